"""Single-shot autofocus vs the contrast sweep, on held-out synthetic recordings.

The recordings are synthesised here (cached under ``--data``) from slide seeds
and objectives the model never saw in training: z-stacks of 41 planes, 0.5 µm
apart, around a coarse focus, so every field is recorded over about ±10 µm of
defocus. Three measurements on the same fields:

1. The model alone: every recorded plane within ±10 µm of the true focus of a
   tissue field, one estimate each: MAE, share within ±0.35 µm (half the depth
   of field at 40x/0.95), sign accuracy for |defocus| >= 1 µm.
2. The scan path: each field focused by ``FieldFocuser`` through the replay
   driver (the daemon's own code), single_shot vs contrast_sweep: final focus
   error against the truth, captures per field.
3. Cold start: the scan path's single-shot loop (capture, estimate, move;
   sweep fallback) started on each tissue field from a focus guess 0, ±1, ...,
   ±10 µm off, as on the first field of a scan or after the focus surface is
   lost: final error and captures by starting defocus, next to the contrast
   sweep started from the same guesses.
4. Inference time per tile for every backend that runs here.
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.report import Column, emit, percent

if TYPE_CHECKING:
    from hw_sim.synth import SynthParams

DESCRIPTION = "single-shot autofocus vs contrast sweep on held-out recordings (accuracy, captures, ms/tile)"
HALF_DOF_UM = 0.35
# Held-out objectives and slide seeds: outside every range export/datasets.py draws from for training.
HELDOUT = (
    {"seed": 7_000_001, "spherical_waves": 0.095, "chromatic_shift_um": (0.12, 0.0, -0.24)},
    {"seed": 7_000_002, "spherical_waves": 0.055, "chromatic_shift_um": (0.21, 0.0, -0.13)},
    {"seed": 7_000_003, "spherical_waves": 0.075, "chromatic_shift_um": (0.17, 0.0, -0.28)},
)


OBJECTIVE_PRESETS = ("training", "flipped", "apochromat", "strong")  # hw_sim.synth.OBJECTIVES
OBJECTIVE_SEED = 7_000_011  # a held-out slide seed for the objective matrix


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=Path("out/bench-data"), help="recording cache folder")
    p.add_argument("--recordings", type=int, default=2, choices=range(1, len(HELDOUT) + 1))
    p.add_argument("--fields", type=int, nargs=2, default=(4, 3), metavar=("X", "Y"))
    p.add_argument("--tile", type=int, default=512)
    p.add_argument(
        "--model", type=Path, default=None, help="autofocus model folder (default: the builtin choice for --tile)"
    )
    p.add_argument(
        "--classifier",
        type=Path,
        default=None,
        help="tile classifier model folder for the scan path (default: builtin)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    p.add_argument(
        "--objectives",
        nargs="+",
        default=None,
        choices=("heldout", *OBJECTIVE_PRESETS),
        help="instead of the default report: per objective (hw_sim.synth.OBJECTIVES presets; heldout: the "
        "default held-out recordings), the model alone, its sign confidence, and the scan path "
        "(single_shot with the two-shot sign loop vs the contrast sweep)",
    )
    p.add_argument(
        "--contents",
        nargs="+",
        default=["synthetic"],
        help="with --objectives: tissue looks to cross with the objectives (hw_sim.content: synthetic, "
        "ihc = real colon tissue, brick, gravel, grass, file:PATH; NAME@UM: at UM µm per image pixel); "
        "the models trained on synthetic only",
    )


def _recordings(args: argparse.Namespace) -> list[Path]:
    from hw_sim.synth import SynthParams, synthesize

    out = []
    for h in HELDOUT[: args.recordings]:
        params = SynthParams(
            fields_x=args.fields[0],
            fields_y=args.fields[1],
            seed=int(h["seed"]),  # type: ignore[call-overload]
            tile=args.tile,
            z_planes=41,
            z_step_um=0.5,
            coarse_focus_error_um=1.0,
            spherical_waves=float(h["spherical_waves"]),  # type: ignore[arg-type]
            chromatic_shift_um=h["chromatic_shift_um"],  # type: ignore[arg-type]
        )
        path = args.data / f"af-heldout-{h['seed']}-{args.fields[0]}x{args.fields[1]}-{args.tile}.zarr"
        if not (path / "zarr.json").exists():
            synthesize(path, params, overwrite=True, progress=not args.json)
        out.append(path)
    return out


def _tissue_fields(rec: Any) -> np.ndarray:
    """Fields whose actual area holds >= 5% tissue (the truth; glass has no focus to find)."""
    from hw_sim.slide import SlideSpec, SyntheticSlide

    slide = SyntheticSlide(SlideSpec.from_dict(rec.meta.slide))
    m = rec.meta
    xy = rec.truth_actual_xy_um
    w, h = m.tile_width * m.pixel_size_um, m.tile_height * m.pixel_size_um
    fractions = [
        slide.tissue_fraction(x - w / 2, y - h / 2, m.tile_height, m.tile_width, m.pixel_size_um) for x, y in xy
    ]
    return np.asarray(fractions) >= 0.05


SMALL_FRAME = 256  # px: a smaller camera, simulated by the centre crop of each recorded plane


def model_accuracy(recs: list[Any], model: Any, frame: int | None = None) -> dict[str, Any]:
    """One estimate per recorded plane of every tissue field; ``frame``: on the centre
    ``frame`` x ``frame`` px of each plane only (a smaller camera)."""
    true, pred, which = [], [], []
    for r, rec in enumerate(recs):
        tissue = _tissue_fields(rec)
        focus = rec.truth_focus_z_um
        for f in np.flatnonzero(tissue):
            for k, z in enumerate(rec.z_um[f]):
                d = float(z - focus[f])
                if abs(d) > 10.0:
                    continue
                plane = rec.plane(int(f), k)
                if frame is not None:
                    y, x = (plane.shape[0] - frame) // 2, (plane.shape[1] - frame) // 2
                    plane = plane[y : y + frame, x : x + frame]
                est = model.estimate(plane)
                true.append(d)
                pred.append(np.nan if est.defocus_um is None else est.defocus_um)
                which.append(r)
    t, p, rec_of = np.asarray(true), np.asarray(pred), np.asarray(which)
    ok = np.isfinite(p)
    err = np.abs(p[ok] - t[ok])
    big = ok & (np.abs(t) >= 1.0)
    return {
        "planes": len(t),
        "abstained": int((~ok).sum()),
        "mae_um": float(err.mean()),
        "within_half_dof": float(np.mean(err <= HALF_DOF_UM)),
        "mae_abs_defocus_le_2um": float(np.abs(p[ok] - t[ok])[np.abs(t[ok]) <= 2].mean()),
        "sign_accuracy_abs_ge_1um": float(np.mean(np.sign(p[big]) == np.sign(t[big]))),
        # Where the error comes from: the loop only ever needs the small-|z| range.
        "mae_by_abs_defocus_um": {
            f"{lo}-{hi}": float(np.abs(p[ok] - t[ok])[(np.abs(t[ok]) >= lo) & (np.abs(t[ok]) < hi)].mean())
            for lo, hi in ((0, 1), (1, 2), (2, 5), (5, 8), (8, 10.01))
        },
        # Each recording is one objective (its own aberrations): the far-defocus error depends on it.
        "mae_by_recording_um": [float(np.abs(p - t)[ok & (rec_of == r)].mean()) for r in range(len(recs))],
    }


@dataclass(frozen=True)
class _Replay:
    """One held-out recording behind the replay driver, with what the scan-path scores need."""

    driver: Any  # hw_sim.replay.ReplayDriver
    settings: Any  # runtime.config.ModelsConfig
    grid: Any  # runtime.devices.scan_plan.GridPlan
    tissue: np.ndarray  # per field: holds >= 5% tissue
    truth: np.ndarray  # per field: true focus z (µm)
    sharpest: np.ndarray  # per field: the stack's sharpest z (runtime.focus.stack_labels; NaN: no peak)
    peak: np.ndarray  # per field: the stack's whole-frame Brenner peak (stack_labels.sharpness_peak; NaN: none)


@functools.cache
def _sharpest_planes(path: Path) -> np.ndarray:
    """Per field, where its own z-stack is sharpest (the calibration's label). With strong
    spherical aberration the sharpest plane is not the simulator's paraxial focus (0.8-0.9 µm
    apart at 0.25 waves), so the scan path is scored against both. Cached per recording: it
    reads every plane, and each strategy replays the same recordings."""
    from runtime.devices.recording import Recording
    from runtime.focus.stack_labels import label_stack

    rec = Recording.open(path)
    out = np.full(rec.meta.n_fields, np.nan)
    for f in range(rec.meta.n_fields):
        lab = label_stack(f, rec.z_um[f], [rec.plane(f, k) for k in range(rec.meta.n_z)])
        if lab.focus_z_um is not None:
            out[f] = lab.focus_z_um
    out.setflags(write=False)  # shared by every caller through the cache
    return out


@functools.cache
def _sharpness_peaks(path: Path) -> np.ndarray:
    """Per field, where its whole frame is sharpest by the scan's own near-focus measure and fit
    (``runtime.focus.stack_labels.sharpness_peak``: ln Brenner, a parabola through the sharpest plane
    and its neighbours). The reference "in focus" is scored on besides the paraxial truth: the plane a
    sharpness-driven scanner can find and a reader sees sharpest. On objectives in or near the training
    range it lies within ~0.03 µm of the stack label; at 0.25 waves of spherical aberration 0.6-0.7 µm
    above the paraxial focus and ~0.3 µm above the label (the curve is flat and lopsided there)."""
    from runtime.devices.recording import Recording
    from runtime.focus.stack_labels import sharpness_peak

    rec = Recording.open(path)
    out = np.full(rec.meta.n_fields, np.nan)
    for f in range(rec.meta.n_fields):
        z = sharpness_peak(rec.z_um[f], [rec.plane(f, k) for k in range(rec.meta.n_z)])
        if z is not None:
            out[f] = z
    out.setflags(write=False)
    return out


def _replay(path: Path, model_dir: Path | None, classifier_dir: Path | None = None) -> _Replay:
    from hw_sim.replay import ReplayDriver
    from runtime.config import ModelsConfig
    from runtime.devices.recording import Recording
    from runtime.devices.scan_plan import serpentine_plan

    rec = Recording.open(path)
    m = rec.meta
    truth = rec.truth_focus_z_um
    assert truth is not None, f"{path} has no truth"
    return _Replay(
        sharpest=_sharpest_planes(path),
        peak=_sharpness_peaks(path),
        driver=ReplayDriver(rec),
        settings=ModelsConfig(
            autofocus_dir=str(model_dir) if model_dir else "builtin",
            classifier_dir=str(classifier_dir) if classifier_dir else "builtin",
            backend="ort_cpu",
        ),
        grid=serpentine_plan(m.area, m.field_width_um, m.field_height_um, m.overlap),
        tissue=_tissue_fields(rec),
        truth=truth,
    )


def scan_path(
    paths: list[Path], strategy: str, model_dir: Path | None, classifier_dir: Path | None = None
) -> dict[str, Any]:
    from runtime.config import FocusConfig
    from runtime.focus.field import FieldFocuser

    errors, sharp_errors, peak_errors, captures, tissue_caps, clamped = [], [], [], [], [], 0
    classes: dict[str, int] = {}
    t0 = time.perf_counter()
    for path in paths:
        rp = _replay(path, model_dir, classifier_dir)
        drv, tissue, truth = rp.driver, rp.tissue, rp.truth
        focuser = FieldFocuser(FocusConfig(strategy=strategy), rp.settings, drv.camera, drv.stage)
        for plan in rp.grid.fields:
            drv.stage.move_xy(plan.x_um, plan.y_um)
            r = focuser.focus_field(plan, lambda: False)
            f = drv.stage.field_index()
            captures.append(r.captures)
            if r.tile_class:
                classes[r.tile_class] = classes.get(r.tile_class, 0) + 1
            if tissue[f]:
                errors.append(abs(r.z_um - float(truth[f])))
                sharp_errors.append(abs(r.z_um - float(rp.sharpest[f])))
                peak_errors.append(abs(r.z_um - float(rp.peak[f])))
                tissue_caps.append(r.captures)
        clamped += drv.camera.clamped_snaps
    e = np.asarray(errors)
    return {
        "strategy": strategy,
        "fields": len(captures),
        "tissue_fields": len(e),
        "mae_um": float(e.mean()),
        "max_abs_error_um": float(e.max()),
        "within_half_dof": float(np.mean(e <= HALF_DOF_UM)),
        **_sharpest_scores(np.asarray(sharp_errors), np.asarray(peak_errors)),
        "captures_per_field": float(np.mean(captures)),
        "captures_per_tissue_field": float(np.mean(tissue_caps)),
        "clamped_snaps": clamped,
        "classes": classes,
        "wall_s": time.perf_counter() - t0,
    }


COLD_STARTS_UM = tuple(float(d) for d in range(-10, 11))


def cold_start(
    paths: list[Path], strategy: str, model_dir: Path | None, classifier_dir: Path | None = None
) -> dict[str, Any]:
    """Every tissue field focused from every start guess in ``COLD_STARTS_UM`` (truth + offset)."""
    from runtime.config import FocusConfig
    from runtime.focus.field import FieldFocuser
    from runtime.focus.surface import FocusSurface

    starts, errors, captures, fallbacks = [], [], [], 0
    t0 = time.perf_counter()
    for path in paths:
        rp = _replay(path, model_dir, classifier_dir)
        drv, tissue, truth = rp.driver, rp.tissue, rp.truth
        focuser: FieldFocuser | None = None
        for plan in rp.grid.fields:
            drv.stage.move_xy(plan.x_um, plan.y_um)
            f = drv.stage.field_index()
            if not tissue[f]:
                continue
            for d0 in COLD_STARTS_UM:
                z0 = float(truth[f]) + d0
                if focuser is None or strategy == "contrast_sweep":  # the sweep starts where the last field ended
                    focus = FocusConfig(strategy=strategy, start_z_um=z0)
                    focuser = FieldFocuser(focus, rp.settings, drv.camera, drv.stage)
                focuser.surface = FocusSurface(z0)  # no points: the first field's guess is z0
                r = focuser.focus_field(plan, lambda: False)
                starts.append(d0)
                errors.append(abs(r.z_um - float(truth[f])))
                captures.append(r.captures)
                fallbacks += r.method.endswith("sweep_fallback")
    d, e, c = np.abs(np.asarray(starts)), np.asarray(errors), np.asarray(captures, np.float64)
    bins = ((0, 2), (2, 5), (5, 8), (8, 10.01))
    return {
        "strategy": strategy,
        "focus_runs": len(e),
        "starts_um": list(COLD_STARTS_UM),
        "mae_um": float(e.mean()),
        "within_half_dof": float(np.mean(e <= HALF_DOF_UM)),
        "captures_per_field": float(c.mean()),
        "sweep_fallbacks": fallbacks,
        "by_abs_start_um": {
            f"{lo}-{hi}": {
                "mae_um": float(e[(d >= lo) & (d < hi)].mean()),
                "within_half_dof": float(np.mean(e[(d >= lo) & (d < hi)] <= HALF_DOF_UM)),
                "captures": float(c[(d >= lo) & (d < hi)].mean()),
            }
            for lo, hi in bins
        },
        "wall_s": time.perf_counter() - t0,
    }


def backend_timing(model_dir: Path | None, tile: np.ndarray) -> list[dict[str, Any]]:
    from runtime.ml.backends import BACKENDS, installed_backends, select_backend
    from runtime.ml.model_folder import default_model_dir, load_model_folder

    folder = load_model_folder(model_dir or default_model_dir("autofocus"), "autofocus")
    pre = folder.autofocus_preprocess()
    t = time.perf_counter()
    for _ in range(5):
        x = pre.inputs(tile)
    pre_ms = (time.perf_counter() - t) / 5 * 1000
    rows: list[dict[str, Any]] = []
    inst = installed_backends()
    for name in BACKENDS:
        if inst[name] is not None:
            rows.append({"backend": name, "status": inst[name]})
            continue
        try:
            b = select_backend(folder, name).backend
        except Exception as err:
            rows.append({"backend": name, "status": f"failed: {err}"})
            continue
        b.run(x)  # warm-up
        n = 20
        t = time.perf_counter()
        for _ in range(n):
            b.run(x)
        ms = (time.perf_counter() - t) / n * 1000
        rows.append(
            {
                "backend": name,
                "status": "ok",
                "crops_per_tile": len(x),
                "infer_ms_per_tile": ms,
                "preprocess_ms_per_tile": pre_ms,
            }
        )
        b.close()
    return rows


def objective_recording_params(
    args: argparse.Namespace, name: str, content: str = "synthetic", seed: int = OBJECTIVE_SEED, region: str = ""
) -> SynthParams:
    """The ``hw_sim.synth.SynthParams`` of :func:`_objective_recording` (``region``: the part of an image
    content the slide shows, ``SlideSpec.content_region``)."""
    from hw_sim.synth import SynthParams, objective_params

    return SynthParams(
        fields_x=args.fields[0],
        fields_y=args.fields[1],
        seed=seed,
        tile=args.tile,
        z_planes=41,
        z_step_um=0.5,
        coarse_focus_error_um=1.0,
        content=content,
        content_region=region,
        **objective_params(name),  # type: ignore[arg-type]
    )


def _objective_recording(
    args: argparse.Namespace, name: str, content: str = "synthetic", seed: int = OBJECTIVE_SEED, region: str = ""
) -> Path:
    from hw_sim.synth import synthesize

    params = objective_recording_params(args, name, content, seed, region)
    look = "" if content == "synthetic" else "-" + "".join(c if c.isalnum() else "_" for c in content)
    look += f"-{region}" if region else ""
    name_part = f"af-objective-{name}{look}-{seed}-{args.fields[0]}x{args.fields[1]}-{args.tile}.zarr"
    path: Path = args.data / name_part
    if not (path / "zarr.json").exists():
        synthesize(path, params, overwrite=True, progress=not args.json)
    return path


NEAR_FOCUS_UM = 2.0
"""|z| (µm, from the reference) of the planes the near-focus figures cover (the closed loop's last capture is
there; ``export.train.NEAR_FOCUS_UM``, restated so the bench needs no torch)."""


def alone_scores(true: Any, pred: Any, unsure: Any) -> dict[str, Any]:
    """The model alone's figures from per-plane ``true`` defocus (stage z minus the reference's focus), the
    estimates ``pred`` (NaN: abstained) and the model's ``unsure`` flags: MAE, sign over |true| >= 1 µm
    (sign relative to that reference) with its confidence, and near focus (|true| <= ``NEAR_FOCUS_UM``)
    the mean and 95th percentile of |error|."""
    t, p, u = np.asarray(true, np.float64), np.asarray(pred, np.float64), np.asarray(unsure, bool)
    ok = np.isfinite(p)
    big = ok & (np.abs(t) >= 1.0)
    right = big & (np.sign(p) == np.sign(t))
    wrong = big & ~right
    near = ok & (np.abs(t) <= NEAR_FOCUS_UM)
    e = np.abs(p - t)
    return {
        "planes": len(t),
        "abstained": int((~ok).sum()),
        "mae_um": float(e[ok].mean()) if ok.any() else None,
        # The size alone: what a model can read where no frame tells the sign (an aberration-free
        # objective) and the loop's two-shot test resolves it.
        "magnitude_mae_um": float(np.abs(np.abs(p[ok]) - np.abs(t[ok])).mean()) if ok.any() else None,
        "sign_accuracy_abs_ge_1um": float(right.sum() / max(1, big.sum())),
        "sign_right_planes": int(right.sum()),
        "sign_wrong_planes": int(wrong.sum()),
        "uncertain_where_right": float(u[right].mean()) if right.any() else None,
        "uncertain_where_wrong": float(u[wrong].mean()) if wrong.any() else None,
        # Sign accuracy over the planes the model is sure of.
        "sign_accuracy_when_sure": float(right[~u].sum() / max(1, big[~u].sum())),
        "near_focus_planes": int(near.sum()),
        "near_focus_mae_um": float(e[near].mean()) if near.any() else None,
        "near_focus_q95_um": float(np.quantile(e[near], 0.95)) if near.any() else None,
    }


def model_alone_by_reference(
    recs: list[Any], model: Any, references: dict[str, list[Any]], max_abs_um: float = 8.0
) -> dict[str, dict[str, Any]]:
    """The model alone on every tissue field, scored against each reference "in focus" at once.

    ``references``: name -> per recording, each field's in-focus z (µm; NaN: that field has none and is left
    out of that reference's figures). Per reference, the planes within ``max_abs_um`` of the field's focus
    there; defocus, sign and error are relative to it (:func:`alone_scores`). Each plane is estimated once,
    whichever references take it."""
    rows: dict[str, tuple[list[float], list[float], list[bool]]] = {name: ([], [], []) for name in references}
    which: dict[str, list[tuple[int, int]]] = {name: [] for name in references}
    fields = {name: 0 for name in references}
    for r, rec in enumerate(recs):
        for f in np.flatnonzero(_tissue_fields(rec)):
            focus = {name: float(refs[r][f]) for name, refs in references.items()}
            for name, z0 in focus.items():
                fields[name] += bool(np.isfinite(z0))
            for k, z in enumerate(rec.z_um[f]):
                near = [n for n, z0 in focus.items() if np.isfinite(z0) and abs(float(z) - z0) <= max_abs_um]
                if not near:
                    continue
                est = model.estimate(rec.plane(int(f), k))
                for name in near:
                    t, p, u = rows[name]
                    t.append(float(z) - focus[name])
                    p.append(np.nan if est.defocus_um is None else est.defocus_um)
                    u.append(est.sign_uncertain)
                    which[name].append((r, int(f)))
    return {
        name: {
            **alone_scores(*rows[name]),
            "fields": fields[name],
            "per_field": per_field_scores(*rows[name][:2], which[name]),
        }
        for name in references
    }


def per_field_scores(true: Any, pred: Any, which: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Per (recording, field) of ``which`` (one per plane, as ``true`` and ``pred``): planes, MAE and the mean
    signed error near focus (|true| <= ``NEAR_FOCUS_UM``), in the order the fields come. Why: a model-alone MAE
    over a recording can be one content type read with an offset (stop 33: real skin, 3 of 11 scored fields,
    all epidermis, ~1 µm off near focus, the rest 0.2-0.5 µm), which the pooled figures cannot tell from a
    uniform error."""
    t, p = np.asarray(true, np.float64), np.asarray(pred, np.float64)
    out = []
    keys = list(dict.fromkeys(which))
    idx = np.asarray([keys.index(w) for w in which], np.int64)
    for i, (r, f) in enumerate(keys):
        sel = (idx == i) & np.isfinite(p)
        near = sel & (np.abs(t) <= NEAR_FOCUS_UM)
        out.append(
            {
                "recording": r,
                "field": f,
                "planes": int((idx == i).sum()),
                "mae_um": float(np.abs(p[sel] - t[sel]).mean()) if sel.any() else None,
                "near_focus_bias_um": float((p[near] - t[near]).mean()) if near.any() else None,
            }
        )
    return out


