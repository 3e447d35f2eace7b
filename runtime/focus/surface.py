"""The focus surface: focus z(x, y) predicted from the fields already focused.

A distance-weighted plane through the nearest accepted focus points: a slide is
tilted and smoothly warped, so nearby points predict the next field's focus to a
fraction of a micrometre, which is what lets most fields be accepted on their
first capture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class FocusSurface:
    """Focus z(x, y) from accepted points: a Gaussian-weighted plane through the nearest ones."""

    default_z_um: float
    scale_um: float = 1000.0  # weight falls off over about this distance
    neighbours: int = 12
    points: list[tuple[float, float, float]] = field(default_factory=list)

    def add(self, x_um: float, y_um: float, z_um: float) -> None:
        self.points.append((x_um, y_um, z_um))

    def predict(self, x_um: float, y_um: float) -> float:
        if not self.points:
            return self.default_z_um
        p = np.asarray(self.points, np.float64)
        d = np.hypot(p[:, 0] - x_um, p[:, 1] - y_um)
        near = np.argsort(d, kind="stable")[: self.neighbours]
        p, d = p[near], d[near]
        if len(p) < 3:
            return float(p[0, 2])
        w = np.exp(-0.5 * (d / self.scale_um) ** 2) + 1e-6
        a = np.stack([np.ones(len(p)), p[:, 0] - x_um, p[:, 1] - y_um], axis=1)
        sw = np.sqrt(w)[:, None]
        coef = np.linalg.lstsq(a * sw, p[:, 2] * sw[:, 0], rcond=None)[0]
        # Collinear points (one scan row so far) leave the cross-row slope undetermined: lstsq's
        # minimum-norm solution then sets it to zero, which is the right prior for a flat slide.
        z = float(coef[0])
        # A plane extrapolated far beyond its points can run away; stay within the points' range.
        lo, hi = float(p[:, 2].min()), float(p[:, 2].max())
        margin = 2.0
        return float(np.clip(z, lo - margin, hi + margin))
