"""Per-lesion outline thresholds: where a lesion's edge lies on the tumour probability map.

A patch classifier's probability does not fall to 0.5 where the tumour ends: a patch half over a
high-grade lesion (crowded, dark, enlarged nuclei) already reads ~0.9, so the 0.5 contour runs
10-20 µm outside it (+15-25% area), while a patch half over a low-grade glandular lesion reads
~0.3 and the 0.5 contour cuts into it (-25-40%). A lesion of about one patch is a bump whose
0.5 contour is set by its peak, not by its size (one cell more or less is +-100% of its area).
What the right level is follows from the lesion's own map: its peak and mean probability (how
strongly the model sees this lesion, i.e. its grade) and its size (a lesion below the patch size
never reaches the plateau). :class:`OutlineFit` maps those three to the level of the lesion's
contour, ``logit(t) = c0 + c1 logit(peak) + c2 logit(mean) + c3 ln(area / cell area)``, fitted by
least squares to the level that reproduces each lesion's true area on training-range slides
(``python -m export.fit_outline``, seeds below 900000; it writes the fit into the tumour
model's ``model.json`` under ``"outline"``, per ``subdivide``: the map's shape depends on the grid).

:func:`refine_labels` applies it: each lesion (a connected region at the base threshold) is
re-outlined at its own level within one patch width of itself; a lower level keeps only what
connects to the lesion, so it never annexes a neighbour or a separate faint region, and a lesion
never vanishes (if its level were above its whole map, its peak pixels stay). Detection is
untouched: which regions are lesions, and their peak probability, are those of the base threshold.

A fit may also carry ``tissue_min``: outlines are then cut to the tissue, the cells whose tissue
fraction (upsampled as the probability is) is at least that -- the tissue outline the annotations
draw at 0.5 -- with the holes inside it filled. The map is a 64 µm blur that runs past a lesion at a
tissue edge onto the glass; without the cut that glass counts as tumour. Holes inside the tissue are
kept, as the simulator's truth keeps them (a lesion is its outline within the tissue piece, holes
included): cutting them too lowered Dice on the development slides (0.910 -> 0.889). A lesion the
cut would empty keeps its outline (a detection never vanishes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import cv2
import numpy as np
import numpy.typing as npt

T_RANGE: Final = (0.1, 0.95)  # a fitted level is clipped to this (beyond it the map says nothing of an edge)
N_FEATURES: Final = 4  # OutlineFit.features: 1, logit peak, logit mean, ln area
MARGIN_PATCHES: Final = 1.0  # how far (in patch widths) a lesion's new outline may reach beyond its base region


def _logit(p: float) -> float:
    p = min(max(p, 1e-3), 1.0 - 1e-3)
    return math.log(p / (1.0 - p))


@dataclass(frozen=True)
class OutlineFit:
    """The fitted per-lesion level for one grid (``subdivide``); see the module docstring."""

    subdivide: int
    coef: tuple[float, ...]  # N_FEATURES: c0 (intercept), c1 logit(peak), c2 logit(mean), c3 ln(area cells)
    tissue_min: float | None = None  # outlines cut to cells of at least this tissue fraction (None: no cut)

    @staticmethod
    def features(peak: float, mean: float, area_cells: float) -> tuple[float, float, float, float]:
        """The regression's inputs for a lesion (1, logit peak, logit mean, ln area in cells)."""
        return 1.0, _logit(peak), _logit(mean), math.log(max(area_cells, 1e-3))

    def level(self, peak: float, mean: float, area_cells: float) -> float:
        """The probability level of this lesion's outline, within :data:`T_RANGE`."""
        z = sum(c * f for c, f in zip(self.coef, self.features(peak, mean, area_cells), strict=True))
        return float(min(max(1.0 / (1.0 + math.exp(-z)), T_RANGE[0]), T_RANGE[1]))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"coef": list(self.coef)}
        if self.tissue_min is not None:
            out["tissue_min"] = self.tissue_min
        return out


def fits_from_meta(meta: Mapping[str, Any]) -> dict[int, OutlineFit]:
    """The fits in a tumour model's ``model.json`` (``"outline": {"<subdivide>": {"coef": [4 numbers],
    "tissue_min": number (optional)}}``); {} when it has none. ValueError naming the key when one is malformed."""
    block = meta.get("outline") or {}
    if not isinstance(block, Mapping):
        raise ValueError(f"model.json 'outline' must be an object, got {type(block).__name__}")
    out = {}
    for key, v in block.items():
        coef = v.get("coef") if isinstance(v, Mapping) else None
        if not (str(key).isdigit() and isinstance(coef, list) and len(coef) == N_FEATURES):
            raise ValueError(
                f"model.json 'outline'.{key!r}: expected a subdivide key and 'coef' of {N_FEATURES} numbers"
            )
        t_min = v.get("tissue_min")
        if t_min is not None and not (isinstance(t_min, int | float) and 0.0 < float(t_min) <= 1.0):
            raise ValueError(f"model.json 'outline'.{key!r}.'tissue_min': expected a number in (0, 1], got {t_min!r}")
        out[int(key)] = OutlineFit(int(key), tuple(float(c) for c in coef), None if t_min is None else float(t_min))
    return out


