"""Tile classifier (background / tissue / artifact) on held-out synthetic slides, vs Otsu on saturation.

The held-out tiles come from ``export.datasets`` (split ``heldout``: slide
seeds and objectives never used in training; rendered once and cached under
``--data``; numpy + hw_sim only, no torch). Each tile goes through the
runtime's own path: ``TileClassifierModel`` on ONNX Runtime CPU, with the
decision rule its ``model.json`` records (flips/transposes averaged, an
artifact threshold: :mod:`export.classifier_decision`); ``--decision
single-pass`` scores one pass + argmax instead, the rule before it.

Baseline (what scanners and toolkits such as histolab/CLAM do): HSV
saturation, one Otsu threshold over all tiles, a tile is tissue when at least
5% of its pixels are above it (the same 5% the truth labels use). It only
separates tissue from glass, so the comparison is tissue-vs-glass F1 on the
tiles whose truth is background or tissue; the model counts as "tissue" any
tile it does not call background.

Two held-out sets: ``heldout`` (the training distribution's stain and camera
ranges) and ``heldout_hard`` (faint stain, 0.15-1.0 of the usual optical
density, and white balance off by up to ~12%, which tints the glass): the
conditions under which a saturation threshold is known to lose pale tissue or
call tinted glass tissue.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.classifier_scan import add_arguments as scan_arguments
from bench.report import Column, emit

DESCRIPTION = "tile classifier vs Otsu-on-saturation baseline on held-out slides (P/R/F1, tiles/s)"
CLASSES = ("background", "tissue", "artifact")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=Path("out/export-data"), help="dataset cache folder")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (as in python -m export)")
    p.add_argument("--model", type=Path, default=None, help="classifier model folder (default: committed)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    p.add_argument(
        "--scale",
        type=int,
        default=1,
        help="held-out slides x this (4: 2,400 tiles per set instead of 600; rendered once, cached under --data)",
    )
    p.add_argument(
        "--contents",
        nargs="+",
        default=None,
        help="instead of the default report: labels given to in-focus tissue tiles of content the models "
        "never trained on (hw_sim.content: ihc = real colon tissue, brick, gravel, grass, file:PATH; "
        "synthetic for comparison); target: at most 2%% of tissue tiles called artifact",
    )
    p.add_argument("--tiles", type=int, default=24, help="with --contents: tissue tiles per content")
    p.add_argument("--seeds", type=int, default=3, help="with --contents: slide seeds the tiles come from (0..N-1)")
    p.add_argument(
        "--layout",
        action="store_true",
        help="instead of the default report: artifact recall in slide layout (blocks of 5 x 5 fields around "
        "artifacts), the per-window rule vs artifact context (bench.classifier_layout)",
    )
    p.add_argument(
        "--scan",
        action="store_true",
        help="instead of the default report: artifact window recall in the daemon (held-out recordings replayed "
        "through a live daemon, overlapping fields, the real focus loop), model alone vs the scan-end context "
        "(bench.classifier_scan)",
    )
    p.add_argument(
        "--grow",
        default=None,
        help="with --layout: this context grow threshold (a number, or 'enclosed': enclosed cells only) instead "
        "of the rule chosen on the validation blocks",
    )
    p.add_argument(
        "--decision",
        choices=("folder", "single-pass"),
        default="folder",
        help="window labels by the folder's model.json decision (default) or by one pass + argmax (the rule "
        "before the decision was recorded, for comparison)",
    )
    scan_arguments(p)


def prf(true: np.ndarray, pred: np.ndarray, k: int) -> dict[str, float]:
    tp = int(np.sum((pred == k) & (true == k)))
    fp = int(np.sum((pred == k) & (true != k)))
    fn = int(np.sum((pred != k) & (true == k)))
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": int(np.sum(true == k))}


def otsu_saturation(raw: np.ndarray, min_fraction: float = 0.05) -> np.ndarray:
    """1 where a tile is tissue by the classical rule, else 0."""
    sat = np.stack([cv2.cvtColor(t, cv2.COLOR_RGB2HSV)[..., 1] for t in raw])
    thr, _ = cv2.threshold(sat.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return np.asarray((sat > thr).mean(axis=(1, 2)) >= min_fraction, dtype=np.int64)


def evaluate(model: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Model and baseline on one held-out set (cached tiles, 0.5 µm/px)."""
    raw, truth = data["raw"], data["label"]
    px = 0.5  # the cached raw tiles are the 0.25 µm frames subsampled by 2
    out = []
    for i in range(0, len(raw), 64):
        out += model.classify_batch(list(raw[i : i + 64]), px)
    pred = np.asarray([CLASSES.index(t.label) for t in out])
    sel = truth != 2
    tg_truth = (truth[sel] == 1).astype(np.int64)
    by_kind: dict[str, Any] = {}
    if "artifact_kind" in data:  # data rendered before the kinds were recorded have none
        from hw_sim.slide import ARTIFACT_KINDS

        for k, name in enumerate(ARTIFACT_KINDS):
            of = data["artifact_kind"] == k
            by_kind[name] = {"recall": float(np.mean(pred[of] == 2)) if of.any() else None, "support": int(of.sum())}
    return {
        "tiles": len(truth),
        "artifact_recall_by_kind": by_kind,
        "per_class": {c: prf(truth, pred, k) for k, c in enumerate(CLASSES)},
        "accuracy": float(np.mean(pred == truth)),
        "tissue_vs_glass": {
            "model": prf(tg_truth, (pred[sel] != 0).astype(np.int64), 1),
            "otsu_saturation_baseline": prf(tg_truth, otsu_saturation(raw[sel]), 1),
            "tiles": int(sel.sum()),
        },
    }


