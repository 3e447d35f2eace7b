"""Calibration per instrument: the autofocus before and after ``python -m export calibrate``.

For each (objective, content) cell: a calibration recording of that instrument (4 x 2 fields,
41 planes; a slide of its own) is labelled from its own stacks and the builtin model fine-tuned
on it; then the model alone (|z| <= 8 µm) and the scan path (single_shot with the two-shot sign
loop) are scored on the instrument's *other* fields -- the same slide seed and layout ``bench autofocus
--objectives`` uses (another slide) -- before and after. Needs the ``export`` extra (torch).

Unseen content (``--content-split``, since stop 30): an image content (``ihc``, ``gravel``, ``file:PATH``)
is anchored at each slide's origin and tiled by mirroring, so two slides of the whole image show the
same pixels -- before stop 30 the scored fields partly showed the calibration's own content. By default
the calibration recording shows the image's left half and the scored recording its right half
(``hw_sim`` ``content_region``; disjoint pixels); ``--content-split right|top|bottom`` picks another
half for the calibration (the scored one is the opposite), ``none`` the old overlapping recordings
(both the whole image), for comparison. The procedural tissue (``synthetic``) differs per slide seed,
so it is never split. Every cell's output says which content each recording showed.

Two references for "in focus" (since stop 31), side by side: the simulator's **paraxial** focus (the truth, as
before) and each scored field's own **in-focus plane** as the instrument defines it -- the whole-frame ln-Brenner
peak of that field's z-stack (``runtime.focus.stack_labels.sharpness_peak``, the reference ``bench autofocus``
scores the strong objective on). With spherical aberration the sharpest plane is not the paraxial focus
(0.1-0.2 µm apart through the training and flipped objectives), and the stack labels the calibration trains
on follow the sharpest plane: against the paraxial focus that offset is an error no calibration can remove
without the truth. The model alone (MAE over |z| <= 8 µm, sign over |z| >= 1 µm, near-focus |z| <= 2 µm
mean and 95th percentile of |error|, z and sign relative to the reference) and the scan path (% within
±0.35 µm) are scored against both; JSON: ``model_alone`` / ``scan_path.within_half_dof`` paraxial (the keys
before stop 31), ``model_alone_in_focus_plane`` / ``scan_path.within_half_dof_of_peak`` the in-focus plane.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.autofocus import (
    OBJECTIVE_PRESETS,
    OBJECTIVE_SEED,
    _objective_recording,
    _resolutions,
    _sharpness_peaks,
    _tissue_fields,
    model_alone_by_reference,
    objective_recording_params,
)
from bench.report import Column, emit
from hw_sim.slide import OPPOSITE_REGION

if TYPE_CHECKING:
    from hw_sim.synth import SynthParams

DESCRIPTION = "autofocus per instrument before/after self-labelled calibration (export calibrate)"
CAL_SEED = 7_100_021  # the calibration slide: not the evaluation slide (bench.autofocus.OBJECTIVE_SEED)
CONTENT_SPLITS = ("left", "right", "top", "bottom", "none")
DEFAULT_CONTENT_SPLIT = "left"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=Path("out/bench-data"), help="recording and model cache folder")
    p.add_argument("--objectives", nargs="+", default=["flipped", "apochromat", "strong"], choices=OBJECTIVE_PRESETS)
    p.add_argument("--contents", nargs="+", default=["synthetic"], help="tissue looks (hw_sim.content)")
    p.add_argument("--fields", type=int, nargs=2, default=(4, 3), metavar=("X", "Y"), help="evaluation recording")
    p.add_argument("--cal-fields", type=int, nargs=2, default=(4, 2), metavar=("X", "Y"), help="at most 8 fields")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: export calibrate's)")
    p.add_argument(
        "--freeze-blocks",
        type=int,
        default=None,
        help="conv blocks kept frozen (0: fine-tune every layer; default: export calibrate's)",
    )
    p.add_argument(
        "--contrast-jitter",
        type=float,
        default=None,
        help="export calibrate --contrast-jitter (default: export calibrate's, 0.1)",
    )
    p.add_argument(
        "--near-weight",
        type=float,
        default=None,
        help="export calibrate --near-weight (default: export calibrate's, 10)",
    )
    p.add_argument(
        "--tta",
        type=int,
        default=None,
        choices=(1, 2, 4, 8),
        help="export calibrate --tta (default: export calibrate's, 4)",
    )
    p.add_argument(
        "--single-pass",
        action="store_true",
        help="export the hold-out pass's model (export calibrate --single-pass; default: refit on every field)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="export calibrate --seed (default: export calibrate's, 0); another seed writes its own model folder",
    )
    p.add_argument(
        "--content-split",
        choices=CONTENT_SPLITS,
        default=DEFAULT_CONTENT_SPLIT,
        help="image contents: the half of the image the calibration recording shows; the scored recording shows "
        "the opposite half, so the model is scored on content it never saw (default: left, scored on right). "
        "none: both recordings show the whole image (overlapping content, the behaviour before stop 30). "
        "The procedural tissue (synthetic) is never split: it differs per slide seed",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="export calibrate --threads: torch threads while calibrating (default: export calibrate's, 2; "
        "1 is faster on cores other jobs hold)",
    )
    p.add_argument(
        "--content-targets",
        choices=("init", "stack"),
        default=None,
        help="export calibrate --content-targets (default: export calibrate's, init); stack writes its own model "
        "folder",
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")


def content_regions(args: argparse.Namespace, content: str) -> tuple[str, str]:
    """(calibration, scored) recording's ``content_region``: opposite halves of an image content,
    the whole image for both with ``--content-split none``, none for the procedural tissue."""
    split = getattr(args, "content_split", DEFAULT_CONTENT_SPLIT)
    if content == "synthetic" or split == "none":
        return "", ""
    return split, OPPOSITE_REGION[split]


def _cell_recordings(
    args: argparse.Namespace, content: str
) -> tuple[tuple[argparse.Namespace, int, str], tuple[argparse.Namespace, int, str]]:
    """(args, slide seed, content_region) of a cell's calibration and scored recording: the one place
    :func:`recording_params` and the recordings the bench makes both read."""
    cal_region, eval_region = content_regions(args, content)
    cal_args = argparse.Namespace(**{**vars(args), "fields": tuple(args.cal_fields)})
    return (cal_args, CAL_SEED, cal_region), (args, OBJECTIVE_SEED, eval_region)


def recording_params(args: argparse.Namespace, objective: str, content: str) -> tuple[SynthParams, SynthParams]:
    """The (calibration, scored) recordings' ``hw_sim.synth.SynthParams`` of a cell."""
    cal, scored = _cell_recordings(args, content)
    return objective_recording_params(cal[0], objective, content, *cal[1:]), objective_recording_params(
        scored[0], objective, content, *scored[1:]
    )


