"""The streaming OME-TIFF writer: same file as tifffile would make, pixels equal to a reference pyramid.

``tifffile_reference`` below is the writer this project used before streaming
(tifffile lays out the file from the same encoded tiles, page after page): our
own BigTIFF writer must produce the same tags and the same tile bytes, only at
other offsets and in another order.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from bench.level0_writer import write_ome_tiff_from_level0
from runtime.output.mosaic_store import MosaicStore
from runtime.output.ome_tiff import (
    OmeTiffStream,
    partial_path,
    tile_encoder,
    write_ome_tiff,
)
from runtime.output.tiff_stream import COMPRESSION_NONE, TiffPage, TiffStreamWriter
from tests import bioformats
from tests.test_ome_tiff import PIXEL_UM, make_mosaic, smooth_image

CODES = {"jpeg": 7, "deflate": 8, "zstd": 50000, "none": 1}


def tifffile_reference(store: MosaicStore, out: Path, compression: str, tile: int) -> None:
    """The pre-streaming writer: tifffile writes every level in order from our encoded tiles."""
    encode = tile_encoder(compression, jpeg_quality=90)  # type: ignore[arg-type]
    shapes = store.level_shapes
    options: dict[str, Any] = {
        "tile": (tile, tile),
        "photometric": "rgb",
        "planarconfig": "contig",
        "compression": CODES[compression],
        "resolutionunit": "CENTIMETER",
    }
    if compression == "jpeg":
        options["subsampling"] = (2, 2)
    elif compression != "none":
        options["predictor"] = 2

    def tiles(k: int) -> Any:
        level = store.level(k)[:]
        h, w = shapes[k]
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                t = level[y : y + tile, x : x + tile]
                pad = ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0))
                yield encode(np.ascontiguousarray(np.pad(t, pad, mode="edge")))

    metadata = {
        "axes": "YXS",
        "Name": out.name.split(".")[0],
        "PhysicalSizeX": PIXEL_UM,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": PIXEL_UM,
        "PhysicalSizeYUnit": "µm",
    }
    with tifffile.TiffWriter(out, bigtiff=True, ome=True) as tif:
        for k, (h, w) in enumerate(shapes):
            ppcm = 1e4 / (PIXEL_UM * 2**k)
            extra: dict[str, Any] = (
                {"subifds": len(shapes) - 1, "metadata": metadata, "software": "wsi-edge-runtime"}
                if k == 0
                else {"subfiletype": 1, "metadata": None, "software": "wsi-edge-runtime"}
            )
            tif.write(tiles(k), shape=(h, w, 3), dtype=np.uint8, resolution=(ppcm, ppcm), **options, **extra)


def page_summary(path: Path) -> list[tuple[dict[int, Any], list[bytes]]]:
    """Per level (the SubIFDs): tag values by code (minus what legitimately differs) and the raw tile bytes."""
    out = []
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
        for lvl in tif.series[0].levels:
            page = lvl.keyframe
            tags: dict[int, Any] = {}
            for t in page.tags.values():
                if t.code in (324, 330):  # TileOffsets, SubIFDs: where things are, not what
                    continue
                v = t.value
                if t.code == 270:  # OME-XML: every file gets its own UUID
                    v = re.sub(r'UUID="[^"]*"', "", v)
                tags[t.code] = (t.dtype, t.count, v)
            raw = []
            for off, n in zip(page.dataoffsets, page.databytecounts, strict=True):
                tif.filehandle.seek(off)
                raw.append(tif.filehandle.read(n))
            out.append((tags, raw))
    return out


@pytest.mark.parametrize("compression", ["jpeg", "zstd", "none"])
def test_same_tags_and_tiles_as_tifffile(tmp_path: Path, compression: str) -> None:
    store = make_mosaic(tmp_path / "m.zarr", smooth_image(700, 900, seed=4), chunk=256, min_level_size=200)
    (tmp_path / "ours").mkdir()
    (tmp_path / "ref").mkdir()
    # Same file name: the OME-XML's Image Name is taken from it.
    ours, ref = tmp_path / "ours" / "slide.ome.tif", tmp_path / "ref" / "slide.ome.tif"
    write_ome_tiff(store, ours, compression=compression, tile=256)  # type: ignore[arg-type]
    tifffile_reference(store, ref, compression, 256)
    a, b = page_summary(ours), page_summary(ref)
    assert len(a) == len(b) == store.n_levels
    for k, ((tags_a, tiles_a), (tags_b, tiles_b)) in enumerate(zip(a, b, strict=True)):
        assert tags_a == tags_b, f"level {k}: tags differ"
        assert tiles_a == tiles_b, f"level {k}: tile bytes differ"
    # tifffile's file has one top-level IFD; ours chains the SubIFDs after it too (for OpenSlide).
    with tifffile.TiffFile(ours) as tif, tifffile.TiffFile(ref) as tref:
        top = list(tif.pages)  # TiffPages, before the series turn them into TiffFrames
        assert (len(top), len(tref.pages)) == (store.n_levels, 1)
        for k in range(1, store.n_levels):
            page, sub = top[k], tif.series[0].levels[k].keyframe
            assert isinstance(page, tifffile.TiffPage)
            assert {t.code: t.value for t in page.tags.values()} == {t.code: t.value for t in sub.tags.values()}
    # And without the chain, the very layout tifffile writes.
    strict = tmp_path / "ours" / "strict" / "slide.ome.tif"
    strict.parent.mkdir()
    write_ome_tiff(store, strict, compression=compression, tile=256, openslide_levels=False)  # type: ignore[arg-type]
    with tifffile.TiffFile(strict) as tif:
        assert len(tif.pages) == 1
    assert page_summary(strict) == b


def reference_pyramid(img: np.ndarray, n: int) -> list[np.ndarray]:
    """Whole-image numpy pyramid: round-half-up 2x2 means, odd edges replicated (the mosaic's rule)."""
    levels = [img]
    for _ in range(n - 1):
        a = levels[-1]
        p = np.pad(a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2), (0, 0)), mode="edge").astype(np.uint16)
        levels.append(((p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2] + 2) >> 2).astype(np.uint8))
    return levels


