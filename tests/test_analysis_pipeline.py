"""The streaming slide analyzer: streaming equals the whole image, memory is bounded by a band,
lesion polygons have the right area, and the offline ``python -m runtime analyze`` writes the outputs."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bench.analysis import ArraySource, render_slide
from runtime.analysis import geojson
from runtime.analysis.baselines import NuclearDensityTumour
from runtime.analysis.heatmap import occlusion_map
from runtime.analysis.lesions import find_lesions
from runtime.analysis.pipeline import (
    GridResult,
    ModelSet,
    SlideAnalyzer,
    analyze_source,
    baseline_models,
)
from runtime.analysis.summary import slide_score, summarize
from runtime.config import AnalysisConfig

PX = 0.5


@pytest.fixture(scope="module")
def small_slide() -> list[np.ndarray]:
    # A development seed (not held out) with lesions, 500 µm at 0.5 µm/px and its 2x pyramid.
    return render_slide(1234, 0, 500.0, held_out=False).levels


def _pieces(rng: np.random.Generator, h: int) -> list[tuple[int, int]]:
    cuts = sorted({0, h, *rng.integers(1, h, size=12).tolist()})
    return list(itertools.pairwise(cuts))


@pytest.mark.parametrize("subdivide", [1, 2])
def test_streaming_in_pieces_equals_the_whole_image(small_slide: list[np.ndarray], subdivide: int) -> None:
    models = baseline_models()
    src = ArraySource(small_slide, PX)
    whole = SlideAnalyzer(src.geometry, models, batch_size=16, subdivide=subdivide)
    for lv in whole.levels:
        whole.feed(lv, 0, small_slide[lv])
    a = whole.finish()

    rng = np.random.default_rng(7)
    streamed = SlideAnalyzer(src.geometry, models, batch_size=16, subdivide=subdivide)
    # Interleave the levels' pieces the way a scan announces them: in order per level, mixed between levels.
    queue = [(lv, y0, y1) for lv in streamed.levels for y0, y1 in _pieces(rng, small_slide[lv].shape[0])]
    queue.sort(key=lambda t: t[2] / small_slide[t[0]].shape[0])
    for lv, y0, y1 in queue:
        streamed.feed(lv, y0, small_slide[lv][y0:y1])
    b = streamed.finish()

    cell_um = 32 / subdivide  # 32 px patches at 1 µm
    assert a.probability.shape == (math.ceil(500 / cell_um), math.ceil(500 / cell_um))
    assert a.analysed.any() and not a.analysed.all()  # tissue and glass
    np.testing.assert_array_equal(a.probability, b.probability)
    np.testing.assert_array_equal(a.tissue, b.tissue)
    np.testing.assert_array_equal(a.analysed, b.analysed)
    np.testing.assert_array_equal(a.attention, b.attention)
    assert a.slide_score == b.slide_score
    assert len(a.nuclei) > 100
    np.testing.assert_array_equal(np.sort(a.nuclei, axis=0), np.sort(b.nuclei, axis=0))


def test_memory_is_a_band_not_the_slide(small_slide: list[np.ndarray]) -> None:
    src = ArraySource(small_slide, PX)
    an = SlideAnalyzer(src.geometry, baseline_models())
    for lv in an.levels:
        for y in range(0, small_slide[lv].shape[0], 8):
            an.feed(lv, y, small_slide[lv][y : y + 8])
    an.finish()
    window = an.win_l + 2 * an.halo_l
    # Rows held: at most one nuclei window with its halo (or a tumour cell row) plus one piece.
    assert an.buffered_rows <= max(window, an.cell_l) + 8
    assert an.buffered_rows < small_slide[0].shape[0]


def test_feeding_out_of_order_is_refused(small_slide: list[np.ndarray]) -> None:
    src = ArraySource(small_slide, PX)
    an = SlideAnalyzer(src.geometry, baseline_models())
    lv = an.levels[0]
    an.feed(lv, 0, small_slide[lv][:10])
    with pytest.raises(ValueError, match="in order"):
        an.feed(lv, 20, small_slide[lv][20:30])


def _grid(prob: np.ndarray, cell_px: float = 64.0, px_um: float = 0.5) -> GridResult:
    gh, gw = prob.shape
    return GridResult(
        shape=(int(gh * cell_px), int(gw * cell_px)),
        pixel_size_um=px_um,
        cell_px=cell_px,
        probability=prob.astype(np.float32),
        tissue=np.ones((gh, gw), np.float32),
        analysed=np.ones((gh, gw), bool),
        artifact=np.zeros((gh, gw), bool),
        attention=np.zeros((gh, gw), np.float32),
        slide_score=float(prob.max()),
        nuclei=np.zeros((0, 2), np.float32),
        stats={"patches": gh * gw},
    )


def test_lesion_polygons_of_a_synthetic_grid_have_the_right_area() -> None:
    prob = np.zeros((60, 80), np.float32)
    prob[10:20, 10:30] = 1.0  # a 10 x 20 cell rectangle: the 0.5 crossing lies on the cell edges
    yy, xx = np.mgrid[0:60, 0:80]
    disk = np.hypot(yy + 0.5 - 40, xx + 0.5 - 55) <= 12  # a disk of 12 cells radius
    prob[disk] = 0.8
    r = _grid(prob)
    found = find_lesions(r)
    assert len(found) == 2
    cell_mm2 = (64 * 0.5 / 1000) ** 2
    big, small = sorted(found, key=lambda les: -les.area_mm2)
    assert big.area_mm2 == pytest.approx(math.pi * 12**2 * cell_mm2, rel=0.04)
    assert small.area_mm2 == pytest.approx(200 * cell_mm2, rel=0.03)
    assert small.max_diameter_mm == pytest.approx(math.hypot(10, 20) * 64 * 0.5 / 1000, rel=0.05)
    assert big.max_diameter_mm == pytest.approx(24 * 64 * 0.5 / 1000, rel=0.05)
    assert small.max_probability == pytest.approx(1.0) and big.max_probability == pytest.approx(0.8)
    # Polygons in level-0 pixels: the rectangle spans x 640..1920, y 640..1280.
    x0, y0, x1, y1 = small.geometry.bounds
    assert (x0, y0, x1, y1) == pytest.approx((640, 640, 1920, 1280), abs=12)
    summ = summarize(r, found, {"tumour": "t"})
    assert summ["lesion_count"] == 2
    assert summ["tumour_burden_mm2"] == pytest.approx(big.area_mm2 + small.area_mm2, rel=1e-4)
    assert summ["tumour_burden_pct"] == pytest.approx(100 * summ["tumour_burden_mm2"] / (60 * 80 * cell_mm2), rel=1e-3)
    assert summ["nuclei_count"] is None


def test_slide_score_is_the_slide_models_or_the_strongest_lesions() -> None:
    """A slide on which a lesion was found contains tumour: its score is at least that lesion's peak; with no
    lesion, or a stronger slide model, it is the slide model's (reported apart as ``slide_model_score``)."""
    prob = np.zeros((40, 40), np.float32)
    prob[10:14, 10:14] = 0.9
    r = dataclasses.replace(_grid(prob), slide_score=0.2)
    found = find_lesions(r)
    assert len(found) == 1 and found[0].max_probability > 0.2
    assert slide_score(r, found) == pytest.approx(found[0].max_probability)
    summ = summarize(r, found, {"tumour": "t"})
    assert summ["slide_score"] == pytest.approx(found[0].max_probability, abs=1e-6)
    assert summ["slide_model_score"] == pytest.approx(0.2) and summ["max_patch_probability"] == pytest.approx(0.9)
    assert slide_score(r, []) == 0.2
    assert slide_score(dataclasses.replace(r, slide_score=0.97), found) == 0.97


