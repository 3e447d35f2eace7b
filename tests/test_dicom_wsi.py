"""DICOM WSI output: written from the OME-TIFF's own tiles, validated by dciodvfy, opened by wsidicom and
OpenSlide 4 at every level with its pixel spacing; and the NGFF copy opened by ome-zarr-py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.encaps import generate_frames
from wsidicom import WsiDicom

from runtime.config import WriterConfig
from runtime.output import cli, dicom_wsi
from runtime.output.dicom_wsi import SOP_CLASS_UID, DicomWsiWriter, level_file_name
from runtime.output.mosaic_store import MosaicStore
from runtime.output.ome_tiff import pad_tile, tile_encoder, write_ome_tiff
from runtime.workers.writer import dicom_path, open_stream
from tests import slide_readers
from tests.test_ome_tiff import PIXEL_UM, make_mosaic, smooth_image

H, W = 1100, 1500  # odd-sized: partial edge tiles at every level


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory: pytest.TempPathFactory) -> tuple[MosaicStore, np.ndarray]:
    img = smooth_image(H, W, seed=4)
    return make_mosaic(tmp_path_factory.mktemp("mosaic") / "m.zarr", img), img


@pytest.fixture(scope="module")
def jpeg_slide(tmp_path_factory: pytest.TempPathFactory, mosaic: tuple[MosaicStore, np.ndarray]) -> Path:
    """slide.ome.tif + slide.dicom/ + slide.ome.zarr, one export (JPEG, the default codec)."""
    store, _ = mosaic
    out = tmp_path_factory.mktemp("jpeg")
    write_ome_tiff(
        store, out / "slide.ome.tif", tile=256, ngff_out=out / "slide.ome.zarr", dicom_out=out / "slide.dicom"
    )
    return out


@pytest.fixture(scope="module")
def lossless_slide(tmp_path_factory: pytest.TempPathFactory, mosaic: tuple[MosaicStore, np.ndarray]) -> Path:
    """The same with zstd tiles: the DICOM frames are native (uncompressed) RGB."""
    store, _ = mosaic
    out = tmp_path_factory.mktemp("zstd")
    write_ome_tiff(store, out / "slide.ome.tif", tile=256, compression="zstd", dicom_out=out / "slide.dicom")
    return out


def sizes(store: MosaicStore) -> list[tuple[int, int]]:
    return slide_readers.expected_sizes(H, W, store.n_levels)


def dicom_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("level-*.dcm"), key=lambda p: int(p.stem.split("-")[1]))


def test_wsidicom_reads_every_level(jpeg_slide: Path, mosaic: tuple[MosaicStore, np.ndarray]) -> None:
    store, _ = mosaic
    seen = slide_readers.check_wsidicom(jpeg_slide / "slide.dicom", sizes(store), PIXEL_UM)
    assert len(dicom_files(jpeg_slide / "slide.dicom")) == store.n_levels == 4
    tiff = slide_readers.check_tifffile(jpeg_slide / "slide.ome.tif", sizes(store), PIXEL_UM)
    assert seen.smallest is not None and tiff.smallest is not None
    # The same JPEG bytes, decoded by another library: equal but for the decoders' rounding.
    assert np.abs(seen.smallest.astype(int) - tiff.smallest).max() <= 3


def test_openslide_reads_every_level_of_the_dicom(jpeg_slide: Path, mosaic: tuple[MosaicStore, np.ndarray]) -> None:
    store, _ = mosaic
    folder = jpeg_slide / "slide.dicom"
    seen = slide_readers.check_openslide(folder / level_file_name(0), sizes(store), PIXEL_UM, vendor="dicom")
    # OpenSlide decodes the DICOM's JPEG frames and the TIFF's JPEG tiles with the same libjpeg:
    # identical pixels say the frames are the tiles.
    tiff = slide_readers.check_openslide(jpeg_slide / "slide.ome.tif", sizes(store), PIXEL_UM)
    assert seen.smallest is not None and tiff.smallest is not None
    np.testing.assert_array_equal(seen.smallest, tiff.smallest)


def test_frames_are_the_tiffs_jpeg_tiles_byte_for_byte(jpeg_slide: Path) -> None:
    """No re-encoding: frame i of level k's Pixel Data is tile i of the TIFF's level k (pydicom splits the frames)."""
    files = dicom_files(jpeg_slide / "slide.dicom")
    with tifffile.TiffFile(jpeg_slide / "slide.ome.tif") as tif:
        levels = tif.series[0].levels
        assert len(levels) == len(files)
        for k, (level, path) in enumerate(zip(levels, files, strict=True)):
            page = level.keyframe
            ds = pydicom.dcmread(path)
            frames = list(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
            assert len(frames) == len(page.dataoffsets), f"level {k}"
            for i, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts, strict=True)):
                tif.filehandle.seek(offset)
                tile = tif.filehandle.read(count)
                # A frame is padded to even length with one zero byte.
                assert frames[i] in (tile, tile + b"\0"), f"level {k} tile {i}"


def run_dciodvfy(files: list[Path]) -> None:
    """Debian's dicom3tools validator on each file: no error; warnings only the DICOMDIR ones."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (Debian: apt-get install dicom3tools)")
    for f in files:
        proc = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
        lines = (proc.stdout + proc.stderr).splitlines()
        assert "VLWholeSlideMicroscopyImage" in lines, f"{f}: not checked as a WSI image: {lines}"
        errors = [line for line in lines if line.startswith("Error")]
        assert not errors, f"{f}: {errors}"
        # The only warnings allowed: an anonymous slide's empty Patient ID and Study ID, which a DICOMDIR
        # (a media index, not the image) would need.
        warnings = [line for line in lines if line.startswith("Warning")]
        assert all("needed to build DICOMDIR" in w for w in warnings), f"{f}: {warnings}"


