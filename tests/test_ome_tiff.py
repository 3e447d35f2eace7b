"""Pyramidal OME-TIFF: structure per the OME-TIFF spec, pixels, atomic output, and Bio-Formats' verdict."""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from runtime.output.mosaic_store import FILL, MosaicStore
from runtime.output.ome_tiff import partial_path, tile_encoder, write_ome_tiff
from tests import bioformats, slide_readers

PIXEL_UM = 0.25
OME_NS = "{http://www.openmicroscopy.org/Schemas/OME/2016-06}"


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus mild noise: JPEG reproduces it closely, so errors mean bugs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack(
        [
            128 + 100 * np.sin(xx / 97.0) * np.cos(yy / 131.0),
            128 + 90 * np.cos((xx + yy) / 173.0),
            128 + 80 * np.sin(yy / 59.0),
        ],
        axis=-1,
    )
    img += rng.normal(0, 2.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_mosaic(path: Path, img: np.ndarray, *, chunk: int = 256, min_level_size: int = 200) -> MosaicStore:
    h, w = img.shape[:2]
    store = MosaicStore.create(path, h, w, chunk=chunk, pixel_size_um=PIXEL_UM, min_level_size=min_level_size)
    for y in range(0, h, chunk):
        store.write_band(y, img[y : y + chunk])
    store.finish()
    return store


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory: pytest.TempPathFactory) -> tuple[MosaicStore, np.ndarray]:
    img = smooth_image(1100, 1500)
    return make_mosaic(tmp_path_factory.mktemp("mosaic") / "m.zarr", img), img


def ome_pixels(path: Path) -> ET.Element:
    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata
    assert xml is not None, "no OME-XML"
    pixels = ET.fromstring(xml).find(f"{OME_NS}Image/{OME_NS}Pixels")
    assert pixels is not None
    return pixels


@pytest.mark.parametrize("compression", ["jpeg", "deflate", "zstd", "none"])
def test_pyramid_structure_follows_ome_tiff_spec(
    tmp_path: Path, mosaic: tuple[MosaicStore, np.ndarray], compression: str
) -> None:
    store, _ = mosaic
    out = tmp_path / "slide.ome.tif"
    summary = write_ome_tiff(store, out, compression=compression, tile=256)  # type: ignore[arg-type]
    assert summary.levels == ((1100, 1500), (550, 750), (275, 375), (138, 188))
    assert summary.bytes == out.stat().st_size > 0
    with tifffile.TiffFile(out) as tif:
        assert tif.is_bigtiff and tif.is_ome
        # Sub-resolutions are SubIFDs (OME-TIFF), chained again as top-level IFDs for OpenSlide.
        assert len(tif.pages) == 4
        base = tif.pages[0]
        assert isinstance(base, tifffile.TiffPage)
        assert base.subifds is not None and len(base.subifds) == 3
        levels = tif.series[0].levels
        assert [lvl.shape for lvl in levels] == [(h, w, 3) for h, w in summary.levels]
        for k, lvl in enumerate(levels):
            page = lvl.keyframe
            assert page.subfiletype == (1 if k else 0)
            assert (page.tilelength, page.tilewidth) == (256, 256)
            assert page.planarconfig == tifffile.PLANARCONFIG.CONTIG and page.samplesperpixel == 3
            # Resolution tags in pixels per cm, halving with each level.
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            num, den = page.tags["XResolution"].value
            assert num / den == pytest.approx(1e4 / (PIXEL_UM * 2**k), rel=1e-6)
            if compression == "jpeg":
                assert page.photometric == tifffile.PHOTOMETRIC.YCBCR
                assert page.tags["YCbCrSubSampling"].value == (2, 2)
            else:
                assert page.photometric == tifffile.PHOTOMETRIC.RGB
    pixels = ome_pixels(out)
    assert float(pixels.get("PhysicalSizeX", "nan")) == PIXEL_UM
    assert float(pixels.get("PhysicalSizeY", "nan")) == PIXEL_UM
    assert pixels.get("PhysicalSizeXUnit") == "µm" and pixels.get("PhysicalSizeYUnit") == "µm"
    assert (pixels.get("SizeX"), pixels.get("SizeY"), pixels.get("Interleaved")) == ("1500", "1100", "true")