def test_nothing_above_threshold_is_no_lesion() -> None:
    r = _grid(np.full((10, 10), 0.3, np.float32))
    assert find_lesions(r) == []
    assert summarize(r, [], {})["tumour_burden_mm2"] == 0.0


def test_glass_is_never_sent_to_the_model(small_slide: list[np.ndarray]) -> None:
    seen: list[int] = []
    base = baseline_models()

    class Counting:
        patch_px = base.tumour.patch_px
        pixel_size_um = base.tumour.pixel_size_um
        embedding_dim = base.tumour.embedding_dim

        def predict(self, patches: np.ndarray):  # type: ignore[no-untyped-def]
            seen.append(len(patches))
            return base.tumour.predict(patches)

    res = analyze_source(ArraySource(small_slide, PX), ModelSet(Counting(), None, base.slide, {}), nuclei=False)
    assert sum(seen) == int(res.analysed.sum()) == res.stats["patches"]
    assert (res.tissue[~res.analysed] < 0.1).all()
    assert res.probability[~res.analysed].max(initial=0.0) == 0.0


def _write_pyramid_tiff(path: Path, levels: list[np.ndarray], px_um: float) -> None:
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(
            levels[0],
            subifds=len(levels) - 1,
            tile=(256, 256),
            photometric="rgb",
            metadata={"axes": "YXS", "PhysicalSizeX": px_um, "PhysicalSizeY": px_um},
        )
        for lv in levels[1:]:
            tif.write(lv, subfiletype=1, tile=(256, 256), photometric="rgb")


