"""The stitching worker: takes tiles out of the ring, accumulates them into the Zarr mosaic.

It gives each slot back as soon as the tile is pasted, so acquisition is
never held up by more than one paste. Rows of the mosaic that become final
are announced to the writer (:class:`~runtime.ipc.messages.MosaicRows`) as
they are written; after the acquisition's :class:`~runtime.ipc.messages.EndOfStream`
the mosaic is finished and :class:`~runtime.ipc.messages.MosaicDone` goes to the
writer and the scan job. If this worker fails, the writer's stream is ended
without a MosaicDone (the writer then keeps no slide).
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import assert_never

from runtime.config import MosaicConfig, StitchConfig, WriterConfig
from runtime.ipc.messages import (
    EndOfStream,
    EventQueue,
    MosaicDone,
    MosaicRows,
    SlotQueue,
    TileQueue,
    TileReady,
    WriterQueue,
    peak_rss_bytes,
)
from runtime.ipc.ring import RingSpec
from runtime.output.mosaic_store import MosaicStore
from runtime.stitching.accumulator import DequeAccumulator, MosaicGeometry
from runtime.workers.skeleton import POLL_S, WorkerContext, run_worker

log = logging.getLogger("wsi.stitcher")


@dataclass(frozen=True)
class StitchJob:
    """What is particular to this scan (the settings come as config sections beside it)."""

    geometry: MosaicGeometry
    ring: RingSpec
    mosaic_path: str


def stitcher_main(
    job: StitchJob,
    mosaic: MosaicConfig,
    stitch: StitchConfig,
    writer: WriterConfig,
    tiles: TileQueue,
    free_slots: SlotQueue,
    to_writer: WriterQueue,
    events: EventQueue,
) -> None:
    """Process entry point (spawned). Ends on the acquisition's :class:`EndOfStream`.

    ``writer``: for ``min_level_size``, where the mosaic's pyramid (which the writer streams)
    stops."""

    def body(worker: WorkerContext) -> None:
        worker.on_failure(lambda _: to_writer.put(EndOfStream("the stitcher failed")))
        ring = worker.attach(job.ring)
        h, w = job.geometry.shape
        store = MosaicStore.create(
            Path(job.mosaic_path),
            h,
            w,
            chunk=mosaic.chunk,
            pixel_size_um=job.geometry.pixel_size_um,
            compressor=mosaic.compressor,
            min_level_size=writer.min_level_size,
            # The writer streams the OME-TIFF from the rows that become final (see runtime.workers.writer).
            on_rows=lambda level, rows: to_writer.put(MosaicRows(job.mosaic_path, level, rows)),
        )
        acc = DequeAccumulator(job.geometry, store, stitch)
        while True:
            worker.beat()
            try:
                msg = tiles.get(timeout=POLL_S)
            except queue.Empty:
                continue
            match msg:
                case TileReady():
                    acc.add(msg.plan, ring.slot(msg.slot))
                    free_slots.put(msg.slot)
                case EndOfStream():
                    log.debug("tile stream ended: %s", msg.reason)
                    break
                case _:
                    assert_never(msg)
        complete = acc.finish()
        if complete:
            store.finish()
        done = MosaicDone(job.mosaic_path, (h, w), complete, peak_rss_bytes(), acc.summary())
        to_writer.put(done)
        events.put(done)

    run_worker("stitcher", events, body)
