"""Held-out metrics of the slide-analysis models: ROC AUC and point matching (nuclei F1).

NumPy + SciPy only (no torch), so tests and benchmarks can score the exported models too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree


def roc_auc(label: npt.ArrayLike, score: npt.ArrayLike) -> float:
    """Area under the ROC curve (the Mann-Whitney U statistic; ties count one half); NaN if a
    class is missing."""
    y = np.asarray(label, bool)
    s = np.asarray(score, np.float64)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    ranks[order] = np.arange(1, len(s) + 1)
    # average ranks over ties
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def match_points(pred: npt.ArrayLike, truth: npt.ArrayLike, radius: float) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of a one-to-one matching of predicted
    and true points (both (K, 2)) within ``radius``, maximising the matches (Hungarian on the
    pairs closer than ``radius``)."""
    p = np.asarray(pred, np.float64).reshape(-1, 2)
    t = np.asarray(truth, np.float64).reshape(-1, 2)
    if len(p) == 0 or len(t) == 0:
        return 0, len(p), len(t)
    near = cKDTree(p).query_ball_tree(cKDTree(t), radius)
    pi = np.asarray([i for i, js in enumerate(near) for _ in js], np.int64)
    ti = np.asarray([j for js in near for j in js], np.int64)
    if pi.size == 0:
        return 0, len(p), len(t)
    # Only the rows/columns with a candidate take part; a pair beyond the radius is never chosen.
    rows, cols = np.unique(pi), np.unique(ti)
    cost = np.full((len(rows), len(cols)), 1e6)
    cost[np.searchsorted(rows, pi), np.searchsorted(cols, ti)] = np.hypot(*(p[pi] - t[ti]).T)
    r, c = linear_sum_assignment(cost)
    tp = int((cost[r, c] <= radius).sum())
    return tp, len(p) - tp, len(t) - tp


def f1_report(tp: int, fp: int, fn: int) -> dict[str, Any]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "tp": tp, "fp": fp, "fn": fn}
