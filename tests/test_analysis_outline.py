"""Per-lesion outline levels (runtime.analysis.outline) and their fit (export.fit_outline)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shapely.geometry import Point

from runtime.analysis.baselines import NuclearDensityTumour
from runtime.analysis.lesions import Lesion, find_lesions
from runtime.analysis.outline import OutlineFit, fits_from_meta, outline_for
from runtime.analysis.pipeline import GridResult

CELL_PX = 32.0  # level-0 px per cell (1 µm/px: the default grid of subdivide 2)


def bump_result(
    prob: np.ndarray[Any, np.dtype[np.float32]], tissue: np.ndarray[Any, np.dtype[np.float32]] | None = None
) -> GridResult:
    gh, gw = prob.shape
    ones = np.ones((gh, gw), np.float32)
    return GridResult(
        shape=(round(gh * CELL_PX), round(gw * CELL_PX)),
        pixel_size_um=1.0,
        cell_px=CELL_PX,
        probability=prob.astype(np.float32),
        tissue=ones if tissue is None else tissue.astype(np.float32),
        analysed=ones > 0,
        artifact=np.zeros((gh, gw), bool),
        attention=ones / ones.sum(),
        slide_score=0.9,
        nuclei=np.zeros((0, 2), np.float32),
        stats={"subdivide": 2},
    )


def disc_map(gh: int, gw: int, cy: float, cx: float, radius_cells: float, peak: float) -> np.ndarray[Any, Any]:
    """A lesion-like map: ``peak`` inside a disc, falling linearly to 0 over two cells outside it."""
    yy, xx = np.mgrid[0:gh, 0:gw] + 0.5
    d = np.hypot(yy - cy, xx - cx) - radius_cells
    return np.asarray(peak * np.clip(1.0 - d / 2.0, 0.0, 1.0), np.float32)


def by_peak(lesions: list[Lesion]) -> list[Lesion]:
    return sorted(lesions, key=lambda les: les.max_probability)


def constant_fit(level: float) -> OutlineFit:
    """A fit whose level is ``level`` whatever the lesion (intercept only)."""
    return OutlineFit(2, (math.log(level / (1 - level)), 0.0, 0.0, 0.0))


def test_level_follows_the_lesion_and_stays_in_range() -> None:
    fit = OutlineFit(2, (-0.6, 0.7, 1.1, -0.7))
    strong = fit.level(0.99, 0.9, 100.0)
    weak = fit.level(0.7, 0.6, 100.0)
    assert weak < strong  # a lesion the model sees weakly (low grade) is outlined lower on its map
    assert fit.level(0.5, 0.5, 1e6) >= 0.1 and fit.level(0.999, 0.999, 0.01) <= 0.95


def test_outline_moves_the_edge_not_the_detections() -> None:
    prob = disc_map(24, 24, 12.0, 12.0, 4.0, 0.98)
    prob += disc_map(24, 24, 3.0, 20.0, 0.5, 0.62)  # a faint small lesion far from the first
    r = bump_result(prob)
    base = find_lesions(r)
    high = find_lesions(r, outline=constant_fit(0.9))
    low = find_lesions(r, outline=constant_fit(0.2))
    assert len(base) == len(high) == len(low) == 2
    for b, h, lo in zip(by_peak(base), by_peak(high), by_peak(low), strict=True):
        assert b.max_probability == pytest.approx(h.max_probability) == pytest.approx(lo.max_probability)
    big = [by_peak(x)[1].area_mm2 for x in (base, high, low)]
    assert big[1] < big[0] < big[2]
    # The faint lesion's peak is below 0.9: it keeps its peak pixels, it does not vanish.
    assert by_peak(high)[0].area_mm2 > 0
    # A low level reaches at most one patch width (2 cells) beyond the region found at 0.5.
    grown = by_peak(low)[1].geometry
    assert grown.within(by_peak(base)[1].geometry.buffer(2 * CELL_PX + 1))


def test_low_level_does_not_annex_a_separate_faint_region() -> None:
    prob = disc_map(24, 24, 12.0, 12.0, 4.0, 0.98)
    prob[12, 20] = 0.35  # a faint spot within reach, not connected above 0.3 to the lesion
    r = bump_result(prob)
    (les,) = find_lesions(r, outline=constant_fit(0.3))
    assert not les.geometry.contains(Point(20.5 * CELL_PX, 12.5 * CELL_PX))


def test_tissue_cut_keeps_outlines_on_tissue_and_detections_unchanged() -> None:
    """A lesion over a tissue edge loses the glass side of its outline, not its score; a lesion
    wholly on cells below ``tissue_min`` keeps its outline (a detection never vanishes)."""
    prob = disc_map(24, 24, 12.0, 12.0, 4.0, 0.98) + disc_map(24, 24, 3.0, 20.0, 1.0, 0.9)
    tissue = np.ones((24, 24), np.float32)
    tissue[:, 14:] = 0.0  # glass right of column 14: the big lesion's right side, the small one whole
    tissue[:, 14] = 0.3  # a cell part tissue, below the cut
    r = bump_result(prob, tissue)
    fit = constant_fit(0.5)
    uncut = by_peak(find_lesions(r, outline=fit))
    cut = by_peak(find_lesions(r, outline=OutlineFit(2, fit.coef, 0.5)))
    assert len(cut) == len(uncut) == 2
    assert [les.max_probability for les in cut] == pytest.approx([les.max_probability for les in uncut])
    big_cut, big = cut[1].geometry, uncut[1].geometry
    assert big_cut.area < 0.8 * big.area and big_cut.difference(big).area < 0.01 * big_cut.area
    # Tissue 1 at cell 13's centre (x 13.5), 0.3 at cell 14's: the upsampled tissue crosses 0.5 at x ~14.2;
    # the last quarter-cell pixel kept covers [14, 14.25).
    assert big_cut.bounds[2] <= 14.25 * CELL_PX
    assert cut[0].geometry.equals(uncut[0].geometry)  # on glass only: kept as it was


def test_tissue_cut_keeps_holes_inside_the_tissue() -> None:
    """A hole inside the tissue (a lumen, a tear) stays part of a lesion over it, as in the truth."""
    prob = disc_map(24, 24, 12.0, 12.0, 5.0, 0.98)
    tissue = np.ones((24, 24), np.float32)
    tissue[11:14, 11:14] = 0.0  # glass inside the tissue, under the lesion
    r = bump_result(prob, tissue)
    fit = constant_fit(0.5)
    (uncut,) = find_lesions(r, outline=fit)
    (cut,) = find_lesions(r, outline=OutlineFit(2, fit.coef, 0.5))
    assert cut.area_mm2 == pytest.approx(uncut.area_mm2)


def test_fits_from_meta_and_outline_for() -> None:
    assert fits_from_meta({}) == {}
    fits = fits_from_meta({"outline": {"2": {"coef": [0.1, 0.2, 0.3, 0.4], "seeds": "x"}}})
    assert fits[2].coef == (0.1, 0.2, 0.3, 0.4)
    with pytest.raises(ValueError, match=r"'outline'.'2'"):
        fits_from_meta({"outline": {"2": {"coef": [1.0]}}})
    with pytest.raises(ValueError, match="'outline' must be an object"):
        fits_from_meta({"outline": [1, 2]})
    assert fits[2].tissue_min is None
    cut = fits_from_meta({"outline": {"2": {"coef": [0, 0, 0, 0], "tissue_min": 0.5}}})[2]
    assert cut.tissue_min == 0.5 and cut.to_dict() == {"coef": [0, 0, 0, 0], "tissue_min": 0.5}
    with pytest.raises(ValueError, match="'tissue_min'"):
        fits_from_meta({"outline": {"2": {"coef": [0, 0, 0, 0], "tissue_min": 1.5}}})
    assert outline_for(NuclearDensityTumour(), 2) is None  # the baseline keeps the fixed threshold


def test_committed_tumour_model_has_a_fit_for_the_default_grid() -> None:
    from runtime.analysis.models import load_tumour_model
    from runtime.config import AnalysisConfig

    model = load_tumour_model(None)
    sub = AnalysisConfig().subdivide
    fit = outline_for(model, sub)
    assert fit is not None and fit.subdivide == sub and fit.tissue_min == 0.5
    assert outline_for(model, 3) is None


def test_fit_finds_the_level_of_the_true_area(tmp_path: Path) -> None:
    """export.fit_outline: on a map whose 0.5 contour lies outside the true disc, the searched level
    reproduces the true area, and the fit's error is no larger than the least-squares start's."""
    from export.fit_outline import FitSlide, area_error, fit, lesion_samples, write_fit

    samples = []
    for i, (radius, peak) in enumerate([(3.0, 0.98), (5.0, 0.95), (2.0, 0.9), (4.0, 0.97), (6.0, 0.99)]):
        prob = disc_map(24, 24, 12.0, 12.0, radius, peak)
        truth = Point(12 * CELL_PX, 12 * CELL_PX).buffer((radius + 0.5) * CELL_PX)  # inside the 0.5 contour
        (s,) = lesion_samples(FitSlide(i, bump_result(prob), [truth]), 4)
        k = int(np.argmin(np.abs(np.asarray(s["areas"]) - s["true_px"])))
        assert abs(s["areas"][k] - s["true_px"]) / s["true_px"] < 0.1
        assert s["level"] > 0.5
        samples.append(s)
    coef = fit(samples)
    x = np.array([OutlineFit.features(s["peak"], s["mean"], s["area_cells"]) for s in samples])
    assert area_error(coef, x, samples) < 0.15
    (tmp_path / "model.json").write_text('{"format": "wsi-model", "outline": {"1": {"coef": [0, 0, 0, 0]}}}')
    write_fit(tmp_path, 2, coef, {"seeds": "1-5"})
    import json

    meta = json.loads((tmp_path / "model.json").read_text())
    assert set(fits_from_meta(meta)) == {1, 2} and meta["format"] == "wsi-model"