SETS = {
    "heldout": "held-out slides",
    "heldout_hard": "held-out slides, faint stain and tinted glass",
}


def unseen_frames(
    content: str, tiles: int, tile: int = 512, px: float = 0.25, seeds: int = 3
) -> Iterator[tuple[Any, int]]:
    """In-focus tissue frames (>= 60% tissue) of one content, imaged by the simulator's optics and
    camera (the training objective), on slides of ``seeds`` seeds (candidate k from seed k mod
    ``seeds``): yields (frame, seed) until ``tiles`` frames or 20 x ``tiles`` candidates."""
    from hw_sim.content import make_slide
    from hw_sim.optics import CameraParams, Optics, OpticsParams
    from hw_sim.slide import SlideSpec

    optics = Optics(OpticsParams(), px, (tile, tile), CameraParams())
    m = optics.margin_px
    slides: dict[int, Any] = {}
    n = 0
    for k in range(tiles * 20):  # candidate positions; most are tissue
        if n >= tiles:
            break
        seed = k % seeds
        if seed not in slides:
            spec = SlideSpec(seed=seed, origin_x_um=0.0, origin_y_um=0.0, width_um=2000.0, height_um=2000.0)
            slides[seed] = make_slide(SlideSpec(**{**spec.__dict__, "content": content}))
        slide = slides[seed]
        x, y = np.random.default_rng([seed, k]).uniform(150.0, 1700.0, 2)
        if slide.tissue_fraction(x, y, tile, tile, px) < 0.6:
            continue
        trans = slide.transmittance(x - m * px, y - m * px, tile + 2 * m, tile + 2 * m, px)
        n += 1
        yield optics.camera_capture(optics.image(optics.prepare(trans), 0.0), np.random.default_rng(k)), seed


def unseen_content(
    model: Any, contents: list[str], tiles: int, tile: int = 512, px: float = 0.25, seeds: int = 3
) -> dict[str, Any]:
    """Label counts for in-focus tissue tiles (>= 60% tissue) of each content (:func:`unseen_frames`;
    24 tiles of 3 seeds was the first report, 96 of 6 the larger one)."""
    out: dict[str, Any] = {}
    for content in contents:
        counts = dict.fromkeys(CLASSES, 0)
        for frame, _ in unseen_frames(content, tiles, tile, px, seeds):
            counts[model.classify(frame, px).label] += 1
        n = sum(counts.values())
        out[content] = {"tiles": n, **counts, "artifact_share": counts["artifact"] / n if n else None}
    return out


def _decision(model: Any) -> str:
    d = model.decision
    t = "argmax" if d.artifact_threshold is None else f"artifact at p >= {d.artifact_threshold}"
    return f"{d.transforms} flip/transpose pass(es), {t}"


