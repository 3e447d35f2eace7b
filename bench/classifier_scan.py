"""Tile classifier in the daemon: artifact window recall of a scan's own flags vs its scan-end context.

``python -m bench classifier --scan`` (``--json``). ``bench classifier --layout`` renders held-out
slides as fields that abut (no overlap), each frame exposed at one defocus; this bench measures the
same two rules where they run: in the daemon. Held-out recordings are synthesised (``hw_sim.synth``,
slide seeds ``SCAN_SEED_BASE + k``: the held-out stream's range of ``export.datasets``, above every
seed its data sets draw, so no model trained or was validated on them; each recording's objective
drawn by ``export.datasets.random_optics`` from the held-out stream; ``--artifacts`` artifacts per
slide, the kinds in turn) and replayed through a live daemon (``hw_sim.replay_job.run_replay``:
``single_shot`` focus, ``ort_cpu``, the inference worker), so every frame the classifier sees comes
through the real focus loop (the first capture of each field, at the focus surface's z) and fields
overlap as planned (``--overlap``, 10% by default).

Truth per window as ``bench classifier --layout`` labels its windows (``export.datasets.tile_label``:
artifact when >= 2% covered, else tissue when >= 5% tissue, else glass; the kind covering most of
it): each field's windows are the tile cut evenly into the classifier's window grid (as
``runtime.analysis.artifact_regions`` draws them) placed at the field's *commanded* position (the
report's ``x_um``, ``y_um``: the field's centre), i.e. where ``artifacts.geojson`` puts them. The
stage missed that by a few µm (``stage_error_um``); how many window labels the true position would
change is reported (``labels_moved_by_stage``).

Two rules on the same windows, both read from ``report.json``: the classifier's own flags
(``window_artifact``) and the scan-end context's (``artifact_windows_in_context``:
:mod:`runtime.ml.artifact_context`, hysteresis at 0.5 + enclosed cells over the scan's window grid,
field row x 2 + window row). Scored: every window (``all``), and ``inner``: the windows of fields
with a field on every side, as the layout bench scores the middle 3 x 3 fields of its blocks. A
control for the focus loop: the same model and window context on each field's recorded plane
nearest its true focus (``in-focus plane``), classified in this process. The replay driver serves
the recorded plane nearest the commanded z, so the focus loop's first frame is never further from
focus than the recorded stack reaches (``--z-planes`` at 0.5 µm around the coarse focus, which is
off by up to 1 µm). Recall's 90% interval comes from resampling the recordings (an ink stroke
covers dozens of windows: windows are not independent).

Recordings and reports are cached under ``--data`` (``scan-recordings-*/``, ``scan-reports-*/``);
a recording of the default 8 x 8 fields of 512 px with 7 planes takes ~25 s to synthesise and
~10 s to scan on 2 (shared) cores, and ~265 MB of disk (32: 8.5 GB; truth and the in-focus control
read it, so a deleted recording is synthesised again, bit for bit, when the bench next runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bench.report import Column, emit, percent

FOCUS = "single_shot"  # the strategy that classifies fields (contrast_sweep does not)
KINDS = ("ink", "bubble", "dust", "fold")  # hw_sim.slide.ARTIFACT_KINDS
SCAN_SEED_BASE = 3_900_000  # export.datasets._SEED_BASE["heldout"] + 900_000: no data set draws here
CONFIG_TOML = (
    '[scan]\noverlap = {overlap}\n[focus]\nstrategy = "{focus}"\n'
    '[models]\nclassifier_dir = "{model}"\nbackend = "ort_cpu"\nworker = "process"\n'
)


class SlideLike(Protocol):
    """What the truth needs of a slide (``hw_sim.slide.SyntheticSlide``)."""

    artifacts: list[Any]

    def artifact_fraction(self, x0_um: float, y0_um: float, height_px: int, width_px: int, px: float) -> float: ...

    def tissue_fraction(self, x0_um: float, y0_um: float, height_px: int, width_px: int, px: float) -> float: ...


@dataclass(frozen=True)
class Window:
    """One classifier window of a scan: its field's plan (row, col), its place (i, j) in the field's
    window grid, its box on the slide (µm: x0, y0, width, height), truth and both rules' flags."""

    field: tuple[int, int]
    cell: tuple[int, int]
    box_um: tuple[float, float, float, float]
    label: int  # 2 artifact, 1 tissue, 0 glass (export.datasets.tile_label)
    kind: int  # KINDS index of the artifact covering most of it, -1 if none
    afrac: float
    by_model: bool
    in_context: bool
    inner: bool  # its field has a field on every side
    # The same rules on the field's recorded plane nearest its true focus, classified here (None: not run).
    focus_by_model: bool | None = None
    focus_in_context: bool | None = None
    # An artifact window: whether the artifact covering most of it lies wholly inside the scanned area
    # (its reach: hw_sim's Artifact.reach, beyond which it leaves no trace); None: not known.
    whole: bool | None = None


