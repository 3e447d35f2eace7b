"""The writer worker's protocol: MosaicRows while the mosaic grows, then MosaicDone (complete or not)."""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from runtime.config import WriterConfig
from runtime.ipc.messages import EndOfStream, Heartbeat, MosaicDone, MosaicRows, WriterDone
from runtime.output.mosaic_store import MosaicStore
from runtime.output.ome_tiff import partial_path
from runtime.workers.writer import open_stream, writer_main
from tests.test_ome_tiff import PIXEL_UM, make_mosaic, smooth_image
from tests.test_tiff_stream import reference_pyramid


def _run_writer(
    tmp_path: Path, complete: bool, stop_after_bands: int | None = None
) -> tuple[WriterDone, Path, np.ndarray, MosaicStore]:
    h, w, chunk = 900, 700, 128
    img = smooth_image(h, w, seed=9)
    ctx = mp.get_context("spawn")
    to_writer: Any = ctx.Queue()
    events: Any = ctx.Queue()
    path = tmp_path / "mosaic.zarr"
    store = MosaicStore.create(
        path,
        h,
        w,
        chunk=chunk,
        pixel_size_um=PIXEL_UM,
        min_level_size=100,
        on_rows=lambda level, rows: to_writer.put(MosaicRows(str(path), level, rows)),
    )
    out = tmp_path / "slide.ome.tif"
    cfg = WriterConfig(tile=chunk, compression="zstd", max_workers=2, buffer_mib=1)
    t = threading.Thread(target=writer_main, args=(str(out), cfg, to_writer, events), daemon=True)
    t.start()
    bands = range(0, h, chunk) if stop_after_bands is None else range(0, stop_after_bands * chunk, chunk)
    for y in bands:
        store.write_band(y, img[y : y + chunk])
    if complete:
        store.finish()
    else:
        # The writer starts the file as soon as it hears of the first final rows, during the scan.
        deadline = time.monotonic() + 10
        while not partial_path(out).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert partial_path(out).exists(), "the writer should have started the file during the scan"
    to_writer.put(MosaicDone(str(path), (h, w), complete, 0))
    t.join(60)
    assert not t.is_alive()
    while True:
        msg = events.get(timeout=5)
        if not isinstance(msg, Heartbeat):
            break
    assert isinstance(msg, WriterDone)
    for q in (to_writer, events):
        q.close()
    return msg, out, img, store


def test_complete_scan_gives_the_whole_pyramid(tmp_path: Path) -> None:
    done, out, img, store = _run_writer(tmp_path, complete=True)
    assert done.path == str(out) and done.levels == tuple(store.level_shapes)
    assert not partial_path(out).exists()
    expected = reference_pyramid(img, store.n_levels)
    with tifffile.TiffFile(out) as tif:
        # writer.openslide_levels (default): the lower levels are top-level IFDs too, for OpenSlide.
        assert len(tif.pages) == len(tif.series[0].levels) == store.n_levels
        for k, lvl in enumerate(tif.series[0].levels):
            assert np.array_equal(lvl.asarray(), expected[k]), f"level {k}"


def test_openslide_levels_switch(tmp_path: Path) -> None:
    """``writer.openslide_levels = false``: the strict OME-TIFF layout (one top-level IFD)."""
    store = make_mosaic(tmp_path / "m.zarr", smooth_image(300, 200, seed=11), chunk=64, min_level_size=60)
    for on in (True, False):
        out = tmp_path / f"{on}.ome.tif"
        cfg = WriterConfig(tile=64, compression="none", openslide_levels=on)
        stream = open_stream(cfg, str(out), str(store.path), lambda: None)
        for k, (h, _) in enumerate(store.level_shapes):
            stream.rows_final(k, h)
        stream.finish()
        with tifffile.TiffFile(out) as tif:
            assert len(tif.pages) == (store.n_levels if on else 1)
            assert len(tif.series[0].levels) == store.n_levels == 4


def test_cancelled_scan_removes_the_partial_file(tmp_path: Path) -> None:
    done, out, _, store = _run_writer(tmp_path, complete=False, stop_after_bands=4)
    assert done.path is None and done.levels == ()
    assert not out.exists() and not partial_path(out).exists()
    assert store.rows_written == 4 * 128  # the mosaic is kept for a later export


def test_no_news_is_not_an_error(tmp_path: Path) -> None:
    """A writer told nothing keeps beating until its stream ends (EndOfStream: the stitcher failed)."""
    ctx = mp.get_context("spawn")
    to_writer: Any = ctx.Queue()
    events: Any = ctx.Queue()
    out = str(tmp_path / "slide.ome.tif")
    t = threading.Thread(target=writer_main, args=(out, WriterConfig(), to_writer, events), daemon=True)
    t.start()
    assert isinstance(events.get(timeout=5), Heartbeat)
    to_writer.put(EndOfStream("the stitcher failed"))
    t.join(10)
    msgs = []
    while True:
        try:
            msgs.append(events.get(timeout=1))
        except queue.Empty:
            break
    done = [m for m in msgs if isinstance(m, WriterDone)]
    assert len(done) == 1 and done[0].path is None
    assert list(tmp_path.iterdir()) == []