def test_dciodvfy_finds_no_errors(
    jpeg_slide: Path, lossless_slide: Path, mosaic: tuple[MosaicStore, np.ndarray]
) -> None:
    """Every level of the JPEG series and of the native (lossless) one; JPEG 2000: in its own test."""
    store, _ = mosaic
    files = dicom_files(jpeg_slide / "slide.dicom") + dicom_files(lossless_slide / "slide.dicom")
    assert len(files) == 2 * store.n_levels
    run_dciodvfy(files)


@pytest.mark.parametrize("subsampling", [(1, 1), (2, 1), (4, 1)])
def test_every_jpeg_subsampling_opens_as_the_tiff_does(
    tmp_path: Path, mosaic: tuple[MosaicStore, np.ndarray], subsampling: tuple[int, int]
) -> None:
    """YBR_FULL_422 for every JPEG (the WSI IOD has no other YCbCr value for it): readers follow the
    stream's own sampling factors, so OpenSlide decodes the DICOM as it decodes the TIFF."""
    store, _ = mosaic
    folder = tmp_path / "slide.dicom"
    write_ome_tiff(store, tmp_path / "slide.ome.tif", tile=256, subsampling=subsampling, dicom_out=folder)
    seen = slide_readers.check_openslide(folder / level_file_name(0), sizes(store), PIXEL_UM, vendor="dicom")
    tiff = slide_readers.check_openslide(tmp_path / "slide.ome.tif", sizes(store), PIXEL_UM)
    np.testing.assert_array_equal(seen.smallest, tiff.smallest)
    if shutil.which("dciodvfy"):
        run_dciodvfy(dicom_files(folder))


def test_series_identifiers(jpeg_slide: Path) -> None:
    """Anonymous by default: empty patient, generated UIDs; one study, series and frame of reference."""
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_files(jpeg_slide / "slide.dicom")]
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "ContainerIdentifier"):
        assert len({str(ds[key].value) for ds in datasets}) == 1, key
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    for k, ds in enumerate(datasets):
        assert ds.SOPClassUID == SOP_CLASS_UID and ds.Modality == "SM"
        assert ds.PatientName == "" and ds.PatientID == ""
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
        assert ds.PhotometricInterpretation == "YBR_FULL_422"
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        assert [float(v) for v in spacing] == pytest.approx([PIXEL_UM * 2**k / 1000] * 2)
        assert ds.ImageType[2] == "VOLUME" and float(ds.LossyImageCompressionRatio) > 1