RULES = {
    "model": "model alone",
    "context": "context",
    "focus_model": "in-focus plane, model alone",
    "focus_context": "in-focus plane, context",
}
_RULE_FLAG = {
    "model": "by_model",
    "context": "in_context",
    "focus_model": "focus_by_model",
    "focus_context": "focus_in_context",
}
Offline = Mapping[tuple[int, int], tuple[Sequence[Sequence[bool]], frozenset[tuple[int, int]]]]


def window_boxes(
    centre_um: tuple[float, float], tile_px: tuple[int, int], px_um: float, grid: tuple[int, int]
) -> dict[tuple[int, int], tuple[float, float, float, float]]:
    """(x0, y0, width, height) in µm of each window (row i, col j) of a field whose centre is at
    ``centre_um`` (x, y): the tile (height, width px) cut evenly into ``grid`` (rows, cols), rows
    down the slide's y, columns along its x (``runtime.analysis.artifact_regions.FieldArtifacts``)."""
    from runtime.analysis.artifact_regions import window_grid_boxes

    (cx, cy), (h, w) = centre_um, tile_px
    size = (h * px_um, w * px_um)
    boxes = window_grid_boxes((cy - size[0] / 2, cx - size[1] / 2), size, grid)
    return {cell: (x0, y0, x1 - x0, y1 - y0) for cell, (x0, y0, x1, y1) in boxes.items()}


def artifact_instance(slide: SlideLike, x0: float, y0: float, size_px: int, px_um: float) -> int:
    """Index in ``slide.artifacts`` of the artifact covering most of a region, -1 if none covers any
    (``export.datasets.artifact_kind``'s choice, as an index)."""
    arts = slide.artifacts
    best, index = 0.0, -1
    try:
        for i, a in enumerate(arts):
            slide.artifacts = [a]
            f = slide.artifact_fraction(x0, y0, size_px, size_px, px_um)
            if f > best:
                best, index = f, i
    finally:
        slide.artifacts = arts
    return index


def label_box(slide: SlideLike, box: tuple[float, float, float, float], px_um: float) -> tuple[int, int, float, int]:
    """(label, kind, artifact fraction, index in ``slide.artifacts`` of the artifact covering most of
    it or -1) of a box, as ``bench classifier --layout`` labels a window."""
    from export.datasets import tile_label

    x0, y0, w, h = box
    size = round(w / px_um)
    if round(h / px_um) != size:
        raise ValueError(f"windows must be square, got {w} x {h} µm")
    label, _, afrac = tile_label(slide, x0, y0, size, px_um)  # type: ignore[arg-type]
    index = artifact_instance(slide, x0, y0, size, px_um) if label == 2 else -1
    kind = KINDS.index(slide.artifacts[index].kind) if index >= 0 else -1
    return int(label), kind, float(afrac), index


