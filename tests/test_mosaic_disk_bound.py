"""mosaic_bytes_bound: the disk a working mosaic can take, which the scan's disk-space check needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.output.mosaic_store import MosaicStore, mosaic_bytes_bound


def _chunk_bytes(path: Path) -> int:
    """Bytes of the chunk files of every level (not the small Zarr metadata)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


@pytest.mark.parametrize("compressor", ["none", "lz4", "zstd"])
def test_incompressible_mosaic_fits_the_bound(tmp_path: Path, compressor: str) -> None:
    h, w, chunk = 300, 230, 64
    kw = {"chunk": chunk, "min_level_size": 40, "compressor": compressor}
    store = MosaicStore.create(tmp_path / "m.zarr", h, w, pixel_size_um=0.5, **kw)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    # Random pixels: no codec compresses them, and no chunk is all fill (glass), so every chunk is stored.
    for y0 in range(0, h, chunk):
        store.write_band(y0, rng.integers(0, 255, (min(chunk, h - y0), w, 3), dtype=np.uint8))
    store.finish()
    assert store.complete
    stored = _chunk_bytes(tmp_path / "m.zarr")
    bound = mosaic_bytes_bound(h, w, **kw)  # type: ignore[arg-type]
    assert stored <= bound
    raw = sum(hk * wk * 3 for hk, wk in store.level_shapes)
    if compressor == "none":
        assert stored == bound  # every chunk stored raw, edge chunks padded: the bound is exact
    else:
        # Near the bound: only the fill padding of the edge chunks compresses.
        assert stored >= 0.9 * raw


def test_bound_rejects_an_unknown_codec() -> None:
    with pytest.raises(ValueError, match="compressor"):
        mosaic_bytes_bound(100, 100, chunk=64, min_level_size=40, compressor="gzip")
