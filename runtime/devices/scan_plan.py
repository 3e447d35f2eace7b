"""Scan plans: which fields to visit, in which order."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from runtime.devices.protocols import ScanArea

MAX_FIELDS: Final = 100_000
"""Default bound on the fields of one plan: a whole 75 x 25 mm slide at 0.25 µm/px in 1024 px
fields is about 35,000. A larger plan is a wrong region or pixel size, and would cost memory
before the first field is captured."""


@dataclass(frozen=True)
class FieldPlan:
    """One field of a scan: its place in the grid and its commanded stage centre (µm)."""

    index: int
    row: int
    col: int
    x_um: float
    y_um: float


@dataclass(frozen=True)
class GridPlan:
    """A serpentine grid of fields covering an area with a given overlap."""

    area: ScanArea
    rows: int
    cols: int
    field_width_um: float
    field_height_um: float
    step_x_um: float
    step_y_um: float
    fields: tuple[FieldPlan, ...]

    @property
    def origin_um(self) -> tuple[float, float]:
        """Stage coordinates (x, y) of the top-left corner of the first field: mosaic pixel (0, 0)."""
        return (self.area.x_um, self.area.y_um)


def _count(extent_um: float, field_um: float, step_um: float) -> int:
    if extent_um <= field_um:
        return 1
    return 1 + math.ceil((extent_um - field_um) / step_um - 1e-9)


def serpentine_plan(
    area: ScanArea,
    field_width_um: float,
    field_height_um: float,
    overlap: float = 0.1,
    *,
    max_fields: int = MAX_FIELDS,
) -> GridPlan:
    """Cover ``area`` with fields overlapping by ``overlap`` (a fraction of the field).

    Rows run left-to-right, then right-to-left (serpentine), which halves the
    stage travel between rows compared with a raster. Fields are indexed in
    acquisition order. Raises ValueError, before building anything, when the
    plan would have more than ``max_fields`` fields.
    """
    if not 0.0 <= overlap < 0.5:
        raise ValueError(f"overlap must be in [0, 0.5), got {overlap}")
    if field_width_um <= 0 or field_height_um <= 0:
        raise ValueError("field size must be positive")
    step_x = field_width_um * (1.0 - overlap)
    step_y = field_height_um * (1.0 - overlap)
    cols = _count(area.width_um, field_width_um, step_x)
    rows = _count(area.height_um, field_height_um, step_y)
    if rows * cols > max_fields:
        raise ValueError(
            f"the scan area {area.width_um:g} x {area.height_um:g} µm needs {cols} x {rows} = {cols * rows} fields "
            f"of {field_width_um:g} x {field_height_um:g} µm; the limit is {max_fields} (scan.max_fields)"
        )
    fields: list[FieldPlan] = []
    for r in range(rows):
        order = range(cols) if r % 2 == 0 else range(cols - 1, -1, -1)
        for c in order:
            fields.append(
                FieldPlan(
                    index=len(fields),
                    row=r,
                    col=c,
                    x_um=area.x_um + field_width_um / 2 + c * step_x,
                    y_um=area.y_um + field_height_um / 2 + r * step_y,
                )
            )
    return GridPlan(area, rows, cols, field_width_um, field_height_um, step_x, step_y, tuple(fields))