def scan_windows(
    report: Mapping[str, Any],
    slide: SlideLike,
    tile_px: tuple[int, int],
    px_um: float,
    actual_xy_um: Sequence[tuple[float, float]] | None = None,
    offline: Offline | None = None,
    area_um: tuple[float, float, float, float] | None = None,
) -> tuple[list[Window], int]:
    """Every window of a scan's ``report.json`` with truth at its field's commanded position, and how
    many windows' labels would differ at the field's true position (``actual_xy_um`` per report field,
    in its order; 0 without). ``offline``: per field (row, col), another classification's window flags
    and windows in context (:func:`in_focus_rules`). ``area_um``: the scanned area (x0, y0, x1, y1),
    to tell the artifacts wholly inside it (``Window.whole``)."""
    fields = report["fields"]
    rows = {int(f["row"]) for f in fields}
    cols = {int(f["col"]) for f in fields}
    moved, out = 0, []
    for n, f in enumerate(fields):
        flags = f.get("window_artifact")
        if not flags:
            raise ValueError(f"field {f['row']},{f['col']} carries no window flags (an old report?)")
        grid = (len(flags), len(flags[0]))
        ctx = {(int(i), int(j)) for i, j in f.get("artifact_windows_in_context") or []}
        r, c = int(f["row"]), int(f["col"])
        inner = min(rows) < r < max(rows) and min(cols) < c < max(cols)
        boxes = window_boxes((float(f["x_um"]), float(f["y_um"])), tile_px, px_um, grid)
        true_boxes = window_boxes(actual_xy_um[n], tile_px, px_um, grid) if actual_xy_um is not None else None
        off = offline.get((r, c)) if offline is not None else None
        for cell, box in boxes.items():
            label, kind, afrac, index = label_box(slide, box, px_um)
            whole = None
            if index >= 0 and area_um is not None:
                a = slide.artifacts[index]
                ax0, ay0, ax1, ay1 = area_um
                whole = (
                    ax0 <= a.cx - a.reach and a.cx + a.reach <= ax1 and ay0 <= a.cy - a.reach and a.cy + a.reach <= ay1
                )
            if true_boxes is not None:
                moved += label_box(slide, true_boxes[cell], px_um)[0] != label
            i, j = cell
            out.append(
                Window(
                    (r, c),
                    cell,
                    box,
                    label,
                    kind,
                    afrac,
                    bool(flags[i][j]),
                    cell in ctx,
                    inner,
                    None if off is None else bool(off[0][i][j]),
                    None if off is None else cell in off[1],
                    whole,
                )
            )
    return out, moved


def score(windows: Sequence[Window], rule: str) -> dict[str, Any]:
    """``rule`` (a key of ``RULES``) on ``windows``: artifact recall (all, by kind), tissue called
    artifact (all tissue windows; those no artifact touches), glass called artifact, precision."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {tuple(RULES)}, got {rule!r}")
    flag = np.asarray([bool(getattr(w, _RULE_FLAG[rule])) for w in windows], bool)
    label = np.asarray([w.label for w in windows], np.int64)
    kind = np.asarray([w.kind for w in windows], np.int64)
    afrac = np.asarray([w.afrac for w in windows], np.float64)

    def share(m: Any) -> float | None:
        return float(flag[m].mean()) if m.any() else None

    art, tis = label == 2, label == 1
    by_kind = {k: share(kind == i) for i, k in enumerate(KINDS)}
    present = [v for v in by_kind.values() if v is not None]
    return {
        "artifacts": int(art.sum()),
        "artifact_recall": share(art),
        "recall_by_kind": by_kind,
        "kind_balanced_recall": float(np.mean(present)) if present else None,
        "artifacts_by_kind": {k: int((kind == i).sum()) for i, k in enumerate(KINDS)},
        "tissue": int(tis.sum()),
        "tissue_called_artifact": share(tis),
        "untouched_tissue_called_artifact": share(tis & (afrac == 0)),
        "glass": int((label == 0).sum()),
        "glass_called_artifact": share(label == 0),
        "artifact_precision": float(art[flag].mean()) if flag.any() else None,
    }


def bootstrap(per_recording: Sequence[Sequence[Window]], rule: str, n: int = 2000, seed: int = 0) -> dict[str, Any]:
    """90% intervals of artifact recall and tissue called artifact over ``n`` resamples of the
    recordings (windows of one slide are not independent: an ink stroke covers dozens)."""
    counts = []
    for ws in per_recording:
        s = score(ws, rule)
        rec, fp = s["artifact_recall"] or 0.0, s["tissue_called_artifact"] or 0.0
        counts.append((rec * s["artifacts"], s["artifacts"], fp * s["tissue"], s["tissue"]))
    c = np.asarray(counts, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(c), (n, len(c)))
    tot = c[idx].sum(axis=1)
    recall = tot[:, 0] / np.maximum(tot[:, 1], 1)
    fp = tot[:, 2] / np.maximum(tot[:, 3], 1)
    return {
        "artifact_recall_90": [float(v) for v in np.percentile(recall, [5, 95])],
        "tissue_called_artifact_90": [float(v) for v in np.percentile(fp, [5, 95])],
    }


# ---------------------------------------------------------------------------------------- the run


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--scan`` options (``bench classifier`` adds them to its own)."""
    p.add_argument("--recordings", type=int, default=32, help="with --scan: held-out recordings (slide seeds)")
    p.add_argument("--fields", type=int, default=8, help="with --scan: fields per side of each recording")
    p.add_argument("--z-planes", type=int, default=7, help="with --scan: planes per field in each recording")
    p.add_argument("--artifacts", type=int, default=3, help="with --scan: artifacts per slide (the kinds in turn)")
    p.add_argument("--overlap", type=float, default=0.10, help="with --scan: field overlap of the scan plan")


