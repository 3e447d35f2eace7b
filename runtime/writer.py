"""The writer worker: turns the finished Zarr mosaic into a pyramidal OME-TIFF.

Memory is bounded by tile size (see runtime.ome_tiff); the file appears
under its final name only when complete.
"""

from __future__ import annotations

import queue
import traceback
from dataclasses import dataclass
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

from runtime.config import WriterConfig
from runtime.messages import HeartbeatSender, MosaicDone, WorkerFailed, WriterDone, peak_rss_bytes
from runtime.mosaic import MosaicStore
from runtime.ome_tiff import write_ome_tiff


@dataclass(frozen=True)
class WriteJob:
    out_path: str
    settings: WriterConfig


def writer_main(job: WriteJob, from_stitcher: Queue[Any], events: Queue[Any]) -> None:
    """Process entry point (spawned). Waits for the mosaic, writes, reports."""
    hb = HeartbeatSender("writer", events)
    try:
        while True:
            hb.beat()
            try:
                msg = from_stitcher.get(timeout=0.2)
            except queue.Empty:
                continue
            break
        if not isinstance(msg, MosaicDone) or not msg.complete:
            # Cancelled or failed upstream: the Zarr mosaic is kept for a later export.
            events.put(WriterDone(None, (), 0.0, peak_rss_bytes()))
            return
        store = MosaicStore.open(Path(msg.path))
        s = job.settings
        summary = write_ome_tiff(
            store,
            Path(job.out_path),
            tile=s.tile,
            compression=s.compression,
            jpeg_quality=s.jpeg_quality,
            max_workers=s.max_workers,
            buffer_mib=s.buffer_mib,
            progress=lambda done, total: hb.beat(),
        )
        levels = tuple((int(h), int(w)) for h, w in summary.levels)
        events.put(WriterDone(str(summary.path), levels, summary.seconds, peak_rss_bytes()))
    except Exception as err:
        events.put(WorkerFailed("writer", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None
