"""Slide analysis (issue 13) on held-out synthetic slides against the simulator's truth.

Each slide is a square of tissue drawn by ``hw_sim`` from a held-out seed (900000-999999), half of
them with tumour lesions (and some benign mimics), half without (some with mimics), rendered in
focus at the analysis resolution (0.5 µm/px, the way ``hw_sim truth`` renders the truth mosaic),
with a 2x pyramid above it. A quarter of the tumour slides hold only one or two lesions of
50-100 µm (:func:`slide_kind` "small": about one 64 µm patch, the hard case of the slide-level
call); the default 48 slides hold 6 of them. No training run or threshold choice uses these seeds
(training and any tuning use seeds below 900000).
The runtime's own analysis (:func:`runtime.analysis.pipeline.analyze_source`)
runs over it, streaming bands, once per model set: the classical ``baseline``
(:mod:`runtime.analysis.baselines`: nuclear density, max tile probability, LoG nuclei) and the
trained ``models`` (``runtime.analysis.models.load_analysis_models``, when present). Scored
against the truth (``hw_sim.truth``: lesion polygons, nucleus centres):

- lesion detection: sensitivity and false positives per slide as the detection threshold (a
  lesion's max probability) sweeps -- the FROC curve; a detection is a true positive when it
  overlaps a truth lesion; the FROC score is the mean sensitivity at 1/4, 1/2, 1, 2, 4, 8 FP per
  slide (CAMELYON16's);
- tumour-mask Dice (pooled over the tumour slides, and per slide), tumour burden error %;
- slide AUC ("contains tumour") of the slide score (the runtime's: the slide model's, or the strongest
  lesion's peak where higher: ``runtime.analysis.summary.slide_score``), of the slide model alone and of
  the max-probability aggregate;
- nuclei F1 (one-to-one matches within 4 µm);
- tumour patches/s and nuclei windows/s on this CPU (ONNX Runtime CPU for the models).

The scan-path cost (wall time of a replayed scan with analysis on vs off) is measured with
``--scan-cost`` (two replayed scans of a small synthetic recording through the daemon).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.report import Column, emit

DESCRIPTION = "slide analysis vs baselines on held-out synthetic slides (FROC, Dice, burden, AUC, nuclei F1)"

PX_UM = 0.5  # analysis resolution of the rendered slides
MATCH_UM = 4.0
FROC_FP = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
TARGETS = {
    "sensitivity_at_0.5_fp": 0.9,
    "dice": 0.85,
    "burden_error_pct": 10.0,
    "slide_auc": 0.97,
    "nuclei_f1": 0.85,
    "scan_cost_pct": 10.0,
}


def default_subdivide() -> int:
    """The runtime's default ``[analysis] subdivide``: the bench measures what a scan runs."""
    from runtime.config import AnalysisConfig

    return int(AnalysisConfig().subdivide)


def _lesion_head_on(flag: str | None) -> bool:
    """``--lesion-head on|off``, or the runtime's default ``[analysis] lesion_head``."""
    from runtime.config import AnalysisConfig

    return bool(AnalysisConfig().lesion_head) if flag is None else flag == "on"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--slides",
        type=int,
        default=48,
        help="held-out slides (half with tumour, a quarter of those small-lesion slides); 0: only --scan-cost",
    )
    p.add_argument("--size-um", type=float, default=1500.0, help="side of each slide's square area (µm)")
    p.add_argument("--first-seed", type=int, default=900_000, help="first slide seed (held out: 900000-999999)")
    p.add_argument(
        "--vesicular-max",
        type=float,
        default=0.0,
        help="draw the slides' carcinoma up to this vesicular, in [0, 1] (hw_sim SlideSpec.vesicular_max; the same "
        "slides and truth; default 0: the look the models trained on)",
    )
    p.add_argument("--no-nuclei", action="store_true", help="skip nuclei detection (faster)")
    p.add_argument(
        "--subdivide",
        type=int,
        nargs="+",
        default=[default_subdivide()],
        help="tumour grid cells per patch side (default: [analysis] subdivide's default); several: one run each",
    )
    p.add_argument(
        "--models",
        type=Path,
        default=None,
        help="analysis model root: tumour, nuclei, slide_mil and, if there, lesion_head folders (default: the "
        "committed ones; a root without lesion_head uses the committed head)",
    )
    p.add_argument("--baseline-only", action="store_true", help="only the classical baselines")
    p.add_argument(
        "--lesion-head",
        choices=("on", "off"),
        default=None,
        help="re-outline small lesions with the lesion head (default: [analysis] lesion_head's default)",
    )
    p.add_argument("--scan-cost", action="store_true", help="also time a replayed scan with analysis on vs off")
    p.add_argument("--cost-fields", type=int, default=8, help="--scan-cost: N x N fields of 512 px (default 8)")
    p.add_argument("--cost-repeats", type=int, default=2, help="--scan-cost: scans per setting, alternated")
    p.add_argument(
        "--cost-compare",
        choices=("analysis", "lesion-head"),
        default="analysis",
        help="--scan-cost: analysis off vs on (default), or analysis on with the lesion head off vs on",
    )
    p.add_argument(
        "--cost-seed",
        type=int,
        default=900_500,
        help="--scan-cost: the replayed recording's slide seed (held out; 900500: 2 lesions, 1 mimic)",
    )
    p.add_argument("--cost-lesions", type=int, default=2, help="--scan-cost: lesions on the replayed slide (default 2)")
    p.add_argument(
        "--cost-paces", type=float, nargs="+", default=[0.0, 1.0], help="--scan-cost: replay paces (default 0 1)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")