def outline_for(model: object, subdivide: int) -> OutlineFit | None:
    """The fit of a tumour model (its folder's ``model.json``) for grids of ``subdivide``, or None
    (a model without one, e.g. the baselines: lesions keep the fixed threshold)."""
    folder = getattr(model, "folder", None)
    meta = getattr(folder, "meta", None)
    if not isinstance(meta, Mapping):
        return None
    return fits_from_meta(meta).get(int(subdivide))


def lesion_levels(
    up: npt.NDArray[np.float32], labels: npt.NDArray[Any], n: int, cell_upx: float, fit: OutlineFit
) -> list[float]:
    """Each base region's outline level (index k-1 for region k); ``cell_upx``: map pixels per cell side."""
    out = []
    for k in range(1, n):
        vals = up[labels == k]
        out.append(fit.level(float(vals.max()), float(vals.mean()), vals.size / cell_upx**2))
    return out


def region_mask(
    up: npt.NDArray[np.float32],
    labels: npt.NDArray[Any],
    k: int,
    level: float,
    margin_px: int,
    threshold: float,
    claimed: npt.NDArray[np.int32] | None = None,
) -> tuple[tuple[slice, slice], npt.NDArray[np.bool_]]:
    """Region ``k`` of ``labels`` outlined at ``level``: (its window, its mask there) (see the module
    docstring); ``claimed``: pixels other regions' outlines already hold (non-zero), left to them."""
    h, w = up.shape
    ys, xs = np.nonzero(labels == k)
    win = (
        slice(max(0, int(ys.min()) - margin_px), min(h, int(ys.max()) + 1 + margin_px)),
        slice(max(0, int(xs.min()) - margin_px), min(w, int(xs.max()) + 1 + margin_px)),
    )
    lab, u = labels[win], up[win]
    comp = lab == k
    kernel = np.ones((2 * margin_px + 1, 2 * margin_px + 1), np.uint8)
    m = cv2.dilate(comp.astype(np.uint8), kernel).astype(bool) & ((lab == 0) | comp) & (u >= level)
    if claimed is not None:
        m &= claimed[win] == 0
    if level < threshold and m.any():  # only what connects to the region itself
        _, cc = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        touch = np.unique(cc[comp & m])
        m = np.isin(cc, touch[touch > 0])
    if not m.any():
        m = comp & (u >= u[comp].max())
    return win, m


def refine_labels(
    up: npt.NDArray[np.float32],
    labels: npt.NDArray[Any],
    n: int,
    levels: list[float],
    margin_px: int,
    threshold: float,
) -> npt.NDArray[np.int32]:
    """``labels`` (regions 1..n-1 of ``up >= threshold``) re-outlined each at its level (see the
    module docstring); pixels nobody claims are 0. Regions are handled in label order; a pixel two
    regions could claim stays with the first."""
    out = np.zeros_like(labels)
    for k in range(1, n):
        win, m = region_mask(up, labels, k, levels[k - 1], margin_px, threshold, out)
        out[win][m] = k
    return out


def tissue_region(tissue_up: npt.NDArray[np.float32], tissue_min: float) -> npt.NDArray[np.bool_]:
    """Where ``tissue_up`` is at least ``tissue_min``, with the holes inside filled (see :func:`cut_to_tissue`)."""
    on = np.pad((tissue_up >= tissue_min).astype(np.uint8), 1)
    contours, _ = cv2.findContours(on, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(on)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return np.asarray(filled[1:-1, 1:-1] > 0)


def cut_to_tissue(
    labels: npt.NDArray[Any], tissue_up: npt.NDArray[np.float32], tissue_min: float
) -> npt.NDArray[np.int32]:
    """``labels`` without the pixels outside the tissue: where the tissue fraction (``tissue_up``, the
    grid's tissue upsampled as the map is) is below ``tissue_min``, holes inside the tissue excepted
    (they count as tissue, as the truth's tissue piece does: a lumen or tear inside a lesion is part
    of its area); a region the cut would empty keeps all its pixels."""
    out = np.where(tissue_region(tissue_up, tissue_min), labels, 0).astype(np.int32)
    kept = np.unique(out)
    for k in np.setdiff1d(np.unique(labels), kept):
        out[labels == k] = k
    return out
