"""Pairwise registration of two neighbouring tiles on their overlap.

Given two grey tiles (or strips of them) and the displacement the stage model
predicts between them, :func:`register_pair` measures the real displacement to
a few thousandths of a pixel, scores how much to trust it, and rejects pairs
that cannot be measured (glass, a near-empty overlap, a match farther from the
prediction than the stage can err).

Two steps:

1. **Coarse:** the normalised cross-correlation of the two images over their
   shared pixels only, for every displacement within ``search_px`` of the
   prediction (masked NCC, computed with FFTs at a quarter of the resolution
   for big windows, the best peaks re-scored at half resolution, the winner
   refined by the subpixel step at a quarter, which puts it within ~0.1 px).
   Both windows are the predicted overlap widened by the search range and
   high-passed (vignetting and stain gradients are smooth and would
   otherwise dominate). Glass is rejected before any search by a texture
   test (high-passed spread over pixel noise). Phase correlation was tried first: when the
   stage error leaves a thin true overlap inside wide windows its peak shrinks
   with the shared area and lost to noise peaks.
2. **Fine, subpixel:** Lucas-Kanade (Gauss-Newton on the squared difference)
   on the exact overlap, inverse-compositional: b is moved onto a, a's
   gradient is the Jacobian (computed once), so an iteration is one small
   separable filter and two dot products. Interpolation is the cubic B-spline
   (prefiltered), which reproduces polynomials exactly: OpenCV's
   ``remap``/``warpAffine`` quantise coordinates to 1/32 px and its cubic
   kernel shifts a smooth image by up to 15 % too much, and a normalised
   Lanczos kernel under-shifts by ~5 %; either bias was larger than the whole
   error budget (measured on simulator pairs: B-spline LK reaches
   0.001-0.005 px RMS, phase correlation's peak alone ~0.1 px). Moving both
   images by half the shift (so both are interpolated alike) measured no
   better on bench pairs (0.0044 px RMS either way) at twice the cost.

Cost, single thread, per pair of 1024 px tiles with a 10 % overlap and a
+-60 px search (``python -m bench stitch`` pairs): ~6 ms (a glass pair
~1.7 ms), from ~19 ms (7 ms) with full-resolution high-passed windows, a
half-resolution search and full-resolution hill climb, scipy's spline
prefilter and the symmetric LK from the integer peak; the same accuracy
(0.0044 px RMS against the simulator's truth, the same pair outcomes).
Stop 26: high-passes by two box filters instead of ``cv2.stackBlur`` (the
same triangle kernel), LK iterations without copies, and, for a tile's second
pair, the subpixel step started where its first pair and the solved
neighbours put it (``near``, right to ~0.005 px on the e2e recording), which
skips the glass test and the coarse search: on the 356 pairs of the 16 x 12
e2e recording 4.4-4.5 -> 3.4 ms per pair on one core (the 130 second pairs
4.3 -> 2.9 ms), accepted shifts within 0.0006 px of the full search's, the
same outcomes. Stop 31: the subpixel step without per-iteration residual
arrays or gradient filters, the blank test on uint8 overlaps by min == max,
the texture test and the candidates' re-scoring with OpenCV on the uint8 rows
(no float copies): 2.2 -> 1.8 ms per pair on the recording (one core, glibc
tuned as in the stitcher), accepted shifts within 1e-6 px, the same outcomes.
Then a first pair is searched over half the range at a quarter of the
resolution only (:func:`_quick_fit`; the full search when that does not
settle at NCC >= 0.9 well inside it: 5 of the recording's 169 searched
pairs): ~0.45 ms less per searched pair, the same outcomes on every bench
pair, accepted shifts within 0.005 px of the full search's (the subpixel
step's stopping point depends on its start by that much on weak pairs).

The confidence is the normalised cross-correlation of the aligned, high-passed
overlaps (glass: noise against independent noise, ~0; tissue: 0.8-0.99) and a
precision estimate from the Gauss-Newton normal matrix and the residual, which
the position solver uses as the measurement's weight.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

__all__ = ["PairMeasurement", "RegistrationParams", "highpass", "register_pair", "texture", "to_grey"]


@dataclass(frozen=True)
class RegistrationParams:
    """How to register a pair, and when to give up on it.

    ``search_px``: the largest deviation from the predicted displacement (per
    axis) that is believed: the relative error two stage moves can make. A
    match farther away is rejected (the pair falls back on the stage prior).
    ``min_ncc``: the least correlation of the aligned overlaps; independent
    noise (glass on both sides) scores ~0.02 on a 100 x 1000 px overlap,
    tissue 0.9-0.999. In between are overlaps holding a sliver of smooth
    tissue edge: at NCC ~0.3 such a match was measured 0.5 px off while
    claiming 0.03 px, so 0.5 (shared signal as strong as the noise) is the
    default.
    ``mismatch_px``: times (1 - NCC), added in quadrature too: the error a
    partly dissimilar overlap adds to the estimate (see ``register_pair``).
    ``retry_below_ncc``: a fit correlating less is also started from the
    neighbouring pixels, and the best-correlating fit kept.
    ``retry_from_ncc``: ... unless it correlates less than this: such a pair
    is hopeless (rejected below ``min_ncc`` whatever the start), and its four
    retries cost 15-20 times a normal pair. Measured on every pair of the 15
    ``bench stitch`` scans and the 16 x 12 e2e recording (1,431 pairs): 6 were
    retried; the retries raised a first fit's NCC by at most 0.036 (two were
    rescued, from 0.477 and 0.764), and the three that stayed rejected started
    at 0.17-0.22. 0.35 leaves four times that largest gain below ``min_ncc``:
    the same outcomes and accepted shifts, for half the weak pairs' time.
    ``min_texture``: windows whose :func:`texture` is below this (glass reads
    ~1.0, tissue > 3) are not searched at all.
    ``sigma_floor_px``: added in quadrature to the estimated precision, so that
    no single pair is trusted beyond what the model (pure translation,
    interpolation) can deliver.
    ``tolerance_px``: the subpixel step stops once an update is smaller than
    this. 0.005 px saved an iteration on most pairs (about 0.3 ms of 5-7 ms)
    with the same pair errors on the bench recordings (0.0060 vs 0.0061 px
    RMS, 1,230 pairs of 15 scans), but moved the solved positions a little
    (``bench stitch`` rotation seed 1: 0.0175 -> 0.0182 px RMSE; e2e PSNR
    40.263 -> 40.257 dB), so the default stays 0.001.
    ``near_px``: a pair given a ``near`` displacement (see :func:`register_pair`) skips the coarse
    search when the subpixel step started there settles within this of it (per axis) at an NCC of at
    least ``retry_below_ncc``; otherwise it is registered as without one.
    ``quick_share``, ``quick_margin_px``: a pair without ``near`` is first searched within this share of
    ``search_px`` at a quarter of the resolution (:func:`_quick_fit`); its fit is kept when it settles at
    NCC >= ``retry_below_ncc`` at least ``quick_margin_px`` inside that range, else the full search runs.
    1.0: the full search only.
    """

    search_px: float = 40.0
    min_overlap_px: int = 10
    min_ncc: float = 0.5
    highpass_px: int = 41
    sigma_floor_px: float = 0.01
    mismatch_px: float = 2.0
    min_texture: float = 1.1
    retry_below_ncc: float = 0.9
    retry_from_ncc: float = 0.35
    candidates: int = 3
    max_iterations: int = 10
    tolerance_px: float = 0.001
    border_px: int = 3
    near_px: float = 1.0
    quick_share: float = 0.5
    quick_margin_px: float = 4.0

    def __post_init__(self) -> None:
        if self.search_px < 1 or self.min_overlap_px < 8 or not self.near_px > 0:
            raise ValueError("search_px must be >= 1, min_overlap_px >= 8 and near_px > 0")
        if not (0 < self.quick_share <= 1 and self.quick_margin_px >= 0):
            raise ValueError("quick_share must be in (0, 1] and quick_margin_px >= 0")
        if self.highpass_px < 3 or self.highpass_px % 2 == 0:
            raise ValueError(f"highpass_px must be an odd number >= 3, got {self.highpass_px}")


@dataclass(frozen=True)
class PairMeasurement:
    """The displacement of tile b relative to tile a, in a's pixel frame.

    ``shift`` (dy, dx): where b's pixel (0, 0) lies in a's pixel coordinates.
    ``sigma``: 1-sigma precision per component (px); meaningful when accepted.
    ``reason``: ``ok`` or why the pair was rejected (``no_overlap``, ``blank``,
    ``low_ncc``, ``beyond_search``, ``unstable``).
    """

    shift: tuple[float, float]
    sigma: tuple[float, float]
    ncc: float
    accepted: bool
    reason: str
    predicted: tuple[float, float]

    @property
    def deviation(self) -> tuple[float, float]:
        """Measured minus predicted displacement (px)."""
        return (self.shift[0] - self.predicted[0], self.shift[1] - self.predicted[1])


def to_grey(tile: npt.NDArray[np.uint8], out: npt.NDArray[np.uint8] | None = None) -> npt.NDArray[np.uint8]:
    """Luminance of an RGB tile, the single channel registration works on. ``out``: a C-contiguous
    uint8 array of the tile's height and width to write into (and return), reused tile after tile."""
    if out is not None and (out.shape != tile.shape[:2] or out.dtype != np.uint8 or not out.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous uint8 array of shape {tile.shape[:2]}")
    return np.asarray(cv2.cvtColor(np.ascontiguousarray(tile), cv2.COLOR_RGB2GRAY, dst=out), dtype=np.uint8)


def _triangle_blur(img: npt.NDArray[np.generic], kx: int, ky: int) -> F32:
    """The stack blur of ``img`` (odd sizes ``kx`` x ``ky``): the separable triangle kernel
    1, 2, ..., r + 1, ..., 2, 1 (r = k // 2), edges replicated, as float32.

    A triangle is two boxes of r + 1 taps, and a box is O(1) per pixel: on the image padded by r
    (replicated), two ``boxFilter`` passes cost 25-45% less than ``cv2.stackBlur`` (1024 x 100 px:
    0.29 vs 0.42 ms, one core) and agree with the exact kernel to 1e-5; ``cv2.stackBlur`` itself
    is 1e-3 off inside and up to ~9 grey levels off in its last 8 columns (OpenCV 4.x, float32).
    uint8 input is summed exactly."""
    rx, ry = kx // 2, ky // 2
    wx, wy = rx + 1, ry + 1
    h, w = img.shape[:2]
    pad = cv2.copyMakeBorder(np.asarray(img), ry, ry, rx, rx, cv2.BORDER_REPLICATE)
    # An even box is not centred: its two passes take opposite anchors, so the triangle is.
    g = cv2.boxFilter(pad, cv2.CV_32F, (wx, wy), anchor=(wx // 2, wy // 2))
    g = cv2.boxFilter(g, -1, (wx, wy), dst=g, anchor=(wx - 1 - wx // 2, wy - 1 - wy // 2))
    return np.asarray(g[ry : ry + h, rx : rx + w], dtype=np.float32)


def highpass(img: npt.NDArray[np.generic], size: int) -> F32:
    """``img`` minus a smooth version of itself: removes shading, keeps texture.

    A stack blur (a triangle kernel, Gaussian-like, O(1) per pixel: :func:`_triangle_blur`) of
    ``size`` px: vignetting and slow stain variations would otherwise bias both steps of the match.
    """
    src = np.asarray(img)
    k = min(size, 2 * (min(src.shape) // 2) - 1)
    if k < 3:
        f = np.asarray(src, dtype=np.float32)
        return f - np.float32(f.mean())
    if src.dtype != np.uint8:
        src = np.asarray(src, dtype=np.float32)
    return np.asarray(cv2.subtract(src, _triangle_blur(src, k, k), dtype=cv2.CV_32F), dtype=np.float32)


def _rough_highpass(img: npt.NDArray[np.generic], size: int) -> F32:
    """:func:`highpass` with the blur done on a grid size/10 px coarse (block means, stack blur, bicubic back up).

    Several times cheaper, for the search windows and the texture test, where
    only the integer match and a threshold depend on it. Not for the subpixel
    step: its smooth part does not move with the content's subpixel offset,
    which cost accuracy there (0.0050 instead of 0.0044 px RMS pair error on
    bench pairs; with a bilinear upsampling, 0.0065 px). Images not much
    bigger than the blur get the exact one.
    """
    f = np.asarray(img, dtype=np.float32)
    step = size // 10
    if step < 2 or min(f.shape) < 2 * size:
        return highpass(f, size)
    h, w = f.shape
    small = cv2.resize(f, (-(-w // step), -(-h // step)), interpolation=cv2.INTER_AREA)
    small = _triangle_blur(small, 11, 11)
    return f - cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def texture(img: npt.NDArray[np.generic], size: int = 41, high: F32 | None = None, row_step: int = 1) -> float:
    """High-passed standard deviation over the pixel noise: ~1 for glass, >3 for tissue.

    The noise is estimated from differences of horizontally adjacent pixels
    (for white noise E|d| = 2 sigma / sqrt(pi)); texture inflates that
    estimate too, which only makes the test conservative. ``high``: the
    image's high-pass, if the caller has it already. ``row_step``: use every
    row_step-th row only (the blur across rows shrinks by as much): the same
    figure within a few % (glass 1.024 vs 1.026 with 4) for a fraction of the
    work; the noise comes from neighbours within a row either way.
    """
    # uint8 rows are used as they are (no float copy): the differences' L1 norm and the box sums of
    # the blur are exact on integers, and OpenCV's uint8 box filter is ~30% cheaper than its float one.
    f = np.asarray(img[::row_step])
    if f.dtype != np.uint8:
        f = np.asarray(f, dtype=np.float32)
    if f.size < 16 or f.shape[1] < 2:
        return 0.0
    mean_diff = float(cv2.norm(f[:, 1:], f[:, :-1], cv2.NORM_L1)) / float(f.size - f.shape[0])
    noise = mean_diff * math.sqrt(math.pi) / 2
    if high is not None:
        hp = high
    elif row_step == 1:
        hp = _rough_highpass(f, size)
    else:
        kx = min(size, 2 * (f.shape[1] // 2) - 1)
        ky = min((size // row_step) | 1, 2 * (f.shape[0] // 2) - 1)
        if min(kx, ky) >= 3:
            hp = np.asarray(cv2.subtract(f, _triangle_blur(f, kx, ky), dtype=cv2.CV_32F), np.float32)
        else:
            hp = np.asarray(f, np.float32) - np.float32(f.mean())
    std = float(cv2.meanStdDev(hp)[1][0, 0])
    return std / max(noise, 0.25)


def _reject(reason: str, predicted: tuple[float, float], ncc: float = 0.0) -> PairMeasurement:
    return PairMeasurement(predicted, (math.inf, math.inf), ncc, False, reason, predicted)


def _overlap(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...], dy: int, dx: int
) -> tuple[slice, slice, slice, slice] | None:
    """Slices of a and of b that cover the same pixels when b's origin is at (dy, dx) in a."""
    y0, y1 = max(0, dy), min(a_shape[0], dy + b_shape[0])
    x0, x1 = max(0, dx), min(a_shape[1], dx + b_shape[1])
    if y1 <= y0 or x1 <= x0:
        return None
    return slice(y0, y1), slice(x0, x1), slice(y0 - dy, y1 - dy), slice(x0 - dx, x1 - dx)


@functools.lru_cache(maxsize=64)
def _overlap_rows(lo: int, hi: int, n_self: int, n_other: int, first: bool) -> F64:
    """For each displacement r in lo..hi, which of ``n_self`` rows (or columns) lie in the overlap.

    ``first``: this window is the reference (wb(q) ~ wa(q + r)): its rows [r, r + n_other) overlap;
    else it is the moved one, whose rows [-r, n_self' - r) overlap the reference's ``n_other`` rows.
    As 0/1 matrices, the sums over every overlap rectangle are two small matrix products.
    Cached (read-only): tile after tile the windows and bounds repeat (87% of the calls on the 16 x 12
    e2e recording).
    """
    rs = np.arange(lo, hi + 1)[:, None]
    j = np.arange(n_self)[None, :]
    inside = (j >= rs) & (j < rs + n_other) if first else (j >= -rs) & (j < n_other - rs)
    out = inside.astype(np.float64)
    out.setflags(write=False)
    return out


def _masked_ncc(wa: F32, wb: F32, lo: tuple[int, int], hi: tuple[int, int], min_count: float) -> F64:
    """Normalised cross-correlation over the overlap only, for every r in [lo, hi] (Padfield 2012).

    ``wb(p) ~ wa(p + r)``. Each displacement is scored on exactly the pixels
    the two windows share there, so a match covering a sliver of both windows
    (a large stage error, a thin overlap) scores as well as a central one --
    phase correlation's peak shrinks with the shared area and was lost among
    noise peaks in such cases. Displacements sharing fewer than ``min_count``
    pixels score -1. The cross term is OpenCV's ``matchTemplate`` of wb over wa
    zero-padded to just the displacements searched (DFT-based, no cyclic
    aliasing); the overlaps are rectangles, so their sums and sums of squares
    are products of 0/1 row and column selections with the windows (a third of
    the time of integral images with fancy indexing, same figures to 1e-8).
    """
    ha, wa_ = wa.shape
    hb, wb_ = wb.shape
    # cross(r) = sum_q wa(q + r) wb(q): pad[y, x] = wa[y + lo0, x + lo1], zero outside wa.
    ph, pw = hi[0] - lo[0] + hb, hi[1] - lo[1] + wb_
    pad = np.zeros((ph, pw), np.float32)
    y0, x0, y1, x1 = max(0, lo[0]), max(0, lo[1]), min(ha, lo[0] + ph), min(wa_, lo[1] + pw)
    if y1 > y0 and x1 > x0:
        pad[y0 - lo[0] : y1 - lo[0], x0 - lo[1] : x1 - lo[1]] = wa[y0:y1, x0:x1]
    sab = np.asarray(cv2.matchTemplate(pad, np.ascontiguousarray(wb, np.float32), cv2.TM_CCORR), np.float64)
    ra, ca = _overlap_rows(lo[0], hi[0], ha, hb, True), _overlap_rows(lo[1], hi[1], wa_, wb_, True)
    rb, cb = _overlap_rows(lo[0], hi[0], hb, ha, False), _overlap_rows(lo[1], hi[1], wb_, wa_, False)
    a64, b64 = wa.astype(np.float64), wb.astype(np.float64)
    sa = ra @ a64 @ ca.T
    sb = rb @ b64 @ cb.T
    n = np.outer(ra.sum(axis=1), ca.sum(axis=1))
    safe = np.maximum(n, 1.0)
    num = sab - sa * sb / safe
    va = ra @ (a64 * a64) @ ca.T - sa * sa / safe
    vb = rb @ (b64 * b64) @ cb.T - sb * sb / safe
    den = np.sqrt(np.maximum(va, 0.0) * np.maximum(vb, 0.0))
    ok = (n >= min_count) & (den > 1e-6 * safe)
    out = np.full(n.shape, -1.0)
    out[ok] = num[ok] / den[ok]
    return out


# The masked NCC surface's signature (wa, wb, lo, hi, min_count): :func:`_masked_ncc` or a GPU's.
NccSurface = Callable[[F32, F32, tuple[int, int], tuple[int, int], float], F64]


def _peaks(surface: F64, count: int) -> list[tuple[int, int]]:
    """Indices of the ``count`` highest 3 x 3 local maxima, best first."""
    # 3 x 3 maximum; dilate's default border ignores outside pixels (scipy's mode "nearest" alike)
    peaks = surface == cv2.dilate(surface, np.ones((3, 3), np.uint8))
    idx = np.flatnonzero(peaks & (surface > -1.0))
    best = idx[np.argsort(surface.reshape(-1)[idx])[::-1][:count]]
    return [(int(i // surface.shape[1]), int(i % surface.shape[1])) for i in best]


def _overlap_ncc(wa: F32, wb: F32, r: tuple[int, int]) -> float:
    """NCC of the windows' shared pixels at displacement r (wb(p) ~ wa(p + r))."""
    ov = _overlap(wa.shape, wb.shape, r[0], r[1])
    if ov is None:
        return -1.0
    x = wa[ov[0], ov[1]]
    y = wb[ov[2], ov[3]]
    n = x.size
    # Sums over views (no copies), OpenCV's (accumulated in float64, ~3x cheaper than numpy's here);
    # the cross term from the norm of the difference: x.y = (|x|^2 + |y|^2 - |x - y|^2) / 2.
    sx, sy = float(cv2.sumElems(x)[0]), float(cv2.sumElems(y)[0])
    xx, yy = float(cv2.norm(x, cv2.NORM_L2SQR)), float(cv2.norm(y, cv2.NORM_L2SQR))
    sxy = (xx + yy - float(cv2.norm(x, y, cv2.NORM_L2SQR))) / 2
    vx = xx - sx * sx / n
    vy = yy - sy * sy / n
    den = math.sqrt(max(vx, 0.0) * max(vy, 0.0))
    return (sxy - sx * sy / n) / den if den > 0 else -1.0


def _downsample(img: npt.NDArray[np.generic], f: int) -> F32:
    """Means of f x f blocks from the top-left corner (a partial last block is dropped), as float32
    (rounded to integers when ``img`` is uint8).

    Cropped first: ``cv2.resize`` to a size that does not divide the input
    stretches the sampling grid, which shifted coarse matches by up to
    (f - 1) / 2 px.
    """
    h, w = img.shape[0] // f, img.shape[1] // f
    src = np.asarray(img[: h * f, : w * f], dtype=img.dtype)  # a view, typed for OpenCV
    out = cv2.resize(src, (w, h), interpolation=cv2.INTER_AREA)
    return np.asarray(out, dtype=np.float32)


def _coarse(
    raw_a: npt.NDArray[np.generic],
    raw_b: npt.NDArray[np.generic],
    lo: tuple[int, int],
    hi: tuple[int, int],
    p: RegistrationParams,
    surface: NccSurface | None = None,
) -> tuple[float, float]:
    """The r in [lo, hi] (wb(q) ~ wa(q + r)) with the best overlap NCC, to a fraction of a pixel.

    Big windows are high-passed at half resolution (a quarter of the
    pixels), searched at a quarter (a sixteenth of the FFT work; nuclei and
    fibres are still a few pixels wide there), the best ``p.candidates`` local
    maxima re-scored at half resolution, and the winner refined by the
    subpixel step at a quarter: within ~0.1 px, so the full-resolution step
    starts close. Smaller windows are high-passed and searched as they are
    (halved when >= 64 px), the candidates re-scored at full resolution.
    """
    m = min(*raw_a.shape, *raw_b.shape)
    if m >= 128:
        half = (p.highpass_px // 2) | 1
        fine_a = highpass(_downsample(np.asarray(raw_a, np.float32), 2), half)
        fine_b = highpass(_downsample(np.asarray(raw_b, np.float32), 2), half)
        sa, sb, f, g = _downsample(fine_a, 2), _downsample(fine_b, 2), 4, 2
    else:
        fine_a, fine_b = _rough_highpass(raw_a, p.highpass_px), _rough_highpass(raw_b, p.highpass_px)
        f, g = (2 if m >= 64 else 1), 1
        sa, sb = (_downsample(fine_a, 2), _downsample(fine_b, 2)) if f == 2 else (fine_a, fine_b)
    lo_f = (math.floor(lo[0] / f), math.floor(lo[1] / f))
    hi_f = (math.ceil(hi[0] / f), math.ceil(hi[1] / f))
    ncc = (surface or _masked_ncc)(sa, sb, lo_f, hi_f, (p.min_overlap_px / f) ** 2)
    scored = []
    for i, j in _peaks(ncc, p.candidates):
        rc = (lo_f[0] + i, lo_f[1] + j)
        # the candidate at the re-scoring resolution (1/g), kept within the search bounds there
        r = tuple(min(max(rc[k] * f // g, math.ceil(lo[k] / g)), math.floor(hi[k] / g)) for k in (0, 1))
        scored.append((_overlap_ncc(fine_a, fine_b, (r[0], r[1])), rc))
    if not scored:
        return (0.0, 0.0)
    _, rc = max(scored)
    if f == 1:
        return (float(rc[0]), float(rc[1]))
    fit = _lk(sa, sb, (float(rc[0]), float(rc[1])), p, tol=0.01, border=1)
    if isinstance(fit, str):
        return (float(rc[0] * f), float(rc[1] * f))
    return (fit[0][0] * f, fit[0][1] * f)


# The cubic B-spline's prefilter (the inverse of its sampled kernel [1, 4, 1] / 6) is the
# two-sided geometric series sqrt(3) z^|k|, z = sqrt(3) - 2; cut at |k| <= 7 (z^8 ~ 3e-5) it is a
# 15-tap FIR that OpenCV runs in a fraction of scipy's recursive spline_filter's time.
_POLE = math.sqrt(3.0) - 2.0
_PREFILTER: F32 = np.array([math.sqrt(3.0) * _POLE ** abs(k) for k in range(-7, 8)], np.float32)
_PREFILTER /= _PREFILTER.sum()


def _spline_coeffs(img: F32) -> F32:
    """Cubic B-spline coefficients of ``img`` (mirrored at its edges)."""
    out = cv2.sepFilter2D(img, cv2.CV_32F, _PREFILTER, _PREFILTER, borderType=cv2.BORDER_REFLECT_101)
    return np.asarray(out, dtype=np.float32)


def _bspline_kernel(t: float) -> F32:
    """5-tap cubic B-spline weights sampling a prefiltered signal at offset ``t`` (|t| <= 1)."""
    weights = []
    for j in (-2, -1, 0, 1, 2):  # plain floats: this runs a few times per iteration, numpy's overhead dominated
        x = abs(j - t)
        weights.append(2 / 3 - x * x + x * x * x / 2 if x < 1 else (2 - x) ** 3 / 6 if x < 2 else 0.0)
    return np.array(weights, np.float32)


def _shift_coeffs(coeffs: F32, sy: float, sx: float) -> F32:
    """Samples at p + (sy, sx) of the cubic spline whose coefficients are ``coeffs``."""
    out = cv2.sepFilter2D(
        coeffs, cv2.CV_32F, _bspline_kernel(sx), _bspline_kernel(sy), borderType=cv2.BORDER_REFLECT_101
    )
    return np.asarray(out, dtype=np.float32)


_DIFF = np.array([-0.5, 0.0, 0.5], np.float32)
_ONE = np.array([1.0], np.float32)


def _inverse_2x2(gyy: float, gxy: float, gxx: float) -> F64 | None:
    """The inverse of the symmetric normal matrix [[gyy, gxy], [gxy, gxx]], or None when its condition
    number (the ratio of its eigenvalues) exceeds 1e8: closed form, ~50x cheaper than numpy's SVD and
    inverse of a 2 x 2 matrix."""
    half_trace = (gyy + gxx) / 2
    det = gyy * gxx - gxy * gxy
    root = math.sqrt(max(half_trace * half_trace - det, 0.0))
    low, high = half_trace - root, half_trace + root
    if not (low > 0 and high <= 1e8 * low):
        return None
    return np.array([[gxx, -gxy], [-gxy, gyy]]) / det


def _fine(
    oa: F32, ob: F32, start: tuple[float, float], params: RegistrationParams, tol: float, border: int
) -> tuple[F64, F64, float]:
    """Subpixel s with ob(p) ~ oa(p + s), from ``start``; its 1-sigma precision, and the aligned NCC.

    Inverse-compositional Lucas-Kanade: b, interpolated by its cubic B-spline,
    is moved onto a; the Jacobian is a's gradient, computed once, so each
    iteration is one 5 x 5 separable filter and two dot products. The fit uses
    the pixels ``border`` px (>= 1) inside the overlap: the gradients are zero outside
    them, so the dot products run over whole arrays that each iteration writes
    into the same buffer (no slices copied, nothing allocated).

    Stop 31: the residual mb - oa is never formed. Its dot products with the
    gradients are those of mb less the constant ones of oa (computed once),
    and the final residual's spread and the NCC follow from three norms
    (|mb - oa|^2, |oa|^2, |mb|^2) and two sums by expanding the squares:
    per 1024 px pair 0.81 -> ~0.6 ms of CPU.
    """
    cb = _spline_coeffs(ob)
    h, w = oa.shape
    inner = (slice(border, h - border), slice(border, w - border))
    # Central differences on the inner pixels only, left undivided (twice the gradient; the factor
    # is folded into the normal matrix), zero outside: two subtractions of views, no filter, no
    # border to clear afterwards.
    gy, gx = np.empty_like(oa), np.empty_like(oa)
    cols, rows = slice(border, w - border), slice(border, h - border)
    cv2.subtract(oa[border + 1 : h - border + 1, cols], oa[border - 1 : h - border - 1, cols], dst=gy[inner])
    cv2.subtract(oa[rows, border + 1 : w - border + 1], oa[rows, border - 1 : w - border - 1], dst=gx[inner])
    for g in (gy, gx):
        g[:border], g[h - border :], g[:, :border], g[:, w - border :] = 0, 0, 0, 0
    gyy, gxy, gxx = float(np.vdot(gy, gy)), float(np.vdot(gy, gx)), float(np.vdot(gx, gx))
    inv2 = _inverse_2x2(gyy, gxy, gxx)
    if inv2 is None:
        return np.full(2, np.nan), np.full(2, np.inf), 0.0
    # With g = 2 x the gradient: the normal matrix's inverse is 4 inv2 and the right-hand side g.r / 2,
    # so an update is 2 inv2 (g.r).
    inv = 4.0 * inv2
    ga = (float(np.vdot(gy, oa)), float(np.vdot(gx, oa)))
    s = np.array(start, np.float64)
    ds = np.zeros(2)
    rhs = (0.0, 0.0)  # g.r of the last iteration (true gradient)
    mb = np.empty_like(oa)
    if params.max_iterations < 1:
        mb[...] = oa
    for _ in range(params.max_iterations):
        # b sampled at q - s: where a's pixel q finds it
        cv2.sepFilter2D(
            cb, cv2.CV_32F, _bspline_kernel(-s[1]), _bspline_kernel(-s[0]), dst=mb, borderType=cv2.BORDER_REFLECT_101
        )
        rhs = ((float(np.vdot(gy, mb)) - ga[0]) / 2, (float(np.vdot(gx, mb)) - ga[1]) / 2)
        ds = inv @ np.array(rhs)
        s = s + ds
        if float(np.abs(ds).max()) < tol or float(np.abs(s).max()) > 2.0:
            break
    # The residual r = mb - oa on the inner pixels, and r' = r - ds . grad after the last update:
    # |r'|^2 = |r|^2 - 2 ds . (grad . r) + ds' H ds, sum(r') = sum(r) - ds . sum(grad) (H = the normal matrix).
    ta, mbi = oa[inner], mb[inner]
    n = float(ta.size)
    rr = float(cv2.norm(mbi, ta, cv2.NORM_L2SQR))
    r_sum = float(cv2.sumElems(mbi)[0]) - float(cv2.sumElems(ta)[0])
    d0, d1 = float(ds[0]), float(ds[1])
    quad = (d0 * d0 * gyy + 2 * d0 * d1 * gxy + d1 * d1 * gxx) / 4
    rr_after = rr - 2 * (d0 * rhs[0] + d1 * rhs[1]) + quad
    sum_after = r_sum - (d0 * float(cv2.sumElems(gy)[0]) + d1 * float(cv2.sumElems(gx)[0])) / 2
    var = max(rr_after / n - (sum_after / n) ** 2, 0.0)
    cov = inv * var
    sigma = np.sqrt(np.maximum(np.diag(cov), 0.0))
    # The aligned NCC (not mean-subtracted): ta . mb = (|ta|^2 + |mb|^2 - |mb - ta|^2) / 2.
    na, nb = float(cv2.norm(ta, cv2.NORM_L2SQR)), float(cv2.norm(mbi, cv2.NORM_L2SQR))
    denom = math.sqrt(na * nb)
    ncc = (na + nb - rr) / (2 * denom) if denom > 0 else 0.0
    return s, sigma, ncc


def _fine_symmetric(
    oa: F32, ob: F32, start: tuple[float, float], params: RegistrationParams, tol: float, border: int
) -> tuple[F64, F64, float]:
    """:func:`_fine`, with each image moved by half the shift in opposite directions (both interpolated alike)
    and the Jacobian recomputed every iteration: twice the cost, for the partly dissimilar overlaps where the
    inverse-compositional form is less robust (bench pairs at NCC 0.78: 0.016 px off instead of 0.062 px)."""
    ca = _spline_coeffs(oa)
    cb = _spline_coeffs(ob)
    inner = (slice(border, oa.shape[0] - border), slice(border, oa.shape[1] - border))
    s = np.array(start, np.float64)
    ds = np.zeros(2)
    ma = mb = gy = gx = oa[inner]
    normal = np.eye(2)
    for _ in range(params.max_iterations):
        ma = _shift_coeffs(ca, s[0] / 2, s[1] / 2)[inner]
        mb = _shift_coeffs(cb, -s[0] / 2, -s[1] / 2)[inner]
        mean = (ma + mb) * np.float32(0.5)
        gy = np.asarray(cv2.sepFilter2D(mean, cv2.CV_32F, _ONE, _DIFF, borderType=cv2.BORDER_REPLICATE), np.float32)
        gx = np.asarray(cv2.sepFilter2D(mean, cv2.CV_32F, _DIFF, _ONE, borderType=cv2.BORDER_REPLICATE), np.float32)
        r = mb - ma
        gyy, gxy, gxx = float(np.vdot(gy, gy)), float(np.vdot(gy, gx)), float(np.vdot(gx, gx))
        normal = np.array([[gyy, gxy], [gxy, gxx]])
        if np.linalg.cond(normal) > 1e8:
            return np.full(2, np.nan), np.full(2, np.inf), 0.0
        ds = np.asarray(np.linalg.solve(normal, [float(np.vdot(gy, r)), float(np.vdot(gx, r))]), np.float64)
        s = s + ds
        if float(np.abs(ds).max()) < tol or float(np.abs(s).max()) > 2.0:
            break
    residual = (mb - ma) - (gy * np.float32(ds[0]) + gx * np.float32(ds[1]))
    cov = np.linalg.inv(normal) * float(residual.var())
    sigma = np.sqrt(np.maximum(np.diag(cov), 0.0))
    ma, mb = np.ascontiguousarray(ma), np.ascontiguousarray(mb)
    denom = math.sqrt(float(np.vdot(ma, ma)) * float(np.vdot(mb, mb)))
    ncc = float(np.vdot(ma, mb)) / denom if denom > 0 else 0.0
    return s, sigma, ncc


Fit = tuple[tuple[float, float], tuple[float, float], float]


def _constant(img: npt.NDArray[np.generic]) -> bool:
    """Whether every pixel of ``img`` has the same value."""
    low, high, _, _ = cv2.minMaxLoc(np.asarray(img, dtype=img.dtype))
    return bool(low == high)


def _lk(
    wa: npt.NDArray[np.generic],
    wb: npt.NDArray[np.generic],
    start: tuple[float, float],
    p: RegistrationParams,
    tol: float,
    border: int,
    raw: bool = False,
) -> Fit | str:
    """Subpixel r with wb(q) ~ wa(q + r) on the windows' overlap, from ``start``: (r, sigma, ncc), or why not.

    ``tol``: the update (px) at which the iteration stops; ``border``: pixels
    at the overlap's edges left out of the fit (also the least overlap kept
    is ``p.min_overlap_px``). ``raw``: the windows are not high-passed yet.
    """
    least = max(p.min_overlap_px, 2 * border + 4)
    ry, rx = round(start[0]), round(start[1])
    frac = (start[0] - ry, start[1] - rx)
    for _ in range(2):
        ov = _overlap(wa.shape, wb.shape, ry, rx)
        if ov is None or min(ov[0].stop - ov[0].start, ov[1].stop - ov[1].start) < least:
            return "no_overlap"
        a_ov, b_ov = wa[ov[0], ov[1]], wb[ov[2], ov[3]]
        uint8 = raw and a_ov.dtype == np.uint8 and b_ov.dtype == np.uint8
        # Stop 31: on uint8 overlaps "blank" (high-passed spread below 1e-3) means one grey level throughout
        # (a single pixel one level off in 1e5 already reads 3e-3): min == max costs a twentieth of the spread.
        if uint8 and (_constant(a_ov) or _constant(b_ov)):
            return "blank"
        if raw:
            # High-passed on the exact overlap, not cut from the high-passed windows: cut, each side's
            # smooth part near the overlap's edges comes from pixels the other side does not see, which
            # cost accuracy (0.012 px RMS pair error instead of 0.004 px on bench pairs).
            oa, ob = highpass(a_ov, p.highpass_px), highpass(b_ov, p.highpass_px)
        else:
            oa, ob = np.asarray(a_ov, np.float32), np.asarray(b_ov, np.float32)
        if not uint8 and (float(cv2.meanStdDev(oa)[1][0, 0]) < 1e-3 or float(cv2.meanStdDev(ob)[1][0, 0]) < 1e-3):
            return "blank"
        s, sigma, ncc = _fine(oa, ob, frac, p, tol, border)
        if not np.all(np.isfinite(s)):
            return "blank"
        if raw and ncc < p.retry_below_ncc:
            # A partly dissimilar overlap: polish with the symmetric form, from here if LK stayed near.
            near = float(np.abs(s).max()) <= 1.0
            s, sigma, ncc = _fine_symmetric(oa, ob, (float(s[0]), float(s[1])) if near else frac, p, tol, border)
            if not np.all(np.isfinite(s)):
                return "blank"
        # LK is good to about a pixel: re-centre (once) only when the integer start was clearly
        # a pixel off, not for a fraction near 0.5 that would just flip sides.
        step = np.where(np.abs(s) > 0.75, np.round(s), 0).astype(int)
        if not step.any():
            return (ry + float(s[0]), rx + float(s[1])), (float(sigma[0]), float(sigma[1])), ncc
        ry, rx = ry + int(step[0]), rx + int(step[1])
        frac = (float(s[0] - step[0]), float(s[1] - step[1]))
    return "unstable"


def _near_fit(
    raw_a: npt.NDArray[np.generic],
    raw_b: npt.NDArray[np.generic],
    near: tuple[float, float] | None,
    origin: tuple[int, int],
    lo: tuple[int, int],
    hi: tuple[int, int],
    p: RegistrationParams,
) -> Fit | None:
    """The subpixel fit started at ``near`` (b's origin in a's frame; window r = near - ``origin``), if it
    settles within ``p.near_px`` of it at NCC >= ``p.retry_below_ncc``; None: search as without it."""
    if near is None or not (math.isfinite(near[0]) and math.isfinite(near[1])):
        return None
    rn = (near[0] - origin[0], near[1] - origin[1])
    if not (lo[0] <= rn[0] <= hi[0] and lo[1] <= rn[1] <= hi[1]):
        return None
    fit = _lk(raw_a, raw_b, rn, p, p.tolerance_px, p.border_px, raw=True)
    if isinstance(fit, str) or fit[2] < p.retry_below_ncc:
        return None
    if abs(fit[0][0] - rn[0]) > p.near_px or abs(fit[0][1] - rn[1]) > p.near_px:
        return None
    return fit


def _windows(
    a: npt.NDArray[np.generic],
    b: npt.NDArray[np.generic],
    i: tuple[int, int],
    ov: tuple[slice, slice, slice, slice],
    s_: int,
    min_overlap: int,
) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.generic], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Search windows for b's origin within ``s_`` px of ``i`` = (iy, ix), the rounded prediction (``ov``:
    the overlap there): the predicted overlap widened by ``s_``, cut from each image, so the true overlap
    lies inside both wherever it is in that range. Also ``base`` (b's window origin less a's; b's origin is
    i + r - base for a window displacement r, wb(q) ~ wa(q + r)) and the bounds lo..hi of r that keep
    |b's origin - i| <= s_ and an overlap of at least ``min_overlap`` px."""
    iy, ix = i
    ha, wa_, hb, wb_ = a.shape[0], a.shape[1], b.shape[0], b.shape[1]
    ay = (max(0, ov[0].start - s_), min(ha, ov[0].stop + s_))
    ax = (max(0, ov[1].start - s_), min(wa_, ov[1].stop + s_))
    by = (max(iy, ov[0].start - s_), min(iy + hb, ov[0].stop + s_))
    bx = (max(ix, ov[1].start - s_), min(ix + wb_, ov[1].stop + s_))
    raw_a = a[ay[0] : ay[1], ax[0] : ax[1]]
    raw_b = b[by[0] - iy : by[1] - iy, bx[0] - ix : bx[1] - ix]
    base = (by[0] - ay[0], bx[0] - ax[0])
    lo_d = (max(iy - s_, min_overlap - hb), max(ix - s_, min_overlap - wb_))
    hi_d = (min(iy + s_, ha - min_overlap), min(ix + s_, wa_ - min_overlap))
    lo = (lo_d[0] - iy + base[0], lo_d[1] - ix + base[1])
    hi = (hi_d[0] - iy + base[0], hi_d[1] - ix + base[1])
    return raw_a, raw_b, base, lo, hi


def _quick_fit(
    a: npt.NDArray[np.generic],
    b: npt.NDArray[np.generic],
    i: tuple[int, int],
    ov: tuple[slice, slice, slice, slice],
    base: tuple[int, int],
    p: RegistrationParams,
    surface: NccSurface | None,
) -> Fit | None:
    """A cheaper coarse search, then the subpixel step, kept if it settles at NCC >= ``p.retry_below_ncc``
    at least ``p.quick_margin_px`` inside its range (returned in the frame of the full search's windows,
    ``base`` apart); None: register with the full search.

    Cheaper in two ways. The range is ``p.quick_share`` of ``search_px``: that is twice the stage's error
    bound (two moves may err in opposite directions), but a first guess is the tile's own stage prior less
    its neighbour's solved position, so its error is mostly one move's (16 x 12 e2e recording: first
    pairs within 25 px per axis of the guess, search 80 px). And the windows are high-passed and searched
    at a quarter of the resolution only, the best peak taken as it is (no half-resolution re-scoring of
    candidates). A match correlating >= ``retry_below_ncc`` (shared signal ~3x the noise) is the one
    the full search finds; anything else is searched again in full.
    """
    s_q = math.ceil(p.search_px * p.quick_share)
    if not p.quick_margin_px < s_q < math.ceil(p.search_px):
        return None
    wa, wb, base_q, lo, hi = _windows(a, b, i, ov, s_q, p.min_overlap_px)
    f = 4
    if lo[0] > hi[0] or lo[1] > hi[1] or min(*wa.shape, *wb.shape) < 16 * f:
        return None
    # 4 x 4 means (rounded to uint8 when the windows are: a tenth of the cost of a float copy, and the
    # rounding's 0.3 grey level is below the noise of 16 pixels' mean; only the start depends on it).
    size = (p.highpass_px // f) | 1
    qa, qb = highpass(_downsample(wa, f), size), highpass(_downsample(wb, f), size)
    lo_f = (math.floor(lo[0] / f), math.floor(lo[1] / f))
    hi_f = (math.ceil(hi[0] / f), math.ceil(hi[1] / f))
    peaks = _peaks((surface or _masked_ncc)(qa, qb, lo_f, hi_f, (p.min_overlap_px / f) ** 2), 1)
    if not peaks:
        return None
    start = _lk(qa, qb, (float(lo_f[0] + peaks[0][0]), float(lo_f[1] + peaks[0][1])), p, tol=0.01, border=1)
    if isinstance(start, str):
        return None
    fit = _lk(wa, wb, (start[0][0] * f, start[0][1] * f), p, p.tolerance_px, p.border_px, raw=True)
    if isinstance(fit, str) or fit[2] < p.retry_below_ncc:
        return None
    r = fit[0]
    inside = s_q - p.quick_margin_px
    if abs(r[0] - base_q[0]) > inside or abs(r[1] - base_q[1]) > inside:  # b's origin less i
        return None
    return (r[0] - base_q[0] + base[0], r[1] - base_q[1] + base[1]), fit[1], fit[2]


def register_pair(
    a: npt.NDArray[np.generic],
    b: npt.NDArray[np.generic],
    predicted: tuple[float, float],
    params: RegistrationParams | None = None,
    surface: NccSurface | None = None,
    near: tuple[float, float] | None = None,
) -> PairMeasurement:
    """Measure where b's origin lies in a's frame, starting from ``predicted`` (dy, dx).

    ``a`` and ``b`` are single-channel images (uint8 or float) of the same
    optics; ``a`` may be a strip of a tile (pass ``predicted`` in the strip's
    frame). Never raises for bad content: an unreliable pair comes back with
    ``accepted=False`` and the reason. ``surface``: computes the coarse search's masked NCC surface
    in place of :func:`_masked_ncc` (the GPU's, :mod:`runtime.stitching.gpu`).

    ``near``: the displacement believed to within a pixel or so (in the frame of ``predicted``), e.g.
    from the tile's other pair and the solved positions of both neighbours. The subpixel step then
    starts there; if it settles within ``params.near_px`` of ``near`` at an NCC of at least
    ``params.retry_below_ncc`` (which also rules out the retries and the glass test), the glass test and
    the coarse search (together about 40% of a pair's CPU) are skipped; otherwise the pair is registered
    as without ``near``. The search bounds and the acceptance are the same either way; ``predicted``
    stays the reference of ``beyond_search`` and ``deviation``.
    """
    p = params or RegistrationParams()
    pred = (float(predicted[0]), float(predicted[1]))
    iy, ix = round(pred[0]), round(pred[1])
    ov = _overlap(a.shape, b.shape, iy, ix)
    if ov is None or min(ov[0].stop - ov[0].start, ov[1].stop - ov[1].start) < p.min_overlap_px:
        return _reject("no_overlap", pred)
    raw_a, raw_b, base, lo, hi = _windows(a, b, (iy, ix), ov, math.ceil(p.search_px), p.min_overlap_px)
    # A fit from ``near`` that settles at NCC >= retry_below_ncc needs no glass test either: that
    # correlation means the shared signal is ~3x the noise at least (texture >= ~2.4 > min_texture).
    near_fit = _near_fit(raw_a, raw_b, near, (iy - base[0], ix - base[1]), lo, hi, p)
    fit: Fit | str
    if near_fit is not None:  # no retries below either
        r0, fit = near_fit[0], near_fit
    else:
        # Glass on one side at least: nothing to match (tested on every fourth row of big windows).
        step = 4 if min(raw_a.shape[0], raw_b.shape[0]) >= 128 else 1
        tex = min(texture(raw_a, p.highpass_px, row_step=step), texture(raw_b, p.highpass_px, row_step=step))
        if tex < p.min_texture:
            return _reject("blank", pred)
        if lo[0] > hi[0] or lo[1] > hi[1]:
            return _reject("no_overlap", pred)
        quick = _quick_fit(a, b, (iy, ix), ov, base, p, surface)
        if quick is not None:  # no retries below either
            r0, fit = quick[0], quick
        else:
            r0 = _coarse(raw_a, raw_b, lo, hi, p, surface)
            fit = _lk(raw_a, raw_b, r0, p, p.tolerance_px, p.border_px, raw=True)
    if fit == "unstable" or (not isinstance(fit, str) and p.retry_from_ncc <= fit[2] < p.retry_below_ncc):
        # A middling match: LK may have settled in a neighbouring local minimum (thin or
        # smooth overlaps). Start it from the neighbouring pixels too; keep the best fit.
        ry, rx = round(r0[0]), round(r0[1])
        for ny, nx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            other = _lk(raw_a, raw_b, (float(ry + ny), float(rx + nx)), p, p.tolerance_px, p.border_px, raw=True)
            if not isinstance(other, str) and (isinstance(fit, str) or other[2] > fit[2]):
                fit = other
    if isinstance(fit, str):
        return _reject(fit, pred)
    (ry_, rx_), sigma, ncc = fit
    shift = (iy + ry_ - base[0], ix + rx_ - base[1])
    # The LK precision assumes the overlaps differ by noise only; what they do not share (NCC
    # below 1: smooth, sparse or partly out-of-focus content) costs accuracy beyond it. Measured
    # on simulator pairs: errors of ~1-2 px x (1 - NCC), e.g. 0.27 px at NCC 0.74 while LK
    # claimed 0.013 px. Without this a weak pair inside a loop pulled its good neighbours.
    mismatch = p.mismatch_px * max(0.0, 1.0 - ncc)
    sig = (
        math.sqrt(sigma[0] ** 2 + p.sigma_floor_px**2 + mismatch**2),
        math.sqrt(sigma[1] ** 2 + p.sigma_floor_px**2 + mismatch**2),
    )
    if ncc < p.min_ncc:
        return PairMeasurement(shift, sig, ncc, False, "low_ncc", pred)
    if abs(shift[0] - pred[0]) > p.search_px or abs(shift[1] - pred[1]) > p.search_px:
        return PairMeasurement(shift, sig, ncc, False, "beyond_search", pred)
    return PairMeasurement(shift, sig, ncc, True, "ok", pred)
