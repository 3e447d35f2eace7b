"""Pairwise registration of two neighbouring tiles on their overlap.

Given two grey tiles (or strips of them) and the displacement the stage model
predicts between them, :func:`register_pair` measures the real displacement to
a few thousandths of a pixel, scores how much to trust it, and rejects pairs
that cannot be measured (glass, a near-empty overlap, a match farther from the
prediction than the stage can err).

Two steps:

1. **Coarse, integer:** the normalised cross-correlation of the two images
   over their shared pixels only, for every displacement within
   ``search_px`` of the prediction (masked NCC, computed with FFTs at half
   resolution for big windows, then re-scored at full resolution around the
   best peaks). Both windows are the predicted overlap widened by the search
   range and high-passed (vignetting and stain gradients are smooth and would
   otherwise dominate). Phase correlation was tried first: when the stage
   error leaves a thin true overlap inside wide windows its peak shrinks with
   the shared area and lost to noise peaks.
2. **Fine, subpixel:** Lucas-Kanade (Gauss-Newton on the squared difference)
   on the exact overlap at the integer shift, each image moved by half the
   shift in opposite directions so both are interpolated alike. Interpolation
   is the cubic B-spline (prefiltered), which reproduces polynomials exactly:
   OpenCV's ``remap``/``warpAffine`` quantise coordinates to 1/32 px and its
   cubic kernel shifts a smooth image by up to 15 % too much, and a
   normalised Lanczos kernel under-shifts by ~5 %; either bias was larger
   than the whole error budget (measured on simulator pairs: B-spline LK
   reaches 0.001-0.003 px RMS, phase correlation's peak alone ~0.1 px).

The confidence is the normalised cross-correlation of the aligned, high-passed
overlaps (glass: noise against independent noise, ~0; tissue: 0.8-0.99) and a
precision estimate from the Gauss-Newton normal matrix and the residual, which
the position solver uses as the measurement's weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
import scipy.fft as sfft
import scipy.ndimage as ndi

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
    ``min_texture``: windows whose :func:`texture` is below this (glass reads
    ~1.0, tissue > 3) are not searched at all.
    ``sigma_floor_px``: added in quadrature to the estimated precision, so that
    no single pair is trusted beyond what the model (pure translation,
    interpolation) can deliver.
    """

    search_px: float = 40.0
    min_overlap_px: int = 10
    min_ncc: float = 0.5
    highpass_px: int = 41
    sigma_floor_px: float = 0.01
    mismatch_px: float = 2.0
    min_texture: float = 1.1
    retry_below_ncc: float = 0.9
    candidates: int = 3
    max_iterations: int = 10
    border_px: int = 3

    def __post_init__(self) -> None:
        if self.search_px < 1 or self.min_overlap_px < 8:
            raise ValueError("search_px must be >= 1 and min_overlap_px >= 8")
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