def sign_confidence(recs: list[Any], model: Any, max_abs_um: float = 8.0) -> dict[str, Any]:
    """The model alone over |z| <= ``max_abs_um`` of every tissue field (z from the simulator's paraxial
    focus, the truth), with its sign confidence: how often it says "sign uncertain" where its sign is
    right and where it is wrong (|z| >= 1)."""
    truth = {"paraxial": [rec.truth_focus_z_um for rec in recs]}
    return model_alone_by_reference(recs, model, truth, max_abs_um)["paraxial"]


def _sharpest_scores(e: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """Errors against each field's sharpest plane (``e``: the stack label; ``p``: the whole-frame
    Brenner peak, the scan's own measure); fields whose stack has no peak left out."""
    ok, okp = np.isfinite(e), np.isfinite(p)
    return {
        "sharpest_fields": int(ok.sum()),
        "within_half_dof_of_sharpest": float(np.mean(e[ok] <= HALF_DOF_UM)) if ok.any() else None,
        "peak_fields": int(okp.sum()),
        "mae_to_peak_um": float(p[okp].mean()) if okp.any() else None,
        "within_half_dof_of_peak": float(np.mean(p[okp] <= HALF_DOF_UM)) if okp.any() else None,
    }


STEADY_AFTER = 4
"""Fields of each recording (scan order) left out of the steady-state captures per field: a scan's
first near-focus checks are bracketed (the sharpness curve's curvature is not known yet), a fixed
start-up cost that a 12-field recording spreads over few fields and a slide of hundreds over many."""
CAUSES = ("first", "moves", "second_shots", "start_probes", "probes", "sweep")


def capture_breakdown(costs: list[list[Any]], after: int = STEADY_AFTER) -> dict[str, Any]:
    """Captures per field by cause (``runtime.focus.single_shot.CaptureCost``; ``costs``: per recording,
    each field's in scan order) over the whole recordings, and over the fields after the first
    ``after`` of each (the steady state)."""

    def per_field(rows: list[Any]) -> dict[str, float]:
        return {c: float(np.mean([getattr(r, c) for r in rows])) if rows else 0.0 for c in CAUSES}

    every = [c for rec in costs for c in rec]
    later = [c for rec in costs for c in rec[after:]]
    return {
        "per_field": per_field(every),
        "steady_state": {
            "after_fields": after,
            "fields": len(later),
            "captures_per_field": float(np.mean([c.total for c in later])) if later else None,
            "per_field": per_field(later),
        },
    }


def _resolutions(paths: list[Path], model_dir: Path | None, classifier_dir: Path | None = None) -> dict[str, Any]:
    """The scan path with single_shot, counting how each field's sign was resolved and where the
    captures went."""
    from runtime.config import FocusConfig
    from runtime.focus.field import FieldFocuser

    counts: dict[str, int] = {}
    near: dict[str, int] = {}
    trusts: list[dict[str, Any]] = []
    flipped = 0
    errors, sharp_errors, peak_errors, caps, tissue_caps = [], [], [], [], []
    costs: list[list[Any]] = []
    for path in paths:
        rp = _replay(path, model_dir, classifier_dir)
        drv = rp.driver
        focuser = FieldFocuser(FocusConfig(strategy="single_shot"), rp.settings, drv.camera, drv.stage)
        costs.append([])
        for plan in rp.grid.fields:
            drv.stage.move_xy(plan.x_um, plan.y_um)
            r = focuser.focus_field(plan, lambda: False)
            f = drv.stage.field_index()
            key = str(r.sign_resolution)
            counts[key] = counts.get(key, 0) + 1
            if r.near_focus is not None:
                near[r.near_focus] = near.get(r.near_focus, 0) + 1
            flipped += r.sign_flipped
            caps.append(r.captures)
            assert r.cost is not None and r.cost.total == r.captures, (r.cost, r.captures)
            costs[-1].append(r.cost)
            if rp.tissue[f]:
                errors.append(abs(r.z_um - float(rp.truth[f])))
                sharp_errors.append(abs(r.z_um - float(rp.sharpest[f])))
                peak_errors.append(abs(r.z_um - float(rp.peak[f])))
                tissue_caps.append(r.captures)
        t = focuser.near_focus
        if t is not None:  # what the scan's near-focus checks learnt (runtime.focus.near_focus)
            trusts.append(
                {
                    "checks": t.checks,
                    "failures": t.failures,
                    "offset_um": t.offset_um,
                    "curvature": t.curvature,
                    # In-focus frames read this far off with both signs (None: not blind near focus).
                    "blind_um": t.blind_um,
                }
            )
    e = np.asarray(errors)
    return {
        "strategy": "single_shot",
        "tissue_fields": len(e),
        "mae_um": float(e.mean()),
        "within_half_dof": float(np.mean(e <= HALF_DOF_UM)),
        **_sharpest_scores(np.asarray(sharp_errors), np.asarray(peak_errors)),
        "captures_per_field": float(np.mean(caps)),
        "captures_per_tissue_field": float(np.mean(tissue_caps)),
        "sign_resolution": counts,
        # The near-focus sharpness fit (runtime.focus.near_focus): verified / fit / failed fields.
        "near_focus": near,
        "near_focus_trust": trusts,  # per recording
        "fields_with_flipped_convention": flipped,
        "capture_cost": capture_breakdown(costs),
    }


def run_objectives(args: argparse.Namespace) -> int:
    from runtime.devices.recording import Recording
    from runtime.ml.model_folder import builtin_autofocus_dir
    from runtime.ml.tasks import load_models

    model_dir: Path = args.model or builtin_autofocus_dir((args.tile, args.tile))
    af, _, _ = load_models(model_dir, None, "ort_cpu")
    cells: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    matrix = [(o, c) for c in args.contents for o in args.objectives if not (o == "heldout" and c != "synthetic")]
    for name, content in matrix:
        paths = _recordings(args) if name == "heldout" else [_objective_recording(args, name, content)]
        recs = [Recording.open(p) for p in paths]
        alone = sign_confidence(recs, af)
        single = _resolutions(paths, model_dir, args.classifier)
        sweep = scan_path(paths, "contrast_sweep", model_dir, args.classifier)
        cells.append(
            {
                "objective": name,
                "content": content,
                "optics": [r.meta.optics for r in recs],
                "recordings": [str(p) for p in paths],
                "model_alone": alone,
                "scan_path": [single, sweep],
            }
        )
        uw, ur = alone["uncertain_where_wrong"], alone["uncertain_where_right"]
        rows.append(
            {
                "cell": name if content == "synthetic" else f"{name} / {content}",
                "mae": alone["mae_um"],
                "mag": alone["magnitude_mae_um"],
                "sign": 100 * alone["sign_accuracy_abs_ge_1um"],
                "unsure_r": None if ur is None else 100 * ur,
                "unsure_w": None if uw is None else 100 * uw,
                "n": single["tissue_fields"],
                "ss_within": 100 * single["within_half_dof"],
                "ss_caps": single["captures_per_field"],
                "ss_steady": single["capture_cost"]["steady_state"]["captures_per_field"],
                "ss_cost": " ".join(
                    f"{k}:{v:.2f}" for k, v in single["capture_cost"]["per_field"].items() if v and k != "first"
                ),
                "ss_sharp": percent(single["within_half_dof_of_sharpest"]),
                "ss_peak": percent(single["within_half_dof_of_peak"]),
                "sw_within": 100 * sweep["within_half_dof"],
                "sw_sharp": percent(sweep["within_half_dof_of_sharpest"]),
                "sw_peak": percent(sweep["within_half_dof_of_peak"]),
                "sw_caps": sweep["captures_per_field"],
                "near": " ".join(f"{k}:{v}" for k, v in sorted(single["near_focus"].items())),
                "how": " ".join(f"{k}:{v}" for k, v in sorted(single["sign_resolution"].items()))
                + (
                    f" flipped:{single['fields_with_flipped_convention']}"
                    if single["fields_with_flipped_convention"]
                    else ""
                ),
            }
        )
    cols = [
        Column("cell", "objective / content"),
        Column("mae", "model MAE µm |z|<=8", ".3f"),
        Column("mag", "|estimate| MAE µm", ".3f"),
        Column("sign", "sign % |z|>=1", ".1f"),
        Column("unsure_r", "unsure % where right", ".1f"),
        Column("unsure_w", "unsure % where wrong", ".1f"),
        Column("n", "tissue fields"),
        Column("ss_within", "single_shot % ±0.35", ".1f"),
        Column("ss_caps", "single_shot captures/field", ".2f"),
        Column("ss_steady", f"captures/field after {STEADY_AFTER}", ".2f"),
        Column("ss_cost", "captures/field by cause (besides the first)"),
        Column("ss_sharp", "single_shot % ±0.35 of sharpest", ".1f"),
        Column("ss_peak", "single_shot % ±0.35 of Brenner peak", ".1f"),
        Column("sw_within", "sweep % ±0.35", ".1f"),
        Column("sw_caps", "sweep captures/field", ".2f"),
        Column("sw_sharp", "sweep % ±0.35 of sharpest", ".1f"),
        Column("sw_peak", "sweep % ±0.35 of Brenner peak", ".1f"),
        Column("near", "near-focus fit (fields)"),
        Column("how", "sign resolved (fields)"),
    ]
    result = {
        "model": {"path": str(af.folder.path), "onnx_sha256": af.folder.sha256},
        "cells": cells,
        "targets": {"within_half_dof": 0.95, "captures_per_field": 2.0},
    }
    notes = [
        "",
        "% ±0.35: of the simulator's paraxial focus (the truth); of sharpest: of the stack label "
        "(runtime.focus.stack_labels.label_stack, what export calibrate trains on); of Brenner peak: of the "
        "stack's whole-frame ln-Brenner peak (stack_labels.sharpness_peak, the scan's own near-focus measure "
        "and fit). Where the paraxial focus is not where the image is sharpest (strong: 0.6-0.7 µm apart) "
        "the target is scored on the Brenner peak.",
    ]
    emit(result, rows, cols, as_json=args.json, title="autofocus per objective (no calibration)", notes=notes)
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "objectives", None):
        return run_objectives(args)
    from runtime.devices.recording import Recording
    from runtime.ml.model_folder import builtin_autofocus_dir
    from runtime.ml.tasks import load_models

    paths = _recordings(args)
    recs = [Recording.open(p) for p in paths]
    # The model the runtime's builtin choice picks for these frames, unless one is named.
    model_dir: Path = args.model or builtin_autofocus_dir((args.tile, args.tile))
    af, _, _ = load_models(model_dir, None, "ort_cpu")
    acc = model_accuracy(recs, af)
    acc_small = model_accuracy(recs, af, SMALL_FRAME)
    single = scan_path(paths, "single_shot", model_dir, args.classifier)
    sweep = scan_path(paths, "contrast_sweep", model_dir, args.classifier)
    cold = [
        cold_start(paths, "single_shot", model_dir, args.classifier),
        cold_start(paths, "contrast_sweep", model_dir, args.classifier),
    ]
    timing = backend_timing(model_dir, recs[0].plane(0, 20))
    meta = af.folder.meta
    result = {
        "recordings": [str(p) for p in paths],
        "model": {
            "path": str(af.folder.path),
            "onnx_sha256": af.folder.sha256,
            "macs_per_crop": meta.get("training", {}).get("macs_per_crop"),
        },
        "single_shot_estimate": acc,
        f"single_shot_estimate_{SMALL_FRAME}px": acc_small,
        "scan_path": [single, sweep],
        "cold_start": cold,
        "inference": timing,
        "targets": {"mae_um": 0.25, "within_half_dof": 0.95, "captures_per_field": 1.2},
    }
    rows = [
        {
            "what": "model estimate, every plane |z|<=10",
            "n": acc["planes"],
            "mae": acc["mae_um"],
            "within": 100 * acc["within_half_dof"],
            "sign": 100 * acc["sign_accuracy_abs_ge_1um"],
        },
        {
            "what": f"model estimate, centre {SMALL_FRAME} px of each plane",
            "n": acc_small["planes"],
            "mae": acc_small["mae_um"],
            "within": 100 * acc_small["within_half_dof"],
            "sign": 100 * acc_small["sign_accuracy_abs_ge_1um"],
        },
    ]
    for s in (single, sweep):
        rows.append(
            {
                "what": f"scan path: {s['strategy']}",
                "n": s["tissue_fields"],
                "mae": s["mae_um"],
                "within": 100 * s["within_half_dof"],
                "caps": s["captures_per_field"],
                "caps_t": s["captures_per_tissue_field"],
            }
        )
    for s in cold:
        rows.append(
            {
                "what": f"cold start ±10 µm: {s['strategy']}",
                "n": s["focus_runs"],
                "mae": s["mae_um"],
                "within": 100 * s["within_half_dof"],
                "caps": s["captures_per_field"],
                "caps_t": s["captures_per_field"],
            }
        )
    cols = [
        Column("what", ""),
        Column("n", "n"),
        Column("mae", "MAE µm", ".3f"),
        Column("within", "% ±0.35 µm", ".1f"),
        Column("sign", "sign % (|z|>=1)", ".1f"),
        Column("caps", "captures/field", ".2f"),
        Column("caps_t", "captures/tissue field", ".2f"),
    ]
    notes = (
        [""]
        + [
            f"inference {r['backend']}: "
            + (
                f"{r['infer_ms_per_tile']:.2f} ms/tile ({r['crops_per_tile']} crops) "
                f"+ preprocessing {r['preprocess_ms_per_tile']:.2f} ms"
                if r["status"] == "ok"
                else r["status"]
            )
            for r in timing
        ]
        + [
            f"abstained (no content) on {acc['abstained']} of {acc['planes']} tissue planes; "
            f"MAE for |z|<=2 µm: {acc['mae_abs_defocus_le_2um']:.3f} µm; by |z| (µm): "
            + ", ".join(f"{k}: {v:.2f}" for k, v in acc["mae_by_abs_defocus_um"].items())
            + f" ({SMALL_FRAME} px: "
            + ", ".join(f"{v:.2f}" for v in acc_small["mae_by_abs_defocus_um"].values())
            + "); by recording (objective): "
            + ", ".join(f"seed {h['seed']}: {v:.3f}" for h, v in zip(HELDOUT, acc["mae_by_recording_um"], strict=False))
            + "; "
            f"replay clamps (z outside the recorded stack): single {single['clamped_snaps']}, "
            f"sweep {sweep['clamped_snaps']}"
        ]
        + [
            f"cold start {s['strategy']} by |start defocus| (µm): "
            + ", ".join(
                f"{k}: MAE {v['mae_um']:.2f}, {100 * v['within_half_dof']:.0f}% within, {v['captures']:.1f} captures"
                for k, v in s["by_abs_start_um"].items()
            )
            + f"; sweep fallbacks {s['sweep_fallbacks']}"
            for s in cold
        ]
    )
    emit(
        result,
        rows,
        cols,
        as_json=args.json,
        title="autofocus on held-out recordings " + ", ".join(p.name for p in paths),
        notes=notes,
    )
    return 0
