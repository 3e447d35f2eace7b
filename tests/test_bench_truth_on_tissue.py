"""bench analysis: the truth's area on the runtime's tissue (how much of a burden error is definition)."""

from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import box

from bench.analysis import PX_UM, BenchSlide, score_slide
from runtime.analysis.lesions import find_lesions
from tests.test_analysis_outline import CELL_PX, bump_result, disc_map


def test_truth_on_tissue_counts_only_the_truth_over_tissue() -> None:
    prob = disc_map(24, 24, 12.0, 12.0, 4.0, 0.98)
    tissue = np.ones((24, 24), np.float32)
    tissue[:, 12:] = 0.0  # glass right of x = 12 cells
    result = bump_result(prob, tissue)
    result.stats.update(patches=0, tumour_s=0.0, nuclei_s=0.0, windows_run=0)
    truth = box(8 * CELL_PX, 8 * CELL_PX, 16 * CELL_PX, 16 * CELL_PX)  # half over the glass
    slide = BenchSlide(seed=1, levels=[], tumour=[truth], mimics=[], nuclei=np.zeros((0, 2)))
    p = score_slide(slide, result, find_lesions(result))
    mm2 = (PX_UM / 1000.0) ** 2
    assert p["truth_mm2"] == pytest.approx(truth.area * mm2)
    # The tissue outline crosses 0.5 half-way between cells 11 and 12 (x = 12 cells), +- a quarter cell.
    assert p["truth_on_tissue_mm2"] / p["truth_mm2"] == pytest.approx(0.5, abs=0.25 / 8)
