"""The deque accumulator: turns a serpentine stream of tiles into final mosaic bands.

Tiles are placed at their commanded stage positions (registration against
neighbours is a later step). Each mosaic pixel is taken from the tile whose
centre is nearest along each axis: a cut in the middle of every overlap, which
hides the stage error better than letting the last tile overwrite.

Memory: the accumulator holds a deque of ``chunk``-row bands, full mosaic
width, only from the first row not yet final down to the bottom of the scan
row being captured -- bounded by the row width and the tile height, not by
the slide. When a scan row completes, every band above the next row's owned
range is final: it is popped from the left of the deque and written to Zarr
as whole chunks (no read-modify-write), which also feeds the pyramid.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from runtime.mosaic import MosaicStore
from runtime.scan_plan import FieldPlan, GridPlan


@dataclass(frozen=True)
class MosaicGeometry:
    """Where each field's pixels go in the mosaic (level 0, pixels)."""

    plan: GridPlan
    tile_height: int
    tile_width: int
    pixel_size_um: float

    @property
    def step_px(self) -> tuple[float, float]:
        return (self.plan.step_y_um / self.pixel_size_um, self.plan.step_x_um / self.pixel_size_um)

    @property
    def shape(self) -> tuple[int, int]:
        sy, sx = self.step_px
        return (
            round((self.plan.rows - 1) * sy) + self.tile_height,
            round((self.plan.cols - 1) * sx) + self.tile_width,
        )

    def top_left(self, field: FieldPlan) -> tuple[int, int]:
        """Mosaic pixel of the tile's top-left corner at its commanded position."""
        ox, oy = self.plan.origin_um
        x = (field.x_um - self.plan.field_width_um / 2 - ox) / self.pixel_size_um
        y = (field.y_um - self.plan.field_height_um / 2 - oy) / self.pixel_size_um
        return (round(y), round(x))

    def _owned(self, index: int, count: int, step: float, tile: int, total: int) -> tuple[int, int]:
        start = round(index * step)
        lo = 0 if index == 0 else (start + round((index - 1) * step) + tile) // 2
        hi = total if index == count - 1 else (round((index + 1) * step) + start + tile) // 2
        return lo, hi

    def owned_rows(self, row: int) -> tuple[int, int]:
        """Mosaic rows [lo, hi) that scan row ``row`` provides (cut mid-overlap)."""
        return self._owned(row, self.plan.rows, self.step_px[0], self.tile_height, self.shape[0])

    def owned_cols(self, col: int) -> tuple[int, int]:
        return self._owned(col, self.plan.cols, self.step_px[1], self.tile_width, self.shape[1])


class DequeAccumulator:
    """Receives tiles in acquisition order; writes final bands to the mosaic store."""

    def __init__(self, geometry: MosaicGeometry, store: MosaicStore) -> None:
        self.geometry = geometry
        self.store = store
        self.chunk = store.chunk
        height, self.width = geometry.shape
        self.height = height
        self._bands: deque[npt.NDArray[np.uint8]] = deque()
        self._first_band_y = 0  # mosaic row of self._bands[0]
        self._row_counts = [0] * geometry.plan.rows
        self._next_row_to_close = 0
        self.peak_bands = 0

    def _band_for(self, y: int) -> npt.NDArray[np.uint8]:
        idx = (y - self._first_band_y) // self.chunk
        if idx < 0:
            raise ValueError(f"mosaic row {y} was already written; tiles arrived out of order")
        while len(self._bands) <= idx:
            band_y = self._first_band_y + len(self._bands) * self.chunk
            h = min(self.chunk, self.height - band_y)
            # Glass is bright: unfilled pixels (none in a complete grid) stay white.
            self._bands.append(np.full((h, self.width, 3), 255, dtype=np.uint8))
        self.peak_bands = max(self.peak_bands, len(self._bands))
        return self._bands[idx]

    def add(self, field: FieldPlan, tile: npt.NDArray[np.uint8]) -> None:
        """Paste the tile's owned region; close scan rows that became complete."""
        g = self.geometry
        ty, tx = g.top_left(field)
        y0, y1 = g.owned_rows(field.row)
        x0, x1 = g.owned_cols(field.col)
        y = y0
        while y < y1:
            band = self._band_for(y)
            band_y = self._first_band_y + ((y - self._first_band_y) // self.chunk) * self.chunk
            y_end = min(y1, band_y + band.shape[0])
            band[y - band_y : y_end - band_y, x0:x1] = tile[y - ty : y_end - ty, x0 - tx : x1 - tx]
            y = y_end
        self._row_counts[field.row] += 1
        self._close_complete_rows()

    def _close_complete_rows(self) -> None:
        plan = self.geometry.plan
        while self._next_row_to_close < plan.rows and self._row_counts[self._next_row_to_close] == plan.cols:
            _, final_y = self.geometry.owned_rows(self._next_row_to_close)
            self._next_row_to_close += 1
            self._flush_below(final_y)

    def _flush_below(self, final_y: int) -> None:
        while self._bands and self._first_band_y + self._bands[0].shape[0] <= final_y:
            band = self._bands.popleft()
            self.store.write_band(self._first_band_y, band)
            self._first_band_y += band.shape[0]

    def finish(self) -> bool:
        """Flush what is left. Returns True if every field arrived (the mosaic is complete)."""
        complete = self._next_row_to_close == self.geometry.plan.rows
        if complete:
            self._flush_below(self.height)
        else:
            # A cancelled scan: keep every captured row that is final, and the
            # partial band too, so nothing captured is lost.
            while self._bands:
                band = self._bands.popleft()
                self.store.write_band(self._first_band_y, band)
                self._first_band_y += band.shape[0]
        return complete

    @staticmethod
    def bands_bound(geometry: MosaicGeometry, chunk: int) -> int:
        """The most bands the deque can hold at once: a tile's height plus alignment slack."""
        return math.ceil(geometry.tile_height / chunk) + 2
