"""Tile classifier in slide layout: artifact recall of the per-window rule vs artifact context.

``python -m bench classifier --layout`` (``--json``). The held-out tiles of ``bench classifier``
are isolated 64 µm windows; here slides are rendered as a scan sees them: blocks of 5 x 5 fields
(512 px at 0.25 µm/px, 128 µm, no overlap) around each artifact of a slide plus one block on its
tissue, each field exposed by the camera on its own, shrunk to the classifier's 1 µm/px and cut
into its 2 x 2 windows exactly as :class:`runtime.ml.preprocess.ClassifierPreprocess` cuts a
frame. A block is a 10 x 10 grid of windows with truth per window (``export.datasets.tile_label``:
artifact when >= 2% covered, the kind covering most of it). Scored: the inner 6 x 6 windows (the
middle 3 x 3 fields), so every scored window has neighbours on all sides.

Two rules on the same windows: the classifier's own (``model.json`` decision: a window is an
artifact on its own evidence) and :class:`runtime.ml.artifact_context.ArtifactContext` (the same
seeds, grown by hysteresis over neighbours with p(artifact) >= a lower threshold, and the cells
they enclose). The grow threshold is chosen here on the validation blocks only (``val`` and
``val_hard``: the ``val`` stream's slides and objectives, ordinary and faint stain): the lowest
candidate whose validation tissue windows called artifact stay within ``FP_BUDGET`` of the
per-window rule's. Then the held-out blocks (``heldout``, ``heldout_hard``) and blocks of the
unseen contents (ihc, brick, gravel, grass; no artifacts drawn: every call is false) are scored
with it. The same scores at field level (a field flagged if any window is; truth: any window an
artifact) are what a scan's ``report.json`` carries.

Rendered once and cached under ``--data`` (``layout-*.npz``); the first run renders ~1,000 blocks
(~2.3 CPU-s each).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from bench.report import Column, emit, percent
from runtime.ml.artifact_context import ArtifactContext

PX_UM = 0.25
FIELD_PX = 512
FIELDS = 5  # fields per block side
WINDOW = 64  # classifier window (px at 1 µm/px)
WINDOWS = FIELDS * 2  # windows per block side
INNER = slice(2, WINDOWS - 2)  # scored windows
INNER_FIELDS = slice(1, FIELDS - 1)
KINDS = ("ink", "bubble", "dust", "fold")
# Context candidates, the most cautious first: enclosed cells only (None), then hysteresis down to 0.2.
GROW_CANDIDATES: tuple[float | None, ...] = (None, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2)
FP_BUDGET = 0.01  # extra share of validation tissue windows called artifact allowed to context
UNSEEN = ("ihc", "brick", "gravel", "grass")

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]
B = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class LayoutSet:
    split: str  # the export.datasets random stream
    configs: int  # objectives
    slides: int  # slides per objective
    hard: bool  # faint stain, tinted glass


LAYOUT_SETS = {
    "val": LayoutSet("val", 4, 6, False),
    "val_hard": LayoutSet("val", 4, 6, True),
    "heldout": LayoutSet("heldout", 3, 8, False),
    "heldout_hard": LayoutSet("heldout", 3, 8, True),
}


def _render_block(slide: Any, optics: Any, x0: float, y0: float, defocus: float, rng: np.random.Generator) -> Any:
    """(1 µm/px block image, per-window truth: label, kind, artifact fraction) of the block at (x0, y0)."""
    from export.datasets import artifact_kind, tile_label

    size = FIELD_PX * FIELDS
    m = optics.margin_px
    tr = slide.transmittance(x0 - m * PX_UM, y0 - m * PX_UM, size + 2 * m, size + 2 * m, PX_UM)
    inten = optics.image(tr, defocus)
    small = FIELD_PX // 4  # a field at 1 µm/px
    img = np.zeros((WINDOWS * WINDOW, WINDOWS * WINDOW, 3), np.uint8)
    for fr in range(FIELDS):
        for fc in range(FIELDS):
            frame = optics.camera_capture(
                inten[fr * FIELD_PX : (fr + 1) * FIELD_PX, fc * FIELD_PX : (fc + 1) * FIELD_PX], rng
            )
            img[fr * small : (fr + 1) * small, fc * small : (fc + 1) * small] = cv2.resize(
                frame, (small, small), interpolation=cv2.INTER_AREA
            )
    label = np.zeros((WINDOWS, WINDOWS), np.int64)
    kind = np.full((WINDOWS, WINDOWS), -1, np.int64)
    afrac = np.zeros((WINDOWS, WINDOWS), np.float32)
    win_px = int(WINDOW / PX_UM)
    for i in range(WINDOWS):
        for j in range(WINDOWS):
            wx, wy = x0 + j * WINDOW, y0 + i * WINDOW
            label[i, j], _, afrac[i, j] = tile_label(slide, wx, wy, win_px, PX_UM)
            if label[i, j] == 2:
                kind[i, j] = artifact_kind(slide, wx, wy, win_px, PX_UM)
    return img, label, kind, afrac


def render_config(job: tuple[str, int, int, int, bool]) -> list[dict[str, Any]]:
    """Blocks of one objective's slides: one around each artifact (the block's centre within a
    window of it), one on the slide's tissue."""
    from export.datasets import _SEED_BASE, _rng, random_camera, random_optics, random_slide
    from hw_sim.optics import Optics
    from hw_sim.slide import SyntheticSlide

    split, seed, config, slides, hard = job
    cfg = config + (100 if hard else 0)
    rng = _rng(split, seed, 7000 + cfg)
    optics = Optics(random_optics(rng, 2.0), PX_UM, (FIELD_PX * FIELDS, FIELD_PX * FIELDS))
    pool = rng.uniform(-1.5, 1.5, 6)
    half = FIELD_PX * FIELDS * PX_UM / 2
    out = []
    for s in range(slides):
        sseed = _SEED_BASE[split] + 500_000 + seed * 10_000 + cfg * 500 + s
        slide = SyntheticSlide(random_slide(rng, sseed, artifacts=int(rng.integers(4, 12)), hard=hard))
        optics.camera = random_camera(rng, hard=hard)
        centres = [(a.cx, a.cy, a.index) for a in slide.artifacts]
        p = slide._pieces[int(rng.integers(len(slide._pieces)))]
        centres.append((p.cx + rng.uniform(-0.5, 0.5) * p.a, p.cy + rng.uniform(-0.5, 0.5) * p.b, -1))
        for cx, cy, ai in centres:
            x0, y0 = cx - half + rng.uniform(-64, 64), cy - half + rng.uniform(-64, 64)
            img, label, kind, afrac = _render_block(slide, optics, x0, y0, float(rng.choice(pool)), rng)
            out.append({"img": img, "label": label, "kind": kind, "afrac": afrac, "centred_on": ai})
    return out