def test_streamed_during_ingest_equals_reference_pyramid(tmp_path: Path) -> None:
    """The daemon's pattern in one process: bands in, tiles of every level out as they become final."""
    h, w, chunk = 1300, 1100, 128
    img = smooth_image(h, w, seed=6)
    events: list[tuple[int, int]] = []
    stream: OmeTiffStream | None = None

    def on_rows(level: int, rows: int) -> None:
        events.append((level, rows))
        assert stream is not None
        stream.rows_final(level, rows)

    store = MosaicStore.create(
        tmp_path / "m.zarr", h, w, chunk=chunk, pixel_size_um=PIXEL_UM, min_level_size=100, on_rows=on_rows
    )
    out = tmp_path / "slide.ome.tif"
    stream = OmeTiffStream(store, out, tile=chunk, compression="zstd", max_workers=2, buffer_mib=1)
    written_before_last_band = 0
    for y in range(0, h, chunk):
        if y + chunk >= h:
            stream.pump(wait_s=1.0)
            written_before_last_band = stream.written
        store.write_band(y, img[y : y + chunk])
    store.finish()
    assert store.complete
    summary = stream.finish()
    assert summary.path == out and not partial_path(out).exists()
    # Lower levels were announced band by band, interleaved with level 0, not after it.
    first_low = next(i for i, (k, _) in enumerate(events) if k > 0)
    assert events.index((0, h)) > first_low
    # Most of the file was written before the last level-0 band arrived.
    assert written_before_last_band >= 0.7 * stream.total, (written_before_last_band, stream.total)
    expected = reference_pyramid(img, store.n_levels)
    with tifffile.TiffFile(out) as tif:
        levels = tif.series[0].levels
        assert len(levels) == store.n_levels == 5
        for k, lvl in enumerate(levels):
            assert np.array_equal(lvl.asarray(), expected[k]), f"level {k}"
        # The tiles really sit interleaved in the file: a level-1 tile before level 0's last.
        level1_first = min(levels[1].keyframe.dataoffsets)
        assert level1_first < max(levels[0].keyframe.dataoffsets)


