"""The analysis summary: what ``report.json`` carries under ``analysis`` and ``analysis_ready`` publishes.

Fields (areas in mm², densities per mm² of tissue):

- ``slide_score``: the probability that the slide contains tumour, :func:`slide_score`: the slide
  model's, or the peak of the strongest lesion found where that is higher; ``slide_model_score`` (the
  slide model's alone: the max patch probability when no slide model runs) and
  ``max_patch_probability`` (the baseline aggregate) beside it;
- ``tissue_mm2``: tissue area (sum over the grid of each cell's tissue fraction);
- ``tumour_burden_mm2`` and ``tumour_burden_pct`` (of the tissue area): the lesions' total area;
- ``lesion_count``, ``largest_lesion_diameter_mm`` (largest distance across a lesion) and the
  largest ``lesions`` (area, diameter, mean and max probability, up to ``MAX_LISTED``);
- ``nuclei_count``, ``nuclei_density_in_lesions_per_mm2`` and ``nuclei_density_outside_per_mm2``
  (null when no nuclei model ran, or the area is zero);
- ``models`` (names), ``grid`` (cell size, shape), ``patches`` analysed, ``timing_s``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from runtime.analysis.lesions import Lesion, inside_lesions

if TYPE_CHECKING:
    from runtime.analysis.pipeline import GridResult

MAX_LISTED: Final = 20


def _r(v: float, nd: int = 6) -> float:
    return round(float(v), nd)


def slide_score(result: GridResult, lesions: list[Lesion]) -> float:
    """The slide's tumour score: the slide model's (``result.slide_score``), or the strongest lesion's peak
    probability where that is higher -- a slide on which a lesion was found contains tumour.

    Why: the attention-MIL model reads a slide from patch embeddings, and the slides it ranks lowest are
    those whose only tumour is one or two tiny lesions (0.002-0.005 mm²), which the lesion detection (with
    the lesion head's confirmation of faint regions) does find. On training-range bench slides (seeds
    340000-340063 in both carcinoma looks, 350000-350095), the slide AUC of this score against the slide
    model's alone: 0.991 vs 0.969, 0.967 vs 0.968, 0.995 vs 0.998 with the both-looks models; 0.966 vs
    0.945, 0.944 vs 0.922, 0.979 vs 0.978 with the stop-28 ones (README, "The both-looks head adopted")."""
    return max(result.slide_score, max((les.max_probability for les in lesions), default=0.0))


def summarize(result: GridResult, lesions: list[Lesion], models: dict[str, str]) -> dict[str, Any]:
    """The summary of one analysed slide (see the module docstring)."""
    cell_mm2 = (result.cell_um / 1000.0) ** 2
    tissue_mm2 = float(result.tissue.sum()) * cell_mm2
    burden = sum(les.area_mm2 for les in lesions)
    has_nuclei = bool(models.get("nuclei"))
    inside = inside_lesions(result, lesions)
    n_in = int(inside.sum())
    n_out = len(inside) - n_in
    outside_mm2 = max(tissue_mm2 - burden, 0.0)
    return {
        "slide_score": _r(slide_score(result, lesions)),
        "slide_model_score": _r(result.slide_score),
        "max_patch_probability": _r(result.max_probability),
        "tissue_mm2": _r(tissue_mm2),
        "tumour_burden_mm2": _r(burden),
        "tumour_burden_pct": _r(100.0 * burden / tissue_mm2, 4) if tissue_mm2 > 0 else 0.0,
        "lesion_count": len(lesions),
        "largest_lesion_diameter_mm": _r(max((les.max_diameter_mm for les in lesions), default=0.0)),
        "lesions": [
            {
                "area_mm2": _r(les.area_mm2),
                "max_diameter_mm": _r(les.max_diameter_mm),
                "mean_probability": _r(les.mean_probability, 4),
                "max_probability": _r(les.max_probability, 4),
            }
            for les in lesions[:MAX_LISTED]
        ],
        "nuclei_count": len(result.nuclei) if has_nuclei else None,
        "nuclei_density_in_lesions_per_mm2": _r(n_in / burden, 2) if has_nuclei and burden > 0 else None,
        "nuclei_density_outside_per_mm2": _r(n_out / outside_mm2, 2) if has_nuclei and outside_mm2 > 0 else None,
        "models": dict(models),
        "grid": {
            "cell_um": _r(result.cell_um, 4),
            "shape": list(result.probability.shape),
            "subdivide": int(result.stats.get("subdivide", 1)),
        },
        "patches": int(result.stats.get("patches", 0)),
        "timing_s": {k: _r(v, 3) for k, v in result.stats.items() if k.endswith("_s") and isinstance(v, int | float)},
    }