@pytest.mark.parametrize("compression", ["jpeg", "zstd"])
def test_openslide_levels_reuse_the_subifds_tiles(
    tmp_path: Path, mosaic: tuple[MosaicStore, np.ndarray], compression: str
) -> None:
    """The top-level chain repeats each SubIFD entry for entry: same tiles, same tags; only IFD bytes are added."""
    store, _ = mosaic
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    on, off = tmp_path / "on" / "slide.ome.tif", tmp_path / "off" / "slide.ome.tif"
    write_ome_tiff(store, on, compression=compression, tile=256)  # type: ignore[arg-type]
    write_ome_tiff(store, off, compression=compression, tile=256, openslide_levels=False)  # type: ignore[arg-type]
    with tifffile.TiffFile(on) as tif:
        top = list(tif.pages)
        assert len(top) == store.n_levels == 4
        base = top[0]
        assert isinstance(base, tifffile.TiffPage) and base.subifds is not None
        assert list(base.subifds) == sorted(base.subifds)
        for k, lvl in enumerate(tif.series[0].levels[1:], start=1):
            chained, sub = top[k], lvl.keyframe
            assert isinstance(chained, tifffile.TiffPage) and isinstance(sub, tifffile.TiffPage)
            assert chained.offset != sub.offset, "two IFDs: the SubIFD keeps NextIFD = 0"
            assert chained.dataoffsets == sub.dataoffsets and chained.databytecounts == sub.databytecounts
            assert {t.code: t.value for t in chained.tags.values()} == {t.code: t.value for t in sub.tags.values()}
            assert chained.subfiletype == tifffile.FILETYPE.REDUCEDIMAGE
    with tifffile.TiffFile(off) as tif:
        assert len(tif.pages) == 1 and tif.series[0].levels[3].shape == (138, 188, 3)
    extra = on.stat().st_size - off.stat().st_size
    # One IFD per lower level (entries + NextIFD), nothing else: no tile is stored twice.
    assert 0 < extra <= 3 * 400, extra


def test_strict_ome_layout_hides_the_levels_from_openslide(
    tmp_path: Path, mosaic: tuple[MosaicStore, np.ndarray]
) -> None:
    """Why the chain exists: without it OpenSlide (generic-tiff) sees level 0 only; the OME readers see all."""
    store, _ = mosaic
    out = tmp_path / "slide.ome.tif"
    write_ome_tiff(store, out, tile=256, openslide_levels=False)
    sizes = slide_readers.expected_sizes(1100, 1500, store.n_levels)
    with openslide.OpenSlide(str(out)) as slide:
        assert slide.level_dimensions == ((1500, 1100),)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(PIXEL_UM)
    slide_readers.check_tiffslide(out, sizes, PIXEL_UM)
    slide_readers.check_tifffile(out, sizes, PIXEL_UM)


@pytest.mark.parametrize("compression", ["jpeg", "deflate", "zstd", "none"])
def test_openslide_reads_every_level_and_codec(
    tmp_path: Path, mosaic: tuple[MosaicStore, np.ndarray], compression: str
) -> None:
    """OpenSlide 4 on each codec the writer offers: every level, its size, mpp; lossless levels exact."""
    store, _ = mosaic
    out = tmp_path / "slide.ome.tif"
    write_ome_tiff(store, out, compression=compression, tile=256)  # type: ignore[arg-type]
    sizes = slide_readers.expected_sizes(1100, 1500, store.n_levels)
    slide_readers.check_openslide(out, sizes, PIXEL_UM)
    with openslide.OpenSlide(str(out)) as slide:
        for k in range(store.n_levels):
            got = np.asarray(slide.read_region((0, 0), k, slide.level_dimensions[k]).convert("RGB"))
            if compression == "jpeg":
                assert np.abs(got.astype(np.int16) - store.level(k)[:]).mean() < 2.0, f"level {k}"
            else:
                assert np.array_equal(got, store.level(k)[:]), f"level {k}"