def test_unannounced_rows_are_not_written_and_abort_leaves_nothing(tmp_path: Path) -> None:
    img = smooth_image(600, 400, seed=7)
    store = make_mosaic(tmp_path / "m.zarr", img, chunk=128, min_level_size=100)
    out = tmp_path / "slide.ome.tif"
    stream = OmeTiffStream(store, out, tile=128, compression="none")
    stream.rows_final(0, 300)  # two full tile rows (256), the third is not complete
    stream.pump(wait_s=5.0)
    while stream.busy:
        stream.pump(wait_s=1.0)
    assert stream.written == 2 * 4
    with pytest.raises(ValueError, match="not final"):
        stream.finish()
    assert not out.exists() and not partial_path(out).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.zarr"]


def test_tiff_writer_refuses_holes_and_duplicates(tmp_path: Path) -> None:
    page = TiffPage(height=40, width=40, tile=16, compression=COMPRESSION_NONE)
    w = TiffStreamWriter(tmp_path / "x.tif", [page])
    tile = bytes(16 * 16 * 3)
    w.write_tile(0, 0, 0, tile)
    with pytest.raises(ValueError, match="twice"):
        w.write_tile(0, 0, 0, tile)
    with pytest.raises(IndexError):
        w.write_tile(0, 3, 0, tile)
    with pytest.raises(ValueError, match="8 tiles were never written"):
        w.close()
    w.abort()


def test_tiff_writer_chains_levels_sharing_their_tiles(tmp_path: Path) -> None:
    """``chain_levels``: main IFD -> level 1 -> level 2 as top-level IFDs, each also a SubIFD, tiles stored once."""
    rng = np.random.default_rng(1)
    pages = [TiffPage(height=64 >> k, width=96 >> k, tile=16, compression=COMPRESSION_NONE) for k in range(3)]
    imgs = [rng.integers(0, 255, (p.height, p.width, 3), dtype=np.uint8) for p in pages]
    out = tmp_path / "x.tif"
    with TiffStreamWriter(out, pages, chain_levels=True) as w:
        for k, (p, img) in enumerate(zip(pages, imgs, strict=True)):
            for r in range(p.tiles_down):
                for c in range(p.tiles_across):
                    w.write_tile(k, r, c, img[r * 16 : r * 16 + 16, c * 16 : c * 16 + 16].tobytes())
    pixel_bytes = sum(img.nbytes for img in imgs)
    with tifffile.TiffFile(out) as tif:
        top = list(tif.pages)
        assert len(top) == 3
        base = top[0]
        assert isinstance(base, tifffile.TiffPage) and base.subifds is not None and len(base.subifds) == 2
        for k in range(3):
            page = top[k]
            assert isinstance(page, tifffile.TiffPage)
            assert np.array_equal(page.asarray(), imgs[k]), f"top-level page {k}"
            if k:
                tif.filehandle.seek(base.subifds[k - 1])
                sub = tifffile.TiffPage(tif, index=k)
                assert np.array_equal(sub.asarray(), imgs[k]), f"SubIFD {k}"
                assert page.dataoffsets == sub.dataoffsets and page.offset != sub.offset
        assert max(top[2].dataoffsets) < pixel_bytes + 16, "tiles first, IFDs after"
    assert out.stat().st_size < pixel_bytes + 4096