def render_unseen(job: tuple[str, int, int]) -> list[dict[str, Any]]:
    """Blocks of in-focus tissue of one unseen content (>= 60% tissue in the middle), the
    simulator's training objective and camera (as ``bench classifier --contents``); no artifacts."""
    from hw_sim.content import make_slide
    from hw_sim.optics import CameraParams, Optics, OpticsParams
    from hw_sim.slide import SlideSpec

    content, seed, blocks = job
    optics = Optics(OpticsParams(), PX_UM, (FIELD_PX * FIELDS, FIELD_PX * FIELDS), CameraParams())
    slide = make_slide(SlideSpec(seed=seed, width_um=2000.0, height_um=2000.0, content=content))
    rng = np.random.default_rng([seed, 4242])
    out: list[dict[str, Any]] = []
    for tries in range(1, 201):
        if len(out) >= blocks:
            break
        x0, y0 = rng.uniform(150.0, 1700.0 - 640.0, 2)
        if slide.tissue_fraction(x0 + 160, y0 + 160, 1280, 1280, PX_UM) < 0.6:
            continue
        img, _, kind, afrac = _render_block(slide, optics, x0, y0, 0.0, np.random.default_rng([seed, tries]))
        label = np.zeros((WINDOWS, WINDOWS), np.int64)
        for i in range(WINDOWS):
            for j in range(WINDOWS):
                tis = slide.tissue_fraction(x0 + j * WINDOW, y0 + i * WINDOW, 256, 256, PX_UM)
                label[i, j] = 1 if tis >= 0.05 else 0
        out.append({"img": img, "label": label, "kind": kind, "afrac": afrac, "centred_on": -1})
    return out