def to_grey(tile: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Luminance of an RGB tile, the single channel registration works on."""
    return np.asarray(cv2.cvtColor(np.ascontiguousarray(tile), cv2.COLOR_RGB2GRAY), dtype=np.uint8)


def highpass(img: npt.NDArray[np.generic], size: int) -> F32:
    """``img`` minus a smooth version of itself: removes shading, keeps texture.

    A stack blur (Gaussian-like, O(1) per pixel) of ``size`` px: vignetting
    and slow stain variations would otherwise bias both steps of the match.
    """
    f = img.astype(np.float32)
    k = min(size, 2 * (min(f.shape) // 2) - 1)
    if k < 3:
        return f - np.float32(f.mean())
    return f - cv2.stackBlur(f, (k, k))


def texture(img: npt.NDArray[np.generic], size: int = 41, high: F32 | None = None) -> float:
    """High-passed standard deviation over the pixel noise: ~1 for glass, >3 for tissue.

    The noise is estimated from differences of horizontally adjacent pixels
    (for white noise E|d| = 2 sigma / sqrt(pi)); texture inflates that
    estimate too, which only makes the test conservative. ``high``: the
    image's :func:`highpass`, if the caller has it already.
    """
    f = img.astype(np.float32)
    if f.size < 16 or f.shape[1] < 2:
        return 0.0
    noise = float(np.abs(np.diff(f, axis=1)).mean()) * math.sqrt(math.pi) / 2
    hp = highpass(f, size) if high is None else high
    return float(hp.std()) / max(noise, 0.25)


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


Bounds = tuple[npt.NDArray[np.integer], npt.NDArray[np.integer]]


def _window_sums(img: npt.NDArray[np.floating], rows: Bounds, cols: Bounds) -> F64:
    """Sums of img over the rectangles rows[0][i]:rows[1][i] x cols[0][j]:cols[1][j], for every (i, j)."""
    ii = np.zeros((img.shape[0] + 1, img.shape[1] + 1))
    ii[1:, 1:] = np.cumsum(np.cumsum(img, axis=0, dtype=np.float64), axis=1)
    y0, y1 = rows
    x0, x1 = cols
    out: F64 = ii[np.ix_(y1, x1)] - ii[np.ix_(y0, x1)] - ii[np.ix_(y1, x0)] + ii[np.ix_(y0, x0)]
    return out


def _masked_ncc(wa: F32, wb: F32, lo: tuple[int, int], hi: tuple[int, int], min_count: float) -> F64:
    """Normalised cross-correlation over the overlap only, for every r in [lo, hi] (Padfield 2012).

    ``wb(p) ~ wa(p + r)``. Each displacement is scored on exactly the pixels
    the two windows share there, so a match covering a sliver of both windows
    (a large stage error, a thin overlap) scores as well as a central one --
    phase correlation's peak shrinks with the shared area and was lost among
    noise peaks in such cases. Displacements sharing fewer than ``min_count``
    pixels score -1. The cross term is one zero-padded FFT correlation (no
    cyclic aliasing); the overlaps are rectangles, so their sums and sums of
    squares come from integral images.
    """
    ha, wa_ = wa.shape
    hb, wb_ = wb.shape
    shape = (sfft.next_fast_len(ha + hb), sfft.next_fast_len(wa_ + wb_, True))
    ys = np.arange(lo[0], hi[0] + 1)
    xs = np.arange(lo[1], hi[1] + 1)
    cross = sfft.irfft2(sfft.rfft2(wa, s=shape) * np.conj(sfft.rfft2(wb, s=shape)), s=shape)
    sab = np.asarray(cross[np.ix_(ys % shape[0], xs % shape[1])], dtype=np.float64)
    # The overlap at r: rows [max(0, ry), min(ha, ry + hb)) of wa, the same rows minus ry of wb.
    ay = (np.clip(ys, 0, ha), np.clip(ys + hb, 0, ha))
    ax = (np.clip(xs, 0, wa_), np.clip(xs + wb_, 0, wa_))
    by = (ay[0] - ys, ay[1] - ys)
    bx = (ax[0] - xs, ax[1] - xs)
    n = np.outer(np.maximum(ay[1] - ay[0], 0), np.maximum(ax[1] - ax[0], 0)).astype(np.float64)
    sa = _window_sums(wa, ay, ax)
    sb = _window_sums(wb, by, bx)
    safe = np.maximum(n, 1.0)
    num = sab - sa * sb / safe
    va = _window_sums(wa * wa, ay, ax) - sa * sa / safe
    vb = _window_sums(wb * wb, by, bx) - sb * sb / safe
    den = np.sqrt(np.maximum(va, 0.0) * np.maximum(vb, 0.0))
    ok = (n >= min_count) & (den > 1e-6 * safe)
    out = np.full(n.shape, -1.0)
    out[ok] = num[ok] / den[ok]
    return out


def _peaks(surface: F64, count: int) -> list[tuple[int, int]]:
    """Indices of the ``count`` highest 3 x 3 local maxima, best first."""
    peaks = surface == ndi.maximum_filter(surface, size=3, mode="nearest")
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
    # Sums over views (no copies): this runs a dozen times per pair.
    sx, sy = float(x.sum(dtype=np.float64)), float(y.sum(dtype=np.float64))
    sxy = float(np.einsum("ij,ij->", x, y))
    vx = float(np.einsum("ij,ij->", x, x)) - sx * sx / n
    vy = float(np.einsum("ij,ij->", y, y)) - sy * sy / n
    den = math.sqrt(max(vx, 0.0) * max(vy, 0.0))
    return (sxy - sx * sy / n) / den if den > 0 else -1.0


def _coarse(
    wa: F32, wb: F32, lo: tuple[int, int], hi: tuple[int, int], min_overlap: int, count: int
) -> tuple[tuple[int, int], float]:
    """The integer r in [lo, hi] with the best overlap NCC, and that NCC.

    Big windows are searched at half resolution first (a quarter of the FFT
    work; nuclei and fibres are still several pixels wide), then the best
    ``count`` candidates are re-scored at full resolution around their
    position.
    """
    f = 2 if min(*wa.shape, *wb.shape) >= 64 else 1
    if f == 1:
        surface = _masked_ncc(wa, wb, lo, hi, float(min_overlap) ** 2)
        cands = [(lo[0] + i, lo[1] + j) for i, j in _peaks(surface, 1)]
        if not cands:
            return (0, 0), -1.0
        return cands[0], _overlap_ncc(wa, wb, cands[0])
    sa = np.asarray(cv2.resize(wa, (wa.shape[1] // f, wa.shape[0] // f), interpolation=cv2.INTER_AREA), np.float32)
    sb = np.asarray(cv2.resize(wb, (wb.shape[1] // f, wb.shape[0] // f), interpolation=cv2.INTER_AREA), np.float32)
    lo_f = (math.floor(lo[0] / f), math.floor(lo[1] / f))
    hi_f = (math.ceil(hi[0] / f), math.ceil(hi[1] / f))
    surface = _masked_ncc(sa, sb, lo_f, hi_f, (min_overlap / f) ** 2)
    # Each candidate at its half-resolution position, then the best one's neighbourhood.
    scored = []
    for i, j in _peaks(surface, count):
        r = (min(max((lo_f[0] + i) * f, lo[0]), hi[0]), min(max((lo_f[1] + j) * f, lo[1]), hi[1]))
        scored.append((_overlap_ncc(wa, wb, r), r))
    if not scored:
        return (0, 0), -1.0
    best_score, best = max(scored)
    # Climb the full-resolution NCC from there to its local maximum: the half-resolution peak
    # can be a coarse pixel (two fine ones) off, beyond what the subpixel step recovers.
    for _ in range(4 * f):
        step_best = best
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                r = (best[0] + dy, best[1] + dx)
                if (dy or dx) and lo[0] <= r[0] <= hi[0] and lo[1] <= r[1] <= hi[1]:
                    score = _overlap_ncc(wa, wb, r)
                    if score > best_score:
                        best_score, step_best = score, r
        if step_best == best:
            break
        best = step_best
    return best, best_score


def _bspline_kernel(t: float) -> F32:
    """5-tap cubic B-spline weights sampling a prefiltered signal at offset ``t`` (|t| <= 1)."""
    x = np.abs(np.arange(-2, 3, dtype=np.float64) - t)
    k = np.where(x < 1, 2 / 3 - x**2 + x**3 / 2, np.where(x < 2, (2 - x) ** 3 / 6, 0.0))
    return k.astype(np.float32)


def _shift_coeffs(coeffs: F32, sy: float, sx: float) -> F32:
    """Samples at p + (sy, sx) of the cubic spline whose coefficients are ``coeffs``."""
    out = cv2.sepFilter2D(coeffs, cv2.CV_32F, _bspline_kernel(sx), _bspline_kernel(sy), borderType=cv2.BORDER_REFLECT)
    return np.asarray(out, dtype=np.float32)


def _fine(oa: F32, ob: F32, params: RegistrationParams) -> tuple[F64, F64, float]:
    """Subpixel s with ob(p) ~ oa(p + s), its 1-sigma precision, and the aligned NCC."""
    ca = ndi.spline_filter(oa, order=3, output=np.float32, mode="mirror")
    cb = ndi.spline_filter(ob, order=3, output=np.float32, mode="mirror")
    e = params.border_px
    inner = (slice(e, oa.shape[0] - e), slice(e, oa.shape[1] - e))
    s = np.zeros(2)
    ds = np.zeros(2)
    ma = mb = gy = gx = oa[inner]
    normal = np.eye(2)
    for _ in range(params.max_iterations):
        ma = _shift_coeffs(ca, s[0] / 2, s[1] / 2)[inner]
        mb = _shift_coeffs(cb, -s[0] / 2, -s[1] / 2)[inner]
        gy, gx = np.gradient((ma + mb) * np.float32(0.5))
        r = mb - ma
        normal = np.array(
            [[float(np.vdot(gy, gy)), float(np.vdot(gy, gx))], [float(np.vdot(gy, gx)), float(np.vdot(gx, gx))]]
        )
        if np.linalg.cond(normal) > 1e8:
            return np.full(2, np.nan), np.full(2, np.inf), 0.0
        ds = np.asarray(np.linalg.solve(normal, [float(np.vdot(gy, r)), float(np.vdot(gx, r))]), np.float64)
        s = s + ds
        if float(np.abs(ds).max()) < 1e-3 or float(np.abs(s).max()) > 2.0:
            break
    residual = (mb - ma) - (gy * np.float32(ds[0]) + gx * np.float32(ds[1]))
    cov = np.linalg.inv(normal) * float(residual.var())
    sigma = np.sqrt(np.maximum(np.diag(cov), 0.0))
    denom = math.sqrt(float(np.vdot(ma, ma)) * float(np.vdot(mb, mb)))
    ncc = float(np.vdot(ma, mb)) / denom if denom > 0 else 0.0
    return s, sigma, ncc


def _refine(
    a: npt.NDArray[np.generic], b: npt.NDArray[np.generic], start: tuple[int, int], p: RegistrationParams
) -> tuple[tuple[float, float], tuple[float, float], float] | str:
    """LK from an integer start: (shift, sigma, ncc), or why not."""
    dy, dx = start
    for _ in range(2):
        ov = _overlap(a.shape, b.shape, dy, dx)
        if ov is None or min(ov[0].stop - ov[0].start, ov[1].stop - ov[1].start) < p.min_overlap_px:
            return "no_overlap"
        oa = highpass(a[ov[0], ov[1]], p.highpass_px)
        ob = highpass(b[ov[2], ov[3]], p.highpass_px)
        if min(oa.shape) < 2 * p.border_px + 4:
            return "no_overlap"
        if float(oa.std()) < 1e-3 or float(ob.std()) < 1e-3:
            return "blank"
        s, sigma, ncc = _fine(oa, ob, p)
        if not np.all(np.isfinite(s)):
            return "blank"
        # LK is good to about a pixel: re-centre (once) only when the integer start was clearly
        # a pixel off, not for a fraction near 0.5 that would just flip sides.
        step = np.where(np.abs(s) > 0.75, np.round(s), 0).astype(int)
        if not step.any():
            return (dy + float(s[0]), dx + float(s[1])), (float(sigma[0]), float(sigma[1])), ncc
        dy, dx = dy + int(step[0]), dx + int(step[1])
    return "unstable"


def register_pair(
    a: npt.NDArray[np.generic],
    b: npt.NDArray[np.generic],
    predicted: tuple[float, float],
    params: RegistrationParams | None = None,
) -> PairMeasurement:
    """Measure where b's origin lies in a's frame, starting from ``predicted`` (dy, dx).

    ``a`` and ``b`` are single-channel images (uint8 or float) of the same
    optics; ``a`` may be a strip of a tile (pass ``predicted`` in the strip's
    frame). Never raises for bad content: an unreliable pair comes back with
    ``accepted=False`` and the reason.
    """
    p = params or RegistrationParams()
    pred = (float(predicted[0]), float(predicted[1]))
    iy, ix = round(pred[0]), round(pred[1])
    ov = _overlap(a.shape, b.shape, iy, ix)
    if ov is None or min(ov[0].stop - ov[0].start, ov[1].stop - ov[1].start) < p.min_overlap_px:
        return _reject("no_overlap", pred)
    # Search windows: the predicted overlap widened by the search range, cut
    # from each image, so the true overlap lies inside both wherever it is.
    s_ = math.ceil(p.search_px)
    ha, wa_, hb, wb_ = a.shape[0], a.shape[1], b.shape[0], b.shape[1]
    ay = (max(0, ov[0].start - s_), min(ha, ov[0].stop + s_))
    ax = (max(0, ov[1].start - s_), min(wa_, ov[1].stop + s_))
    by = (max(iy, ov[0].start - s_), min(iy + hb, ov[0].stop + s_))
    bx = (max(ix, ov[1].start - s_), min(ix + wb_, ov[1].stop + s_))
    raw_a = a[ay[0] : ay[1], ax[0] : ax[1]]
    raw_b = b[by[0] - iy : by[1] - iy, bx[0] - ix : bx[1] - ix]
    win_a = highpass(raw_a, p.highpass_px)
    win_b = highpass(raw_b, p.highpass_px)
    if min(texture(raw_a, p.highpass_px, win_a), texture(raw_b, p.highpass_px, win_b)) < p.min_texture:
        return _reject("blank", pred)  # glass on one side at least: nothing to match
    # b's origin d = (iy, ix) + r - (b window origin - a window origin); keep |d - predicted| within
    # the search and the overlap at least min_overlap_px.
    base = (by[0] - ay[0], bx[0] - ax[0])
    lo_d = (max(iy - s_, p.min_overlap_px - hb), max(ix - s_, p.min_overlap_px - wb_))
    hi_d = (min(iy + s_, ha - p.min_overlap_px), min(ix + s_, wa_ - p.min_overlap_px))
    lo = (lo_d[0] - iy + base[0], lo_d[1] - ix + base[1])
    hi = (hi_d[0] - iy + base[0], hi_d[1] - ix + base[1])
    if lo[0] > hi[0] or lo[1] > hi[1]:
        return _reject("no_overlap", pred)
    (ry, rx), _ = _coarse(win_a, win_b, lo, hi, p.min_overlap_px, p.candidates)
    dy, dx = iy + ry - base[0], ix + rx - base[1]
    fit = _refine(a, b, (dy, dx), p)
    if fit == "unstable" or (not isinstance(fit, str) and fit[2] < p.retry_below_ncc):
        # A middling match: LK may have settled in a neighbouring local minimum (thin or
        # smooth overlaps). Start it from the neighbouring pixels too; keep the best fit.
        for ny, nx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            other = _refine(a, b, (dy + ny, dx + nx), p)
            if not isinstance(other, str) and (isinstance(fit, str) or other[2] > fit[2]):
                fit = other
    if isinstance(fit, str):
        return _reject(fit, pred)
    shift, sigma, ncc = fit
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