def content_text(content: str, region: str, seed: int) -> str:
    """What a recording's tissue shows, for the output: the image, its half and pixel box, or the
    procedural tissue of a slide seed."""
    if content == "synthetic":
        return f"procedural H&E of slide seed {seed}"
    from hw_sim.content import load_content, region_pixels

    h, w = load_content(content).shape[:2]
    x0, y0, x1, y1 = region_pixels(region, h, w)
    part = f"{region} half" if region else "whole image"
    return f"{content} {part} (px x {x0}-{x1}, y {y0}-{y1} of {w} x {h})"


def _calibration_recording(args: argparse.Namespace, objective: str, content: str) -> Path:
    cal_args, seed, region = _cell_recordings(args, content)[0]
    return _objective_recording(cal_args, objective, content, seed, region)


def _scored_recording(args: argparse.Namespace, objective: str, content: str) -> Path:
    scored_args, seed, region = _cell_recordings(args, content)[1]
    return _objective_recording(scored_args, objective, content, seed, region)


def calibrated_dir(args: argparse.Namespace, objective: str, content: str) -> Path:
    """Where a cell's calibrated model is written: ``af-calibrated-<objective>[-<content>[-<half>]]-<tile>``
    (``<half>``: the calibration's half of an image content; none with ``--content-split none``), with
    ``-seed<N>`` appended when ``--seed`` is given (0 included), so a seed study leaves the default run's
    models in place, and ``-stackcontent`` with ``--content-targets stack``."""
    look = "" if content == "synthetic" else "-" + "".join(c if c.isalnum() else "_" for c in content)
    region = content_regions(args, content)[0]
    look += f"-{region}" if region else ""
    seed = "" if args.seed is None else f"-seed{args.seed}"
    seed += "-stackcontent" if getattr(args, "content_targets", None) == "stack" else ""
    data: Path = args.data
    return data / f"af-calibrated-{objective}{look}-{args.tile}{seed}"