def synth_params(k: int, a: argparse.Namespace) -> Any:
    """The ``k``-th held-out recording's settings: slide seed ``SCAN_SEED_BASE + k``, an objective of
    the training range drawn from the held-out stream."""
    from export.datasets import _rng, random_optics
    from hw_sim.synth import SynthParams

    o = random_optics(_rng("heldout", k, 9100), 6.0)
    return SynthParams(
        fields_x=a.fields,
        fields_y=a.fields,
        seed=SCAN_SEED_BASE + k,
        tile=512,
        z_planes=a.z_planes,
        overlap=a.overlap,
        spherical_waves=o.spherical_waves,
        chromatic_shift_um=o.chromatic_shift_um,
        artifacts=a.artifacts,
    )


def in_focus_rules(rec: Any, report: Mapping[str, Any], fields_rec: Sequence[int], model: Any) -> Offline:
    """Per report field (row, col): the classifier's window flags and the scan-end context's windows
    (:func:`runtime.ml.artifact_context.scan_window_context`, the daemon's own pass) when each field
    is classified on its recorded plane nearest its true focus (``fields_rec``: the recording's field
    of each report field) instead of the frame the focus loop classified."""
    from runtime.ml.artifact_context import FieldClass, scan_window_context

    truth = rec.truth_focus_z_um
    if truth is None:
        raise ValueError("the recording has no truth focus")
    frames = [rec.plane(i, int(np.argmin(np.abs(rec.z_um[i] - truth[i])))) for i in fields_rec]
    classes = []
    for b in range(0, len(frames), 16):
        classes += model.classify_batch(frames[b : b + 16], rec.meta.pixel_size_um)
    fcs = [
        FieldClass(
            int(f["row"]),
            int(f["col"]),
            tc.label == "artifact",
            tc.probabilities[2],
            tc.window_p_artifact,
            tc.window_artifact,
        )
        for f, tc in zip(report["fields"], classes, strict=True)
    ]
    wc = scan_window_context(fcs)
    if wc is None:
        raise ValueError("no field carries windows")
    return {(fc.row, fc.col): (fc.window_flags or (), wc.in_context[(fc.row, fc.col)]) for fc in fcs}


