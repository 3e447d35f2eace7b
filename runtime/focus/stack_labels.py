"""In-focus z of a recorded field from its own z-stack: the label that self-calibration trains on.

A z-stack labels itself: the plane where the image is sharpest is the in-focus
plane. This module turns a stack into that z robustly, with no ground truth:

* The frame is cut into square regions (about 128 px); each region gets a
  sharpness curve over z (:func:`runtime.focus.sweep.sharpness`, Brenner by
  default: the steepest of the three near focus).
* Each region's curve is fitted by :func:`fit_peak`: a region whose curve is
  flat (glass, noise only) has no peak; a peak on the first or last plane is
  outside the stack (not extrapolated); a curve with two comparable peaks
  (dust on the cover glass, a fold) is ambiguous; otherwise a Gaussian (a
  parabola in log sharpness) through the points of the main peak's upper part
  gives a sub-plane vertex.
* The field's focus is the median of its regions' peaks (one region on a speck
  of dust or at a fold cannot move it), when enough regions agree; their
  spread (MAD) says how much they do.

Fields with too few regions with a usable peak are skipped, with the reason.
Numpy/OpenCV only, so the scanner itself can label stacks it records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from runtime.devices.protocols import RGBImage
from runtime.focus.near_focus import fit_peak as near_fit
from runtime.focus.near_focus import log_sharpness
from runtime.focus.sweep import Metric, sharpness

PeakStatus = Literal["ok", "flat", "edge", "ambiguous", "too_few_planes"]
FieldStatus = Literal["ok", "no_content", "edge", "ambiguous", "inconsistent"]

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LabelParams:
    """``min_prominence``: (peak - baseline) / baseline below which a curve is flat (no content);
    ``fit_half_width_um``: planes within this distance of the best one enter the peak fit;
    ``second_peak_ratio``: a separate peak at least this high (relative to the baseline) makes
    a curve ambiguous; ``region_px``: region edge (the frame is cut into about this size);
    ``min_regions``: regions with a usable peak a field needs; ``max_spread_um``: largest MAD
    of the region peaks (µm) that still counts as agreement."""

    metric: Metric = "brenner"
    min_prominence: float = 0.5
    fit_half_width_um: float = 1.5
    second_peak_ratio: float = 0.8
    region_px: int = 128
    min_regions: int = 2
    max_spread_um: float = 0.75

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PeakFit:
    z_um: float | None  # None unless status == "ok"
    status: PeakStatus
    prominence: float


@dataclass(frozen=True)
class FieldLabel:
    field: int
    focus_z_um: float | None  # None: skipped (status says why)
    status: FieldStatus
    regions_used: int
    regions: int
    spread_um: float | None  # MAD of the region peaks
    # Each region's verdict (row-major, :func:`region_starts` in y then x): where the stack shows content
    # to focus on ("ok") and where it shows none ("flat"). Empty for a label made without regions.
    region_status: tuple[PeakStatus, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["region_status"] = list(self.region_status)
        return d


def _smooth(s: F64) -> F64:
    if len(s) < 3:
        return s.copy()
    p = np.concatenate([s[:1], s, s[-1:]])
    out: F64 = 0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]
    return out


def fit_peak(z: npt.ArrayLike, score: npt.ArrayLike, params: LabelParams | None = None) -> PeakFit:
    """The z of a sharpness curve's peak, or why there is none (see the module docstring)."""
    p = params or LabelParams()
    zs = np.asarray(z, np.float64)
    ss = np.asarray(score, np.float64)
    if len(zs) < 5 or len(zs) != len(ss) or not np.all(np.isfinite(ss)):
        return PeakFit(None, "too_few_planes", 0.0)
    sm = _smooth(ss)
    base = float(np.percentile(sm, 10))
    top = float(sm.max())
    rng = top - base
    prom = rng / max(abs(base), 1e-12)
    if not prom >= p.min_prominence:
        return PeakFit(None, "flat", prom)
    i = int(np.argmax(sm))
    n = len(zs)
    # The main lobe: contiguous planes around the best whose (smoothed) score is above half height.
    half = base + 0.5 * rng
    lo, hi = i, i
    while lo > 0 and sm[lo - 1] > half:
        lo -= 1
    while hi < n - 1 and sm[hi + 1] > half:
        hi += 1
    # Another local maximum outside the main lobe that is nearly as high: two candidate foci.
    for j in range(n):
        if lo <= j <= hi:
            continue
        left = sm[j - 1] if j > 0 else -np.inf
        right = sm[j + 1] if j < n - 1 else -np.inf
        if sm[j] >= left and sm[j] >= right and sm[j] - base >= p.second_peak_ratio * rng:
            return PeakFit(None, "ambiguous", prom)
    i = int(lo + np.argmax(ss[lo : hi + 1]))  # the best raw sample within the main lobe
    if i == 0 or i == n - 1:
        return PeakFit(None, "edge", prom)
    dz = float(np.median(np.diff(zs)))
    h = max(1, round(p.fit_half_width_um / max(dz, 1e-9)))
    sel = np.arange(max(0, i - h), min(n, i + h + 1))
    sel = sel[ss[sel] > base + 0.2 * rng]
    vertex: float | None = None
    if len(sel) >= 3:
        # A Gaussian through the upper part of the peak: a parabola in log(score - baseline).
        y = np.log(ss[sel] - base)
        x = zs[sel] - zs[i]
        w = ss[sel] - base  # weight the top: the tails carry more noise in log
        a, b, _ = np.polyfit(x, y, 2, w=np.sqrt(w))
        if a < 0:
            vertex = float(zs[i] - b / (2 * a))
    if vertex is None:  # the three-point parabola (the contrast sweep's own fit)
        z0, z1, z2 = zs[i - 1 : i + 2]
        s0, s1, s2 = ss[i - 1 : i + 2]
        denom = (z0 - z1) * (z0 - z2) * (z1 - z2)
        a3 = (z2 * (s1 - s0) + z1 * (s0 - s2) + z0 * (s2 - s1)) / denom
        b3 = (z2 * z2 * (s0 - s1) + z1 * z1 * (s2 - s0) + z0 * z0 * (s1 - s2)) / denom
        vertex = float(-b3 / (2 * a3)) if a3 < 0 else float(z1)
    return PeakFit(float(np.clip(vertex, zs[i - 1], zs[i + 1])), "ok", prom)