# --------------------------------------------------------------------------- slides and truth


@dataclass
class BenchSlide:
    seed: int
    levels: list[npt.NDArray[np.uint8]]
    tumour: list[Any]  # shapely geometries (level-0 px) of the tumour lesions
    mimics: list[Any]
    nuclei: npt.NDArray[np.float64]  # (K, 2) (y, x) level-0 px
    kind: str = "tumour"  # slide_kind(): "benign", "small" or "tumour" (what was asked; the truth decides the label)

    @property
    def has_tumour(self) -> bool:
        return bool(self.tumour)


SMALL_LESION_UM = (50.0, 100.0)  # "small-lesion" slides: lesions of this diameter range only


def slide_kind(index: int) -> str:
    """What slide ``index`` carries: odd indices no tumour ("benign"); every eighth index (2, 10,
    18, ...) only one or two lesions of ``SMALL_LESION_UM`` ("small": about the 64 µm patch size,
    the hard case of a slide-level call; a quarter of the tumour slides, where lesion sizes drawn
    log-uniformly from 50 µm leave ~10-15% of slides with nothing larger); the other even ones 1-3
    lesions of 50 µm to half the slide ("tumour")."""
    return "benign" if index % 2 else "small" if index % 8 == 2 else "tumour"


def slide_spec_for(seed: int, index: int, size_um: float, held_out: bool = True) -> dict[str, Any]:
    """Slide ``index`` (of :func:`slide_kind`); mimics on some, with or without tumour.
    ``held_out``: the seed must be a held-out one (figures); False for tuning on development seeds."""
    from hw_sim.lesions import HELD_OUT_SEEDS

    if held_out and seed not in HELD_OUT_SEEDS:
        held = f"{HELD_OUT_SEEDS.start}-{HELD_OUT_SEEDS.stop - 1}"
        raise ValueError(f"bench slides use held-out seeds ({held}), got {seed}")
    rng = np.random.default_rng(seed)
    kind = slide_kind(index)
    tumour = kind != "benign"
    small = kind == "small"
    return {
        "seed": seed,
        "pieces": int(rng.integers(1, 3)),
        "lesions": (int(rng.integers(1, 3)) if small else int(rng.integers(1, 4))) if tumour else 0,
        "mimics": int(rng.integers(0, 2)) if tumour else int(rng.integers(0, 3)),
        "lesion_min_um": SMALL_LESION_UM[0],
        "lesion_max_um": SMALL_LESION_UM[1] if small else size_um * 0.5,
        "artifacts": 0,
    }


def render_slide(
    seed: int,
    index: int,
    size_um: float,
    px_um: float = PX_UM,
    held_out: bool = True,
    vesicular_max: float = 0.0,
) -> BenchSlide:
    """Render slide ``index`` (seed ``seed``) in focus, with its truth (see the module docstring).
    ``vesicular_max``: the carcinoma's look (:attr:`hw_sim.slide.SlideSpec.vesicular_max`; the same
    slides, lesions and truth either way)."""
    import cv2

    from hw_sim.content import make_slide
    from hw_sim.optics import CameraParams, OpticsParams
    from hw_sim.slide import SlideSpec
    from hw_sim.synth import AREA_ORIGIN_UM
    from hw_sim.truth import TILE, TruthRenderer, lesion_geometries
    from runtime.devices.protocols import ScanArea
    from runtime.devices.recording import RecordingMeta, Timing

    ox, oy = AREA_ORIGIN_UM
    drawn = slide_spec_for(seed, index, size_um, held_out)
    spec = SlideSpec(
        origin_x_um=ox, origin_y_um=oy, width_um=size_um, height_um=size_um, vesicular_max=vesicular_max, **drawn
    )
    n = round(size_um / px_um)
    # One "field" exactly covering the area: the truth mosaic is then the area at px_um.
    meta = RecordingMeta(
        pixel_size_um=px_um,
        tile_height=n,
        tile_width=n,
        n_fields=1,
        n_z=1,
        rows=1,
        cols=1,
        overlap=0.0,
        area=ScanArea(ox, oy, size_um, size_um),
        field_width_um=size_um,
        field_height_um=size_um,
        optics=OpticsParams().to_dict(),
        camera=CameraParams().to_dict(),
        timing=Timing(),
        slide=spec.to_dict(),
    )
    renderer = TruthRenderer(meta)
    img = np.empty((n, n, 3), np.uint8)
    for r in range(0, n, TILE):
        for c in range(0, n, TILE):
            img[r : r + TILE, c : c + TILE] = renderer.render(r, c)[: n - r, : n - c]
    levels = [img]
    while max(levels[-1].shape[:2]) > 512:
        h, w = levels[-1].shape[:2]
        levels.append(np.asarray(cv2.resize(levels[-1], ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA)))
    slide = make_slide(spec)
    geoms = lesion_geometries(slide, meta)
    cx, cy, _ = slide.nuclei(ox, oy, ox + size_um, oy + size_um)
    nuclei = np.stack([(cy - oy) / px_um, (cx - ox) / px_um], axis=1) if len(cx) else np.zeros((0, 2))
    return BenchSlide(
        seed,
        levels,
        [g for les, g in geoms if les.tumour],
        [g for les, g in geoms if not les.tumour],
        nuclei,
        slide_kind(index),
    )