def run_contents(args: argparse.Namespace, model: Any, folder: Any) -> int:
    cells = unseen_content(model, args.contents, args.tiles, seeds=args.seeds)
    rows = [{"content": c, **r, "artifact_pct": 100 * (r["artifact_share"] or 0.0)} for c, r in cells.items()]
    cols = [
        Column("content", "content"),
        Column("tiles", "tissue tiles"),
        Column("background", "background"),
        Column("tissue", "tissue"),
        Column("artifact", "artifact"),
        Column("artifact_pct", "% called artifact", ".1f"),
    ]
    unseen = [c for c in cells if c != "synthetic"]
    n = sum(cells[c]["tiles"] for c in unseen)
    art = sum(cells[c]["artifact"] for c in unseen)
    result = {
        "model": {"path": str(folder.path), "onnx_sha256": folder.sha256},
        "decision": _decision(model),
        "tiles_per_content": args.tiles,
        "seeds": args.seeds,
        "contents": cells,
        "unseen_total": {"tiles": n, "artifact": art, "artifact_share": art / n if n else None},
    }
    notes = [
        f"decision: {_decision(model)}",
        f"all unseen contents: {art} of {n} tissue tiles called artifact ({100 * art / max(n, 1):.1f}%)",
        "target: <= 2% of tissue tiles called artifact on content the models never trained on",
    ]
    emit(result, rows, cols, as_json=args.json, title="tile classifier on unseen content", notes=notes)
    return 0


def run(args: argparse.Namespace) -> int:
    from export.datasets import cached, classifier_data
    from runtime.ml.backends import select_backend
    from runtime.ml.model_folder import default_model_dir, load_model_folder
    from runtime.ml.tasks import ClassifierDecision, TileClassifierModel

    folder = load_model_folder(args.model or default_model_dir("classifier"), "classifier")
    model = TileClassifierModel(folder, select_backend(folder, "ort_cpu").backend)
    if args.decision == "single-pass":
        model.decision = ClassifierDecision()
    if args.contents:
        return run_contents(args, model, folder)
    if args.scan:
        from bench.classifier_scan import run_scan

        return run_scan(args, folder, model)
    if args.layout:
        from bench.classifier_layout import run_layout

        return run_layout(args, model, folder)
    sets: dict[str, dict[str, Any]] = {}
    raw0: np.ndarray | None = None
    suffix = f"_x{args.scale}" if args.scale > 1 else ""  # x4: 4x the slides, the first quarter the x1 set's
    for split in SETS:
        data = cached(
            args.data / f"classifier-{split}{suffix}-seed{args.seed}.npz",
            lambda split=split: classifier_data(split, args.seed, scale=args.scale),
        )
        sets[split] = evaluate(model, data)
        raw0 = data["raw"] if raw0 is None else raw0
    assert raw0 is not None

    # Throughput on full-size 512 px frames (4 classifier windows each), batches of 16 tiles.
    big = [np.ascontiguousarray(np.tile(raw0[i % len(raw0)], (4, 4, 1))) for i in range(64)]
    model.classify_batch(big[:16], 0.25)
    t = time.perf_counter()
    for i in range(0, 64, 16):
        model.classify_batch(big[i : i + 16], 0.25)
    tiles_s = 64 / (time.perf_counter() - t)

    result: dict[str, Any] = {
        "model": {"path": str(folder.path), "onnx_sha256": folder.sha256},
        "decision": _decision(model),
        **sets,
        "throughput": {"backend": "ort_cpu", "tiles_per_s_512px": tiles_s},
        "targets": {"tissue_vs_glass_f1": 0.97},
    }
    rows = []
    for split, r in sets.items():
        rows += [{"what": f"{split} model: {c}", **r["per_class"][c]} for c in CLASSES]
        rows.append({"what": f"{split} model: tissue vs glass", **r["tissue_vs_glass"]["model"]})
        rows.append(
            {"what": f"{split} Otsu(HSV S): tissue vs glass", **r["tissue_vs_glass"]["otsu_saturation_baseline"]}
        )
    cols = [
        Column("what", ""),
        Column("precision", "precision", ".3f"),
        Column("recall", "recall", ".3f"),
        Column("f1", "F1", ".3f"),
        Column("support", "support"),
    ]
    notes = [""]
    notes += [
        f"{split} ({SETS[split]}): accuracy (3 classes) {r['accuracy']:.3f} on {r['tiles']} tiles"
        for split, r in sets.items()
    ]
    for split, r in sets.items():
        if r["artifact_recall_by_kind"]:
            kinds = ", ".join(
                f"{k} {v['recall']:.3f} of {v['support']}" if v["support"] else f"{k} -"
                for k, v in r["artifact_recall_by_kind"].items()
            )
            notes.append(f"{split}: artifact recall by kind (the one covering most of the tile): {kinds}")
    notes.append(f"decision: {_decision(model)}")
    notes.append(f"ONNX Runtime CPU: {tiles_s:.0f} tiles/s (512 px tiles, batches of 16)")
    emit(result, rows, cols, as_json=args.json, title="tile classifier on held-out synthetic slides", notes=notes)
    return 0