def scan_one(
    folder: Path, k: int, a: argparse.Namespace, model_dir: Path, model: Any = None
) -> tuple[list[Window], int, dict[str, Any]]:
    """Synthesise (cached), scan through a daemon (cached) and label the ``k``-th recording's windows."""
    from hw_sim.content import make_slide
    from hw_sim.replay_job import run_replay
    from hw_sim.slide import SlideSpec
    from hw_sim.synth import synthesize
    from runtime.devices.recording import Recording

    params = synth_params(k, a)
    rec_path = folder.parent / f"scan-recordings-f{a.fields}-z{a.z_planes}-a{a.artifacts}-o{a.overlap:g}" / f"{k}.zarr"
    if not rec_path.exists():
        synthesize(rec_path, params)
    out = folder / f"scan-{k}"
    report_path = out / "report.json"
    if not report_path.exists() or json.loads(report_path.read_text()).get("finish_reason") != "completed":
        cfg = folder / "config.toml"
        cfg.write_text(CONFIG_TOML.format(overlap=a.overlap, focus=FOCUS, model=model_dir.resolve()), encoding="utf-8")
        if out.exists():  # an interrupted scan
            import shutil

            shutil.rmtree(out)
        with contextlib.redirect_stdout(sys.stderr):  # --json keeps stdout one JSON object
            run_replay(rec_path, out, cfg, progress=False, timeout_s=1200)
        (out / "slide.ome.tif").unlink(missing_ok=True)  # the bench reads the report only
    report = json.loads(report_path.read_text())
    rec = Recording.open(rec_path)
    meta = rec.meta
    if meta.slide is None:
        raise ValueError(f"{rec_path}: the recording names no slide (truth needs it)")
    slide = make_slide(SlideSpec.from_dict(meta.slide))
    actual = rec.truth_actual_xy_um
    xy = rec.stage_xy_um
    # The report's fields in their order: the recording's field at each commanded position.
    idx = [int(np.argmin(np.hypot(xy[:, 0] - f["x_um"], xy[:, 1] - f["y_um"]))) for f in report["fields"]]
    true_xy = None if actual is None else [(float(actual[i, 0]), float(actual[i, 1])) for i in idx]
    offline = None if model is None else in_focus_rules(rec, report, idx, model)
    tile = (meta.tile_height, meta.tile_width)
    area = (meta.area.x_um, meta.area.y_um, meta.area.x_um + meta.area.width_um, meta.area.y_um + meta.area.height_um)
    windows, moved = scan_windows(report, slide, tile, meta.pixel_size_um, true_xy, offline, area)
    info = {
        "seed": params.seed,
        "spherical_waves": round(params.spherical_waves, 4),
        "fields": len(report["fields"]),
        "captures_per_field": sum(f["captures"] for f in report["fields"]) / max(len(report["fields"]), 1),
        "focus_mae_um": (report.get("focus_truth") or {}).get("mae_um"),
        "artifacts_on_slide": [x.kind for x in slide.artifacts],
        "labels_moved_by_stage": moved,
    }
    return windows, moved, info


def _settings(a: argparse.Namespace, sha256: str) -> str:
    """The reports' folder: the recordings' settings, the focus strategy and the classifier."""
    return f"scan-reports-f{a.fields}-z{a.z_planes}-a{a.artifacts}-o{a.overlap:g}-{FOCUS}-{sha256[:8]}"