def test_offline_analyze_writes_every_output(tmp_path: Path, small_slide: list[np.ndarray]) -> None:
    from runtime.__main__ import main

    slide = tmp_path / "slide.ome.tif"
    _write_pyramid_tiff(slide, small_slide, PX)
    out = tmp_path / "analysis"
    assert main(["analyze", str(slide), "--out", str(out), "--baseline", "--cam", "3"]) == 0
    for name in ("annotations.geojson", "nuclei.geojson", "heatmap.ome.tif", "heatmap.png", "attention.png", "cam.png"):
        assert (out / name).is_file(), name
    assert geojson.check_file(out / "annotations.geojson") >= 1
    assert geojson.check_file(out / "nuclei.geojson") > 100
    summ = json.loads((out / "analysis.json").read_text())
    assert summ["models"]["tumour"].startswith("baseline")
    assert summ["tissue_mm2"] == pytest.approx(0.25 * 0.75, abs=0.1)  # 500 µm square, mostly tissue
    assert summ["nuclei_count"] > 100
    # The same analysis as on the in-memory levels: the TIFF path reads the same pixels.
    direct = analyze_source(ArraySource(small_slide, PX), baseline_models(), subdivide=AnalysisConfig().subdivide)
    assert summ["slide_model_score"] == pytest.approx(direct.slide_score, abs=1e-6)
    assert summ["nuclei_count"] == len(direct.nuclei)


def test_offline_analyze_names_a_bad_slide(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.__main__ import main

    bad = tmp_path / "x.tif"
    bad.write_bytes(b"not a tiff")
    assert main(["analyze", str(bad), "--out", str(tmp_path / "o"), "--baseline"]) == 2
    assert "not a readable TIFF" in capsys.readouterr().err


def test_occlusion_view_points_at_what_the_classifier_reads() -> None:
    """The class-activation view of the nuclear-density baseline lights up its dense nuclei, not the stroma."""
    model = NuclearDensityTumour()
    p = model.patch_px
    patch = np.full((p, p, 3), (235, 170, 225), np.uint8)  # pale eosin
    dark = 9 * p // 16
    patch[:, :dark] = (70, 40, 140)  # the left 9/16: dense haematoxylin, just over the baseline's threshold
    assert model.predict(patch[None]).probability[0] > 0.7
    heat = occlusion_map(model, patch)  # blocks of p/4, stride p/8
    assert heat.shape == (p, p)
    assert heat[:, : dark - p // 4].min() > 0.1  # hiding any of the dense part lowers the probability
    assert abs(heat[:, dark + p // 4 - 2 :]).max() < 1e-6  # hiding only stroma changes nothing


def test_our_ome_tiff_reads_as_the_mosaic_it_was_written_from(tmp_path: Path, small_slide: list[np.ndarray]) -> None:
    """The runtime's own slide (JPEG OME-TIFF with SubIFD levels, written from a Zarr mosaic) gives
    the analyzer the same pyramid as the mosaic, and about the same answers (JPEG aside)."""
    from runtime.analysis.pipeline import MosaicSource, TiffSource
    from runtime.output.mosaic_store import MosaicStore
    from runtime.output.ome_tiff import write_ome_tiff

    img = small_slide[0]
    h, w = img.shape[:2]
    store = MosaicStore.create(tmp_path / "m.zarr", h, w, chunk=256, pixel_size_um=PX, min_level_size=100)
    for y in range(0, h, 256):
        store.write_band(y, img[y : y + 256])
    store.finish()
    write_ome_tiff(store, tmp_path / "slide.ome.tif")
    tiff = TiffSource(tmp_path / "slide.ome.tif")
    try:
        mosaic = MosaicSource(store)
        assert tiff.geometry.level_shapes == mosaic.geometry.level_shapes
        assert tiff.geometry.pixel_size_um == pytest.approx(PX)
        a = analyze_source(mosaic, baseline_models())
        b = analyze_source(tiff, baseline_models())
    finally:
        tiff.close()
        store.close()
    assert (a.analysed == b.analysed).mean() > 0.97  # JPEG moves a cell at the 10% tissue threshold now and then
    both = a.analysed & b.analysed
    assert np.abs(a.probability[both] - b.probability[both]).mean() < 0.05
    assert len(b.nuclei) == pytest.approx(len(a.nuclei), rel=0.05)
