"""Tumour probability grid -> lesion polygons in slide pixels, with area, diameter and probabilities.

The grid (one probability per patch cell) is upsampled ``UPSAMPLE`` times with bilinear
interpolation between cell centres before thresholding, so outlines follow the 0.5 crossing
between cells instead of the cells' staircase; each connected region above the threshold
becomes one lesion: its outer contour and holes (OpenCV, 8-connected), grown by half an
upsampled pixel (contours run through the centres of the boundary pixels; the region covers
them whole), in level-0 pixel coordinates (x right, y down, the GeoJSON convention of
:mod:`runtime.analysis.geojson`). The tissue outline and artifact regions are traced the same way
from their grids.

With the tumour model's outline fit (:mod:`runtime.analysis.outline`, :func:`model_lesions`: what the
runtime and the bench use), each region found at the threshold is then re-outlined at its own
probability level, which places the edge of a high-grade lesion further in and of a low-grade or
sub-patch lesion further out than the fixed 0.5 contour; which regions are lesions does not change.
A fit with ``tissue_min`` also cuts the outlines to the tissue (:func:`runtime.analysis.outline.cut_to_tissue`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import cv2
import numpy as np
import numpy.typing as npt

from runtime.analysis import geojson
from runtime.analysis.outline import (
    MARGIN_PATCHES,
    OutlineFit,
    cut_to_tissue,
    lesion_levels,
    outline_for,
    refine_labels,
)

if TYPE_CHECKING:
    from runtime.analysis.pipeline import GridResult

UPSAMPLE: Final = 4


@dataclass(frozen=True)
class Lesion:
    """One detected lesion: a shapely (Multi)Polygon in level-0 pixels and its measurements."""

    geometry: Any
    area_mm2: float
    max_diameter_mm: float
    mean_probability: float
    max_probability: float


def _upsampled(grid: npt.NDArray[np.float32], factor: int) -> npt.NDArray[np.float32]:
    """``grid`` upsampled ``factor`` times, pixel centres aligned with the cells' (edge values held)."""
    gh, gw = grid.shape
    return np.asarray(cv2.resize(grid, (gw * factor, gh * factor), interpolation=cv2.INTER_LINEAR), np.float32)


