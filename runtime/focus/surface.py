"""The focus surface: focus z(x, y) predicted from the fields already focused.

A distance-weighted plane through the nearest accepted focus points: a slide is
tilted and smoothly warped, so nearby points predict the next field's focus to a
fraction of a micrometre, which is what lets most fields be accepted on their
first capture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MIN_SPREAD_UM = 20.0
"""Points spread less than this (weighted standard deviation) along a direction give it no slope."""


@dataclass
class FocusSurface:
    """Focus z(x, y) from accepted points: a Gaussian-weighted plane through the nearest ones."""

    default_z_um: float
    scale_um: float = 1000.0  # weight falls off over about this distance
    neighbours: int = 12
    points: list[tuple[float, float, float]] = field(default_factory=list)

    def add(self, x_um: float, y_um: float, z_um: float) -> None:
        self.points.append((x_um, y_um, z_um))

    def assumes_flat(self, x_um: float, y_um: float) -> bool:
        """Does the prediction at (x, y) rest on the flat-slide assumption: no points yet, fewer
        than three, or (x, y) off the line of points that all lie on one scan row (the first field
        of the second row)? Then it is a guess, not an interpolation of measured slopes."""
        if len(self.points) < 3:
            return True
        p = self._nearest(x_um, y_um)
        centre = p[:, :2].mean(axis=0)
        spread, axes = np.linalg.eigh(np.cov((p[:, :2] - centre).T, bias=True))
        flat = axes[:, spread < MIN_SPREAD_UM**2]
        return bool(flat.size and np.abs((np.array([x_um, y_um]) - centre) @ flat).max() > 2 * MIN_SPREAD_UM)

    def _nearest(self, x_um: float, y_um: float) -> np.ndarray:
        p = np.asarray(self.points, np.float64)
        d = np.hypot(p[:, 0] - x_um, p[:, 1] - y_um)
        return p[np.argsort(d, kind="stable")[: self.neighbours]]

    def predict(self, x_um: float, y_um: float) -> float:
        if not self.points:
            return self.default_z_um
        p = self._nearest(x_um, y_um)
        d = np.hypot(p[:, 0] - x_um, p[:, 1] - y_um)
        if len(p) < 3:
            return float(p[0, 2])
        w = np.exp(-0.5 * (d / self.scale_um) ** 2) + 1e-6
        # The plane is solved about the points' weighted centre and its slope only along the
        # directions they spread over (>= MIN_SPREAD_UM): points on one scan row (one y, or a y
        # that jitters by a micrometre) leave the cross-row slope unknown, taken as flat. (Solved
        # about the field to predict instead, a min-norm fit of collinear points off their line
        # traded the intercept for a slope: the first field of the second row was predicted
        # 0.4-0.6 µm off on the bench recordings, clipped to 2 µm from the points at worst.)
        centre = np.average(p[:, :2], axis=0, weights=w)
        xy = p[:, :2] - centre
        cov = (xy * w[:, None]).T @ xy / w.sum()
        spread, axes = np.linalg.eigh(cov)
        keep = axes[:, spread >= MIN_SPREAD_UM**2]
        uv = xy @ keep  # the points along the directions they span
        a = np.concatenate([np.ones((len(p), 1)), uv], axis=1)
        sw = np.sqrt(w)[:, None]
        coef = np.linalg.lstsq(a * sw, p[:, 2] * sw[:, 0], rcond=None)[0]
        z = float(coef[0] + (np.array([x_um, y_um]) - centre) @ keep @ coef[1:])
        # A plane extrapolated far beyond its points can run away; stay within the points' range.
        lo, hi = float(p[:, 2].min()), float(p[:, 2].max())
        margin = 2.0
        return float(np.clip(z, lo - margin, hi + margin))
