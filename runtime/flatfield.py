"""Flat-field (vignetting) estimation from the scan's own tiles.

Brightfield tiles are darker toward their corners (the objective's and
camera's vignetting, ~10 % at the corners). Left alone it draws the tile grid
on the mosaic: both sides of every seam are dark. The profile is estimated
from the data, never read from a calibration the runtime does not have:

* **Glass blocks** see the lamp through the slide only, so their brightness
  *is* the profile (times the illumination). Each tile is cut into a grid of
  blocks; a block is glass when it is flat (coefficient of variation near the
  shot-noise level) and bright (near the brightest flat blocks seen).
  Per block position the median of glass samples, per channel, is fitted
  with a smooth surface (a 2-D quadratic: vignetting is a low-order radial
  fall-off, and the fit fills block positions that never saw glass).
* **Fallback, no glass:** the per-position median over tiles of each
  tile's block means divided by the tile's mean; tissue content varies from
  tile to tile, the optics' fall-off does not, so the median keeps the
  fall-off (noisier, but better than nothing).

The profile is normalised to 1 at its brightest point, so correcting a tile
lifts the corners to the centre's level and leaves the illumination and
white balance as the camera set them (that is what the truth shows too).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]

__all__ = ["FlatField", "FlatFieldEstimator"]


@dataclass(frozen=True)
class FlatField:
    """A per-pixel, per-channel gain (H, W, 3) float32, max 1; divide a tile by it."""

    gain: F32
    source: str  # "glass", "median" or "none"
    coefficients: tuple[tuple[float, ...], ...]  # quadratic surface per channel (for the report)

    def correct(self, tile: U8) -> F32:
        """The tile in float32 (0-255 scale) with the fall-off removed (may exceed 255)."""
        return tile.astype(np.float32) / self.gain

    @classmethod
    def identity(cls, height: int, width: int) -> FlatField:
        return cls(np.ones((height, width, 3), np.float32), "none", ())


def _design(ys: F64, xs: F64) -> F64:
    """Quadratic surface terms at normalised coordinates (centre 0, edges +-1)."""
    return np.stack([np.ones_like(xs), xs, ys, xs * xs, ys * ys, xs * ys], axis=-1)


class FlatFieldEstimator:
    """Accumulates block statistics tile by tile; :meth:`estimate` fits the profile.

    ``blocks``: the grid per tile axis (blocks of tile/blocks px). ``max_cv``:
    a glass block's largest coefficient of variation (shot noise of a bright
    8-bit pixel is ~1 %, plus the profile's own slope across a block).
    ``coverage``: the share of block positions that must have seen glass for
    the glass estimate to be trusted.
    """

    def __init__(
        self,
        height: int,
        width: int,
        blocks: int = 16,
        max_cv: float = 0.03,
        bright: float = 0.8,
        coverage: float = 0.5,
        max_samples: int = 32,
    ) -> None:
        self.height, self.width = int(height), int(width)
        self.by = max(2, min(blocks, self.height // 8))
        self.bx = max(2, min(blocks, self.width // 8))
        self.max_cv = max_cv
        self.bright = bright
        self.coverage = coverage
        self.max_samples = max_samples
        # Per block position, the glass samples (RGB means) seen so far: a bounded ring.
        self._glass = np.zeros((self.by, self.bx, max_samples, 3), np.float32)
        self._glass_n = np.zeros((self.by, self.bx), np.int64)
        self._flat_peak = 0.0  # brightest flat block seen (grey): the glass level
        # Per tile (by, bx, 3) block means / tile mean, for the fallback; the latest few suffice.
        self._relative: deque[F32] = deque(maxlen=64)
        self.tiles = 0

    def _block_stats(self, tile: U8) -> tuple[F32, F32]:
        size = (self.bx, self.by)
        f = tile.astype(np.float32)
        means = cv2.resize(f, size, interpolation=cv2.INTER_AREA)
        grey = f.mean(axis=2)
        sq = cv2.resize(grey * grey, size, interpolation=cv2.INTER_AREA)
        g = means.mean(axis=2)
        cv = np.sqrt(np.maximum(sq - g * g, 0.0)) / np.maximum(g, 1.0)
        return np.asarray(means, dtype=np.float32), np.asarray(cv, dtype=np.float32)

    def add(self, tile: U8) -> None:
        if tile.shape[:2] != (self.height, self.width):
            raise ValueError(f"tile is {tile.shape[:2]}, expected {(self.height, self.width)}")
        means, cv = self._block_stats(tile)
        grey = means.mean(axis=2)
        flat = cv <= self.max_cv
        if flat.any():
            self._flat_peak = max(self._flat_peak, float(np.percentile(grey[flat], 90)))
        glass = flat & (grey >= self.bright * self._flat_peak)
        for i, j in zip(*np.nonzero(glass), strict=True):
            slot = self._glass_n[i, j] % self.max_samples
            self._glass[i, j, slot] = means[i, j]
            self._glass_n[i, j] += 1
        tile_mean = np.maximum(means.reshape(-1, 3).mean(axis=0), 1.0)
        self._relative.append((means / tile_mean).astype(np.float32))
        self.tiles += 1

    @property
    def glass_coverage(self) -> float:
        """Share of block positions that have seen glass."""
        return float((self._glass_n > 0).mean())

    @property
    def ready(self) -> bool:
        """Enough glass, spread over the frame, for the glass estimate."""
        if self.glass_coverage < self.coverage:
            return False
        seen = self._glass_n > 0
        hy, hx = self.by // 2, self.bx // 2
        quadrants = (seen[:hy, :hx], seen[:hy, hx:], seen[hy:, :hx], seen[hy:, hx:])
        return all(q.any() for q in quadrants)

    def _fit(self, values: F64, weights: F64) -> tuple[F32, tuple[tuple[float, ...], ...]]:
        """Fit each channel of values (by, bx, 3) with a quadratic; evaluate over the tile."""
        cy = (np.arange(self.by) + 0.5) / self.by * 2 - 1
        cx = (np.arange(self.bx) + 0.5) / self.bx * 2 - 1
        gy, gx = np.meshgrid(cy, cx, indexing="ij")
        design = _design(gy, gx).reshape(-1, 6)
        w = np.sqrt(weights.reshape(-1))
        use = w > 0
        py = (np.arange(self.height) + 0.5) / self.height * 2 - 1
        px = (np.arange(self.width) + 0.5) / self.width * 2 - 1
        fy, fx = np.meshgrid(py, px, indexing="ij")
        full = _design(fy, fx)
        gain = np.empty((self.height, self.width, 3), np.float32)
        coefs = []
        for ch in range(3):
            v = values[..., ch].reshape(-1)
            coef, *_ = np.linalg.lstsq(design[use] * w[use, None], v[use] * w[use], rcond=None)
            surface = full @ coef
            peak = float(surface.max())
            if not math.isfinite(peak) or peak <= 0:
                return FlatField.identity(self.height, self.width).gain, ()
            gain[..., ch] = surface / peak
            coefs.append(tuple(float(c / peak) for c in coef))
        # A profile darker than 40 % anywhere is not vignetting but a failed fit: cap it.
        np.clip(gain, 0.4, 1.0, out=gain)
        return gain, tuple(coefs)

    def estimate(self) -> FlatField:
        """The best profile from what was seen: glass if ready, else the median fallback."""
        if self.ready:
            n = np.minimum(self._glass_n, self.max_samples)
            med = np.zeros((self.by, self.bx, 3))
            for i, j in zip(*np.nonzero(n), strict=True):
                med[i, j] = np.median(self._glass[i, j, : n[i, j]], axis=0)
            gain, coefs = self._fit(med, n.astype(np.float64))
            return FlatField(gain, "glass", coefs)
        if len(self._relative) >= 3:
            med = np.median(np.stack(self._relative), axis=0).astype(np.float64)
            gain, coefs = self._fit(med, np.ones((self.by, self.bx)))
            return FlatField(gain, "median", coefs)
        return FlatField.identity(self.height, self.width)
