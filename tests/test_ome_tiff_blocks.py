"""OmeTiffStream.blocks_final: tiles written ahead of their rows make the same, valid OME-TIFF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from runtime.output.mosaic_store import MosaicStore
from runtime.output.ome_tiff import OmeTiffStream, write_ome_tiff
from tests import slide_readers
from tests.test_ome_tiff import PIXEL_UM, make_mosaic, smooth_image


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory: pytest.TempPathFactory) -> MosaicStore:
    return make_mosaic(tmp_path_factory.mktemp("mosaic") / "m.zarr", smooth_image(1100, 1500))


def _tile_bytes(path: Path) -> list[list[bytes]]:
    """Every tile's stored bytes, per level, in tile order (not file order)."""
    out = []
    with tifffile.TiffFile(path) as tif, open(path, "rb") as f:
        for lvl in tif.series[0].levels:
            page = lvl.keyframe
            tiles = []
            for off, n in zip(page.dataoffsets, page.databytecounts, strict=True):
                f.seek(off)
                tiles.append(f.read(n))
            out.append(tiles)
    return out


def _stream_blocks_first(store: MosaicStore, out: Path, compression: str) -> OmeTiffStream:
    """Announce every other tile of each level as a block, let them be written, then the rows."""
    stream = OmeTiffStream(store, out, tile=store.chunk, compression=compression)  # type: ignore[arg-type]
    for k, (h, w) in enumerate(store.level_shapes):
        rows, cols = -(-h // store.chunk), -(-w // store.chunk)
        stream.blocks_final(k, [(i, j) for i in range(rows) for j in range(cols) if (i + j) % 2 == 0])
    while stream.busy:
        stream.pump(wait_s=0.05)
    return stream


@pytest.mark.parametrize("compression", ["jpeg", "none"])
def test_blocks_ahead_give_the_same_tiles_as_rows(tmp_path: Path, mosaic: MosaicStore, compression: str) -> None:
    rows_only = tmp_path / "rows.ome.tif"
    write_ome_tiff(mosaic, rows_only, tile=mosaic.chunk, compression=compression)  # type: ignore[arg-type]
    out = tmp_path / "blocks.ome.tif"
    stream = _stream_blocks_first(mosaic, out, compression)
    ahead = stream.written
    assert 0 < ahead < stream.total  # written before any row was final, and not everything
    for k, (h, _) in enumerate(mosaic.level_shapes):
        stream.rows_final(k, h)
    summary = stream.finish()
    assert stream.written == stream.total  # each tile once: the blocks were not encoded again
    # Same tile bytes at every level, only their order in the file differs.
    assert _tile_bytes(summary.path) == _tile_bytes(rows_only)
    if compression == "none":
        with tifffile.TiffFile(out) as tif:
            for k, lvl in enumerate(tif.series[0].levels):
                assert np.array_equal(lvl.asarray(), mosaic.level(k)[:]), f"level {k}"


@pytest.mark.parametrize("reader", ["openslide", "tiffslide", "tifffile", "bioformats"])
def test_readers_open_a_file_written_out_of_row_order(tmp_path: Path, mosaic: MosaicStore, reader: str) -> None:
    out = tmp_path / "slide.ome.tif"
    stream = _stream_blocks_first(mosaic, out, "jpeg")
    for k, (h, _) in enumerate(mosaic.level_shapes):
        stream.rows_final(k, h)
    stream.finish()
    sizes = slide_readers.expected_sizes(1100, 1500, mosaic.n_levels)
    slide_readers.READERS[reader](out, sizes, PIXEL_UM)


def test_blocks_are_ignored_when_a_tile_is_not_a_chunk(tmp_path: Path, mosaic: MosaicStore) -> None:
    stream = OmeTiffStream(mosaic, tmp_path / "s.ome.tif", tile=mosaic.chunk * 2)
    stream.blocks_final(0, [(0, 0)])
    assert not stream.busy and stream.written == 0  # written with its row instead
    stream.abort()


def test_a_block_outside_the_level_is_refused(tmp_path: Path, mosaic: MosaicStore) -> None:
    stream = OmeTiffStream(mosaic, tmp_path / "s.ome.tif", tile=mosaic.chunk)
    with pytest.raises(IndexError, match="outside level 0"):
        stream.blocks_final(0, [(0, 99)])
    stream.abort()
    assert not (tmp_path / "s.ome.tif").exists()