def _polygons(mask: npt.NDArray[np.uint8], scale: float) -> list[Any]:
    """The polygons (with holes) of a binary mask's 8-connected regions; pixel (i, j) covers
    [j, j+1) x [i, i+1) times ``scale`` in the output coordinates."""
    from shapely.geometry import Polygon, box

    if not mask.any():
        return []
    padded = np.pad(mask, 1)
    contours, hierarchy = cv2.findContours(padded, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)

    def ring(c: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        # Contour points are the centres of boundary pixels: pixel k's centre is at k + 0.5 (minus the pad).
        return (c[:, 0, :].astype(np.float64) - 1 + 0.5) * scale

    out = []
    for k, c in enumerate(contours):
        if hierarchy[0][k][3] != -1:
            continue  # a hole: taken with its parent
        if len(c) < 3:
            # One or two pixels: the box around them.
            pts = c[:, 0, :].astype(np.float64) - 1
            (x0, y0), (x1, y1) = pts.min(0), pts.max(0) + 1
            out.append(box(x0 * scale, y0 * scale, x1 * scale, y1 * scale))
            continue
        holes = []
        child = hierarchy[0][k][2]
        while child != -1:
            if len(contours[child]) >= 3:
                holes.append(ring(contours[child]))
            child = hierarchy[0][child][0]
        # The region covers its boundary pixels whole: grow the centre-line outline by half a pixel
        # (holes shrink by the same), mitred so that straight runs stay straight.
        poly = Polygon(ring(c), holes).buffer(0).buffer(0.5 * scale, join_style="mitre", mitre_limit=1.5)
        if not poly.is_empty:
            out.append(poly)
    return out


def mask_polygons(mask: npt.NDArray[np.bool_], cell_px: float, factor: int = 1) -> list[Any]:
    """Polygons of a (possibly upsampled by ``factor``) grid mask, in level-0 pixels."""
    return _polygons(mask.astype(np.uint8), cell_px / factor)


def find_lesions(
    result: GridResult,
    *,
    threshold: float = 0.5,
    min_area_um2: float | None = None,
    upsample: int = UPSAMPLE,
    outline: OutlineFit | None = None,
) -> list[Lesion]:
    """Lesions where the tumour probability is at least ``threshold`` (see the module docstring).

    Regions smaller than ``min_area_um2`` (default: a quarter of a cell) are dropped as noise.
    ``outline`` (the tumour model's fit for this grid, :func:`runtime.analysis.outline.outline_for`):
    each region found at ``threshold`` is then outlined at its own level
    (:mod:`runtime.analysis.outline`); the regions, and so the detections, stay those of ``threshold``.
    Largest first.
    """
    import shapely

    prob = np.where(result.analysed, result.probability, 0.0).astype(np.float32)
    if not (prob >= threshold).any():
        return []
    up = _upsampled(prob, upsample)
    mask = (up >= threshold).astype(np.uint8)
    n, labels = cv2.connectedComponents(mask, connectivity=8)
    px_um = result.pixel_size_um
    mm2 = (px_um / 1000.0) ** 2
    min_px2 = (min_area_um2 if min_area_um2 is not None else 0.25 * result.cell_um**2) / px_um**2
    scale = result.cell_px / upsample
    if outline is not None:
        # Noise is judged on the region found at the threshold, before any outline moves in.
        sizes = np.bincount(labels.ravel(), minlength=n) * scale**2
        labels[(sizes < min_px2)[labels] & (labels > 0)] = 0
        n, cc = cv2.connectedComponents((labels > 0).astype(np.uint8), connectivity=8)
        labels = np.asarray(cc, np.int32)
        margin = max(1, round(MARGIN_PATCHES * int(result.stats.get("subdivide", 1)) * upsample))
        levels = lesion_levels(up, labels, n, float(upsample), outline)
        labels = refine_labels(up, labels, n, levels, margin, threshold)
        min_px2 = 0.0
    peaks = labels  # a lesion's max probability (its detection score) is taken before any tissue cut
    if outline is not None and outline.tissue_min is not None:
        labels = cut_to_tissue(labels, _upsampled(result.tissue, upsample), outline.tissue_min)
    out = []
    for k in range(1, n):
        ys, xs = np.nonzero(labels == k)
        if ys.size == 0:
            continue
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        sub = (labels[y0:y1, x0:x1] == k).astype(np.uint8)
        polys = [shapely.affinity.translate(p, x0 * scale, y0 * scale) for p in _polygons(sub, scale)]
        if not polys:
            continue
        geom = shapely.unary_union(polys) if len(polys) > 1 else polys[0]
        if geom.area < min_px2:
            continue
        vals = up[ys, xs]
        out.append(
            Lesion(
                geometry=geom,
                area_mm2=float(geom.area * mm2),
                max_diameter_mm=geojson.max_diameter(geom) * px_um / 1000.0,
                mean_probability=float(vals.mean()),
                max_probability=float(up[peaks == k].max()),
            )
        )
    out.sort(key=lambda les: -les.area_mm2)
    return out


def model_lesions(result: GridResult, tumour_model: object, *, threshold: float = 0.5) -> list[Lesion]:
    """:func:`find_lesions` with ``tumour_model``'s outline fit for the result's grid
    (:func:`runtime.analysis.outline.outline_for`; none: the fixed threshold outlines them)."""
    fit = outline_for(tumour_model, int(result.stats.get("subdivide", 1)))
    return find_lesions(result, threshold=threshold, outline=fit)


def tissue_geometry(result: GridResult) -> Any:
    """The tissue (cells at least half tissue) as one shapely geometry in level-0 pixels (may be empty)."""
    import shapely

    up = _upsampled(result.tissue, UPSAMPLE) >= 0.5
    polys = mask_polygons(up, result.cell_px, UPSAMPLE)
    return shapely.unary_union(polys) if polys else shapely.Polygon()


def _as_polygonal(geom: Any) -> Any:
    """``geom`` reduced to its polygons (a union can also hold lines and points), None when none."""
    import shapely

    parts = [g for g in getattr(geom, "geoms", [geom]) if g.geom_type == "Polygon" and not g.is_empty]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


def region_features(result: GridResult, lesions: list[Lesion]) -> list[dict[str, Any]]:
    """The annotations: the tissue outline, each lesion, each artifact region (QuPath GeoJSON)."""
    mm2 = (result.pixel_size_um / 1000.0) ** 2
    feats = []
    tissue = _as_polygonal(tissue_geometry(result))
    if tissue is not None:
        feats.append(geojson.annotation(tissue, geojson.TISSUE_CLASS, {"Area mm^2": tissue.area * mm2}, name="tissue"))
    for i, les in enumerate(lesions):
        geom = _as_polygonal(les.geometry)
        if geom is None:
            continue
        feats.append(
            geojson.annotation(
                geom,
                geojson.TUMOR_CLASS,
                {
                    "Area mm^2": les.area_mm2,
                    "Max diameter mm": les.max_diameter_mm,
                    "Mean probability": les.mean_probability,
                    "Max probability": les.max_probability,
                },
                name=f"tumour {i}",
                feature_id=f"lesion-{i}",
            )
        )
    for i, poly in enumerate(mask_polygons(result.artifact, result.cell_px)):
        feats.append(
            geojson.annotation(poly, geojson.ARTIFACT_CLASS, {"Area mm^2": poly.area * mm2}, name=f"artifact {i}")
        )
    return feats


def inside_lesions(result: GridResult, lesions: list[Lesion]) -> npt.NDArray[np.bool_]:
    """Whether each of the result's nuclei lies inside a lesion."""
    import shapely

    nuc = result.nuclei
    if not lesions or len(nuc) == 0:
        return np.zeros(len(nuc), bool)
    union = shapely.unary_union([les.geometry for les in lesions])
    return np.asarray(shapely.contains_xy(union, nuc[:, 1].astype(np.float64), nuc[:, 0].astype(np.float64)), bool)


def nuclei_features(result: GridResult, lesions: list[Lesion]) -> Iterator[str]:
    """A ``detection`` per nucleus (serialised), classified Tumor inside a lesion and Other outside."""
    inside = inside_lesions(result, lesions)
    classes = (geojson.TUMOR_CLASS if t else geojson.OTHER_CLASS for t in inside)
    yield from geojson.detection_points_json(result.nuclei[:, 1].tolist(), result.nuclei[:, 0].tolist(), classes)