class ArraySource:
    """A :class:`~runtime.analysis.pipeline.SlideSource` over in-memory levels."""

    def __init__(self, levels: list[npt.NDArray[np.uint8]], px_um: float) -> None:
        from runtime.analysis.pipeline import SlideGeometry

        self.levels = levels
        self.geometry = SlideGeometry(tuple((lv.shape[0], lv.shape[1]) for lv in levels), px_um)

    def read_rows(self, level: int, y0: int, y1: int) -> npt.NDArray[np.uint8]:
        return self.levels[level][y0:y1]

    def thumbnail(self, max_px: int) -> npt.NDArray[np.uint8]:
        return next((lv for lv in self.levels if max(lv.shape[:2]) <= max_px), self.levels[-1])


# --------------------------------------------------------------------------- scoring


def auc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the ROC curve (ties count half); None without both classes."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return float(wins / (len(pos) * len(neg)))


def match_points(truth: npt.NDArray[np.float64], found: npt.NDArray[Any], radius: float) -> int:
    """One-to-one matches within ``radius`` (greedy by distance, closest pairs first)."""
    from scipy.spatial import cKDTree

    if len(truth) == 0 or len(found) == 0:
        return 0
    tree = cKDTree(truth)
    dist, idx = tree.query(found, k=4, distance_upper_bound=radius)
    pairs = sorted(
        (float(d), i, int(j))
        for i, (ds, js) in enumerate(zip(dist, idx, strict=True))
        for d, j in zip(ds, js, strict=True)
        if math.isfinite(d)
    )
    used_t: set[int] = set()
    used_f: set[int] = set()
    for _, i, j in pairs:
        if i not in used_f and j not in used_t:
            used_f.add(i)
            used_t.add(j)
    return len(used_f)


def froc(per_slide: list[dict[str, Any]], n_slides: int) -> dict[str, Any]:
    """FROC points over the detection threshold, the sensitivity at <= 0.5 FP/slide and the FROC score."""
    n_truth = sum(s["n_truth"] for s in per_slide)
    dets = [(d["score"], d["hits"], k) for k, s in enumerate(per_slide) for d in s["detections"]]
    thresholds = sorted({d[0] for d in dets}, reverse=True)
    points = []
    for t in thresholds:
        hit: set[tuple[int, int]] = set()
        fp = 0
        for score, hits, k in dets:
            if score >= t:
                if hits:
                    hit.update((k, h) for h in hits)
                else:
                    fp += 1
        points.append({"threshold": t, "fp_per_slide": fp / n_slides, "sensitivity": len(hit) / max(1, n_truth)})

    def sens_at(fp_max: float) -> float:
        return max((p["sensitivity"] for p in points if p["fp_per_slide"] <= fp_max), default=0.0)

    return {
        "points": points,
        "lesions": n_truth,
        "sensitivity_at_0.5_fp": sens_at(0.5),
        "froc_score": float(np.mean([sens_at(f) for f in FROC_FP])),
    }


def score_slide(slide: BenchSlide, result: Any, lesions: list[Any]) -> dict[str, Any]:
    import shapely

    from runtime.analysis.lesions import tissue_geometry
    from runtime.analysis.summary import slide_score

    truth_u = shapely.unary_union(slide.tumour) if slide.tumour else shapely.Polygon()
    pred_u = shapely.unary_union([les.geometry for les in lesions]) if lesions else shapely.Polygon()
    # The truth outlines the lesion within the simulator's tissue piece (holes included); the runtime
    # sees tissue on its grid. The truth's area on the runtime's tissue (cells >= 0.5, the annotations'
    # tissue outline) tells how much of a burden error is that difference of definition.
    on_tissue = truth_u.intersection(tissue_geometry(result)).area if slide.tumour else 0.0
    inter = truth_u.intersection(pred_u).area if slide.tumour and lesions else 0.0
    detections = []
    for les in lesions:
        hits = [i for i, t in enumerate(slide.tumour) if les.geometry.intersects(t)]
        detections.append({"score": les.max_probability, "hits": hits})
    mm2 = (PX_UM / 1000.0) ** 2
    out: dict[str, Any] = {
        "seed": slide.seed,
        "kind": slide.kind,
        "tumour": slide.has_tumour,
        "n_truth": len(slide.tumour),
        "detections": detections,
        "truth_mm2": truth_u.area * mm2,
        "truth_on_tissue_mm2": on_tissue * mm2,
        "pred_mm2": pred_u.area * mm2,
        "intersection_mm2": inter * mm2,
        "slide_score": slide_score(result, lesions),  # the runtime's: the slide model's, or the strongest lesion's
        "slide_model_score": result.slide_score,
        "max_probability": result.max_probability,
        "patches": result.stats["patches"],
        "tumour_s": result.stats["tumour_s"],
        "nuclei_s": result.stats["nuclei_s"],
        "windows_run": result.stats["windows_run"],
    }
    if len(result.nuclei) or result.stats["windows_run"]:
        tp = match_points(slide.nuclei, result.nuclei, MATCH_UM / PX_UM)
        out.update(nuclei_truth=len(slide.nuclei), nuclei_found=len(result.nuclei), nuclei_tp=tp)
    return out