def label_errors(labels: list[dict[str, Any]], rec: Any, reference: Any = None) -> dict[str, Any]:
    """The calibration's stack labels against the recording's truth (read here, by the bench, never
    by ``export calibrate``): a label bias or scatter is a floor under the calibrated model's error.
    A sharpness peak sits where the aberrated image is sharpest, which with spherical aberration is
    not the paraxial focus the truth records. ``reference``: per field, another in-focus z to compare
    with instead of the truth (NaN: none; fields without one are left out)."""
    truth = rec.truth_focus_z_um if reference is None else np.asarray(reference)
    err = np.asarray(
        [
            lab["focus_z_um"] - truth[lab["field"]]
            for lab in labels
            if lab["focus_z_um"] is not None and np.isfinite(truth[lab["field"]])
        ]
    )
    if not len(err):
        return {"fields": 0}
    return {
        "fields": len(err),
        "mean_um": float(err.mean()),
        "std_um": float(err.std()),
        "max_abs_um": float(np.abs(err).max()),
    }


REFERENCES = {
    "paraxial": "the simulator's paraxial focus (recording truth)",
    "in_focus_plane": "the field's in-focus plane: whole-frame ln-Brenner peak of its own z-stack "
    "(runtime.focus.stack_labels.sharpness_peak, as bench autofocus)",
}
"""The two references "in focus" the bench scores on (module docstring), by the names the JSON uses."""


def focus_references(rec: Any, peaks: Any) -> dict[str, list[Any]]:
    """Per reference (:data:`REFERENCES`), each field's in-focus z of the recording ``rec`` whose fields' in-focus
    planes are ``peaks`` (``_sharpness_peaks`` of its path; NaN: the field's stack has no sharpness peak), in the
    form :func:`model_alone_by_reference` takes."""
    return {"paraxial": [rec.truth_focus_z_um], "in_focus_plane": [peaks]}


def reference_offsets(rec: Any, peaks: Any, fields: Any = None) -> dict[str, Any]:
    """The in-focus plane (``peaks``, per field) minus the paraxial focus over a recording's fields (``fields``:
    a boolean mask, default every field): how far apart the two references are."""
    d = np.asarray(peaks) - np.asarray(rec.truth_focus_z_um)
    if fields is not None:
        d = d[np.asarray(fields, bool)]
    d = d[np.isfinite(d)]
    if not len(d):
        return {"fields": 0}
    return {"fields": len(d), "mean_um": float(d.mean()), "min_um": float(d.min()), "max_um": float(d.max())}


def score_model(eval_rec: Path, model_dir: Path, rec: Any, references: dict[str, list[Any]]) -> dict[str, Any]:
    """One model folder on the scored recording (at ``eval_rec``, opened as ``rec``; ``references``: its
    :func:`focus_references`, found once for every model scored): the model alone against both references
    (``model_alone``: paraxial, the key before stop 31; ``model_alone_in_focus_plane``) and the scan path
    (``scan_path``; its ``within_half_dof_of_peak`` and ``mae_to_peak_um`` are against the in-focus plane)."""
    from runtime.ml.tasks import load_models

    af, _, _ = load_models(model_dir, None, "ort_cpu")
    alone = model_alone_by_reference([rec], af, references)
    return {
        "model_alone": alone["paraxial"],
        "model_alone_in_focus_plane": alone["in_focus_plane"],
        "scan_path": _resolutions([eval_rec], model_dir),
    }


def worst_fields(alone: dict[str, Any], n: int = 3) -> str:
    """The ``n`` scored fields with the largest model-alone MAE (``alone``: one reference's figures with their
    ``per_field``), each as field, MAE and near-focus bias: where a cell's error sits."""
    rows = sorted((f for f in alone.get("per_field", []) if f["mae_um"] is not None), key=lambda f: -f["mae_um"])
    return (
        ", ".join(
            f"field {f['field']} {f['mae_um']:.2f} µm (near focus {_num(f['near_focus_bias_um'], '+.2f')})"
            for f in rows[:n]
        )
        or "-"
    )


