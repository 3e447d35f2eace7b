"""The streaming 2x pyramid and the Zarr mosaic it feeds, against a whole-image reference."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr

from runtime.output.mosaic_store import FILL, MosaicError, MosaicStore
from runtime.output.pyramid import PyramidBuilder, downsample2x, level_shapes
from runtime.stitching.spill import SpillCache


def reference_half(img: np.ndarray) -> np.ndarray:
    """Round-half-up mean of 2x2 windows; odd edges replicated. Written independently of cv2."""
    h, w = img.shape[:2]
    p = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge").astype(np.uint32)
    s = p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


def reference_pyramid(img: np.ndarray, n: int) -> list[np.ndarray]:
    levels = [img]
    for _ in range(n - 1):
        levels.append(reference_half(levels[-1]))
    return levels


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- downsample2x


@pytest.mark.parametrize("shape", [(2, 2), (7, 5), (64, 64), (33, 100), (1, 9), (9, 1), (1, 1), (255, 511)])
def test_downsample2x_matches_reference(shape: tuple[int, int]) -> None:
    img = random_image(np.random.default_rng(sum(shape)), *shape)
    assert np.array_equal(downsample2x(img), reference_half(img))


def test_downsample2x_rounds_half_up_and_replicates_edges() -> None:
    img = np.array([[[0], [1], [9]], [[1], [0], [9]], [[4], [5], [7]]], dtype=np.uint8)
    # (0+1+1+0+2)//4 = 1; last column (9+9)/2 = 9; last row (4+5+1)//2 = 5; corner = 7.
    assert downsample2x(img)[..., 0].tolist() == [[1, 9], [5, 7]]
    assert downsample2x(np.full((2, 2, 1), 255, np.uint8))[0, 0, 0] == 255


def test_downsample2x_rejects_other_dtypes() -> None:
    with pytest.raises(TypeError):
        downsample2x(np.zeros((4, 4, 3), np.uint16))


def test_level_shapes_stop_at_min_level_size() -> None:
    assert level_shapes(3000, 2500, 400) == [(3000, 2500), (1500, 1250), (750, 625), (375, 313)]
    assert level_shapes(1024, 10, 1024) == [(1024, 10)]
    assert level_shapes(1025, 10, 1024) == [(1025, 10), (513, 5)]


# ---------------------------------------------------------------- PyramidBuilder


class Sink:
    """Collects emitted bands into whole levels (fine for small test images)."""

    def __init__(self, shapes: list[tuple[int, int]]) -> None:
        self.levels = [np.zeros((h, w, 3), np.uint8) for h, w in shapes]
        self.bands: list[tuple[int, int, int]] = []

    def __call__(self, k: int, y0: int, rows: np.ndarray) -> None:
        self.levels[k][y0 : y0 + rows.shape[0]] = rows
        self.bands.append((k, y0, rows.shape[0]))


@pytest.mark.parametrize("seed", range(6))
def test_builder_equals_whole_image_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(50, 400)), int(rng.integers(50, 400))
    chunk = int(rng.choice([16, 32, 64]))
    img = random_image(rng, h, w)
    shapes = level_shapes(h, w, int(rng.integers(8, 40)))
    sink = Sink(shapes)
    b = PyramidBuilder(shapes, chunk, sink)
    for y in range(0, h, chunk):  # the mosaic's pattern: chunk-row bands
        b.push(img[y : y + chunk])
    ref = reference_pyramid(img, len(shapes))
    for k in range(1, len(shapes)):
        assert np.array_equal(sink.levels[k], ref[k]), f"level {k}"
        assert b.rows_emitted(k) == shapes[k][0]
    # Every band is a whole chunk row (or the bottom of its level): no read-modify-write.
    for k, y0, n in sink.bands:
        assert y0 % chunk == 0
        assert n == chunk or y0 + n == shapes[k][0]
    b.flush()  # after the last row: nothing more to emit
    assert len(sink.bands) == sum(-(-h_ // chunk) for h_, _ in shapes[1:])


def test_builder_accepts_any_band_sizes() -> None:
    rng = np.random.default_rng(7)
    img = random_image(rng, 301, 177)
    shapes = level_shapes(301, 177, 10)
    sink = Sink(shapes)
    b = PyramidBuilder(shapes, 16, sink)
    y = 0
    while y < 301:
        n = int(rng.integers(1, 40))
        b.push(img[y : y + n])
        y += n
    for k, lvl in enumerate(reference_pyramid(img, len(shapes))):
        if k:
            assert np.array_equal(sink.levels[k], lvl)


def test_builder_flush_previews_truncated_image_and_can_continue() -> None:
    rng = np.random.default_rng(3)
    img = random_image(rng, 333, 250)
    shapes = level_shapes(333, 250, 20)
    sink = Sink(shapes)
    b = PyramidBuilder(shapes, 32, sink)
    for y in range(0, 160, 32):
        b.push(img[y : y + 32])
    b.flush()
    for k, lvl in enumerate(reference_pyramid(img[:160], len(shapes))):
        assert np.array_equal(sink.levels[k][: lvl.shape[0]] if k else img[:160], lvl), f"level {k}"
    for y in range(160, 333, 32):
        b.push(img[y : y + 32])
    for k, lvl in enumerate(reference_pyramid(img, len(shapes))):
        if k:
            assert np.array_equal(sink.levels[k], lvl), f"level {k}"


def test_builder_buffers_stay_below_two_chunks_per_level() -> None:
    shapes = level_shapes(4000, 3000, 100)
    b = PyramidBuilder(shapes, 64, lambda k, y, r: None)
    held = [lvl.buf.shape[0] for lvl in b._levels[1:] if lvl is not None]
    assert held and max(held) < 2 * 64


def test_builder_rejects_rows_beyond_the_level() -> None:
    shapes = level_shapes(64, 64, 16)
    b = PyramidBuilder(shapes, 16, lambda k, y, r: None)
    b.push(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="rows"):
        b.push(np.zeros((1, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        PyramidBuilder(shapes, 16, lambda k, y, r: None).push(np.zeros((4, 63, 3), np.uint8))


# ---------------------------------------------------------------- MosaicStore


def write_all(store: MosaicStore, img: np.ndarray, start: int = 0, stop: int | None = None) -> None:
    c = store.chunk
    for y in range(start, img.shape[0] if stop is None else stop, c):
        store.write_band(y, img[y : y + c])


def assert_levels(store: MosaicStore, img: np.ndarray) -> None:
    for k, lvl in enumerate(reference_pyramid(img, store.n_levels)):
        assert np.array_equal(store.level(k)[:], lvl), f"level {k}"


@pytest.mark.parametrize("compressor", ["zstd", "lz4", "none"])
def test_mosaic_store_builds_every_level(tmp_path: Path, compressor: str) -> None:
    img = random_image(np.random.default_rng(1), 700, 530)
    img[:300, :200] = FILL  # blank glass: its chunks are not stored
    store = MosaicStore.create(
        tmp_path / "m.zarr", 700, 530, chunk=64, pixel_size_um=0.25, compressor=compressor, min_level_size=100
    )
    assert store.level_shapes == [(700, 530), (350, 265), (175, 133), (88, 67)]
    assert not store.complete
    write_all(store, img)
    store.finish()
    assert store.complete
    assert_levels(store, img)
    # A plain Zarr reader sees the same pixels (the store writes chunk files itself).
    group = zarr.open_group(tmp_path / "m.zarr", mode="r")
    assert np.array_equal(group["1"][:], reference_half(img))
    assert not (tmp_path / "m.zarr" / "0" / "c" / "0" / "0" / "0").exists()
    again = MosaicStore.open(tmp_path / "m.zarr")
    assert again.complete and again.pixel_size_um == 0.25 and again.chunk == 64 and again.n_levels == 4


def test_mosaic_attrs(tmp_path: Path) -> None:
    store = MosaicStore.create(tmp_path / "m.zarr", 100, 80, chunk=16, pixel_size_um=0.5, attrs={"scan": "s1"})
    store.update_attrs({"objective": "20x"})
    a = zarr.open_group(tmp_path / "m.zarr", mode="r").attrs.asdict()
    assert a["pixel_size_um"] == 0.5 and a["chunk"] == 16 and a["complete"] is False
    assert a["levels"] == [[100, 80]]
    assert a["attrs"] == {"scan": "s1", "objective": "20x"}
    assert MosaicStore.open(tmp_path / "m.zarr").attrs == {"scan": "s1", "objective": "20x"}


def test_bands_must_arrive_in_order_and_whole(tmp_path: Path) -> None:
    store = MosaicStore.create(tmp_path / "m.zarr", 100, 80, chunk=32, pixel_size_um=1.0, min_level_size=20)
    band = np.zeros((32, 80, 3), np.uint8)
    with pytest.raises(ValueError, match="top to bottom"):
        store.write_band(32, band)
    store.write_band(0, band)
    with pytest.raises(ValueError, match="top to bottom"):
        store.write_band(0, band)
    with pytest.raises(ValueError, match="must be"):
        store.write_band(32, band[:16])
    with pytest.raises(ValueError, match="partial=True"):
        store.finish()
    store.write_band(32, band)
    store.write_band(64, band)
    with pytest.raises(ValueError, match="must be"):
        store.write_band(96, band)  # the bottom band has 4 rows
    store.write_band(96, band[:4])
    store.finish()
    with pytest.raises(ValueError, match="complete"):
        store.write_band(96, band[:4])


def test_open_rejects_foreign_directories(tmp_path: Path) -> None:
    with pytest.raises(MosaicError):
        MosaicStore.open(tmp_path)
    zarr.open_group(tmp_path / "g.zarr", mode="w").attrs["format"] = "something else"
    with pytest.raises(MosaicError, match="not a"):
        MosaicStore.open(tmp_path / "g.zarr")


def test_interrupted_mosaic_partial_finish_then_resume(tmp_path: Path) -> None:
    img = random_image(np.random.default_rng(2), 620, 410)
    path = tmp_path / "m.zarr"
    store = MosaicStore.create(path, 620, 410, chunk=32, pixel_size_um=0.5, min_level_size=30)
    write_all(store, img, stop=224)
    del store  # the scan process dies: nothing but the disk survives

    store = MosaicStore.open(path)
    assert store.rows_written == 224 and not store.pyramid_current
    store.finish(partial=True)  # what export does
    assert store.pyramid_current and not store.complete
    for k, lvl in enumerate(reference_pyramid(img[:224], store.n_levels)):
        assert np.array_equal(store.level(k)[: lvl.shape[0]], lvl), f"level {k}"
    assert (store.level(0)[224:] == FILL).all()

    store = MosaicStore.open(path)  # the scan resumes where it stopped
    write_all(store, img, start=store.rows_written)
    store.finish()
    assert store.complete
    assert_levels(store, img)


def test_rebuild_levels_from_level0(tmp_path: Path) -> None:
    img = random_image(np.random.default_rng(4), 530, 700)
    store = MosaicStore.create(tmp_path / "m.zarr", 530, 700, chunk=64, pixel_size_um=0.5, min_level_size=60)
    write_all(store, img)
    store.finish()
    for k in range(1, store.n_levels):
        store.level(k)[:] = 0  # wreck the lower levels
    store.rebuild_levels(max_workers=2)
    assert_levels(store, img)


def test_write_band_memory_is_bands_not_levels(tmp_path: Path) -> None:
    h = w = 4096
    chunk = 256
    band_bytes = chunk * w * 3
    store = MosaicStore.create(tmp_path / "m.zarr", h, w, chunk=chunk, pixel_size_um=1.0, min_level_size=256)
    band = random_image(np.random.default_rng(5), chunk, w)
    tracemalloc.start()
    try:
        for y in range(0, h, chunk):
            store.write_band(y, band)
        store.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Level 0 is 16 bands and level 1 four: holding either would blow this bound.
    assert peak < 3 * band_bytes, f"peak {peak / 2**20:.1f} MiB vs band {band_bytes / 2**20:.1f} MiB"


# ---------------------------------------------------------------- block-wise writing (the stitcher's path)


def write_blocks(store: MosaicStore, img: np.ndarray, rows: range, reverse: bool = False) -> None:
    c = store.chunk
    cols = range(-(-img.shape[1] // c))
    for i in rows:
        for j in reversed(cols) if reverse else cols:
            store.write_block(i, j, img[i * c : (i + 1) * c, j * c : (j + 1) * c])


def test_blocks_and_completed_rows_build_every_level(tmp_path: Path) -> None:
    img = random_image(np.random.default_rng(6), 700, 530)
    img[:300, :200] = FILL
    seen: list[tuple[int, int]] = []
    store = MosaicStore.create(
        tmp_path / "m.zarr",
        700,
        530,
        chunk=64,
        pixel_size_um=0.5,
        min_level_size=100,
        on_rows=lambda k, r: seen.append((k, r)),
    )
    n = -(-700 // 64)
    # Blocks of the next chunk row go out before the row above is complete (right to left).
    write_blocks(store, img, range(0, 2), reverse=True)
    assert store.rows_written == 0 and seen == []
    store.complete_rows(64)
    assert seen == [(0, 64)]  # level 1's first chunk row needs level-0 rows up to 128
    write_blocks(store, img, range(2, n))
    store.complete_rows(128)
    store.complete_rows(700)
    for k in range(store.n_levels):
        rows = [r for lvl, r in seen if lvl == k]
        assert rows == sorted(rows) and rows[-1] == store.level_shapes[k][0], (k, rows)
    assert store.pyramid_current
    store.finish()
    assert store.complete
    assert_levels(store, img)
    assert not (tmp_path / "m.zarr" / "0" / "c" / "0" / "0" / "0").exists()  # glass is not stored


def test_completed_rows_drop_stale_blocks_and_resume(tmp_path: Path) -> None:
    img = random_image(np.random.default_rng(7), 300, 200)
    path = tmp_path / "m.zarr"
    # One I/O thread writes in the caller's thread: the block is on disk when the "scan dies".
    store = MosaicStore.create(path, 300, 200, chunk=32, pixel_size_um=0.5, min_level_size=40, io_workers=1)
    write_blocks(store, img, range(0, 4))
    store.complete_rows(96)
    store.write_block(3, 1, np.zeros((32, 32, 3), np.uint8))  # written ahead, then the scan dies
    del store

    store = MosaicStore.open(path)  # the resumed scan does not write block (3, 1): it is glass
    assert store.rows_written == 96
    glass = img.copy()
    glass[96:128, 32:64] = FILL
    for i in range(3, 10):
        for j in range(7):
            if (i, j) != (3, 1):
                store.write_block(i, j, glass[i * 32 : (i + 1) * 32, j * 32 : (j + 1) * 32])
    store.complete_rows(300)
    store.finish()
    assert_levels(store, glass)
    with pytest.raises(ValueError, match="complete"):
        store.write_block(0, 0, img[:32, :32])


def assert_lower_levels(store: MosaicStore, img: np.ndarray) -> None:
    for k, lvl in enumerate(reference_pyramid(img, store.n_levels)[1:], start=1):
        assert np.array_equal(store.level(k)[:], lvl), f"level {k}"


def _corrupt_level0(path: Path, rows: range) -> int:
    """Overwrite the stored level-0 chunk files of chunk rows ``rows`` with bytes no codec decodes."""
    n = 0
    for i in rows:
        for f in (path / "0" / "c" / str(i)).glob("*/*"):
            f.write_bytes(b"not a zstd frame")
            n += 1
    return n


@pytest.mark.parametrize("budget", [0, 1 << 20])
def test_kept_pieces_build_every_level_without_reading_level_0_back(tmp_path: Path, budget: int) -> None:
    img = random_image(np.random.default_rng(9), 700, 530)
    img[:300, :200] = FILL
    path = tmp_path / "m.zarr"
    # One I/O thread: each block is on disk when write_block returns, so it can be spoilt below.
    store = MosaicStore.create(path, 700, 530, chunk=64, pixel_size_um=0.5, min_level_size=100, io_workers=1)
    cache = SpillCache(tmp_path / "spill", budget)  # 0: every piece waits on disk
    store.keep_pieces(cache)
    n = -(-700 // 64)
    write_blocks(store, img, range(0, 2), reverse=True)
    store.complete_rows(64)
    write_blocks(store, img, range(2, n))
    # Level 0 is final and its pieces are kept: spoil its files; the lower levels never read them.
    assert _corrupt_level0(path, range(n)) > 0
    store.complete_rows(700)
    store.finish()
    assert_lower_levels(store, img)
    assert len(cache) == 0  # every piece was used
    assert (cache.reloaded > 0) == (budget == 0)


def test_pieces_lost_with_the_process_are_read_back(tmp_path: Path) -> None:
    img = random_image(np.random.default_rng(10), 300, 200)
    path = tmp_path / "m.zarr"
    store = MosaicStore.create(path, 300, 200, chunk=32, pixel_size_um=0.5, min_level_size=40, io_workers=1)
    store.keep_pieces(SpillCache(tmp_path / "spill", 1 << 20))
    write_blocks(store, img, range(0, 3))
    store.complete_rows(96)  # level 1 has rows [0, 32): the pieces of level-0 row 2 wait
    assert store.level_rows_written(1) == 32
    del store  # the scan dies: its pieces go with it

    store = MosaicStore.open(path, io_workers=1)
    store.keep_pieces(SpillCache(tmp_path / "spill", 1 << 20))
    write_blocks(store, img, range(3, -(-300 // 32)))
    _corrupt_level0(path, range(3, -(-300 // 32)))  # the new blocks' pieces are kept ...
    store.complete_rows(300)  # ... row 2's are read back from disk
    store.finish()
    assert_lower_levels(store, img)

    store2 = MosaicStore.create(
        tmp_path / "n.zarr", 300, 200, chunk=32, pixel_size_um=0.5, min_level_size=40, io_workers=1
    )
    write_blocks(store2, img, range(0, 3))
    store2.complete_rows(96)
    write_blocks(store2, img, range(3, -(-300 // 32)))
    _corrupt_level0(tmp_path / "n.zarr", range(3, -(-300 // 32)))
    with pytest.raises(MosaicError):  # without pieces the spoilt chunks are read back: the test can fail
        store2.complete_rows(300)


def test_blocks_are_checked(tmp_path: Path) -> None:
    store = MosaicStore.create(tmp_path / "m.zarr", 100, 80, chunk=32, pixel_size_um=1.0, min_level_size=20)
    with pytest.raises(ValueError, match="must be"):
        store.write_block(0, 2, np.zeros((32, 32, 3), np.uint8))  # the last column has 16
    store.write_block(3, 2, np.zeros((4, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="cannot complete"):
        store.complete_rows(40)
    store.complete_rows(32)
    with pytest.raises(ValueError, match="already written"):
        store.write_block(0, 0, np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="outside"):
        store.write_block(4, 0, np.zeros((32, 32, 3), np.uint8))


def test_block_path_memory_is_chunks_not_rows(tmp_path: Path) -> None:
    h, w, chunk = 1024, 16384, 128
    store = MosaicStore.create(tmp_path / "m.zarr", h, w, chunk=chunk, pixel_size_um=1.0, min_level_size=256)
    block = random_image(np.random.default_rng(8), chunk, chunk)
    tracemalloc.start()
    try:
        for i in range(h // chunk):
            for j in range(w // chunk):
                store.write_block(i, j, block)
            store.complete_rows((i + 1) * chunk)
        store.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A chunk row of level 0 is 6 MiB here, level 1's 3 MiB: the pyramid holds a few chunks per thread
    # (measured 1.2 MiB, the I/O threads' scratch buffers mostly).
    assert peak < 2 * 2**20, f"peak {peak / 2**20:.2f} MiB"
