"""Flat-field (vignetting) estimation from the scan's own tiles.

Brightfield tiles are darker toward their corners (the objective's and
camera's vignetting, ~10 % at the corners). Left alone it draws the tile grid
on the mosaic: both sides of every seam are dark. The profile is estimated
from the data, never read from a calibration the runtime does not have:

* **Glass blocks** see the lamp through the slide only, so their brightness
  *is* the profile (times the illumination). Each tile is cut into a grid of
  blocks; flat blocks (coefficient of variation near the shot-noise level)
  are kept, and a flat block is glass when it is bright (near the brightest
  flat blocks seen) and neutral (the colour of the brightest ones: pale,
  smooth eosin can be as flat and nearly as bright, but it is pink). Per
  block position the median of glass samples, per channel, is fitted with a
  smooth surface (a 2-D quadratic: vignetting is a low-order radial fall-off,
  and the fit fills block positions that never saw glass), robustly: blocks
  far off the first fit are dropped and it is fitted again.
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
from functools import cached_property
from typing import Any

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

    @cached_property
    def inverse(self) -> F32 | None:
        """1 / gain, computed once: the factor :func:`runtime.stitching.blending.subpixel_shift` applies
        (a multiply per pixel instead of a division and a float copy). None for the identity."""
        if self.source == "none" and bool((self.gain == 1).all()):
            return None
        return np.asarray(1.0 / self.gain, dtype=np.float32)

    @classmethod
    def identity(cls, height: int, width: int) -> FlatField:
        return cls(np.ones((height, width, 3), np.float32), "none", ())


_THIRDS = np.full((1, 3), 1 / 3, np.float32)  # RGB -> the mean of the channels


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
        max_chroma: float = 0.03,
        coverage: float = 0.5,
        max_samples: int = 48,
    ) -> None:
        self.height, self.width = int(height), int(width)
        self.by = max(2, min(blocks, self.height // 8))
        self.bx = max(2, min(blocks, self.width // 8))
        self.max_cv = max_cv
        self.bright = bright
        self.max_chroma = max_chroma
        self.coverage = coverage
        self.max_samples = max_samples
        # Per block position, the flat blocks (RGB means) seen so far: a bounded ring. Which of
        # them are glass is decided when estimating, against everything seen by then.
        self._flat = np.zeros((self.by, self.bx, max_samples, 3), np.float32)
        self._flat_n = np.zeros((self.by, self.bx), np.int64)
        # Per tile (by, bx, 3) block means / tile mean, for the fallback; the latest few suffice.
        self._relative: deque[F32] = deque(maxlen=64)
        self.tiles = 0
        self._glass_seen: tuple[int, tuple[F64, npt.NDArray[np.int64]]] | None = None  # (tiles, _glass())

    def _block_stats(self, tile: U8) -> tuple[F32, F32]:
        size = (self.bx, self.by)
        if self.height % self.by or self.width % self.bx:
            return self._stats(tile, size)
        # Blocks tile the frame exactly: one row of blocks at a time, the same operations on each. Area
        # means over whole blocks do not mix rows of blocks, so the figures are those of the whole frame
        # at once, bit for bit; but the float copies (64 px rows: 0.75 MiB at 1024 px) stay in the cache
        # and come from the heap, where the whole frame's (12 MiB, mapped and paged in afresh per tile)
        # cost ~3x: 4.7 -> 1.6 ms per 1024 px tile (one thread).
        bh = self.height // self.by
        means = np.empty((self.by, self.bx, 3), np.float32)
        cv = np.empty((self.by, self.bx), np.float32)
        for i in range(self.by):
            m, c = self._stats(tile[i * bh : (i + 1) * bh], (self.bx, 1))
            means[i], cv[i] = m[0], c[0]
        return means, cv

    @staticmethod
    def _stats(tile: U8, size: tuple[int, int]) -> tuple[F32, F32]:
        """Per block of ``tile`` (``size``: blocks across, down): RGB means and grey coefficient of variation."""
        f = tile.astype(np.float32)
        means = cv2.resize(f, size, interpolation=cv2.INTER_AREA)
        # OpenCV's channel mix and multiply, not numpy's mean(axis=2) and product: 3.4 ms
        # instead of 22 ms per 1024 px tile (single thread), the same figures to 1e-6.
        grey = cv2.transform(f, _THIRDS)
        sq = cv2.resize(cv2.multiply(grey, grey), size, interpolation=cv2.INTER_AREA)
        means = np.asarray(means, dtype=np.float32).reshape(size[1], size[0], 3)
        sq = np.asarray(sq, dtype=np.float32).reshape(size[1], size[0])
        g = means.mean(axis=2)
        cv = np.sqrt(np.maximum(sq - g * g, 0.0)) / np.maximum(g, 1.0)
        return means, np.asarray(cv, dtype=np.float32)

    def add(self, tile: U8) -> None:
        if tile.shape[:2] != (self.height, self.width):
            raise ValueError(f"tile is {tile.shape[:2]}, expected {(self.height, self.width)}")
        means, cv = self._block_stats(tile)
        for i, j in zip(*np.nonzero(cv <= self.max_cv), strict=True):
            slot = self._flat_n[i, j] % self.max_samples
            self._flat[i, j, slot] = means[i, j]
            self._flat_n[i, j] += 1
        tile_mean = np.maximum(means.reshape(-1, 3).mean(axis=0), 1.0)
        self._relative.append((means / tile_mean).astype(np.float32))
        self.tiles += 1
        self._glass_seen = None

    def _glass(self) -> tuple[F64, npt.NDArray[np.int64]]:
        """Per block position: the median glass sample (RGB) and how many glass samples there are.

        Kept until the next tile: :attr:`ready` and :meth:`estimate` ask for it after the same tile (the
        stitcher asks ``ready`` after every warm-up tile, then ``estimate``, which asks again: 3 x ~3 ms)."""
        if self._glass_seen is not None and self._glass_seen[0] == self.tiles:
            med, count = self._glass_seen[1]
            return med.copy(), count.copy()
        out = self._glass_now()
        self._glass_seen = (self.tiles, out)
        return out[0].copy(), out[1].copy()

    def _glass_now(self) -> tuple[F64, npt.NDArray[np.int64]]:
        n = np.minimum(self._flat_n, self.max_samples)
        valid = np.arange(self.max_samples)[None, None, :] < n[..., None]
        samples = self._flat.astype(np.float64)
        grey = samples.mean(axis=3)
        med = np.zeros((self.by, self.bx, 3))
        if not valid.any():
            return med, np.zeros_like(n)
        top = float(np.percentile(grey[valid], 98))
        bright = valid & (grey >= self.bright * top)
        chroma = samples / np.maximum(grey, 1.0)[..., None]
        brightest = valid & (grey >= 0.95 * top)
        ref = np.median(chroma[brightest], axis=0)
        glass = bright & (np.abs(chroma - ref).max(axis=3) <= self.max_chroma)
        count = glass.sum(axis=2)
        for i, j in zip(*np.nonzero(count), strict=True):
            med[i, j] = np.median(samples[i, j][glass[i, j]], axis=0)
        return med, count

    @property
    def glass_coverage(self) -> float:
        """Share of block positions that have seen glass."""
        return float((self._glass()[1] > 0).mean())

    @property
    def ready(self) -> bool:
        """Enough glass, spread over the frame, for the glass estimate."""
        seen = self._glass()[1] > 0
        if float(seen.mean()) < self.coverage:
            return False
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
        gain = np.empty((self.height, self.width, 3), np.float32)
        coefs = []
        for ch in range(3):
            v = values[..., ch].reshape(-1)
            keep = use.copy()
            for _ in range(3):
                coef, *_ = np.linalg.lstsq(design[keep] * w[keep, None], v[keep] * w[keep], rcond=None)
                # Robust: blocks far off the surface (tissue that passed as glass) are dropped.
                rel = np.abs(v - design @ coef) / max(float(np.median(v[use])), 1e-6)
                mad = float(np.median(rel[keep])) * 1.4826
                kept = use & (rel <= max(3 * mad, 0.01))
                if kept.sum() < 6 or (kept == keep).all():
                    break
                keep = kept
            surface = self._surface(py, px, coef)
            peak = float(surface.max())
            if not math.isfinite(peak) or peak <= 0:
                return FlatField.identity(self.height, self.width).gain, ()
            gain[..., ch] = surface / peak
            coefs.append(tuple(float(c / peak) for c in coef))
        # A profile darker than 40 % anywhere is not vignetting but a failed fit: cap it.
        np.clip(gain, 0.4, 1.0, out=gain)
        return gain, tuple(coefs)

    def _surface(self, py: F64, px: F64, coef: npt.NDArray[np.floating[Any]]) -> F64:
        """The fitted quadratic over the tile (rows ``py``, columns ``px``, normalised), as
        ``(c0 + c2 y + c4 y^2) + (c1 + c5 y) x + c3 x^2``: a row term, a row slope times x and a column
        term, three passes over the tile in float64 and no design matrix (the design's 6 float64 planes,
        a band of rows at a time, were 6.6 ms per channel at 1024 px; this is 1.9). The same surface to
        ~1e-16, which no float32 gain rounds differently (checked on the e2e recording's fit)."""
        c0, c1, c2, c3, c4, c5 = (float(c) for c in coef)
        out = np.empty((len(py), len(px)))
        np.multiply((c1 + c5 * py)[:, None], px[None, :], out=out)
        out += (c0 + c2 * py + c4 * py * py)[:, None]
        out += (c3 * px * px)[None, :]
        return out

    def estimate(self) -> FlatField:
        """The best profile from what was seen: glass if ready, else the median fallback."""
        if self.ready:
            med, n = self._glass()
            gain, coefs = self._fit(med, n.astype(np.float64))
            return FlatField(gain, "glass", coefs)
        if len(self._relative) >= 3:
            med = np.median(np.stack(self._relative), axis=0).astype(np.float64)
            gain, coefs = self._fit(med, np.ones((self.by, self.bx)))
            return FlatField(gain, "median", coefs)
        return FlatField.identity(self.height, self.width)
