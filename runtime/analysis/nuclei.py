"""Nuclei detector (:class:`~runtime.analysis.types.NucleiModel`): a centroid heatmap by sliding
window, then local maxima.

The ONNX model (``runtime/ml/builtin/nuclei``, trained by ``python -m export train-nuclei``) reads a
``size``-px RGB window at ``pixel_size_um`` (0.5 µm/px) and answers a heatmap at 1/``stride`` of
its resolution whose peaks are nucleus centres (trained on Gaussian blobs at the truth
centroids of every nucleus the simulator draws: benign stroma and epithelium, tumour, lymphoid
and hyperplastic mimics). :meth:`NucleiDetector.detect` covers a region of any size with
windows that overlap by twice ``halo`` px; each window answers only for its core (the region's
edge, or half-way through its overlap with the next window), so a nucleus is found once and
always with ``halo`` px of context around it; a nucleus right on the seam between two cores can be
placed on either side of it by the two windows, so detections closer than ``min_distance`` cells
across a seam are merged (:func:`merge_seam_duplicates`). A region smaller than a window is mirror-padded.
Windows whose core holds no stained pixel (optical density <= 0.25 everywhere: glass) are not
run: a nucleus centre is a stained pixel, so they cannot answer anything.

Peaks (:func:`find_peaks`): cells above ``threshold`` that are the maximum of their
(2 ``min_distance`` + 1)² neighbourhood, refined to sub-cell precision by the intensity-weighted
centroid of their 3 x 3 neighbourhood. Threshold and distance were chosen on training-seed
regions and are recorded in ``model.json`` (``preprocess``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from runtime.analysis.baselines import stained
from runtime.analysis.types import F32, U8
from runtime.ml.backends import Backend
from runtime.ml.model_folder import ModelFolder, ModelFolderError

MAX_BATCH = 32
CORE_MARGIN = 2  # px: a window runs if a stained pixel lies within its core grown by this much


@dataclass(frozen=True)
class NucleiParams:
    """The ``preprocess`` of a nuclei model folder (``rgb_window_v1``)."""

    size: int
    mean: float
    std: float
    halo: int
    stride: int
    threshold: float
    min_distance: int

    @classmethod
    def from_folder(cls, folder: ModelFolder) -> NucleiParams:
        pre: dict[str, Any] = folder.meta["preprocess"]
        try:
            p = cls(
                int(pre["size"]), float(pre["mean"]), float(pre["std"]), int(pre["halo"]), int(pre["stride"]),
                float(pre["threshold"]), int(pre["min_distance"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFolderError(f"{folder.path / 'model.json'}: key 'preprocess' is invalid: {err!r}") from None
        if not (0 <= 2 * p.halo < p.size and p.stride >= 1 and p.size % p.stride == 0 and p.min_distance >= 1):
            raise ModelFolderError(
                f"{folder.path / 'model.json'}: 'preprocess' needs 0 <= 2 * halo < size, stride dividing size "
                f"and min_distance >= 1, got {pre}"
            )
        return p


def find_peaks(heat: F32, threshold: float, min_distance: int) -> F32:
    """(K, 2) (y, x) of the local maxima of ``heat`` (H, W) above ``threshold``, in heat cells
    (cell i covers [i, i + 1), so a peak centred on cell i is at i + 0.5 +- the refinement)."""
    return _peaks(heat, threshold, min_distance)[0]


def _peaks(heat: F32, threshold: float, min_distance: int) -> tuple[F32, F32]:
    """:func:`find_peaks` and the heat value of each peak's cell (K,)."""
    h = np.ascontiguousarray(heat, np.float32)
    k = 2 * min_distance + 1
    dil = cv2.dilate(h, np.ones((k, k), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0.0)
    is_peak = (h >= dil) & (h > threshold)
    ys, xs = np.nonzero(is_peak)
    if ys.size == 0:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
    # Plateaus (equal neighbours) would give two peaks: keep the first of any two within min_distance.
    order = np.argsort(-h[ys, xs], kind="stable")
    ys, xs = ys[order], xs[order]
    keep = np.ones(ys.size, bool)
    # Two peaks within min_distance of each other need equal values (each is its neighbourhood's
    # maximum): rare, so the greedy pass below runs only where a peak's neighbourhood counts another.
    near = cv2.boxFilter(is_peak.astype(np.float32), -1, (k, k), normalize=False, borderType=cv2.BORDER_CONSTANT)
    if ys.size > 1 and float(near[ys, xs].max()) > 1.5:
        taken = np.zeros(h.shape, bool)
        for i in range(ys.size):
            y0, y1 = max(0, ys[i] - min_distance), ys[i] + min_distance + 1
            x0, x1 = max(0, xs[i] - min_distance), xs[i] + min_distance + 1
            if taken[y0:y1, x0:x1].any():
                keep[i] = False
            else:
                taken[ys[i], xs[i]] = True
        ys, xs = ys[keep], xs[keep]
    pad = np.pad(h, 1)
    win = np.stack([pad[ys + dy, xs + dx] for dy in range(3) for dx in range(3)], axis=1)  # (K, 9)
    win = np.maximum(win - threshold, 0.0)
    off = np.asarray([(dy - 1, dx - 1) for dy in range(3) for dx in range(3)], np.float32)
    w = win.sum(axis=1, keepdims=True)
    ref = (win @ off) / np.maximum(w, 1e-12)
    cells = np.stack([ys + 0.5 + ref[:, 0], xs + 0.5 + ref[:, 1]], axis=1).astype(np.float32)
    return cells, h[ys, xs]


def merge_seam_duplicates(points: F32, values: F32, seams_y: list[float], seams_x: list[float], dist: float) -> F32:
    """``points`` (K, 2) (y, x) less those within ``dist`` (Euclidean) of a stronger one (higher
    ``values``; ties: the earlier), looked for only among points within ``dist`` of a seam (a line
    y = s of ``seams_y`` or x = s of ``seams_x``).

    Two windows that share a seam each answer for their own side of it, and each places a nucleus
    on the seam from its own context: a few tenths of a pixel apart, one on either side, so both
    answered it. Within a window :func:`find_peaks` never gives two peaks that close (each is the
    maximum of its (2 min_distance + 1)² cells), so ``dist`` = min_distance cells separates the two
    cases."""
    if len(points) < 2 or not (seams_y or seams_x):
        return points
    near = np.zeros(len(points), bool)
    for s in seams_y:
        near |= np.abs(points[:, 0] - s) < dist
    for s in seams_x:
        near |= np.abs(points[:, 1] - s) < dist
    idx = np.flatnonzero(near)
    if idx.size < 2:
        return points
    keep = np.ones(len(points), bool)
    kept: list[int] = []
    for i in idx[np.argsort(-values[idx], kind="stable")]:
        if kept and float(np.hypot(*(points[kept] - points[i]).T).min()) < dist:
            keep[i] = False
        else:
            kept.append(int(i))
    return points[keep]


def _starts(length: int, size: int, halo: int) -> list[int]:
    """Window starts covering ``length`` with overlaps of at least 2 * halo (evenly spread)."""
    if length <= size:
        return [0]
    n = 1 + math.ceil((length - size) / (size - 2 * halo))
    return [round(i * (length - size) / (n - 1)) for i in range(n)]


def _cores(starts: list[int], size: int, length: int) -> list[tuple[float, float]]:
    """Each window's share [lo, hi) of the axis: boundaries half-way through each overlap."""
    bounds = [0.0] + [(starts[i] + size + starts[i + 1]) / 2 for i in range(len(starts) - 1)] + [float(length)]
    return [(bounds[i], bounds[i + 1]) for i in range(len(starts))]


class NucleiDetector:
    """A nuclei model folder behind an inference backend."""

    def __init__(self, folder: ModelFolder, backend: Backend) -> None:
        if folder.task != "nuclei":
            raise ModelFolderError(f"{folder.path}: a {folder.task!r} model, expected a 'nuclei' model")
        self.folder = folder
        self.backend = backend
        self.params = NucleiParams.from_folder(folder)
        self._output = folder.output_names[0]

    @property
    def pixel_size_um(self) -> float:
        return self.folder.pixel_size_um

    @property
    def halo_px(self) -> int:
        return self.params.halo

    @property
    def step_px(self) -> int:
        """Core of a window (size - 2 halo): regions of k steps + 2 halo px need k x k windows, no more."""
        return self.params.size - 2 * self.params.halo

    def heatmaps(self, windows: U8) -> F32:
        """(N, size, size, 3) uint8 windows -> (N, size / stride, size / stride) heatmaps."""
        p = self.params
        n = p.size // p.stride
        if len(windows) == 0:
            return np.zeros((0, n, n), np.float32)
        # (v / 255 - mean) / std as one multiply-add in float32, written straight in NCHW order.
        scale, shift = np.float32(1.0 / (255.0 * p.std)), np.float32(-p.mean / p.std)
        out = []
        for i in range(0, len(windows), MAX_BATCH):
            chunk = windows[i : i + MAX_BATCH]
            x = np.empty((len(chunk), 3, p.size, p.size), np.float32)
            np.multiply(chunk.transpose(0, 3, 1, 2), scale, out=x)
            x += shift
            out.append(self.backend.run(x)[self._output][:, 0])
        return np.concatenate(out).astype(np.float32, copy=False)

    def detect(self, region: U8) -> F32:
        """``region`` (H, W, 3) uint8 RGB -> (K, 2) nucleus centroids (y, x) in region pixels."""
        if region.ndim != 3 or region.shape[2] != 3 or region.dtype != np.uint8:
            raise ValueError(f"nuclei detection needs an RGB uint8 region (h, w, 3), got {region.dtype} {region.shape}")
        p = self.params
        h, w = region.shape[:2]
        if h == 0 or w == 0:
            return np.zeros((0, 2), np.float32)
        if h < p.size or w < p.size:  # mirrored (a 1-px region: repeated); detections there are dropped
            pad = ((0, max(0, p.size - h)), (0, max(0, p.size - w)), (0, 0))
            region = np.pad(region, pad, "reflect" if min(h, w) > 1 else "edge").astype(np.uint8)
        sy, sx = _starts(h, p.size, p.halo), _starts(w, p.size, p.halo)
        cy, cx = _cores(sy, p.size, h), _cores(sx, p.size, w)
        tissue = stained(region)
        m = CORE_MARGIN
        tiles = [
            (y0, core_y, x0, core_x)
            for y0, core_y in zip(sy, cy, strict=True)
            for x0, core_x in zip(sx, cx, strict=True)
            if tissue[
                max(0, math.floor(core_y[0]) - m) : math.ceil(core_y[1]) + m,
                max(0, math.floor(core_x[0]) - m) : math.ceil(core_x[1]) + m,
            ].any()
        ]
        if not tiles:
            return np.zeros((0, 2), np.float32)
        windows = np.stack([region[y : y + p.size, x : x + p.size] for y, _, x, _ in tiles])
        heat = self.heatmaps(windows)
        found, values = [], []
        for k, (y0, (ylo, yhi), x0, (xlo, xhi)) in enumerate(tiles):
            cells, val = _peaks(heat[k], p.threshold, p.min_distance)
            pk = cells * np.float32(p.stride) - np.float32(0.5) + np.asarray([y0, x0], np.float32)
            inside = (pk[:, 0] >= ylo) & (pk[:, 0] < yhi) & (pk[:, 1] >= xlo) & (pk[:, 1] < xhi)
            found.append(pk[inside])
            values.append(val[inside])
        # A nucleus on a seam between two windows' cores can be answered by both (one on each side).
        return merge_seam_duplicates(
            np.concatenate(found).astype(np.float32), np.concatenate(values),
            [c[0] for c in cy[1:]], [c[0] for c in cx[1:]], float(p.min_distance * p.stride),
        )