@pytest.mark.parametrize("frames", ["native", "jpeg2000"])
def test_lossless_codecs_give_exact_frames(
    lossless_slide: Path,
    tmp_path: Path,
    mosaic: tuple[MosaicStore, np.ndarray],
    frames: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """zstd/deflate have no DICOM frame form: native RGB frames, or lossless JPEG 2000 once level 0 is
    past native Pixel Data's 4 GiB (the limit lowered here): bit-exact in both readers."""
    store, img = mosaic
    folder = lossless_slide / "slide.dicom"
    if frames == "jpeg2000":
        monkeypatch.setattr(dicom_wsi, "_NATIVE_LIMIT", 0)
        folder = tmp_path / "slide.dicom"
        write_ome_tiff(store, tmp_path / "slide.ome.tif", tile=256, compression="deflate", dicom_out=folder)
    seen = slide_readers.check_wsidicom(folder, sizes(store), PIXEL_UM)
    with WsiDicom.open(folder) as dcm:
        np.testing.assert_array_equal(np.asarray(dcm.read_region((0, 0), 0, (W, H)).convert("RGB")), img)
    np.testing.assert_array_equal(seen.smallest, np.asarray(store.level(store.n_levels - 1)))
    by_openslide = slide_readers.check_openslide(folder / level_file_name(0), sizes(store), PIXEL_UM, vendor="dicom")
    np.testing.assert_array_equal(by_openslide.smallest, seen.smallest)
    ds = pydicom.dcmread(folder / level_file_name(0), stop_before_pixels=True)
    syntax = pydicom.uid.ExplicitVRLittleEndian if frames == "native" else pydicom.uid.JPEG2000Lossless
    assert ds.file_meta.TransferSyntaxUID == syntax and ds.LossyImageCompression == "00"
    if frames == "jpeg2000" and shutil.which("dciodvfy"):
        run_dciodvfy(dicom_files(folder))


def test_extended_offset_table_reads_the_same(tmp_path: Path, mosaic: tuple[MosaicStore, np.ndarray]) -> None:
    """Levels whose frames could pass 4 GiB get 64-bit offsets (``auto``); forced here on a small slide."""
    store, _ = mosaic
    folder = tmp_path / "eot.dicom"
    writer = DicomWsiWriter(folder, store.level_shapes, 256, PIXEL_UM, offset_table="extended")
    encode, buf = tile_encoder("jpeg"), np.empty((256, 256, 3), np.uint8)
    for k, (h, w) in enumerate(store.level_shapes):
        for i in range(-(-h // 256)):
            for j in range(-(-w // 256)):
                writer.write_tile(k, i, j, encode(pad_tile(store.read_chunk(k, i, j), buf)))
    writer.finish()
    ds = pydicom.dcmread(folder / level_file_name(0), stop_before_pixels=True)
    assert "ExtendedOffsetTable" in pydicom.dcmread(folder / level_file_name(0)) and ds.NumberOfFrames == 30
    seen = slide_readers.check_wsidicom(folder, sizes(store), PIXEL_UM)
    by_openslide = slide_readers.check_openslide(folder / level_file_name(0), sizes(store), PIXEL_UM, vendor="dicom")
    assert seen.smallest is not None and by_openslide.smallest is not None
    assert np.abs(seen.smallest.astype(int) - by_openslide.smallest).max() <= 3


def test_ome_zarr_reads_every_level(jpeg_slide: Path, mosaic: tuple[MosaicStore, np.ndarray]) -> None:
    store, _ = mosaic
    seen = slide_readers.check_ome_zarr(jpeg_slide / "slide.ome.zarr", sizes(store), PIXEL_UM)
    # The NGFF copy is lossless: its smallest level is the mosaic's.
    np.testing.assert_array_equal(seen.smallest, np.asarray(store.level(store.n_levels - 1)))


def test_frames_out_of_order_are_refused(tmp_path: Path) -> None:
    w = DicomWsiWriter(tmp_path / "s.dicom", [(300, 300)], 256, PIXEL_UM)
    with pytest.raises(ValueError, match=r"row-major order; expected \(0, 0\), got \(0, 1\)"):
        w.write_tile(0, 0, 1, b"\xff\xd8\xff\xd9")
    with pytest.raises(ValueError, match=r"levels \[0\] are missing frames"):
        w.finish()
    assert not (tmp_path / "s.dicom").exists() and not (tmp_path / "s.dicom.partial").exists()


def test_scan_writer_writes_dicom_with_the_configured_identifiers(
    tmp_path: Path, mosaic: tuple[MosaicStore, np.ndarray]
) -> None:
    """The daemon's writer worker opens its stream with ``writer.dicom``: slide.dicom beside slide.ome.tif."""
    store, _ = mosaic
    cfg = WriterConfig(
        tile=256, dicom=True, dicom_patient_name="Doe^Jane", dicom_patient_id="P-7", dicom_slide_id="S 1"
    )
    out = tmp_path / "slide.ome.tif"
    stream = open_stream(cfg, str(out), str(store.path), lambda: None)
    for k, (h, _) in enumerate(store.level_shapes):
        stream.rows_final(k, h)
    stream.finish()
    assert dicom_path(out) == tmp_path / "slide.dicom"
    ds = pydicom.dcmread(tmp_path / "slide.dicom" / level_file_name(0), stop_before_pixels=True)
    assert (ds.PatientName, ds.PatientID, ds.ContainerIdentifier) == ("Doe^Jane", "P-7", "S 1")
    with WsiDicom.open(tmp_path / "slide.dicom") as dcm:
        assert len(dcm.levels) == store.n_levels


def test_export_command_writes_dicom(
    tmp_path: Path, mosaic: tuple[MosaicStore, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    store, _ = mosaic
    out, folder = tmp_path / "s.ome.tif", tmp_path / "s.dicom"
    argv = [str(store.path), str(out), "--tile", "256", "--dicom", str(folder), "--patient-id", "P-9"]
    assert cli.main([*argv, "--study-uid", "1.2.3"]) == 0
    assert f"{folder}: DICOM WSI, 4 files" in capsys.readouterr().out
    ds = pydicom.dcmread(folder / level_file_name(3), stop_before_pixels=True)
    assert ds.PatientID == "P-9" and ds.StudyInstanceUID == "1.2.3"
    # An existing folder needs --force; a bad identifier is named, in one line, before anything is written.
    assert cli.main([str(store.path), str(tmp_path / "t.ome.tif"), "--dicom", str(folder)]) == 1
    assert capsys.readouterr().err == f"export: {folder} exists (use --force to replace it)\n"
    assert cli.main([*argv, "--force", "--study-uid", "1.02"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export: invalid configuration: writer.dicom_study_uid") and err.count("\n") == 1


def test_writer_bench_measures_dicom_beside_the_ome_tiff(tmp_path: Path) -> None:
    """``python -m bench writer --formats ome-tiff dicom``: the from-pyr job again with DICOM, and the ratios."""
    cmd = [sys.executable, "-m", "bench", "writer", "--size", "1024", "--json", "--no-vips", "--workdir", str(tmp_path)]
    proc = subprocess.run([*cmd, "--formats", "ome-tiff", "dicom"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["config"]["formats"] == ["ome-tiff", "dicom"]
    (r,) = result["results"]
    tiff, dicom = r["tiff"], r["formats"]["dicom"]
    assert dicom["seconds"] > 0 and dicom["peak_rss_mib"] > 0 and dicom["cpu_seconds"] > 0
    assert dicom["wall_vs_tiff"] == pytest.approx(dicom["seconds"] / tiff["seconds"])
    assert dicom["cpu_vs_tiff"] == pytest.approx(dicom["cpu_seconds"] / tiff["cpu_seconds"])
    # JPEG frames are the TIFF's tiles: the series holds about the TIFF's bytes (plus headers and ICC profiles).
    assert tiff["tiff_bytes"] * 0.9 < dicom["bytes"] < tiff["tiff_bytes"] * 1.2