def burden_by_kind(tumour_slides: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Burden error per kind of tumour slide ("tumour", "small") and by truth burden (below and
    above 0.01 mm², ~2.5 patches): mean, median and pooled (|sum found - sum truth| / sum truth) %,
    with the slide count. A lesion of one or two 64 µm patches cannot be outlined to 10% by a
    64 µm grid, so the mean over all slides is carried by them; the split shows it."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in tumour_slides:
        if p["truth_mm2"] <= 0:
            continue
        groups.setdefault(p["kind"], []).append(p)
        groups.setdefault("truth >= 0.01 mm2" if p["truth_mm2"] >= 0.01 else "truth < 0.01 mm2", []).append(p)
    out = {}
    for name, ps in sorted(groups.items()):
        err = [100 * abs(p["pred_mm2"] - p["truth_mm2"]) / p["truth_mm2"] for p in ps]
        tr, pr = sum(p["truth_mm2"] for p in ps), sum(p["pred_mm2"] for p in ps)
        out[name] = {
            "slides": len(ps),
            "mean": float(np.mean(err)),
            "median": float(np.median(err)),
            "pooled": 100 * abs(pr - tr) / tr,
            "within_10pct": float(np.mean(np.asarray(err) <= 10.0)),
        }
    return out


def _without_head(tum: list[dict[str, Any]]) -> dict[str, Any]:
    """The same tumour slides' burden (all, and by kind and size) and pooled Dice as the outlines were
    before the lesion head re-outlined them and added faint ones (same renders, same tumour map)."""
    plain = [dict(p, pred_mm2=p["pred_mm2_no_head"], intersection_mm2=p["intersection_mm2_no_head"]) for p in tum]
    inter, tr, pr = (sum(p[k] for p in plain) for k in ("intersection_mm2", "truth_mm2", "pred_mm2"))
    burden = [100 * abs(p["pred_mm2"] - p["truth_mm2"]) / p["truth_mm2"] for p in plain if p["truth_mm2"] > 0]
    return {
        "dice_pooled": 2 * inter / (tr + pr) if tr + pr else None,
        "burden_within_10pct": float(np.mean(np.asarray(burden) <= 10.0)) if burden else None,
        "burden_all": burden_by_kind([dict(p, kind="all") for p in plain]).get("all"),
        "burden_by_kind": burden_by_kind(plain),
    }


def evaluate(slides: list[BenchSlide], models: Any, nuclei: bool, subdivide: int = 1) -> dict[str, Any]:
    from runtime.analysis.lesions import find_lesions, model_lesions
    from runtime.analysis.outline import outline_for
    from runtime.analysis.pipeline import analyze_source, slide_lesions

    per = []
    lesion_s = {"outline": 0.0, "fixed": 0.0}
    outlined = outline_for(models.tumour, subdivide) is not None
    t0 = time.perf_counter()
    for s in slides:
        src = ArraySource(s.levels, PX_UM)
        res = analyze_source(src, models, nuclei=nuclei, subdivide=subdivide)
        t1 = time.perf_counter()
        found = slide_lesions(res, models, src)  # as the runtime outlines them (outline fit, lesion head if on)
        t2 = time.perf_counter()
        fixed = find_lesions(res)  # the 0.5 contour alone, for comparison
        lesion_s["outline"] += t2 - t1
        lesion_s["fixed"] += time.perf_counter() - t2
        p = score_slide(s, res, found)
        p["pred_mm2_fixed"] = score_slide(s, res, fixed)["pred_mm2"] if outlined else p["pred_mm2"]
        p["lesion_head_calls"] = int(res.stats.get("lesion_head_calls", 0))
        p["lesion_head_windows"] = int(res.stats.get("lesion_head_windows", 0))
        if getattr(models, "lesion_head", None) is not None:  # the same slide without it, for comparison
            no_head = score_slide(s, res, model_lesions(res, models.tumour))
            p["pred_mm2_no_head"], p["intersection_mm2_no_head"] = no_head["pred_mm2"], no_head["intersection_mm2"]
        p["lesion_head_s"] = float(res.stats.get("lesion_head_s", 0.0))
        per.append(p)
    wall = time.perf_counter() - t0
    tum = [p for p in per if p["tumour"]]
    inter, tr, pr = (sum(p[k] for p in tum) for k in ("intersection_mm2", "truth_mm2", "pred_mm2"))
    dice_each = [
        2 * p["intersection_mm2"] / (p["truth_mm2"] + p["pred_mm2"]) for p in tum if p["truth_mm2"] + p["pred_mm2"]
    ]
    burden = [100 * abs(p["pred_mm2"] - p["truth_mm2"]) / p["truth_mm2"] for p in tum if p["truth_mm2"] > 0]
    labels = [p["tumour"] for p in per]
    # The small-lesion slides against every tumour-free slide: the hard case of the slide-level call.
    hard = [p for p in per if not p["tumour"] or p["kind"] == "small"]
    out: dict[str, Any] = {
        "models": dict(models.names),
        "froc": froc(per, len(per)),
        "dice_pooled": 2 * inter / (tr + pr) if tr + pr else None,
        "dice_mean": float(np.mean(dice_each)) if dice_each else None,
        "burden_error_pct_mean": float(np.mean(burden)) if burden else None,
        "burden_error_pct_median": float(np.median(burden)) if burden else None,
        "burden_within_10pct": float(np.mean(np.asarray(burden) <= 10.0)) if burden else None,
        "burden_error_pct_pooled": 100 * abs(pr - tr) / tr if tr else None,
        "false_positive_mm2_on_tumour_free": sum(p["pred_mm2"] for p in per if not p["tumour"]),
        "slide_auc": auc([p["slide_score"] for p in per], labels),
        "slide_auc_max_probability": auc([p["max_probability"] for p in per], labels),
        "slide_auc_slide_model": auc([p["slide_model_score"] for p in per], labels),
        "slide_auc_small": auc([p["slide_score"] for p in hard], [p["tumour"] for p in hard]),
        "slide_auc_small_max_probability": auc([p["max_probability"] for p in hard], [p["tumour"] for p in hard]),
        "burden_by_kind": burden_by_kind(tum),
        # The same slides outlined by the fixed 0.5 contour (what lesions were before the outline fit).
        "outline_fit": outlined,
        "burden_fixed_threshold": burden_by_kind([dict(p, kind="all", pred_mm2=p["pred_mm2_fixed"]) for p in tum]),
        # Against the truth cut to the runtime's tissue (see score_slide), and how much of the truth that cuts.
        "burden_vs_truth_on_tissue": burden_by_kind(
            [dict(p, kind="all", truth_mm2=p["truth_on_tissue_mm2"]) for p in tum]
        ),
        "truth_off_tissue_pct_max": max(
            (100 * (1 - p["truth_on_tissue_mm2"] / p["truth_mm2"]) for p in tum if p["truth_mm2"] > 0), default=0.0
        ),
        "lesions_s_per_slide": {k: v / max(1, len(per)) for k, v in lesion_s.items()},
        "lesion_head": getattr(models, "lesion_head", None) is not None,
        "lesion_head_calls": sum(p["lesion_head_calls"] for p in per),
        "lesion_head_windows": sum(p["lesion_head_windows"] for p in per),
        "lesion_head_s_per_slide": sum(p["lesion_head_s"] for p in per) / max(1, len(per)),
        "without_lesion_head": _without_head(tum) if tum and "pred_mm2_no_head" in tum[0] else None,
        "patches_per_s": sum(p["patches"] for p in per) / max(1e-9, sum(p["tumour_s"] for p in per)),
        "tumour_s_per_slide": sum(p["tumour_s"] for p in per) / max(1, len(per)),
        "wall_s": wall,
        "slides": [{k: v for k, v in p.items() if k != "detections"} for p in per],
    }
    if any("nuclei_tp" in p for p in per):
        tp = sum(p.get("nuclei_tp", 0) for p in per)
        nt = sum(p.get("nuclei_truth", 0) for p in per)
        nf = sum(p.get("nuclei_found", 0) for p in per)
        prec, rec = tp / max(1, nf), tp / max(1, nt)
        out["nuclei"] = {
            "precision": prec,
            "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "truth": nt,
            "windows_per_s": sum(p["windows_run"] for p in per) / max(1e-9, sum(p["nuclei_s"] for p in per)),
        }
    return out


def lesion_head_dir(root: Path | None) -> Path | None:
    """The lesion head of a model root: ``root/lesion_head`` where it exists, else None (the committed head)."""
    return root / "lesion_head" if root is not None and (root / "lesion_head").is_dir() else None


def trained_models(root: Path | None) -> tuple[Any, str | None]:
    """The trained analysis models (folders under ``root``: tumour, nuclei, slide_mil; None: the
    committed ones), or (None, why not). Without a usable slide model, the tumour and nuclei
    models alone (the slide score is then their max patch probability), and why."""
    from runtime.analysis.pipeline import AnalysisError, ModelSet, load_models

    dirs = [None if root is None else root / name for name in ("tumour", "nuclei", "slide_mil")]
    try:
        return load_models(*dirs), None
    except (AnalysisError, ImportError) as err:
        why = str(err)
    try:
        from runtime.analysis.models import load_nuclei_model, load_tumour_model

        t, n = load_tumour_model(dirs[0]), load_nuclei_model(dirs[1])
    except Exception as err:  # a missing or bad folder: the bench reports the baselines only
        return None, f"{why}; tumour/nuclei alone: {err}"
    names = {"tumour": str(t.folder.path), "nuclei": str(n.folder.path), "slide": "max patch probability"}
    return ModelSet(t, n, None, names), f"no slide model ({why}): slide score = max patch probability"


# --------------------------------------------------------------------------- scan-path cost


def scan_cost(
    fields: int,
    repeats: int,
    trained: bool,
    model_root: Path | None = None,
    paces: tuple[float, ...] = (0.0, 1.0),
    no_slide_model: bool = False,
    compare: str = "analysis",
    seed: int = 900_500,
    lesions: int = 2,
) -> dict[str, Any]:
    """Wall time of a replayed scan (start_scan -> scan_finished, through the daemon as ``bench e2e``
    runs it, one z plane) with ``[analysis]`` off and on, alternated ``repeats`` times; medians.
    Each setting's scans run on one daemon kept up across them, as on a scanner: with analysis on,
    its analysis worker is started with the daemon and ready before the first scan
    (:class:`bench.scan_cost.ReplayDaemon`; the worker's start is reported apart, paid once).
    With analysis on, the scan ends once the analysis is written too, so the difference is
    everything the analysis costs the scan. Per replay pace: 0 (as fast as the CPU allows: every
    CPU second the analysis takes competes with the scan's) and 1 (the scanner's real speed by the
    recording's timing model: the analysis runs in the time the scanner waits for the stage).
    ``trained``: the trained models (folders under ``model_root``, else the committed ones), else the baselines.
    ``compare`` "lesion-head": both settings run the analysis, "off" with ``[analysis] lesion_head = false``
    and "on" with it true (trained models only), so the difference is what the small-lesion head costs
    the scan; each scan's ``lesion_head_s`` (the head's reads and calls) is reported. ``seed`` and
    ``lesions``: the replayed slide (a held-out seed)."""
    import tempfile

    from bench.scan_cost import ReplayDaemon
    from hw_sim.synth import SynthParams, synthesize

    models = "trained" if trained else "baseline"
    head = compare == "lesion-head"
    if head and not trained:
        raise ValueError("the lesion head's cost needs the trained models")
    out: dict[str, Any] = {
        "fields": [fields, fields],
        "tile": 512,
        "models": models,
        "repeats": repeats,
        "compare": "analysis on, lesion_head off vs on" if head else "analysis off vs on",
        "seed": seed,
        "lesions": lesions,
    }
    with tempfile.TemporaryDirectory(prefix="bench-analysis-") as tmp:
        work = Path(tmp)
        params = SynthParams(
            fields_x=fields,
            fields_y=fields,
            seed=seed,
            tile=512,
            z_planes=1,
            coarse_focus_error_um=0.0,
            lesions=lesions,
            mimics=1,
        )
        rec = synthesize(work / "rec.zarr", params)
        configs = {}
        dirs = ""
        if trained and model_root is not None:
            dirs = "".join(
                f'{key} = "{model_root / name}"\n'
                for key, name in (("tumour_dir", "tumour"), ("nuclei_dir", "nuclei"), ("slide_dir", "slide_mil"))
            )
        if trained and no_slide_model:
            dirs = (
                "\n".join(line for line in dirs.splitlines() if not line.startswith("slide_dir"))
                + '\nslide_dir = "none"\n'
            )

        for name, enabled in (("off", False), ("on", True)):
            # compare "lesion-head": the analysis runs in both, the setting is the head
            analysis_on, head_on = (True, enabled) if head else (enabled, None)
            head_key = "" if head_on is None else f"lesion_head = {'true' if head_on else 'false'}\n"
            configs[name] = work / f"{name}.toml"
            configs[name].write_text(
                '[focus]\nstrategy = "contrast_sweep"\nsweep_steps = 3\n\n'
                f'[analysis]\nenabled = {"true" if analysis_on else "false"}\nmodels = "{models}"\n{head_key}{dirs}'
            )
        for pace in paces:
            walls: dict[str, list[float]] = {"off": [], "on": []}
            cpu: dict[str, list[float]] = {"off": [], "on": [], "analysis": [], "analysis_off": [], "analysis_on": []}
            head_s: dict[str, list[float]] = {"off": [], "on": []}
            ready: list[float] = []
            analysis: dict[str, Any] | None = None
            scans: list[dict[str, Any]] = []  # every scan, in order: a median hides the runs that matter
            with (
                ReplayDaemon(configs["off"], rec, work / f"off-{pace:g}", pace) as d_off,
                ReplayDaemon(configs["on"], rec, work / f"on-{pace:g}", pace) as d_on,
            ):
                daemons = {"off": d_off, "on": d_on}
                for r in range(repeats):
                    for name in ("off", "on"):
                        load1 = os.getloadavg()[0]  # the machine's load as the scan starts (shared machines)
                        report = daemons[name].scan(f"scan-{r}")
                        walls[name].append(report["_wall_s"])
                        scans.append(_scan_record(r, name, load1, report))
                        # CPU seconds of every process of the scan (the contention-free cost).
                        secs = report.get("cpu_seconds") or {}
                        cpu[name].append(float(sum(secs.values())))
                        if head:
                            cpu[f"analysis_{name}"].append(float(secs.get("analysis", float("nan"))))
                            head_s[name].append(
                                float(((report.get("analysis") or {}).get("timing_s") or {}).get("lesion_head_s", 0.0))
                            )
                        if name == "on":
                            cpu["analysis"].append(float(secs.get("analysis", float("nan"))))
                            analysis = report.get("analysis")
                            if analysis is None or analysis.get("error"):
                                raise RuntimeError(f"the analysis did not run: {analysis}")
                            ready.append(float(analysis.get("ready_after_slide_s", float("nan"))))
            assert analysis is not None
            off, on = float(np.median(walls["off"])), float(np.median(walls["on"]))
            out[f"pace_{pace:g}"] = {
                "off_s": off,
                "on_s": on,
                "cost_pct": 100.0 * (on - off) / off,
                "cpu_s_off": float(np.median(cpu["off"])),
                "cpu_s_on": float(np.median(cpu["on"])),
                "cpu_s_analysis": float(np.median(cpu["analysis"])),
                "ready_after_slide_s": round(float(np.median(ready)), 3),
                "walls": walls,
                # Per repeat: the "on" scan against the "off" scan just before it (not only the medians).
                "pair_cost_pct": [
                    round(100.0 * (on_s - off_s) / off_s, 1)
                    for off_s, on_s in zip(walls["off"], walls["on"], strict=True)
                ],
                "scans": scans,
                "cpu_s_by_process": cpu_by_process(scans),
                **(
                    {
                        "cpu_s_analysis_head_off": cpu["analysis_off"],
                        "cpu_s_analysis_head_on": cpu["analysis_on"],
                        "lesion_head_s": head_s,
                        "lesion_count": analysis.get("lesion_count"),
                        "lesion_areas_mm2": [les.get("area_mm2") for les in analysis.get("lesions") or []],
                    }
                    if head
                    else {}
                ),
                "analysis_patches": analysis.get("patches"),
                "analysis_timing_s": analysis.get("timing_s"),
                # The warm worker: its start (once per daemon, before the first scan) and whether
                # every scan used that one process (starts 1).
                "analysis_worker_start_cpu_s": d_on.worker_start_cpu_s,
                "analysis_worker_ready_s": d_on.worker_ready_s,
                "analysis_worker": analysis.get("worker"),
            }
    return out


def cpu_by_process(scans: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median CPU seconds of each process over ``scans`` (:func:`_scan_record` s), per setting ("off", "on")."""
    out: dict[str, dict[str, float]] = {}
    for setting in sorted({s["analysis"] for s in scans}):
        per: dict[str, list[float]] = {}
        for s in scans:
            if s["analysis"] == setting:
                for k, v in s["cpu_s_by_process"].items():
                    per.setdefault(k, []).append(v)
        out[setting] = {k: round(float(np.median(v)), 3) for k, v in sorted(per.items())}
    return out


def _scan_record(repeat: int, setting: str, load1: float, report: dict[str, Any]) -> dict[str, Any]:
    """One scan of ``scan_cost``: its wall and CPU, the load average as it began, and with analysis
    on what the scan waited for after its slide (``report.json`` ``analysis.timing_s``) and how many
    pieces of rows the worker fed at normal priority because its niced feeding fell behind."""
    secs = report.get("cpu_seconds") or {}
    record: dict[str, Any] = {
        "repeat": repeat,
        "analysis": setting,
        "wall_s": round(report["_wall_s"], 3),
        "cpu_s": round(sum(secs.values()), 3),
        # Per process (report.json cpu_seconds: supervisor, acquisition, stitcher, writer, analysis, ...):
        # on a shared machine the CPU each process spent is steadier than the wall.
        "cpu_s_by_process": {k: round(float(v), 3) for k, v in secs.items()},
        "load1": round(load1, 2),
    }
    a = report.get("analysis") or {}
    if a:  # the analysis ran (both settings of --cost-compare lesion-head)
        timing = a.get("timing_s") or {}
        record |= {
            "cpu_s_analysis": (report.get("cpu_seconds") or {}).get("analysis"),
            "ready_after_slide_s": a.get("ready_after_slide_s"),
            "rows_after_slide_s": timing.get("rows_after_slide"),
            "finish_and_outputs_s": timing.get("finish_and_outputs"),
            "urgent_pieces": (a.get("worker") or {}).get("urgent_pieces"),
            "lesion_head_s": timing.get("lesion_head_s"),
        }
    return record


# --------------------------------------------------------------------------- the bench


def run(args: argparse.Namespace) -> int:
    from runtime.analysis.pipeline import baseline_models

    t0 = time.perf_counter()
    slides = [
        render_slide(args.first_seed + i, i, args.size_um, vesicular_max=args.vesicular_max) for i in range(args.slides)
    ]
    render_s = time.perf_counter() - t0
    runs: dict[str, dict[str, Any]] = {}
    notes = [""]
    sets = [("baseline", baseline_models())]
    if not args.baseline_only:
        models, why = trained_models(args.models)
        if models is None:
            notes.append(f"trained models: not run ({why})")
        else:
            if _lesion_head_on(args.lesion_head):
                import dataclasses

                from runtime.analysis.lesion_head import load_lesion_head

                head = load_lesion_head(lesion_head_dir(args.models), "ort_cpu")
                models = dataclasses.replace(models, lesion_head=head)
                models.names["lesion_head"] = str(models.lesion_head.folder.path)
            sets.append(("models", models))
            if why:
                notes.append(f"trained models: {why}")
    for name, ms in sets if slides else ():  # --slides 0: only the scan cost
        for k in args.subdivide:
            runs[name if k == 1 else f"{name} /{k}"] = evaluate(slides, ms, not args.no_nuclei, k)
    result: dict[str, Any] = {
        "slides": args.slides,
        "size_um": args.size_um,
        "vesicular_max": args.vesicular_max,
        "seeds": [args.first_seed, args.first_seed + args.slides - 1],
        "px_um": PX_UM,
        "render_s": render_s,
        "runs": runs,
        "targets": TARGETS,
    }
    if args.scan_cost:
        trained = len(sets) > 1
        no_slide = trained and sets[1][1].slide is None
        result["scan_cost"] = scan_cost(
            args.cost_fields,
            args.cost_repeats,
            trained,
            args.models,
            paces=tuple(args.cost_paces),
            no_slide_model=no_slide,
            compare=args.cost_compare,
            seed=args.cost_seed,
            lesions=args.cost_lesions,
        )
    rows = []
    for name, r in runs.items():
        rows.append(
            {
                "run": name,
                "sens": r["froc"]["sensitivity_at_0.5_fp"],
                "froc": r["froc"]["froc_score"],
                "dice": r["dice_pooled"],
                "burden": r["burden_error_pct_mean"],
                "burden_med": r["burden_error_pct_median"],
                "burden_in": r["burden_within_10pct"],
                "burden_pool": r["burden_error_pct_pooled"],
                "auc": r["slide_auc"],
                "auc_max": r["slide_auc_max_probability"],
                "auc_mil": r["slide_auc_slide_model"],
                "auc_small": r["slide_auc_small"],
                "nuc_f1": r.get("nuclei", {}).get("f1"),
                "pps": r["patches_per_s"],
            }
        )
    cols = [
        Column("run", ""),
        Column("sens", "sens@0.5FP", ".3f"),
        Column("froc", "FROC", ".3f"),
        Column("dice", "Dice", ".3f"),
        Column("burden", "burden err % mean", ".1f"),
        Column("burden_med", "median", ".1f"),
        Column("burden_in", "<=10%", ".2f"),
        Column("burden_pool", "pooled", ".1f"),
        Column("auc", "AUC", ".3f"),
        Column("auc_max", "AUC maxprob", ".3f"),
        Column("auc_mil", "AUC slide model", ".3f"),
        Column("auc_small", "AUC small", ".3f"),
        Column("nuc_f1", "nuclei F1", ".3f"),
        Column("pps", "patches/s", ".0f"),
    ]
    if runs:
        n_les = next(iter(runs.values()))["froc"]["lesions"]
        notes.append(
            f"{args.slides} held-out slides (seeds {args.first_seed}-{args.first_seed + args.slides - 1}), "
            f"{args.size_um:.0f} µm square at {PX_UM} µm/px, {n_les} tumour lesions; rendered in {render_s:.1f} s"
        )
    notes.append("targets: " + ", ".join(f"{k} {v}" for k, v in TARGETS.items()))
    notes.append(
        "sens@0.5FP: lesion sensitivity at <= 0.5 false-positive detections per slide; FROC: mean sensitivity at "
        "1/4..8 FP/slide; Dice pooled over the tumour slides; burden error: |found - truth| / truth area per tumour "
        "slide (mean, median, fraction within 10%), pooled: |sum found - sum truth| / sum truth; AUC small: the "
        "small-lesion slides against the tumour-free ones; 'NAME /k': the tumour grid k x k cells per patch "
        "(patches at 1/k steps)"
    )
    for name, r in runs.items():
        notes.append(
            f"{name}: burden error by slide kind / truth burden (mean / median / pooled %, slides): "
            + "; ".join(
                f"{k} {v['mean']:.1f} / {v['median']:.1f} / {v['pooled']:.1f} ({v['slides']})"
                for k, v in r["burden_by_kind"].items()
            )
            + f"; tumour model {r['tumour_s_per_slide']:.2f} s per slide"
        )
        if r["outline_fit"]:
            fx = r["burden_fixed_threshold"]
            notes.append(
                f"{name}: lesions outlined by the tumour model's outline fit; with the fixed 0.5 contour instead, "
                "burden error (mean / median / pooled %): "
                + "; ".join(f"{k} {v['mean']:.1f} / {v['median']:.1f} / {v['pooled']:.1f}" for k, v in fx.items())
                + f"; lesion outlines {1000 * r['lesions_s_per_slide']['outline']:.0f} ms per slide "
                f"(fixed contour {1000 * r['lesions_s_per_slide']['fixed']:.0f} ms)"
            )
    if "scan_cost" in result:
        sc = result["scan_cost"]
        for key, c in sc.items():
            if key.startswith("pace_"):
                what = "lesion head" if sc.get("compare", "").startswith("analysis on") else "analysis"
                notes.append(
                    f"replayed scan ({sc['fields'][0]}x{sc['fields'][1]} fields, {key.replace('_', ' ')}), wall time: "
                    f"{what} off {c['off_s']:.2f} s, on {c['on_s']:.2f} s (+{c['cost_pct']:.1f}%); "
                    f"analysis ready {c['ready_after_slide_s']} s after the slide; CPU s of the scan's processes "
                    f"{c['cpu_s_off']:.1f} -> {c['cpu_s_on']:.1f} (analysis worker {c['cpu_s_analysis']:.1f}); "
                    f"per repeat (on vs the off scan before it): {', '.join(f'{x:+.1f}%' for x in c['pair_cost_pct'])}"
                )
                by = c.get("cpu_s_by_process") or {}
                if by:
                    off_p, on_p = by.get("off", {}), by.get("on", {})
                    procs = sorted({*off_p, *on_p})
                    notes.append(
                        "  CPU s per process (median, off -> on): "
                        + ", ".join(f"{k} {off_p.get(k, 0.0):.2f} -> {on_p.get(k, 0.0):.2f}" for k in procs)
                    )
    emit(result, rows, cols, as_json=args.json, title="slide analysis on held-out synthetic slides", notes=notes)
    return 0
