"""Blending tiles into the mosaic at subpixel positions, with feathered overlaps.

Tiles are composited one after the other (in scan order, but for tiles the
stitcher held back), each *over* what is already there with an alpha that
ramps linearly from 0 at the tile's edges that overlap earlier tiles
(usually its leading edge in the row and its top edge) to 1 at the far side
of the overlap. Along every edge of the new tile
that lies on earlier content, alpha is 0, so the mosaic is continuous there;
across the overlap it cross-fades from the earlier tiles to the new one (the
classic feather). Edges toward tiles not yet captured get alpha 1: those
tiles will ramp over them in turn. Because the earlier content is already in
the mosaic band, no strip of an earlier tile needs to be kept for blending.

Subpixel placement: the tile is resampled by the fractional part of its
position with a separable Lanczos-3 kernel whose weights are computed in
float64 for the exact fraction (OpenCV's ``warpAffine`` quantises positions
to 1/32 px and its cubic kernel over-shifts, see ``runtime.stitching.registration``),
then pasted at the integer part.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
Bool = npt.NDArray[np.bool_]

__all__ = ["composite", "feather_alpha", "lanczos_kernel", "ramp", "subpixel_shift"]

LANCZOS_A = 3


def lanczos_kernel(t: float, a: int = LANCZOS_A) -> F32:
    """2a+1 weights w[j] (j = -a..a) so that sum_j w[j] f(x + j) ~ f(x + t), normalised to 1."""
    x = np.arange(-a, a + 1, dtype=np.float64) - t
    w = np.sinc(x) * np.sinc(x / a)
    w[np.abs(x) >= a] = 0.0
    return (w / float(w.sum())).astype(np.float32)


def subpixel_shift(tile: F32 | U8, fy: float, fx: float, scale: F32 | None = None) -> F32:
    """The tile moved by (fy, fx) px (|f| <= 1): out(q) = tile(q - f), edges replicated; times ``scale`` if given.

    Moving content by +f means sampling the source at q - f. ``tile`` may be
    the camera's uint8 frame: the filter reads it directly and writes float32
    (no float copy of the tile first). ``scale`` (same shape, float32): a
    per-pixel gain applied to the result in place, the flat-field's inverse
    gain (:attr:`runtime.stitching.flatfield.FlatField.inverse`): flat-field
    correction and resampling in one pass over the tile, ~5.5 ms instead of
    ~7.6 ms for a 1024 px RGB tile (single thread). The gain is applied after
    the shift, not before, so it is off by its own change over the fraction
    of a pixel: at most 0.06 DN on a 1024 px frame with 12 % vignetting.
    """
    if abs(fy) < 1e-4 and abs(fx) < 1e-4:
        if scale is not None:
            return np.asarray(cv2.multiply(tile, scale, dtype=cv2.CV_32F), dtype=np.float32)
        return tile if tile.dtype == np.float32 else tile.astype(np.float32)  # type: ignore[return-value]
    out = cv2.sepFilter2D(tile, cv2.CV_32F, lanczos_kernel(-fx), lanczos_kernel(-fy), borderType=cv2.BORDER_REPLICATE)
    if scale is not None:
        cv2.multiply(out, scale, dst=out)
    return np.asarray(out, dtype=np.float32)


def ramp(n: int, start: float, end: float) -> F32:
    """n weights over pixel centres 0..n-1: 0 at ``start``, 1 at ``end``, linear between, clamped.

    ``end < start`` gives a falling ramp (1 before ``end``... 0 at ``start``):
    the weight always rises from ``start`` toward ``end``.
    """
    x = np.arange(n, dtype=np.float32) + np.float32(0.5)
    if math.isclose(start, end):
        return (x >= end).astype(np.float32) if end >= start else (x <= end).astype(np.float32)
    return np.asarray(np.clip((x - np.float32(start)) / np.float32(end - start), 0.0, 1.0), dtype=np.float32)


def feather_alpha(
    height: int,
    width: int,
    top: float | None = None,
    bottom: float | None = None,
    left: float | None = None,
    right: float | None = None,
) -> F32:
    """Alpha (height, width) of a new tile over earlier content.

    Earlier content covers tile rows [0, top), rows [bottom, height), columns
    [0, left) or columns [right, width); None: none on that side (alpha 1 up
    to that edge). Alpha ramps linearly from 0 at each covered edge to 1 where
    that side's earlier content ends, and is the product over the sides.
    """
    ry = np.ones(height, np.float32)
    if top is not None and top > 0:
        ry *= ramp(height, 0.0, top)
    if bottom is not None and bottom < height:
        ry *= ramp(height, float(height), bottom)
    rx = np.ones(width, np.float32)
    if left is not None and left > 0:
        rx *= ramp(width, 0.0, left)
    if right is not None and right < width:
        rx *= ramp(width, float(width), right)
    out: F32 = ry[:, None] * rx[None, :]
    return out


def composite(band: U8, covered: Bool, tile: F32, alpha: F32) -> None:
    """``band = (1 - a) band + a tile`` in place, a = alpha where covered else 1; marks covered.

    All four arrays describe the same pixels (band and tile (h, w, 3)).
    """
    a = np.where(covered, alpha, np.float32(1.0))[..., None]
    out = band.astype(np.float32)
    out += a * (tile - out)
    np.clip(out, 0.0, 255.0, out=out)
    band[...] = np.rint(out).astype(np.uint8)
    covered[...] = True