@pytest.mark.parametrize("reader", sorted(slide_readers.READERS))
def test_every_reader_on_an_odd_sized_pyramid(
    tmp_path: Path, mosaic: tuple[MosaicStore, np.ndarray], reader: str
) -> None:
    """Each reader: 4 levels with sizes rounded up (1500 x 1100 ... 188 x 138), 0.25 µm at level 0."""
    store, _ = mosaic
    out = tmp_path / "slide.ome.tif"
    write_ome_tiff(store, out, tile=256)
    sizes = slide_readers.expected_sizes(1100, 1500, store.n_levels)
    assert sizes == [(1500, 1100), (750, 550), (375, 275), (188, 138)]
    slide_readers.READERS[reader](out, sizes, PIXEL_UM)
    if reader == "pyvips":
        # libvips also pages through the top-level chain: the same levels again.
        assert slide_readers.pyvips_pages(out) == sizes


@pytest.mark.parametrize("compression", ["none", "zstd", "deflate"])
def test_lossless_pixels_are_exact_at_every_level(
    tmp_path: Path, mosaic: tuple[MosaicStore, np.ndarray], compression: str
) -> None:
    store, _ = mosaic
    out = tmp_path / "slide.ome.tif"
    write_ome_tiff(store, out, compression=compression, tile=256)  # type: ignore[arg-type]
    with tifffile.TiffFile(out) as tif:
        for k, lvl in enumerate(tif.series[0].levels):
            assert np.array_equal(lvl.asarray(), store.level(k)[:]), f"level {k}"


def test_jpeg_pixels_are_close(tmp_path: Path, mosaic: tuple[MosaicStore, np.ndarray]) -> None:
    store, img = mosaic
    out = tmp_path / "slide.ome.tif"
    write_ome_tiff(store, out, jpeg_quality=90)
    with tifffile.TiffFile(out) as tif:
        got = tif.series[0].levels[0].asarray().astype(np.int16)
    err = np.abs(got - img)
    assert err.mean() < 2.0 and np.percentile(err, 99.9) < 12, (err.mean(), err.max())


def test_tile_different_from_chunk(tmp_path: Path, mosaic: tuple[MosaicStore, np.ndarray]) -> None:
    store, _ = mosaic
    out = tmp_path / "slide.ome.tif"
    write_ome_tiff(store, out, compression="none", tile=128)
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].tilewidth == 128
        assert np.array_equal(tif.series[0].levels[1].asarray(), store.level(1)[:])


@pytest.mark.parametrize("compression", ["jpeg", "deflate", "zstd"])
def test_tiles_are_encoded_exactly_as_tifffile_would(
    tmp_path: Path, mosaic: tuple[MosaicStore, np.ndarray], compression: str
) -> None:
    """Our encoder threads replace tifffile's: the bytes (hence the tags' meaning) must not differ."""
    _, img = mosaic
    tile = np.ascontiguousarray(img[256:512, 512:768])
    args = {"jpeg": {"compressionargs": {"level": 90}}, "deflate": {"predictor": 2}, "zstd": {"predictor": 2}}
    codes = {"jpeg": 7, "deflate": 8, "zstd": 50000}
    ref = tmp_path / "ref.tif"
    tifffile.imwrite(ref, tile, tile=(256, 256), photometric="rgb", compression=codes[compression], **args[compression])
    with tifffile.TiffFile(ref) as tif:
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        tif.filehandle.seek(page.dataoffsets[0])
        expected = tif.filehandle.read(page.databytecounts[0])
    assert tile_encoder(compression, jpeg_quality=90)(tile) == expected  # type: ignore[arg-type]


def test_output_appears_only_when_complete(tmp_path: Path, mosaic: tuple[MosaicStore, np.ndarray]) -> None:
    store, _ = mosaic
    out = tmp_path / "slide.ome.tif"
    seen: list[tuple[bool, bool]] = []

    def progress(done: int, total: int) -> None:
        seen.append((out.exists(), partial_path(out).exists()))

    write_ome_tiff(store, out, progress=progress)
    assert seen and all(s == (False, True) for s in seen), "out must not exist while writing"
    assert out.exists() and not partial_path(out).exists()