def run_scan(args: argparse.Namespace, folder_info: Any, model: Any = None) -> int:
    """The bench; ``model`` (the classifier in this process, the daemon's folder): also score the
    rules on each field's in-focus plane (``RULES`` focus_*), the focus loop's share of the figures."""
    folder = Path(args.data) / _settings(args, folder_info.sha256)
    folder.mkdir(parents=True, exist_ok=True)
    windows: list[Window] = []
    per_rec, by_rec, moved = [], [], 0
    for k in range(args.recordings):
        w, m, info = scan_one(folder, k, args, Path(folder_info.path), model)
        windows += w
        by_rec.append(w)
        moved += m
        per_rec.append(info)
        print(f"recording {k + 1}/{args.recordings} scanned", file=sys.stderr)
    result: dict[str, Any] = {
        "model": {"path": str(folder_info.path), "onnx_sha256": folder_info.sha256},
        "settings": {
            "recordings": args.recordings,
            "fields": f"{args.fields} x {args.fields}",
            "z_planes": args.z_planes,
            "artifacts_per_slide": args.artifacts,
            "overlap": args.overlap,
            "focus": FOCUS,
            "slide_seeds": [SCAN_SEED_BASE, SCAN_SEED_BASE + args.recordings - 1],
        },
        "windows": len(windows),
        "labels_moved_by_stage": moved,
        "recordings": per_rec,
        "scores": {},
    }
    rows = []
    for scope in ("inner", "all"):
        sel = [w for w in windows if w.inner or scope == "all"]
        result["scores"][scope] = {}
        for rule in RULES if model is not None else ("model", "context"):
            s = score(sel, rule)
            s["over_recordings"] = bootstrap([[w for w in ws if w.inner or scope == "all"] for ws in by_rec], rule)
            for part, whole in (("wholly_inside", True), ("crossing_edge", False)):
                # The artifact windows of artifacts wholly inside the scanned area / reaching past its edge
                # (a bubble whose rim the scan's edge cuts cannot be enclosed).
                sub = score([w for w in sel if w.label == 2 and w.whole is whole], rule)
                s[f"artifacts_{part}"] = {k: sub[k] for k in ("artifacts", "artifact_recall", "recall_by_kind")}
            result["scores"][scope][rule] = s
            rows.append(
                {
                    "what": f"{scope} windows: {RULES[rule]}",
                    "artifacts": s["artifacts"],
                    "recall": s["artifact_recall"],
                    "recall_ci": "{:.3f}-{:.3f}".format(*s["over_recordings"]["artifact_recall_90"]),
                    **s["recall_by_kind"],
                    "balanced": s["kind_balanced_recall"],
                    "tissue": s["tissue"],
                    "tissue_fp": percent(s["tissue_called_artifact"]),
                    "clean_fp": percent(s["untouched_tissue_called_artifact"]),
                    "glass_fp": percent(s["glass_called_artifact"]),
                }
            )
    for scope in ("inner",):
        for part, text in (
            ("wholly_inside", "artifacts wholly inside the scan"),
            ("crossing_edge", "crossing its edge"),
        ):
            for rule in ("model", "context"):
                e = result["scores"][scope][rule][f"artifacts_{part}"]
                rows.append(
                    {
                        "what": f"{scope}, {text}: {RULES[rule]}",
                        "artifacts": e["artifacts"],
                        "recall": e["artifact_recall"],
                        **e["recall_by_kind"],
                    }
                )
    cols = [
        Column("what", ""),
        Column("artifacts", "artifacts"),
        Column("recall", "recall", ".3f"),
        Column("recall_ci", "90%"),
        *(Column(k, k, ".3f") for k in KINDS),
        Column("balanced", "kinds' mean", ".3f"),
        Column("tissue", "tissue"),
        Column("tissue_fp", "% tissue called artifact", ".2f"),
        Column("clean_fp", "% untouched tissue", ".2f"),
        Column("glass_fp", "% glass", ".2f"),
    ]
    kinds = _count(k for r in per_rec for k in r["artifacts_on_slide"])
    notes = [
        f"{args.recordings} held-out recordings (slide seeds {SCAN_SEED_BASE}.."
        f"{SCAN_SEED_BASE + args.recordings - 1}), "
        f"{args.fields} x {args.fields} fields of 512 px at 0.25 µm, overlap {args.overlap:g}, {args.z_planes} planes, "
        f"focus {FOCUS}; artifacts on the slides: {kinds}",
        "windows: 64 µm, 2 x 2 per field, labelled at the field's commanded position (tile_label: artifact when >= 2% "
        f"covered); {moved} of {len(windows)} labels would differ at the stage's true positions",
        "wholly inside the scan: windows of artifacts whose reach lies inside the scanned area (a bubble whose rim "
        "the scan's edge cuts cannot be enclosed); crossing its edge: the others (every ink stroke, 600-2000 µm)",
        "90%: recall's interval over resamples of the recordings; kinds' mean: the four kinds' recalls "
        "averaged (windows are mostly ink, whose strokes cover hundreds of µm)",
        "inner: windows of fields with a field on every side; context: the daemon's scan-end rule "
        "(runtime.ml.artifact_context, report.json artifact_windows_in_context); in-focus plane: each field's "
        "recorded plane nearest its true focus classified here (the same model and window context), where the "
        "daemon classified the focus loop's first frame; compare bench classifier --layout",
    ]
    emit(
        result,
        rows,
        cols,
        as_json=args.json,
        title="tile classifier in the daemon: model alone vs context",
        notes=notes,
    )
    return 0


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out
