"""The stitching worker: takes tiles out of the ring, accumulates them into the Zarr mosaic.

It gives each slot back as soon as the tile is pasted, so acquisition is
never held up by more than one paste.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

from runtime.errors import log_failure
from runtime.ipc.lifetime import bind_to_parent
from runtime.ipc.messages import HeartbeatSender, MosaicDone, MosaicRows, TileReady, WorkerFailed, peak_rss_bytes
from runtime.ipc.ring import AttachedRing, RingSpec
from runtime.output.mosaic_store import MosaicStore
from runtime.stitching.accumulator import DequeAccumulator, MosaicGeometry, StitchParams

log = logging.getLogger("wsi.stitcher")


@dataclass(frozen=True)
class StitchJob:
    geometry: MosaicGeometry
    ring: RingSpec
    mosaic_path: str
    chunk: int
    compressor: str
    min_level_size: int
    params: StitchParams = field(default_factory=StitchParams)


def stitcher_main(
    job: StitchJob, tiles: Queue[Any], free_slots: Queue[int], to_writer: Queue[Any], events: Queue[Any]
) -> None:
    """Process entry point (spawned). Ends on the acquisition's END_OF_SCAN marker."""
    bind_to_parent()  # die with the supervisor (runtime/ipc/lifetime.py)
    hb = HeartbeatSender("stitcher", events)
    ring: AttachedRing | None = None
    try:
        ring = AttachedRing(job.ring)
        h, w = job.geometry.shape
        store = MosaicStore.create(
            Path(job.mosaic_path),
            h,
            w,
            chunk=job.chunk,
            pixel_size_um=job.geometry.pixel_size_um,
            compressor=job.compressor,
            min_level_size=job.min_level_size,
            # The writer streams the OME-TIFF from the rows that become final (see runtime.workers.writer).
            on_rows=lambda level, rows: to_writer.put(MosaicRows(job.mosaic_path, level, rows)),
        )
        acc = DequeAccumulator(job.geometry, store, job.params)
        while True:
            hb.beat()
            try:
                msg = tiles.get(timeout=0.2)
            except queue.Empty:
                continue
            if msg is None:
                break
            assert isinstance(msg, TileReady)
            acc.add(msg.plan, ring.slot(msg.slot))
            free_slots.put(msg.slot)
        complete = acc.finish()
        if complete:
            store.finish()
        done = MosaicDone(job.mosaic_path, (h, w), complete, peak_rss_bytes(), acc.summary())
        to_writer.put(done)
        events.put(done)
    except Exception as err:
        events.put(WorkerFailed("stitcher", log_failure(log, "stitcher worker failed", err)))
        to_writer.put(None)
        raise SystemExit(1) from None
    finally:
        if ring is not None:
            ring.close()