def _stack(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: np.stack([b[k] for b in blocks]) for k in blocks[0]}


def layout_data(name: str, data: Path, seed: int, workers: int = 2) -> dict[str, Any]:
    """A layout set (``LAYOUT_SETS`` or ``unseen``), rendered once and cached under ``data``."""
    path = data / f"layout-{name}-seed{seed}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    if name == "unseen":
        jobs_u = [(c, s, 2) for c in UNSEEN for s in range(3)]
        with mp.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(render_unseen, jobs_u)
        d = _stack([b for p in parts for b in p])
        d["content"] = np.asarray([j[0] for j, p in zip(jobs_u, parts, strict=True) for _ in p])
    else:
        s = LAYOUT_SETS[name]
        jobs = [(s.split, seed, c, s.slides, s.hard) for c in range(s.configs)]
        with mp.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(render_config, jobs)
        d = _stack([b for p in parts for b in p])
        d["content"] = np.asarray([""] * len(d["img"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.npz")
    np.savez_compressed(tmp, **d)
    tmp.replace(path)
    return d


def window_p_artifact(model: Any, img: npt.NDArray[np.uint8]) -> tuple[F32, B]:
    """Per window of each block: p(artifact) under the model's decision (its flips averaged) and
    whether the decision calls the window an artifact (the seeds), (blocks, 10, 10) each. Each
    field (128 px at 1 µm/px) goes through the runtime's own cut (``ClassifierPreprocess.inputs``),
    a few blocks per backend call."""
    nb, side = img.shape[0], WINDOW * 2
    p_out = np.zeros((nb, WINDOWS, WINDOWS), np.float32)
    s_out = np.zeros((nb, WINDOWS, WINDOWS), bool)
    for b0 in range(0, nb, 4):
        x = np.concatenate(
            [
                model.pre.inputs(img[b, fr * side : (fr + 1) * side, fc * side : (fc + 1) * side], 1.0)
                for b in range(b0, min(b0 + 4, nb))
                for fr in range(FIELDS)
                for fc in range(FIELDS)
            ]
        )
        probs = model.window_probabilities(x)[0]
        seeds = model.decision.window_labels(probs) == 2
        # (blocks, field row, field col, window row, window col) -> (blocks, 10, 10)
        shape = (-1, FIELDS, FIELDS, 2, 2)
        p_out[b0 : b0 + 4] = probs[:, 2].reshape(shape).transpose(0, 1, 3, 2, 4).reshape(-1, WINDOWS, WINDOWS)
        s_out[b0 : b0 + 4] = seeds.reshape(shape).transpose(0, 1, 3, 2, 4).reshape(-1, WINDOWS, WINDOWS)
    return p_out, s_out


@dataclass(frozen=True)
class Unit:
    """The cells a rule runs on: the blocks' windows, or their fields (2 x 2 windows each)."""

    name: str
    label: I64  # (blocks, n, n) truth: 2 artifact, 1 tissue, 0 glass
    kind: I64  # ARTIFACT kind index of artifact cells, else -1
    afrac: F32  # artifact fraction (a field: its largest window's)
    p: F32  # p(artifact) (a field: its strongest window's)
    seeds: B  # the model's own flags (a field: any window flagged)
    inner: slice  # the scored cells (rows and columns)


def units(d: dict[str, Any], p: F32, seeds: B) -> tuple[Unit, Unit]:
    """The window and the field views of a set's blocks. A field is an artifact (truth) if any of
    its windows is, else tissue if any is; its kind the most common among its artifact windows."""
    nb, nf = p.shape[0], p.shape[1] // 2

    def quads(a: Any) -> Any:
        return a.reshape(nb, nf, 2, nf, 2).swapaxes(2, 3).reshape(nb, nf, nf, 4)

    lab, kd = quads(d["label"]), quads(d["kind"])
    counts = np.stack([(kd == k).sum(3) for k in range(len(KINDS))], axis=-1)
    fields = Unit(
        "fields",
        np.where((lab == 2).any(3), 2, np.where((lab == 1).any(3), 1, 0)),
        np.where(counts.max(-1) > 0, counts.argmax(-1), -1),
        quads(d["afrac"]).max(3),
        quads(p).max(3),
        quads(seeds).any(3),
        INNER_FIELDS,
    )
    return Unit("windows", d["label"], d["kind"], d["afrac"], p, seeds, INNER), fields


def flags(u: Unit, ctx: ArtifactContext | None) -> B:
    """Per cell: the model's own flags (``ctx`` None) or ``ctx`` over each block's grid."""
    if ctx is None:
        return u.seeds.copy()
    out = np.zeros_like(u.seeds)
    n = u.p.shape[1]
    for b in range(len(u.p)):
        grid = {(i, j): float(u.p[b, i, j]) for i in range(n) for j in range(n)}
        for i, j in ctx.flags(grid, zip(*np.nonzero(u.seeds[b]), strict=True)):
            out[b, i, j] = True
    return out


def context_flags(p: F32, seeds: B, ctx: ArtifactContext | None) -> B:
    """:func:`flags` on the windows of blocks of p(artifact) and seeds."""
    z = np.zeros(p.shape, np.int64)
    return flags(Unit("windows", z, z, p, p, seeds, slice(0, p.shape[1])), ctx)


def describe(ctx: ArtifactContext | None) -> str:
    if ctx is None:
        return "model alone"
    g = ctx.grow_threshold
    return "context: enclosed only" if g is None else f"context: grow {g}" + (", enclosed" if ctx.fill_holes else "")


def score(u: Unit, f: B) -> dict[str, Any]:
    """On the scored cells: artifact recall (all, by kind), tissue called artifact (all tissue
    cells; those no artifact touches at all), glass called artifact, artifact precision."""
    sel = (slice(None), u.inner, u.inner)
    label, kind, afrac, f = u.label[sel], u.kind[sel], u.afrac[sel], f[sel]
    art, tis = label == 2, label == 1

    def share(m: B) -> float | None:
        return float(f[m].mean()) if m.any() else None

    return {
        "artifacts": int(art.sum()),
        "artifact_recall": share(art),
        "recall_by_kind": {k: share(kind == i) for i, k in enumerate(KINDS)},
        "tissue": int(tis.sum()),
        "tissue_called_artifact": share(tis),
        "untouched_tissue_called_artifact": share(tis & (afrac == 0)),
        "glass_called_artifact": share(label == 0),
        "artifact_precision": float(art[f].mean()) if f.any() else None,
    }


def choose_context(val: list[Unit]) -> tuple[ArtifactContext | None, list[dict[str, Any]]]:
    """The most permissive of ``GROW_CANDIDATES`` (each with enclosed cells) whose tissue cells
    called artifact, over all the validation blocks (``val``: one unit's view of each validation
    set), stay within ``FP_BUDGET`` of the model's own flags' (None: none does); and every
    candidate's validation figures."""

    def pooled(ctx: ArtifactContext | None) -> tuple[float, float]:
        hits = {1: [0, 0], 2: [0, 0]}
        for u in val:
            sel = (slice(None), u.inner, u.inner)
            f, label = flags(u, ctx)[sel], u.label[sel]
            for k in hits:
                hits[k][0] += int(f[label == k].sum())
                hits[k][1] += int((label == k).sum())
        return hits[1][0] / max(hits[1][1], 1), hits[2][0] / max(hits[2][1], 1)

    base_fp, base_rec = pooled(None)
    table: list[dict[str, Any]] = [
        {"rule": describe(None), "tissue_called_artifact": base_fp, "artifact_recall": base_rec}
    ]
    chosen: ArtifactContext | None = None
    for g in GROW_CANDIDATES:
        ctx = ArtifactContext(g)
        fp, rec = pooled(ctx)
        table.append({"rule": describe(ctx), "tissue_called_artifact": fp, "artifact_recall": rec})
        if fp <= base_fp + FP_BUDGET:
            chosen = ctx
    return chosen, table


def run_layout(args: argparse.Namespace, model: Any, folder: Any) -> int:
    views = {}
    for n in (*LAYOUT_SETS, "unseen"):  # one set's images in memory at a time
        d = layout_data(n, args.data, args.seed)
        views[n] = units(d, *window_p_artifact(model, d["img"]))
        del d
    result: dict[str, Any] = {
        "model": {"path": str(folder.path), "onnx_sha256": folder.sha256},
        "decision": f"{model.decision}",
        "fp_budget": FP_BUDGET,
        "runtime_context": describe(ArtifactContext()),
        "units": {},
    }
    rows = []
    for k, unit in enumerate(("windows", "fields")):
        chosen, table = choose_context([views[n][k] for n in ("val", "val_hard")])
        ctx = chosen if args.grow is None else ArtifactContext(None if args.grow == "enclosed" else float(args.grow))
        r: dict[str, Any] = {
            "context": describe(ctx),
            "chosen_on_validation": describe(chosen),
            "validation_candidates": table,
        }
        for name in ("heldout", "heldout_hard", "unseen", "val", "val_hard"):
            u = views[name][k]
            r[name] = {
                "blocks": len(u.p),
                "per_window_rule": score(u, flags(u, None)),
                "context": score(u, flags(u, ctx)),
            }
            for rule in ("per_window_rule", "context"):
                s = r[name][rule]
                rows.append(
                    {
                        "what": f"{name} {unit}: {describe(None if rule == 'per_window_rule' else ctx)}",
                        "artifacts": s["artifacts"],
                        "recall": s["artifact_recall"],
                        **s["recall_by_kind"],
                        "tissue": s["tissue"],
                        "tissue_fp": percent(s["tissue_called_artifact"]),
                        "clean_fp": percent(s["untouched_tissue_called_artifact"]),
                    }
                )
        result["units"][unit] = r
    cols = [
        Column("what", ""),
        Column("artifacts", "artifacts"),
        Column("recall", "recall", ".3f"),
        *(Column(k, k, ".3f") for k in KINDS),
        Column("tissue", "tissue"),
        Column("tissue_fp", "% tissue called artifact", ".2f"),
        Column("clean_fp", "% untouched tissue", ".2f"),
    ]
    w, f = result["units"]["windows"], result["units"]["fields"]
    notes = [
        "context: runtime.ml.artifact_context.ArtifactContext (hysteresis from the model's flags through "
        "neighbours with p(artifact) >= grow, then the cells they enclose); chosen on the validation blocks: "
        f"the most permissive of grow {GROW_CANDIDATES} (None: enclosed cells only) within "
        f"+{100 * FP_BUDGET:.0f} points of the model's own validation tissue called artifact: windows "
        f"'{w['chosen_on_validation']}', fields '{f['chosen_on_validation']}' (the runtime's, for a scan's "
        f"fields: {describe(ArtifactContext())})",
        "windows: 64 µm (the unit of bench classifier's held-out tiles); fields: 128 µm, 2 x 2 windows (a scan's "
        "unit: p the strongest window's, flagged by the model if any window is); scored: the inner 6 x 6 "
        "windows / 3 x 3 fields of each block",
        "unseen: ihc, brick, gravel, grass, no artifacts drawn (target <= 2% of tissue called artifact); "
        "'untouched tissue': tissue cells no artifact covers at all",
    ]
    emit(
        result,
        rows,
        cols,
        as_json=args.json,
        title="tile classifier in slide layout: model alone vs context",
        notes=notes,
    )
    return 0