def test_failed_write_leaves_nothing(tmp_path: Path, mosaic: tuple[MosaicStore, np.ndarray]) -> None:
    store, _ = mosaic
    out = tmp_path / "slide.ome.tif"

    def progress(done: int, total: int) -> None:
        if done == total // 2:
            raise KeyboardInterrupt  # e.g. the writer is told to stop

    with pytest.raises(KeyboardInterrupt):
        write_ome_tiff(store, out, progress=progress)
    assert not out.exists() and not partial_path(out).exists()
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_stale_pyramid_until_partial_finish(tmp_path: Path) -> None:
    img = smooth_image(700, 500, seed=1)
    store = MosaicStore.create(tmp_path / "m.zarr", 700, 500, chunk=128, pixel_size_um=PIXEL_UM, min_level_size=100)
    for y in range(0, 384, 128):
        store.write_band(y, img[y : y + 128])
    out = tmp_path / "slide.ome.tif"
    with pytest.raises(ValueError, match="partial=True"):
        write_ome_tiff(store, out, compression="none")
    store.finish(partial=True)
    write_ome_tiff(store, out, compression="none")
    with tifffile.TiffFile(out) as tif:
        level1 = tif.series[0].levels[1].asarray()
    assert np.array_equal(level1[:192], store.level(1)[:192]) and (level1[192:] == FILL).all()


def test_export_cli_on_interrupted_scan(tmp_path: Path) -> None:
    img = smooth_image(900, 600, seed=2)
    path = tmp_path / "m.zarr"
    store = MosaicStore.create(path, 900, 600, chunk=128, pixel_size_um=PIXEL_UM, min_level_size=120)
    for y in range(0, 512, 128):
        store.write_band(y, img[y : y + 128])
    del store
    out = tmp_path / "slide.ome.tif"
    cmd = [sys.executable, "-m", "runtime.output.cli", str(path), str(out), "--compression", "zstd"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "interrupted scan (512 of 900 rows)" in proc.stderr
    with tifffile.TiffFile(out) as tif:
        levels = [lvl.asarray() for lvl in tif.series[0].levels]
    assert [lvl.shape[:2] for lvl in levels] == [(900, 600), (450, 300), (225, 150), (113, 75)]
    assert np.array_equal(levels[0][:512], img[:512]) and (levels[0][512:] == FILL).all()
    # Lower levels were brought up to date with the scanned rows before export.
    assert not (levels[2][:128] == FILL).all()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "exists" in again.stderr


def test_export_cli_openslide_levels_switch(tmp_path: Path, mosaic: tuple[MosaicStore, np.ndarray]) -> None:
    """``--no-openslide-levels`` writes the strict OME-TIFF layout; the default chains the levels."""
    from runtime.output.cli import main

    store, _ = mosaic
    on, off = tmp_path / "on.ome.tif", tmp_path / "off.ome.tif"
    assert main([str(store.path), str(on), "--quiet", "--compression", "none"]) == 0
    assert main([str(store.path), str(off), "--quiet", "--compression", "none", "--no-openslide-levels"]) == 0
    with tifffile.TiffFile(on) as a, tifffile.TiffFile(off) as b:
        assert (len(a.pages), len(b.pages)) == (store.n_levels, 1)
        assert len(a.series[0].levels) == len(b.series[0].levels) == store.n_levels


@pytest.mark.skipif(bioformats.java() is None, reason="java is not installed")
def test_bioformats_reads_the_pyramid(tmp_path: Path) -> None:
    img = smooth_image(3000, 2500, seed=3)
    store = make_mosaic(tmp_path / "m.zarr", img, chunk=512, min_level_size=400)
    assert store.n_levels == 4
    out = tmp_path / "slide.ome.tif"
    write_ome_tiff(store, out)
    resolutions, size_x = bioformats.bioformats_summary(out)
    assert resolutions == store.n_levels
    assert size_x == pytest.approx(PIXEL_UM)
    # Bio-Formats decodes our YCbCr JPEG tiles to the same RGB as libjpeg-turbo via tifffile.
    x, y, w, h = 700, 900, 300, 200
    theirs = bioformats.bioformats_crop(out, x, y, w, h).astype(np.int16)
    with tifffile.TiffFile(out) as tif:
        ours = tif.series[0].levels[0].asarray()[y : y + h, x : x + w].astype(np.int16)
    assert np.abs(theirs - ours).max() <= 2
    assert np.abs(theirs - img[y : y + h, x : x + w]).mean() < 2.0


def test_bioformats_helper_fails_loudly_on_a_broken_file(tmp_path: Path) -> None:
    if bioformats.java() is None:
        pytest.skip("java is not installed")
    bad = tmp_path / "bad.ome.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    with pytest.raises(bioformats.BioFormatsError):
        bioformats.bioformats_resolutions(bad)


def test_no_java_no_bioformats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert bioformats.bioformats_jar() is None
