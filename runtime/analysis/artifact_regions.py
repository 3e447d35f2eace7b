"""The scanner's artifact regions as QuPath annotations: ``artifacts.geojson`` beside the slide.

During a scan the tile classifier labels each field's 64 µm windows, and the scan's end grows its
artifact flags over the slide's windows (:mod:`runtime.ml.artifact_context`: the inside of a bubble
whose rim was found, a fold's band). ``report.json`` lists those windows per field; a pathologist
wants to *see* them on the slide, next to the analysis's annotations, to judge what the scanner
flagged (a bubble over a lesion, a fold through the tissue). This module turns them into regions:

- each flagged window is the part of its field's tile that the window covers, with the tile cut
  evenly into the window grid (the classifier's windows overlap a little where a tile is not a
  multiple of the window; the even cut gives each window the pixels nearest to it, so neighbouring
  windows touch and overlapping fields' windows overlap as the fields do);
- a field flagged without windows (a journal written before windows were carried) is its whole tile;
- the windows are placed at their field's commanded position (the stitcher moves a tile by a few
  pixels from it; a 64 µm window is 256 px at 0.25 µm) and merged into regions with shapely.

Each region is an ``annotation`` of class ``Artifact`` (the analysis's class), named ``artifact
(scanner)`` so it can be told from the analysis's own pixel test (ink, dark folds), with
measurements: area (mm²), windows, windows the classifier flagged (the rest were added by
context), and the strongest window's p(artifact). The analysis's ``annotations.geojson`` is a
different file, written by another process; QuPath imports both onto the same image.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from runtime.analysis import geojson

ARTIFACTS_NAME: Final = "artifacts.geojson"
"""The file name in the scan's folder."""

REGION_NAME: Final = "artifact (scanner)"

Cell = tuple[int, int]


def window_grid_boxes(
    top_left: tuple[float, float], size: tuple[float, float], grid: tuple[int, int]
) -> dict[Cell, tuple[float, float, float, float]]:
    """Box (x0, y0, x1, y1) of each window (row i, col j) of a tile whose top-left corner is ``top_left``
    (y, x) and whose size is ``size`` (height, width), cut evenly into ``grid`` (rows, cols): rows down y,
    columns along x, in the units given (slide pixels here; µm in ``bench classifier --scan``)."""
    (y0, x0), (h, w), (rows, cols) = top_left, size, grid
    return {
        (i, j): (x0 + j * w / cols, y0 + i * h / rows, x0 + (j + 1) * w / cols, y0 + (i + 1) * h / rows)
        for i in range(rows)
        for j in range(cols)
    }


@dataclass(frozen=True)
class FieldArtifacts:
    """One field's artifact windows on the slide.

    ``top_left``: the tile's top-left corner in level-0 slide pixels (y, x); ``tile``: its (height,
    width); ``grid``: the windows per (row, col) of the tile, or None when the field carries no
    windows (then ``flagged`` is {(0, 0)} for a flagged field: the whole tile); ``flagged``: the
    windows that are artifacts after context; ``by_model``: those the classifier flagged itself;
    ``window_p``: p(artifact) per window row by row (None: not carried).
    """

    top_left: tuple[float, float]
    tile: tuple[int, int]
    grid: tuple[int, int] | None
    flagged: frozenset[Cell]
    by_model: frozenset[Cell] = frozenset()
    window_p: Sequence[Sequence[float]] | None = None

    @classmethod
    def in_context(
        cls,
        top_left: tuple[float, float],
        tile: tuple[int, int],
        context: Mapping[str, Any],
        window_flags: Sequence[Sequence[bool]] | None,
        window_p: Sequence[Sequence[float]] | None,
    ) -> FieldArtifacts:
        """A field from its entry of the scan-end context (``artifact_in_context`` and
        ``artifact_windows_in_context``, :func:`runtime.ml.artifact_context.context_report`) and the
        classifier's window flags and p(artifact) it carried."""
        windows = context.get("artifact_windows_in_context")
        if windows is None or not window_flags:
            whole = frozenset({(0, 0)}) if context.get("artifact_in_context") else frozenset()
            return cls(top_left, tile, None, whole)
        by_model = frozenset((i, j) for i, row in enumerate(window_flags) for j, flag in enumerate(row) if flag)
        grid = (len(window_flags), len(window_flags[0]))
        return cls(top_left, tile, grid, frozenset((int(i), int(j)) for i, j in windows), by_model, window_p)

    def boxes(self) -> list[tuple[Cell, tuple[float, float, float, float]]]:
        """Each flagged window and its box (x0, y0, x1, y1) in slide pixels."""
        grid = window_grid_boxes(self.top_left, self.tile, self.grid or (1, 1))
        return [(cell, grid[cell]) for cell in sorted(self.flagged)]

    def p_artifact(self, cell: Cell) -> float | None:
        wp = self.window_p
        if wp is None or self.grid is None:
            return None
        i, j = cell
        return float(wp[i][j]) if i < len(wp) and j < len(wp[i]) else None


def artifact_features(fields: Iterable[FieldArtifacts], pixel_size_um: float) -> list[dict[str, Any]]:
    """The regions (largest first) as QuPath ``annotation`` features in slide pixels."""
    import shapely

    boxes, by_model, probs = [], [], []
    for f in fields:
        for cell, (x0, y0, x1, y1) in f.boxes():
            boxes.append(shapely.box(x0, y0, x1, y1))
            by_model.append(f.grid is None or cell in f.by_model)
            p = f.p_artifact(cell)
            probs.append(np.nan if p is None else p)
    if not boxes:
        return []
    union = shapely.unary_union(boxes)
    regions = sorted(getattr(union, "geoms", [union]), key=lambda g: -g.area)
    # Each window belongs to the one region its centre lies in (regions are disjoint).
    centre_idx, region_idx = shapely.STRtree(regions).query(shapely.centroid(boxes), predicate="within")
    owner = np.full(len(boxes), -1)
    owner[centre_idx] = region_idx
    model, p_all = np.asarray(by_model, bool), np.asarray(probs, np.float64)
    mm2 = (pixel_size_um / 1000.0) ** 2
    feats = []
    for k, region in enumerate(regions):
        mine = owner == k
        measurements = {
            "Area mm^2": region.area * mm2,
            "Windows": int(mine.sum()),
            "Windows flagged by the classifier": int((mine & model).sum()),
        }
        p = p_all[mine]
        if np.isfinite(p).any():
            measurements["Max p(artifact)"] = float(np.nanmax(p))
        feats.append(
            geojson.annotation(
                region, geojson.ARTIFACT_CLASS, measurements, name=REGION_NAME, feature_id=f"scanner-artifact-{k}"
            )
        )
    return feats


def write_artifact_regions(folder: Path, fields: Iterable[FieldArtifacts], pixel_size_um: float) -> int:
    """``folder/artifacts.geojson`` with the regions (written whole or not at all; none: no file,
    and a stale one from an earlier attempt of the scan is removed). Returns the number of regions."""
    feats = artifact_features(fields, pixel_size_um)
    path = Path(folder) / ARTIFACTS_NAME
    if not feats:
        path.unlink(missing_ok=True)
        return 0
    return geojson.write_atomic(path, feats)