def region_starts(length: int, region: int) -> list[int]:
    """Start offsets of ``length // region`` (at least one) regions spread evenly over ``length``."""
    n = max(1, length // max(region, 1))
    size = length // n
    return [k * size for k in range(n)]


def region_grid(height: int, width: int, params: LabelParams | None = None) -> tuple[list[int], list[int], int, int]:
    """The regions of a ``height`` x ``width`` frame: their start rows and columns and their size (sy, sx)."""
    p = params or LabelParams()
    ys, xs = region_starts(height, p.region_px), region_starts(width, p.region_px)
    return ys, xs, height // len(ys), width // len(xs)


def region_of(y: int, x: int, height: int, width: int, params: LabelParams | None = None) -> int:
    """Index (row-major, as :func:`region_scores` orders them) of the region holding pixel (y, x) of a
    ``height`` x ``width`` frame; a pixel past the last region's end (the frame's remainder) counts as in it."""
    ys, xs, sy, sx = region_grid(height, width, params)
    return min(y // sy, len(ys) - 1) * len(xs) + min(x // sx, len(xs) - 1)


def region_scores(frame: RGBImage, params: LabelParams | None = None) -> F64:
    """Sharpness of each region of one frame, (regions,) in row-major order."""
    p = params or LabelParams()
    ys, xs, sy, sx = region_grid(frame.shape[0], frame.shape[1], p)
    out = [sharpness(np.ascontiguousarray(frame[y : y + sy, x : x + sx]), p.metric) for y in ys for x in xs]
    return np.asarray(out, np.float64)


def label_curves(field: int, z: npt.ArrayLike, scores: npt.ArrayLike, params: LabelParams | None = None) -> FieldLabel:
    """A field's label from its region sharpness curves ``scores`` (n_z, regions)."""
    p = params or LabelParams()
    s = np.asarray(scores, np.float64)
    fits = [fit_peak(z, s[:, r], p) for r in range(s.shape[1])]
    verdicts = tuple(f.status for f in fits)
    peaks = np.asarray([f.z_um for f in fits if f.z_um is not None], np.float64)
    regions = s.shape[1]
    need = min(p.min_regions, regions)
    if len(peaks) < need:
        counts = {st: sum(f.status == st for f in fits) for st in ("edge", "ambiguous")}
        # Why: content that peaks outside the stack, or two foci; else there is nothing to focus on.
        status: FieldStatus = "no_content"
        if counts["edge"] or counts["ambiguous"]:
            status = "edge" if counts["edge"] >= counts["ambiguous"] else "ambiguous"
        return FieldLabel(field, None, status, len(peaks), regions, None, verdicts)
    med = float(np.median(peaks))
    spread = float(np.median(np.abs(peaks - med)))
    if spread > p.max_spread_um:
        return FieldLabel(field, None, "inconsistent", len(peaks), regions, spread, verdicts)
    return FieldLabel(field, med, "ok", len(peaks), regions, spread, verdicts)


def label_stack(field: int, z: npt.ArrayLike, frames: list[RGBImage], params: LabelParams | None = None) -> FieldLabel:
    """A field's in-focus z from its z-stack (frames in the order of ``z``)."""
    scores = np.stack([region_scores(f, params) for f in frames])
    return label_curves(field, z, scores, params)


SHARPNESS_PEAK_MIN_RANGE = 0.1
"""ln sharpness range over a stack below which it has no peak (:func:`sharpness_peak`): glass varies by
noise only (0.01 over the bench's 41-plane stacks); tissue fields by 0.2-3.5 (the faintest: real tissue
through the strong objective, whose flat curve falls by only 0.2-0.3 over ±10 µm on a few fields)."""


def sharpness_peak(z: npt.ArrayLike, frames: list[RGBImage], metric: Metric = "brenner") -> float | None:
    """Where the whole frame is sharpest, by the measure and the fit the scan's near-focus check uses.

    The single-shot loop decides "in focus" near focus with whole-frame Brenner
    (:func:`runtime.focus.sweep.sharpness`) and :func:`runtime.focus.near_focus.fit_peak`: a parabola in
    ln sharpness through the sharpest sample and its nearest neighbour on each side (within
    ``near_focus.BRACKET_UM``). This applies the same to a z-stack (planes 0.5 µm apart: the sharpest
    plane and its two neighbours). It is the reference the bench scores focus on for an objective whose
    sharpest plane is not its paraxial focus (strong spherical aberration: the ln-sharpness curve is flat
    and lopsided, and :func:`label_stack`'s ±1.5 µm Gaussian sits 0.26-0.31 µm below this peak;
    elsewhere the two agree within about 0.03 µm). None: no content (ln sharpness varies by less than
    ``SHARPNESS_PEAK_MIN_RANGE``), or the sharpest plane is the stack's first or last."""
    zs = np.asarray(z, np.float64)
    ls = np.asarray([log_sharpness(sharpness(f, metric)) for f in frames], np.float64)
    if len(zs) < 3 or len(zs) != len(ls) or float(ls.max() - ls.min()) < SHARPNESS_PEAK_MIN_RANGE:
        return None
    order = np.argsort(zs)
    zs, ls = zs[order], ls[order]
    k = int(np.argmax(ls))
    if k == 0 or k == len(zs) - 1:
        return None
    est = near_fit([(float(zs[j]), float(ls[j])) for j in (k - 1, k, k + 1)])
    return None if est is None else est.z_um
