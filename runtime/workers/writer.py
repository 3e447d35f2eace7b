"""The writer worker: streams the pyramidal OME-TIFF while the stitcher builds the mosaic.

The stitcher sends a :class:`~runtime.ipc.messages.MosaicRows` each time more
rows of a mosaic level are final on disk (level 0 per band, the lower levels
as the streaming pyramid completes theirs). The writer encodes the tiles
those rows complete, in parallel, and appends them to the file at once
(:class:`~runtime.output.ome_tiff.OmeTiffStream`), so by the time the last tile is
stitched almost the whole file, lower levels included, is already written;
:class:`~runtime.ipc.messages.MosaicDone` then only leaves the last bands and the
IFDs. Memory is bounded by the tiles in flight, not by the slide. The file
appears under its final name only when complete; a cancelled or failed scan
removes the partial file and keeps the Zarr mosaic for a later export.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

from runtime.config import WriterConfig
from runtime.errors import log_failure
from runtime.ipc.lifetime import bind_to_parent
from runtime.ipc.messages import HeartbeatSender, MosaicDone, MosaicRows, WorkerFailed, WriterDone, peak_rss_bytes
from runtime.output.mosaic_store import MosaicStore
from runtime.output.ome_tiff import OmeTiffStream

log = logging.getLogger("wsi.writer")

_SUBSAMPLING = {"2x2": (2, 2), "2x1": (2, 1), "4x1": (4, 1), "1x1": (1, 1)}


@dataclass(frozen=True)
class WriteJob:
    out_path: str
    settings: WriterConfig


def open_stream(job: WriteJob, mosaic_path: str, hb: HeartbeatSender) -> OmeTiffStream:
    """The OME-TIFF stream for the mosaic at ``mosaic_path`` (which the stitcher has created)."""
    s = job.settings
    return OmeTiffStream(
        MosaicStore.open(Path(mosaic_path)),
        Path(job.out_path),
        tile=s.tile,
        compression=s.compression,
        jpeg_quality=s.jpeg_quality,
        subsampling=_SUBSAMPLING[s.jpeg_subsampling],
        max_workers=s.max_workers,
        buffer_mib=s.buffer_mib,
        progress=lambda done, total: hb.beat(),
        ngff_out=ngff_path(Path(job.out_path)) if s.ome_zarr else None,
    )


def ngff_path(out: Path) -> Path:
    """``slide.ome.tif`` -> ``slide.ome.zarr`` (beside it)."""
    stem = out.name.removesuffix(".tif").removesuffix(".tiff").removesuffix(".ome")
    return out.with_name(stem + ".ome.zarr")


def writer_main(job: WriteJob, from_stitcher: Queue[Any], events: Queue[Any]) -> None:
    """Process entry point (spawned). Streams the slide as the mosaic grows, finishes on MosaicDone."""
    bind_to_parent()  # die with the supervisor (runtime/ipc/lifetime.py)
    hb = HeartbeatSender("writer", events)
    stream: OmeTiffStream | None = None
    try:
        while True:
            hb.beat()
            if stream is not None and stream.busy:
                # Tiles are being encoded: write those done, then look for news without waiting.
                stream.pump(wait_s=0.02)
                try:
                    msg = from_stitcher.get_nowait()
                except queue.Empty:
                    continue
            else:
                try:
                    msg = from_stitcher.get(timeout=0.2)
                except queue.Empty:
                    continue
            if isinstance(msg, MosaicRows):
                if stream is None:
                    stream = open_stream(job, msg.path, hb)
                stream.rows_final(msg.level, msg.rows)
                continue
            break
        if not isinstance(msg, MosaicDone) or not msg.complete:
            # Cancelled or failed upstream: the Zarr mosaic is kept for a later export.
            if stream is not None:
                stream.abort()
            events.put(WriterDone(None, (), 0.0, peak_rss_bytes()))
            return
        if stream is None:  # no band was ever announced (a mosaic finished elsewhere)
            stream = open_stream(job, msg.path, hb)
        # Every level is final now: queues whatever was not announced (nothing, normally).
        for k, (h, _) in enumerate(stream.shapes):
            stream.rows_final(k, h)
        summary = stream.finish()
        levels = tuple((int(h), int(w)) for h, w in summary.levels)
        events.put(WriterDone(str(summary.path), levels, summary.seconds, peak_rss_bytes()))
    except Exception as err:
        if stream is not None:
            stream.abort()
        events.put(WorkerFailed("writer", log_failure(log, "writer worker failed", err)))
        raise SystemExit(1) from None
