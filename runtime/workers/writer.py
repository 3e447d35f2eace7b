"""The writer worker: streams the pyramidal OME-TIFF while the stitcher builds the mosaic.

The stitcher sends a :class:`~runtime.ipc.messages.MosaicRows` each time more
rows of a mosaic level are final on disk (level 0 per band, the lower levels
as the streaming pyramid completes theirs). The writer encodes the tiles
those rows complete, in parallel, and appends them to the file at once
(:class:`~runtime.output.ome_tiff.OmeTiffStream`), so by the time the last tile is
stitched almost the whole file, lower levels included, is already written;
:class:`~runtime.ipc.messages.MosaicDone` then only leaves the last bands and the
IFDs. Where a tile is a mosaic chunk, the stitcher also announces chunks final
ahead of their rows (:class:`~runtime.ipc.messages.MosaicBlocks`), so the rows that only
the last tile completes are mostly encoded before it. Memory is bounded by the
tiles in flight, not by the slide. The file appears under its final name only
when complete; a cancelled or failed scan
(:class:`~runtime.ipc.messages.EndOfStream`, or a MosaicDone that is not complete)
removes the partial file and keeps the Zarr mosaic for a later export.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Callable
from pathlib import Path
from typing import assert_never

from runtime.config import WriterConfig
from runtime.ipc.messages import (
    EndOfStream,
    EventQueue,
    MosaicBlocks,
    MosaicDone,
    MosaicRows,
    WriterDone,
    WriterQueue,
    peak_rss_bytes,
)
from runtime.output.dicom_wsi import DicomIdentifiers
from runtime.output.mosaic_store import MosaicStore
from runtime.output.ome_tiff import OmeTiffStream
from runtime.workers.skeleton import POLL_S, WorkerContext, run_worker

log = logging.getLogger("wsi.writer")

_SUBSAMPLING = {"2x2": (2, 2), "2x1": (2, 1), "4x1": (4, 1), "1x1": (1, 1)}


def open_stream(cfg: WriterConfig, out_path: str, mosaic_path: str, beat: Callable[[], None]) -> OmeTiffStream:
    """The OME-TIFF stream for the mosaic at ``mosaic_path`` (which the stitcher has created)."""
    return OmeTiffStream(
        MosaicStore.open(Path(mosaic_path)),
        Path(out_path),
        tile=cfg.tile,
        compression=cfg.compression,
        jpeg_quality=cfg.jpeg_quality,
        subsampling=_SUBSAMPLING[cfg.jpeg_subsampling],
        max_workers=cfg.max_workers,
        buffer_mib=cfg.buffer_mib,
        progress=lambda done, total: beat(),
        ngff_out=ngff_path(Path(out_path)) if cfg.ome_zarr else None,
        openslide_levels=cfg.openslide_levels,
        dicom_out=dicom_path(Path(out_path)) if cfg.dicom else None,
        dicom_ids=DicomIdentifiers.from_config(cfg),
    )


def _stem(out: Path) -> str:
    return out.name.removesuffix(".tif").removesuffix(".tiff").removesuffix(".ome")


def ngff_path(out: Path) -> Path:
    """``slide.ome.tif`` -> ``slide.ome.zarr`` (beside it)."""
    return out.with_name(_stem(out) + ".ome.zarr")


def dicom_path(out: Path) -> Path:
    """``slide.ome.tif`` -> ``slide.dicom`` (a folder beside it: a file per level)."""
    return out.with_name(_stem(out) + ".dicom")


def make_durable(path: Path) -> None:
    """fsync the finished slide and the folder that names it. The scan job journals ``completed``
    (and may delete the mosaic and the journal) once this worker is done: the slide must be on disk
    by then, or a power cut could leave a completed scan with neither slide nor mosaic."""
    for target, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))):
        fd = os.open(target, flags | getattr(os, "O_CLOEXEC", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def writer_main(out_path: str, cfg: WriterConfig, from_stitcher: WriterQueue, events: EventQueue) -> None:
    """Process entry point (spawned). Streams the slide as the mosaic grows, finishes on MosaicDone.

    ``out_path``: this scan's slide. An incomplete MosaicDone or an :class:`EndOfStream` (the
    stitcher failed, or the scan job ended the scan) aborts the file: the Zarr mosaic is kept.
    """

    def body(worker: WorkerContext) -> None:
        stream: OmeTiffStream | None = None

        def abort() -> None:
            if stream is not None:
                stream.abort()

        worker.on_failure(lambda _: abort())
        while True:
            worker.beat()
            if stream is not None and stream.busy:
                # Tiles are being encoded: write those done, then look for news without waiting.
                stream.pump(wait_s=0.02)
                try:
                    msg = from_stitcher.get_nowait()
                except queue.Empty:
                    continue
            else:
                try:
                    msg = from_stitcher.get(timeout=POLL_S)
                except queue.Empty:
                    continue
            match msg:
                case MosaicRows():
                    if stream is None:
                        stream = open_stream(cfg, out_path, msg.path, worker.beat)
                    stream.rows_final(msg.level, msg.rows)
                case MosaicBlocks():
                    # Chunks final ahead of their rows (a wide slide's last chunk rows): encoded now,
                    # not after the last tile. The file is the same; it is still a .partial until
                    # finish() and fsynced before WriterDone.
                    if stream is None:
                        stream = open_stream(cfg, out_path, msg.path, worker.beat)
                    stream.blocks_final(msg.level, msg.blocks)
                case MosaicDone(complete=True):
                    if stream is None:  # no band was ever announced (a mosaic finished elsewhere)
                        stream = open_stream(cfg, out_path, msg.path, worker.beat)
                    # Every level is final now: queues whatever was not announced (nothing, normally).
                    for k, (h, _) in enumerate(stream.shapes):
                        stream.rows_final(k, h)
                    summary = stream.finish()
                    make_durable(Path(summary.path))
                    levels = tuple((int(h), int(w)) for h, w in summary.levels)
                    events.put(WriterDone(str(summary.path), levels, summary.seconds, peak_rss_bytes()))
                    return
                case MosaicDone() | EndOfStream():
                    # Cancelled or failed upstream: the Zarr mosaic is kept for a later export.
                    if isinstance(msg, EndOfStream):
                        log.debug("stream ended without a mosaic: %s", msg.reason)
                    abort()
                    events.put(WriterDone(None, (), 0.0, peak_rss_bytes()))
                    return
                case _:
                    assert_never(msg)

    run_worker("writer", events, body)