def _label_text(e: dict[str, Any]) -> str:
    return f"{e['mean_um']:+.2f} / {e['max_abs_um']:.2f}" if e.get("fields") else "-"


def _method_text(cell: dict[str, Any]) -> str:
    m = cell["method"]
    return (
        f"{m['name']} ({m['trained']}), {m['epochs']} epochs, contrast jitter {m['contrast_jitter']:g}, "
        f"near-focus weight {m['near_focus_weight']:g}, test-time transforms {m['tta']}, seed {cell['seed']}, "
        f"{cell['procedure']}"
    )


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _reference_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A cell's two table rows: the paraxial figures, then the in-focus plane's."""
    b, a = result["before"], result["after"]
    rows = []
    for ref, alone_key, within_key in (
        ("paraxial", "model_alone", "within_half_dof"),
        ("in_focus_plane", "model_alone_in_focus_plane", "within_half_dof_of_peak"),
    ):
        mb, ma = b[alone_key], a[alone_key]
        rows.append(
            {
                "ref": "paraxial (truth)" if ref == "paraxial" else "in-focus plane (Brenner peak)",
                "mae": f"{_num(mb['mae_um'])} -> {_num(ma['mae_um'])}",
                "sign": f"{_pct(mb['sign_accuracy_abs_ge_1um'])} -> {_pct(ma['sign_accuracy_abs_ge_1um'])} "
                f"({ma['sign_wrong_planes']} of {ma['sign_wrong_planes'] + ma['sign_right_planes']} wrong)",
                "q95": f"{_num(mb['near_focus_q95_um'], '.2f')} -> {_num(ma['near_focus_q95_um'], '.2f')}",
                "within": f"{_pct(b['scan_path'][within_key])} -> {_pct(a['scan_path'][within_key])}",
            }
        )
    return rows


def run(args: argparse.Namespace) -> int:
    from export.calibrate import calibrate
    from runtime.devices.recording import Recording
    from runtime.ml.model_folder import builtin_autofocus_dir

    builtin = builtin_autofocus_dir((args.tile, args.tile))
    cells: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for content in args.contents:
        for objective in args.objectives:
            cal_rec = _calibration_recording(args, objective, content)
            eval_rec = _scored_recording(args, objective, content)
            cal_region, eval_region = content_regions(args, content)
            out = calibrated_dir(args, objective, content)
            t0 = time.monotonic()
            cal = calibrate(
                [cal_rec],
                builtin,
                out,
                epochs=args.epochs,
                freeze_blocks=args.freeze_blocks,
                refit=not args.single_pass,
                contrast_jitter=args.contrast_jitter,
                **({} if args.near_weight is None else {"near_weight": args.near_weight}),
                **({} if args.tta is None else {"tta": args.tta}),
                **({} if args.seed is None else {"seed": args.seed}),
                **({} if getattr(args, "threads", None) is None else {"threads": args.threads}),
                **(
                    {}
                    if getattr(args, "content_targets", None) is None
                    else {"content_from_stack": args.content_targets == "stack"}
                ),
            )
            seconds = time.monotonic() - t0
            result: dict[str, Any] = {
                "objective": objective,
                "content": content,
                "calibrate_s": seconds,
                "seed": cal["seed"],
                "content_split": args.content_split if content != "synthetic" else None,
                "calibration_content": content_text(content, cal_region, CAL_SEED),
                "scored_content": content_text(content, eval_region, OBJECTIVE_SEED),
            }
            result["method"] = {
                **cal["method"],
                "epochs": cal["epochs"],
                "lr": cal["lr"],
                "near_focus_weight": cal["near_focus_weight"],
            }
            result["procedure"] = cal["procedure"]["name"]
            result["calibrate_cpu_s"] = cal["seconds"]["cpu"]
            # Each recording opened and its fields' in-focus planes found once (a pass over every plane).
            scored, cal_recording = Recording.open(eval_rec), Recording.open(cal_rec)
            scored_peaks, cal_peaks = _sharpness_peaks(eval_rec), _sharpness_peaks(cal_rec)
            references = focus_references(scored, scored_peaks)
            for tag, model_dir in (("before", builtin), ("after", out)):
                result[tag] = score_model(eval_rec, model_dir, scored, references)
            result["references"] = REFERENCES
            result["in_focus_plane_minus_paraxial_um"] = {
                "scored_tissue_fields": reference_offsets(scored, scored_peaks, _tissue_fields(scored)),
                "calibration_fields": reference_offsets(cal_recording, cal_peaks),
            }
            result["labelled_fields"] = cal["fields_labelled"]
            result["label_error_um"] = label_errors(cal["labels"], cal_recording)
            result["label_minus_in_focus_plane_um"] = label_errors(cal["labels"], cal_recording, cal_peaks)
            result["skipped"] = cal["fields_skipped"]
            result["calibration_heldout"] = {k: cal[k] for k in ("heldout_metrics_before", "heldout_metrics_after")}
            cells.append(result)
            b, a = result["before"], result["after"]
            off = result["in_focus_plane_minus_paraxial_um"]["scored_tissue_fields"]
            paraxial, in_focus = _reference_rows(result)
            rows.append(
                {
                    "cell": objective if content == "synthetic" else f"{objective} / {content}",
                    "content": "procedural, per slide"
                    if content == "synthetic"
                    else (f"{cal_region} / {eval_region} half" if cal_region else "whole / whole (overlap)"),
                    "labelled": result["labelled_fields"],
                    "secs": seconds,
                    "label": _label_text(result["label_error_um"]),
                    **paraxial,
                    "caps": f"{b['scan_path']['captures_per_field']:.2f} -> {a['scan_path']['captures_per_field']:.2f}",
                }
            )
            rows.append(
                {
                    "content": "in-focus plane - paraxial, scored fields: "
                    + (f"{off['mean_um']:+.2f} ({off['min_um']:+.2f}..{off['max_um']:+.2f})" if off["fields"] else "-"),
                    "label": _label_text(result["label_minus_in_focus_plane_um"]),
                    **in_focus,
                }
            )
    cols = [
        Column("cell", "objective / content"),
        Column("content", "content calibrated / scored"),
        Column("labelled", "fields labelled"),
        Column("label", "label - reference µm, mean / max |.|"),
        Column("secs", "calibrate s", ".0f"),
        Column("ref", "reference (in focus)"),
        Column("mae", "model MAE µm |z|<=8, before -> after"),
        Column("sign", "sign % |z|>=1"),
        Column("q95", "near-focus q95 |err| µm (|z|<=2)"),
        Column("within", "scan path % ±0.35 µm"),
        Column("caps", "captures/field"),
    ]
    notes = [
        f"calibration: {args.cal_fields[0]}x{args.cal_fields[1]} fields, 41 planes, slide seed {CAL_SEED}, "
        "method: "
        + "; ".join(sorted({_method_text(c) for c in cells}))
        + f"; evaluation: the instrument's other fields (slide seed {OBJECTIVE_SEED}, "
        f"{args.fields[0]}x{args.fields[1]} fields)",
        "content each recording showed: "
        + "; ".join(
            sorted(
                {
                    f"{c['content']}: calibrated on {c['calibration_content']}, scored on {c['scored_content']}"
                    for c in cells
                }
            )
        )
        + (
            " (--content-split none: image contents overlap between the recordings)"
            if args.content_split == "none"
            else " (image contents: disjoint halves, the scored content unseen by the calibration)"
        ),
        "reference, per cell two rows: paraxial (truth) = "
        + REFERENCES["paraxial"]
        + "; in-focus plane = "
        + REFERENCES["in_focus_plane"]
        + "; z, error and sign are relative to the row's reference, and so is the label column (the calibration "
        "recording's stack labels minus its truth / its fields' in-focus planes)",
        "targets after calibration: model MAE <= 0.3 µm, sign >= 98%; scan path >= 95% within, <= 1.2 captures",
        "fields the calibrated model reads worst (paraxial; model_alone.per_field in the JSON): "
        + "; ".join(f"{c['objective']} / {c['content']}: {worst_fields(c['after']['model_alone'])}" for c in cells),
    ]
    emit({"cells": cells}, rows, cols, as_json=args.json, title="autofocus before/after calibration", notes=notes)
    return 0
