"""Blocks ahead of rows, stitcher -> writer (issue 15's tail): the mosaic store announces chunks final
on disk before their chunk row is (and builds the lower levels' chunks as soon as their sources are),
the writer encodes them at once (MosaicBlocks -> OmeTiffStream.blocks_final). The slide must be the
one the rows-only path writes, tile for tile, also after a cancelled scan is resumed. Real Zarr
stores, a real daemon with its processes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from runtime.config import RuntimeConfig
from runtime.control.client import ControlClient
from runtime.daemon.process import daemon_running, wait_finished
from runtime.output.journal import JOURNAL_NAME, read_journal
from runtime.output.mosaic_store import MosaicStore
from runtime.output.ome_tiff import partial_path, write_ome_tiff
from runtime.stitching.spill import SpillCache
from runtime.workers.writer import _SUBSAMPLING
from tests import slide_readers
from tests.conftest import daemon_config
from tests.test_ome_tiff_blocks import _tile_bytes
from tests.test_pyramid import assert_levels, random_image, reference_pyramid
from tests.test_resume import SECTIONS, power_cut, psnr

# ---------------------------------------------------------------- the store


def test_blocks_and_their_pyramid_are_announced_ahead_of_rows(tmp_path: Path) -> None:
    """A scan two field rows high: chunk row 0 is final by rows early, every other chunk row only
    with the last tile -- but block by block, column by column, as the bottom field row is scanned."""
    img = random_image(np.random.default_rng(21), 700, 530)
    img[400:, 300:] = 255  # glass: blocks of pure fill (not stored) are final too
    c = 64
    ahead: list[set[tuple[int, int]]] = [set() for _ in range(8)]

    def on_blocks(k: int, blocks: list[tuple[int, int]]) -> None:
        for i, j in blocks:
            # Final on disk when announced, and ahead of the rows: what the writer relies on.
            assert i * c >= store.level_rows_written(k), (k, i, j)
            want = ref[k][i * c : (i + 1) * c, j * c : (j + 1) * c]
            assert np.array_equal(store.read_chunk(k, i, j), want), (k, i, j)
            assert (i, j) not in ahead[k], f"announced twice: {(k, i, j)}"
            ahead[k].add((i, j))

    store = MosaicStore.create(
        tmp_path / "m.zarr", 700, 530, chunk=c, pixel_size_um=0.5, min_level_size=64, on_blocks=on_blocks
    )
    ref = reference_pyramid(img, store.n_levels)
    cache = SpillCache(tmp_path / "spill", 1 << 16)  # small: pieces spill, as they may in a scan
    store.keep_pieces(cache)
    rows, cols = -(-700 // c), -(-530 // c)
    for j in range(cols):
        store.write_block(0, j, img[:c, j * c : (j + 1) * c])
    store.complete_rows(c)
    for j in range(cols):  # the bottom field row: every remaining chunk row, a column at a time
        for i in range(1, rows):
            store.write_block(i, j, img[i * c : (i + 1) * c, j * c : (j + 1) * c])
    store.complete_rows(700)
    store.finish()
    assert_levels(store, img)  # the same pyramid as rows (and as a whole-image reference)
    assert len(cache) == 0  # every piece used once: memory bounded as on the rows path
    # Every level-0 chunk went out ahead of its row, and every lower level had chunks built ahead.
    assert ahead[0] == {(i, j) for i in range(rows) for j in range(cols)}
    assert all(ahead[k] for k in range(store.n_levels)), [len(a) for a in ahead]
    assert not any(ahead[store.n_levels :])


def test_a_rewound_store_announces_only_what_it_writes_again(tmp_path: Path) -> None:
    img = random_image(np.random.default_rng(22), 300, 200)
    path = tmp_path / "m.zarr"
    store = MosaicStore.create(path, 300, 200, chunk=32, pixel_size_um=0.5, min_level_size=40)
    store.keep_pieces(SpillCache(tmp_path / "spill", 1 << 20))
    for i in range(4):
        for j in range(7):
            store.write_block(i, j, img[i * 32 : (i + 1) * 32, j * 32 : (j + 1) * 32])
    store.complete_rows(96)  # row 3's blocks are ahead, then the scan dies
    store.close()
    seen: list[tuple[int, int, int]] = []
    store = MosaicStore.open(path, on_blocks=lambda k, b: seen.extend((k, i, j) for i, j in b))
    store.keep_pieces(SpillCache(tmp_path / "spill2", 1 << 20))
    store.rewind(64)
    assert seen == []  # nothing was written by this store yet
    for i in range(2, 10):
        for j in range(7):
            store.write_block(i, j, img[i * 32 : (i + 1) * 32, j * 32 : (j + 1) * 32])
    store.complete_rows(300)  # the last blocks are announced once written, before the rows
    assert sorted((i, j) for k, i, j in seen if k == 0) == [(i, j) for i in range(2, 10) for j in range(7)]
    store.finish()
    assert_levels(store, img)


# ---------------------------------------------------------------- the daemon


def _scan(cfg: RuntimeConfig, name: str) -> Path:
    with daemon_running(cfg) as (_, client):
        scan_id = client.request("start_scan", output_name=name)["scan_id"]
        assert wait_finished(client, scan_id)["last_finish"] == "completed"
    return cfg.daemon.data_root / name


def assert_rows_only_slide(folder: Path, cfg: RuntimeConfig) -> None:
    """The slide has the tiles the rows-only path writes from the same mosaic, and some were
    written ahead of their rows (level-0 tiles out of row-major order in the file)."""
    store = MosaicStore.open(folder / "mosaic.zarr")
    w = cfg.writer
    rows_only = folder / "rows-only.ome.tif"
    write_ome_tiff(
        store,
        rows_only,
        tile=w.tile,
        compression=w.compression,
        jpeg_quality=w.jpeg_quality,
        subsampling=_SUBSAMPLING[w.jpeg_subsampling],
        openslide_levels=w.openslide_levels,
    )
    slide = folder / "slide.ome.tif"
    assert _tile_bytes(slide) == _tile_bytes(rows_only)
    with tifffile.TiffFile(slide) as tif:
        offsets = list(tif.series[0].levels[0].keyframe.dataoffsets)
    assert offsets != sorted(offsets), "no level-0 tile was written ahead of its row"
    h, wd = store.shape
    sizes = slide_readers.expected_sizes(h, wd, store.n_levels)
    slide_readers.check_tifffile(slide, sizes, store.pixel_size_um)
    slide_readers.check_tiffslide(slide, sizes, store.pixel_size_um)


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory, small_recording: Path) -> tuple[Path, RuntimeConfig]:
    root = tmp_path_factory.mktemp("blocks")
    cfg = daemon_config(root / "data", Path("/tmp") / f"wsirt-blk-{os.getpid()}", small_recording, **SECTIONS)
    return _scan(cfg, "ref"), cfg


def test_a_scan_writes_blocks_ahead_and_the_rows_only_slide(scanned: tuple[Path, RuntimeConfig]) -> None:
    folder, cfg = scanned
    assert cfg.writer.tile == cfg.mosaic.chunk and not cfg.writer.dicom  # the block path is on
    assert_rows_only_slide(folder, cfg)


def _slow_config(tmp_path: Path, small_recording: Path, name: str) -> RuntimeConfig:
    return daemon_config(
        tmp_path / "data",
        Path("/tmp") / f"wsirt-{name}-{os.getpid()}",
        None,
        driver={"options": {"recording": str(small_recording), "pace": 2.0}},
        **SECTIONS,
    )


def _start_and_wait(client: ControlClient, name: str, fields: int) -> str:
    scan_id: str = client.request("start_scan", output_name=name)["scan_id"]
    deadline = time.monotonic() + 60
    while (st := client.request("status"))["fields_done"] < fields:
        assert time.monotonic() < deadline, st
        time.sleep(0.02)
    return scan_id


def _assert_resumed_slide(folder: Path, cfg: RuntimeConfig, reference: Path) -> None:
    report: dict[str, Any] = json.loads((folder / "report.json").read_text())
    assert report["complete"] and report["resumed"] == 1
    assert_rows_only_slide(folder, cfg)
    a = tifffile.imread(folder / "slide.ome.tif", level=0)
    b = tifffile.imread(reference / "slide.ome.tif", level=0)
    assert a.shape == b.shape and psnr(a, b) >= 45.0  # positions may differ by < 0.05 px on a resume


def test_a_cancelled_scan_resumed_through_blocks_gives_the_same_slide(
    tmp_path: Path, small_recording: Path, scanned: tuple[Path, RuntimeConfig]
) -> None:
    """The cancel flushes every block (announced, then the .partial is dropped); the resume rewinds
    the mosaic to the journal and announces only the blocks it writes again."""
    cfg = _slow_config(tmp_path, small_recording, "blkc")
    folder = cfg.daemon.data_root / "cancelled"
    with daemon_running(cfg) as (_, client):
        scan_id = _start_and_wait(client, "cancelled", 5)
        client.request("cancel")
        assert wait_finished(client, scan_id)["last_finish"] == "cancelled"
        assert not (folder / "slide.ome.tif").exists()
        client.request("start_scan", resume=scan_id)
        assert wait_finished(client, scan_id)["last_finish"] == "completed"
    _assert_resumed_slide(folder, cfg, scanned[0])


def test_a_scan_killed_with_blocks_in_flight_resumes_to_the_same_slide(
    tmp_path: Path, small_recording: Path, scanned: tuple[Path, RuntimeConfig]
) -> None:
    """SIGKILL to every process while the writer has tiles ahead of their rows in its .partial: the
    resumed scan's writer starts the slide afresh from the journaled rows and the blocks it hears of."""
    cfg = _slow_config(tmp_path, small_recording, "blkk")
    folder = cfg.daemon.data_root / "killed"
    with daemon_running(cfg) as (proc, client):
        scan_id = _start_and_wait(client, "killed", 6)
        # Fields captured are not tiles written: on a loaded machine the writer may not have begun the
        # slide yet, so cut the power once it has (the scan is paced to last much longer than this).
        deadline = time.monotonic() + 60
        while not partial_path(folder / "slide.ome.tif").exists():
            assert time.monotonic() < deadline, client.request("status")
            time.sleep(0.02)
        power_cut(proc.pid)
        proc.join(10)
    assert not read_journal(folder / JOURNAL_NAME).completed and not (folder / "slide.ome.tif").exists()
    assert partial_path(folder / "slide.ome.tif").exists()  # the writer had begun the slide
    fast = daemon_config(tmp_path / "data", Path("/tmp") / f"wsirt-blkk-{os.getpid()}", small_recording, **SECTIONS)
    with daemon_running(fast) as (_, client2):
        client2.request("start_scan", resume=scan_id)
        assert wait_finished(client2, scan_id)["last_finish"] == "completed"
    _assert_resumed_slide(folder, cfg, scanned[0])
