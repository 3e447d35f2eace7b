"""A small synthetic slide scanned through the real daemon into a pyramidal OME-TIFF."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile
import tiffslide

from hw_sim.replay_job import run_replay
from hw_sim.truth import TILE, TruthRenderer
from runtime.devices.recording import Recording
from tests import bioformats, slide_readers


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


@pytest.fixture(scope="module")
def scanned(small_recording: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("scan")
    config = root / "runtime.toml"
    # A small mosaic: lower the pyramid's floor so the slide has several levels.
    # writer.dicom: the DICOM WSI series too, from the same tiles (checked below with its readers).
    config.write_text("[writer]\nmin_level_size = 128\ndicom = true\n")
    out = root / "run"
    report = run_replay(small_recording, out, config_path=config, progress=False)
    return out, report


def test_report_lists_every_field(scanned: tuple[Path, dict], small_recording: Path) -> None:
    out, _ = scanned
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["finish_reason"] == "completed"
    rec = Recording.open(small_recording)
    assert on_disk["fields_done"] == rec.meta.n_fields == len(on_disk["fields"])
    assert on_disk["captures_total"] >= on_disk["fields_done"]
    assert on_disk["simulated_scan_time_s"] > 0
    assert set(on_disk["peak_rss_mib"]) == {"supervisor", "acquisition", "stitcher", "writer"}
    # The contrast sweep must find focus: the recording knows the truth.
    assert on_disk["focus_truth"]["mae_um"] < 0.5
    assert not (out / "mosaic.zarr").exists()  # removed once the slide is written (default)


def test_ome_tiff_pyramid_and_physical_size(scanned: tuple[Path, dict], small_recording: Path) -> None:
    out, _ = scanned
    rec = Recording.open(small_recording)
    slide = out / "slide.ome.tif"
    assert not list(out.glob("*.partial"))
    with tifffile.TiffFile(slide) as tif:
        assert tif.is_bigtiff and tif.is_ome
        levels = tif.series[0].levels
        shapes = [lv.shape for lv in levels]
        page0 = tif.pages[0]
        assert page0.is_tiled and page0.tilewidth == 512 and page0.tilelength == 512
        assert len(page0.tags["SubIFDs"].value) == len(levels) - 1
        ome = tif.ome_metadata or ""
    h, w = shapes[0][:2]
    for k, shape in enumerate(shapes):
        assert shape[:2] == (-(-h // 2**k), -(-w // 2**k)) and shape[2] == 3
    assert max(shapes[-1][:2]) <= 1024
    px = float(re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', ome).group(1))  # type: ignore[union-attr]
    assert px == pytest.approx(rec.meta.pixel_size_um)


def test_level0_matches_truth(scanned: tuple[Path, dict], small_recording: Path) -> None:
    """The tiles are registered: level 0 is the truth up to one shift shared by the whole mosaic.

    Registration removes each field's own stage error; what is left is the
    mosaic's frame, which is only defined up to a translation (the stage
    prior pins it to the mean stage error of the first tiles; nothing in the
    images can measure it). Per field with content: the measured offset
    between slide and truth must be that one common shift -- the solved
    positions in the report say which -- and with the truth rendered at that
    shift the pixels must match closely.
    """
    out, report = scanned
    slide = tifffile.imread(out / "slide.ome.tif", level=0)
    rec = Recording.open(small_recording)
    m = rec.meta
    assert rec.truth_actual_xy_um is not None
    px = m.pixel_size_um
    # The common shift from the report: solved top-left minus the true one, over registered fields.
    shifts = []
    for p in report["stitch"]["positions"]:
        i = rec.field_index(p["row"], p["col"])
        assert i is not None, p  # the report lists only recorded fields
        true_y, true_x = rec.true_top_left_px(i)
        if p["registered"]:
            shifts.append((p["y_px"] - true_y, p["x_px"] - true_x))
    assert len(shifts) >= m.n_fields // 2
    gy, gx = np.mean(shifts, axis=0)
    # The truth rendered in the mosaic's frame: mosaic pixel q shows slide point q - g.
    renderer = TruthRenderer(replace(m, area=replace(m.area, x_um=m.area.x_um - gx * px, y_um=m.area.y_um - gy * px)))
    truth = np.empty_like(slide)
    for r0 in range(0, slide.shape[0], TILE):
        for c0 in range(0, slide.shape[1], TILE):
            block = renderer.render(r0, c0)
            truth[r0 : r0 + TILE, c0 : c0 + TILE] = block[: slide.shape[0] - r0, : slide.shape[1] - c0]
    h, w = int(m.tile_height * 0.8), int(m.tile_width * 0.8)  # the tile minus its overlaps
    checked = 0
    for i in range(m.n_fields):
        cx = (rec.stage_xy_um[i, 0] - m.area.x_um) / px
        cy = (rec.stage_xy_um[i, 1] - m.area.y_um) / px
        y0, x0 = round(cy - h / 2), round(cx - w / 2)
        a = cv2.cvtColor(slide[y0 : y0 + h, x0 : x0 + w], cv2.COLOR_RGB2GRAY).astype(np.float32)
        b = cv2.cvtColor(truth[y0 : y0 + h, x0 : x0 + w], cv2.COLOR_RGB2GRAY).astype(np.float32)
        window = cv2.createHanningWindow((w, h), cv2.CV_32F)  # no crop-edge peak at zero shift
        (dx, dy), response = cv2.phaseCorrelate(b, a, window)
        if response < 0.3:  # glass or near-empty: nothing to measure
            continue
        # Placed by commanded position, a field would be off by its stage error (8 px rms here).
        assert abs(dx) < 0.5 and abs(dy) < 0.5, (i, (dx, dy), response)
        e = 16
        psnr = _psnr(slide[y0 + e : y0 + h - e, x0 + e : x0 + w - e], truth[y0 + e : y0 + h - e, x0 + e : x0 + w - e])
        # Measured 38-42 dB (noise, residual focus error, JPEG q90); a field 1 px off scores ~25 dB.
        assert psnr > 35.0, (i, psnr)
        checked += 1
    assert checked >= m.n_fields // 2


def test_bioformats_reads_the_pyramid(scanned: tuple[Path, dict]) -> None:
    if bioformats.java() is None:
        pytest.skip("java is not installed")
    out, report = scanned
    text = bioformats.image_info(out / "slide.ome.tif", "-nopix", "-noflat")
    resolutions = int(re.search(r"Resolutions\s*=\s*(\d+)", text).group(1))  # type: ignore[union-attr]
    assert resolutions == len(report["levels"])


@pytest.mark.parametrize("reader", sorted(slide_readers.READERS))
def test_every_reader_sees_every_level(scanned: tuple[Path, dict], small_recording: Path, reader: str) -> None:
    """The daemon's slide in each reader the field uses: level count, every level's size, the pixel size.

    OpenSlide reads only the top-level IFD chain, Bio-Formats/tifffile/tiffslide the
    OME-XML and SubIFDs, libvips both: one file must serve all (``writer.openslide_levels``).
    """
    out, report = scanned
    (h, w), *_ = report["levels"]
    sizes = slide_readers.expected_sizes(h, w, len(report["levels"]))
    assert [(lw, lh) for lh, lw in report["levels"]] == sizes
    assert len(sizes) >= 3
    mpp = Recording.open(small_recording).meta.pixel_size_um
    slide_readers.READERS[reader](out / "slide.ome.tif", sizes, mpp)


def test_the_scan_writes_a_dicom_series_every_dicom_reader_opens(
    scanned: tuple[Path, dict], small_recording: Path
) -> None:
    """``writer.dicom``: the report names ``slide.dicom``; wsidicom and OpenSlide 4 see every level."""
    out, report = scanned
    assert report["dicom"] == str(out / "slide.dicom")
    (h, w), *_ = report["levels"]
    sizes = slide_readers.expected_sizes(h, w, len(report["levels"]))
    mpp = Recording.open(small_recording).meta.pixel_size_um
    slide_readers.check_wsidicom(out / "slide.dicom", sizes, mpp)
    first = sorted((out / "slide.dicom").iterdir())[0]
    slide_readers.check_openslide(first, sizes, mpp, vendor="dicom")


def test_readers_decode_the_same_pixels(scanned: tuple[Path, dict], small_recording: Path) -> None:
    """OpenSlide's levels are the OME-TIFF's own tiles (not a copy): every level decodes alike in every reader."""
    out, report = scanned
    slide = out / "slide.ome.tif"
    with (
        openslide.OpenSlide(str(slide)) as osl,
        tiffslide.TiffSlide(str(slide)) as tsl,
        tifffile.TiffFile(slide) as tif,
    ):
        levels = tif.series[0].levels
        assert osl.level_count == tsl.level_count == len(levels) == len(report["levels"])
        for k, lvl in enumerate(levels):
            ref = lvl.asarray()
            size = osl.level_dimensions[k]
            for name, reader in (("openslide", osl), ("tiffslide", tsl)):
                got = np.asarray(reader.read_region((0, 0), k, size).convert("RGB"))
                assert np.array_equal(got, ref), f"{name} level {k}"
