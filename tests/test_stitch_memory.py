"""The stitcher's memory is set by its budget, not by the mosaic's width (a structural bound).

Tiles are cut from one textured image at their commanded positions, so the scans are quick to make;
the accumulator registers, blends and spills them like any other scan.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from hw_sim.synth import SynthParams, grid_for
from runtime.config import ConfigError, DaemonConfig, StitchConfig, config_from_dict
from runtime.ipc.messages import FieldRecord, TileReady
from runtime.output.journal import JOURNAL_NAME, ScanJournal, read_journal
from runtime.output.mosaic_store import MosaicStore
from runtime.stitching.accumulator import DequeAccumulator, MosaicGeometry
from runtime.stitching.spill import SpillCache
from runtime.workers.stitcher import MIN_HELD_MIB, STITCHER_BASE_MIB, JournalObserver, held_budget_mib, reopen_mosaic
from runtime.workers.stitcher import resume as resume_journal

TILE = 64
CHUNK = 32
PARAMS = StitchConfig(stage_sigma_um=1.0, max_stage_error_um=2.0, flatfield=False)


def _scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(128, 60, (h, w, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 1.5), 0, 255).astype(np.uint8)


def _stitch(tmp: Path, cols: int, budget_mib: float, rows: int = 3) -> tuple[DequeAccumulator, np.ndarray]:
    p = SynthParams(fields_x=cols, fields_y=rows, tile=TILE, overlap=0.2)
    plan = grid_for(p)
    g = MosaicGeometry(plan, TILE, TILE, p.pixel_size_um)
    h, w = g.shape
    scene = _scene(h, w)
    store = MosaicStore.create(tmp / "m.zarr", h, w, chunk=CHUNK, pixel_size_um=p.pixel_size_um, min_level_size=16)
    acc = DequeAccumulator(g, store, PARAMS, memory_budget_mib=budget_mib)
    for f in plan.fields:
        y, x = g.top_left(f)
        acc.add(f, scene[y : y + TILE, x : x + TILE])
    assert acc.finish()
    store.finish()
    assert store.complete
    return acc, np.asarray(store.level(0)[...])


def test_held_memory_does_not_grow_with_width(tmp_path: Path) -> None:
    budget = 0.1  # MiB: a few tiles' worth, far less than a scan row of blocks at either width
    narrow, _ = _stitch(tmp_path / "w", 6, budget)
    wide, _ = _stitch(tmp_path / "4w", 24, budget)
    assert wide.geometry.shape[1] >= 3.5 * narrow.geometry.shape[1]
    # Both scans spill: the canvas waiting for the next row does not fit the budget at either width.
    assert narrow.stats.spilled > 0 and wide.stats.spilled > 0
    # More blocks wait at 4x the width (a scan row of them), but RAM stays within the budget plus
    # the array being added (a tile, 12 KiB here) and the trailing strip.
    assert wide.stats.peak_blocks > 3 * narrow.stats.peak_blocks
    slack = TILE * TILE * 3 + TILE * TILE
    for acc in (narrow, wide):
        assert acc.stats.peak_held_bytes <= budget * 2**20 + slack
    assert abs(wide.stats.peak_held_bytes - narrow.stats.peak_held_bytes) <= slack


def test_spilling_changes_no_pixel(tmp_path: Path) -> None:
    tight, m_tight = _stitch(tmp_path / "tight", 8, 0.0)  # below one block: every use is a round trip
    roomy, m_roomy = _stitch(tmp_path / "roomy", 8, 64.0)
    assert tight.stats.spilled > 10 and tight.stats.reloaded > 10
    assert roomy.stats.spilled == 0
    np.testing.assert_array_equal(m_tight, m_roomy)
    # Tiles cut from one image at their commanded positions: the mosaic is that image, inside the
    # clipped border (registration is exact to well under a pixel; resampling blurs slightly).
    h, w = m_tight.shape[:2]
    scene = _scene(h, w).astype(np.float64)
    err = np.abs(m_tight.astype(np.float64) - scene)[4:-4, 4:-4]
    assert err.mean() < 2.0, err.mean()
    assert not (tmp_path / "tight" / "m.zarr.spill").exists()  # the spill folder goes with finish()


def test_spill_cache_keeps_a_budget_and_gives_back_what_it_took(tmp_path: Path) -> None:
    cache = SpillCache(tmp_path / "spill", budget_bytes=3000)
    arrays = {n: np.full((10, 100), n, np.uint8) for n in range(5)}  # 1000 bytes each
    for n, a in arrays.items():
        cache.put((("a", n), a))
        assert cache.held_bytes <= 3000
    assert cache.in_ram == 3 and len(cache) == 5 and cache.spilled == 2
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == ["a_0.raw", "a_1.raw"]
    np.testing.assert_array_equal(cache.get(("a", 0))[0], arrays[0])  # read back; the oldest in RAM goes out
    assert cache.reloaded == 1 and (tmp_path / "spill" / "a_2.raw").exists()
    np.testing.assert_array_equal(cache.pop(("a", 1)), arrays[1])
    assert ("a", 1) not in cache and len(cache) == 4
    cache.discard(("a", 2))
    with pytest.raises(KeyError):
        cache.get(("a", 2))
    cache.close()
    assert not (tmp_path / "spill").exists()


def test_spilled_arrays_come_back_with_their_shape_and_dtype(tmp_path: Path) -> None:
    # The files are the raw pixels: the cache itself keeps what they are.
    cache = SpillCache(tmp_path / "spill", budget_bytes=0)
    arrays = {
        "block": np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3),
        "mask": np.eye(6, dtype=np.bool_),
        "gain": np.linspace(0.5, 2.0, 12, dtype=np.float32).reshape(3, 4),
        "view": np.arange(64, dtype=np.uint16).reshape(8, 8)[::2, 1::3],  # not contiguous
    }
    for name, a in arrays.items():
        cache.put(((name,), a))
    assert cache.spilled == 3  # all but the latest
    for name, a in arrays.items():
        (back,) = cache.get((name,))
        assert back.dtype == a.dtype and back.shape == a.shape
        np.testing.assert_array_equal(back, a)
    cache.close()


def test_the_daemon_budget_sets_the_stitchers_part() -> None:
    assert held_budget_mib(768) == 768 / 3 - STITCHER_BASE_MIB
    assert held_budget_mib(3072) > held_budget_mib(768)
    floor = next(m.ge for m in DaemonConfig.model_fields["memory_budget_mib"].metadata if hasattr(m, "ge"))
    assert held_budget_mib(floor) >= MIN_HELD_MIB  # the smallest budget the config takes is one it can keep
    with pytest.raises(ConfigError, match=r"daemon\.memory_budget_mib"):
        config_from_dict({"daemon": {"memory_budget_mib": floor - 1}})


def _journaled(folder: Path, stop_after: int | None, resume: bool = False, budget_mib: float = 0.0) -> MosaicStore:
    """8 x 3 fields with the scan journal (as the stitcher worker keeps it), up to ``stop_after``
    tiles (then everything is dropped, as a SIGKILL would: spilled drafts, blocks written ahead
    of the journaled rows), or resumed from the journal."""
    p = SynthParams(fields_x=8, fields_y=3, tile=TILE, overlap=0.2)
    plan = grid_for(p)
    g = MosaicGeometry(plan, TILE, TILE, p.pixel_size_um)
    h, w = g.shape
    scene = _scene(h, w)
    observer: JournalObserver | None = None

    def on_rows(level: int, rows: int) -> None:
        if observer is not None:
            observer.rows(level, rows)

    def create() -> MosaicStore:
        return MosaicStore.create(
            folder / "mosaic.zarr",
            h,
            w,
            chunk=CHUNK,
            pixel_size_um=p.pixel_size_um,
            min_level_size=16,
            on_rows=on_rows,
            overwrite=True,
        )

    if resume:
        state = read_journal(folder / JOURNAL_NAME)
        store = reopen_mosaic(folder / "mosaic.zarr", state, create, on_rows)
        journal = ScanJournal.open(folder)
    else:
        store = create()
        header = {"scan_id": "s", "request": {}, "fields": len(plan.fields), "rows": 3, "cols": 8}
        journal = ScanJournal.create(folder, header)
    acc = DequeAccumulator(g, store, PARAMS, memory_budget_mib=budget_mib)
    observer = JournalObserver(journal, folder, g, store)
    acc.observer = observer
    start = 0
    if resume:
        resume_journal(acc, store, state, observer)
        start = len(state.fields)
    for n, f in enumerate(plan.fields[start:], start=start):
        if n == stop_after:
            observer.close()
            store.close()
            return store
        y, x = g.top_left(f)
        tile = scene[y : y + TILE, x : x + TILE]
        observer.save_tile(f.index, tile)
        observer.current = TileReady(0, FieldRecord(f.index, f.row, f.col, f.x_um, f.y_um, 0.0, 1, "test"), f)
        acc.add(f, tile)
        observer.wait_tile(f.index)
    assert acc.finish()
    store.finish()
    observer.close()
    return store


@pytest.mark.parametrize("killed_at", [5, 11, 19])
def test_a_resumed_scan_with_spilled_blocks_is_bit_identical(tmp_path: Path, killed_at: int) -> None:
    (tmp_path / "ref").mkdir()
    ref = _journaled(tmp_path / "ref", None, budget_mib=64.0)  # nothing spilled, never interrupted
    folder = tmp_path / "killed"
    folder.mkdir()
    _journaled(folder, killed_at)
    assert (folder / "mosaic.zarr.spill").is_dir()  # drafts left behind, as after a crash
    resumed = _journaled(folder, None, resume=True)
    for k in range(ref.n_levels):
        np.testing.assert_array_equal(np.asarray(resumed.level(k)[:]), np.asarray(ref.level(k)[:]), f"level {k}")
    assert resumed.complete


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="glibc and Linux page-fault counts")
def test_the_stitchers_allocator_reuses_tile_sized_temporaries_without_paging_them_in_again() -> None:
    """``return_freed_memory``: a 3 MiB temporary (a blend strip, a spilled block read back) freed and made again
    comes from the heap, not a fresh mapping (about 770 page faults each time with the 256 KiB threshold of
    before). In a child process: the setting is process-wide."""
    import subprocess
    import sys

    code = (
        "import resource, numpy as np\n"
        "from runtime.workers.stitcher import return_freed_memory\n"
        "return_freed_memory()\n"
        "a = np.ones(3 << 20, np.uint8); del a\n"
        "f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(10):\n"
        "    a = np.ones(3 << 20, np.uint8); del a\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert int(out.stdout) < 200  # 10 arrays of 768 pages each: reused, not faulted in again