def test_tiff_writer_any_order_single_page(tmp_path: Path) -> None:
    """Tiles written in reverse order read back in place (no SubIFDs: a plain tiled BigTIFF)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    page = TiffPage(height=50, width=70, tile=32, compression=COMPRESSION_NONE)
    with TiffStreamWriter(tmp_path / "x.tif", [page]) as w:
        for r in reversed(range(page.tiles_down)):
            for c in reversed(range(page.tiles_across)):
                t = np.zeros((32, 32, 3), np.uint8)
                part = img[r * 32 : r * 32 + 32, c * 32 : c * 32 + 32]
                t[: part.shape[0], : part.shape[1]] = part
                w.write_tile(0, r, c, t.tobytes())
    assert np.array_equal(tifffile.imread(tmp_path / "x.tif"), img)


def test_bioformats_reads_an_interleaved_file(tmp_path: Path) -> None:
    """Bio-Formats on the layout only streaming produces: tiles of all levels mixed, IFDs at the end."""
    if bioformats.java() is None:
        pytest.skip("java is not installed")
    h, w, chunk = 1500, 1300, 256
    img = smooth_image(h, w, seed=8)
    stream: OmeTiffStream | None = None

    def on_rows(level: int, rows: int) -> None:
        assert stream is not None
        stream.rows_final(level, rows)

    store = MosaicStore.create(
        tmp_path / "m.zarr", h, w, chunk=chunk, pixel_size_um=PIXEL_UM, min_level_size=200, on_rows=on_rows
    )
    out = tmp_path / "slide.ome.tif"
    stream = OmeTiffStream(store, out, tile=chunk, compression="jpeg")
    for y in range(0, h, chunk):
        store.write_band(y, img[y : y + chunk])
    store.finish()
    stream.finish()
    resolutions, size_x = bioformats.bioformats_summary(out)
    assert resolutions == store.n_levels == 4
    assert size_x == pytest.approx(PIXEL_UM)
    x, y, cw, ch = 300, 1100, 400, 300  # spans tile borders, near the bottom (the last bands)
    theirs = bioformats.bioformats_crop(out, x, y, cw, ch).astype(np.int16)
    assert np.abs(theirs - img[y : y + ch, x : x + cw]).mean() < 2.0


@pytest.mark.parametrize(
    ("h", "w", "chunk", "min_level"), [(1300, 1100, 128, 100), (1025, 513, 64, 30), (300, 200, 128, 300)]
)
def test_pyramid_from_level0_equals_reference(tmp_path: Path, h: int, w: int, chunk: int, min_level: int) -> None:
    """The one-pass quadtree writer (what the libvips comparison times): lower levels computed on the fly.

    Odd sizes at several levels, a single-level mosaic, and unscanned (fill, never stored) bands at the bottom.
    """
    img = smooth_image(h, w, seed=3)
    store = MosaicStore.create(tmp_path / "m.zarr", h, w, chunk=chunk, pixel_size_um=PIXEL_UM, min_level_size=min_level)
    scanned = (h // chunk - 1) * chunk
    for y in range(0, scanned, chunk):
        store.write_band(y, img[y : y + chunk])
    img[scanned:] = 255
    out = tmp_path / "slide.ome.tif"
    write_ome_tiff_from_level0(store, out, compression="zstd", buffer_mib=1)
    expected = reference_pyramid(img, store.n_levels)
    with tifffile.TiffFile(out) as tif:
        levels = tif.series[0].levels
        assert len(levels) == store.n_levels
        for k, lvl in enumerate(levels):
            assert np.array_equal(lvl.asarray(), expected[k]), f"level {k}"


def test_ome_zarr_beside_the_tiff(tmp_path: Path) -> None:
    """The optional OME-NGFF 0.4 copy: metadata viewers need, and every level's pixels (c, y, x)."""
    import zarr

    img = smooth_image(700, 500, seed=10)
    img[:256] = 255  # a blank band: its chunks are not stored, and must read as white
    store = make_mosaic(tmp_path / "m.zarr", img, chunk=128, min_level_size=100)
    out, ngff = tmp_path / "slide.ome.tif", tmp_path / "slide.ome.zarr"
    write_ome_tiff(store, out, compression="zstd", tile=128, ngff_out=ngff)
    assert ngff.is_dir() and not (tmp_path / "slide.ome.zarr.partial").exists()
    group = zarr.open_group(str(ngff), mode="r", zarr_format=2)
    (ms,) = group.attrs["multiscales"]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert [d["path"] for d in ms["datasets"]] == [str(k) for k in range(store.n_levels)]
    for k, d in enumerate(ms["datasets"]):
        (scale,) = d["coordinateTransformations"]
        assert scale["scale"] == [1.0, PIXEL_UM * 2**k, PIXEL_UM * 2**k]
    assert [c["color"] for c in group.attrs["omero"]["channels"]] == ["FF0000", "00FF00", "0000FF"]
    for k in range(store.n_levels):
        arr = group[str(k)]
        assert arr.chunks == (3, 128, 128)
        assert np.array_equal(np.asarray(arr[:]).transpose(1, 2, 0), store.level(k)[:]), f"level {k}"
    assert not (ngff / "0" / "0" / "0" / "0").exists(), "blank tiles are not stored"
