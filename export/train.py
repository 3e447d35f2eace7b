"""Training loops for the autofocus regressor and the tile classifier (CPU, reproducible by seed).

Data come from :mod:`export.datasets` (rendered once, cached as .npz under
``--data``). Accuracy figures are computed on the ``heldout`` split: slide
seeds and objectives never used for training or model selection.
"""

from __future__ import annotations

import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.datasets import (
    AUTOFOCUS_DATA,
    AUTOFOCUS_V2_DATA,
    CLASSES,
    CLASSIFIER_DATA,
    EXTRA_TRAIN_SPLITS,
    autofocus_data,
    cached,
    classifier_data,
)
from export.models import AutofocusNet, TileClassifier, count_macs
from runtime.ml.preprocess import AutofocusPreprocess

HALF_DOF_UM = 0.35


def seed_everything(seed: int, threads: int = 2) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Flips and transposes: the optics are rotationally symmetric, the tissue has no orientation.
    (The Fourier channel transforms the same way, up to a one-pixel shift of the DC term.)"""
    if torch.rand(1, generator=g).item() < 0.5:
        x = x.flip(3)
    if torch.rand(1, generator=g).item() < 0.5:
        x = x.flip(2)
    if torch.rand(1, generator=g).item() < 0.5:
        x = x.transpose(2, 3)
    return x


def _data(kind: str, split: str, data_dir: Path, seed: int, workers: int, wide: int = 0) -> dict[str, Any]:
    """``wide`` > 0: the autofocus v2 data (512-px tiles, inputs with the wide window)."""
    if kind == "autofocus":
        name = f"autofocus_v2w{wide}" if wide else "autofocus"
        return cached(
            data_dir / f"{name}-{split}-seed{seed}.npz", lambda: autofocus_data(split, seed, workers=workers, wide=wide)
        )
    return cached(data_dir / f"{kind}-{split}-seed{seed}.npz", lambda: classifier_data(split, seed, workers=workers))


class StackedRows:
    """Rows of several arrays indexed as if stacked, without the stacked copy: the autofocus fine-tune
    with every content set holds 11 GB of float16 inputs, and ``np.concatenate`` needs twice that at
    once (more than a 24 GB machine has). ``rows[idx]`` gathers the rows at positions ``idx`` in order."""

    def __init__(self, parts: list[torch.Tensor]) -> None:
        self.parts = parts
        # on the parts' device: the batch indices are there too (training with --device cuda)
        self.starts = torch.tensor(np.cumsum([0] + [len(p) for p in parts]), dtype=torch.int64, device=parts[0].device)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        part = torch.bucketize(idx, self.starts[1:], right=True)
        out = torch.empty((len(idx), *self.parts[0].shape[1:]), dtype=self.parts[0].dtype, device=self.parts[0].device)
        for k, p in enumerate(self.parts):
            sel = part == k
            if bool(sel.any()):
                out[sel] = p[idx[sel] - self.starts[k]]
        return out


def _concat(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A training set with another split's samples appended (the keys training reads)."""
    return {k: np.concatenate([a[k], b[k]]) for k in keys}


# --------------------------------------------------------------------------- autofocus


def predict_autofocus_all(
    model: nn.Module, x: np.ndarray, batch: int = 512, device: str = "cpu"
) -> dict[str, np.ndarray]:
    """Per crop, in eval mode: ``defocus`` (µm), ``content`` (probability) and, for a model with
    the magnitude head, ``magnitude`` (|defocus| µm)."""
    model.eval()
    outs: dict[str, list[np.ndarray]] = {"defocus": [], "content": [], "magnitude": []}
    with torch.no_grad():
        for i in range(0, len(x), batch):
            y = model(torch.from_numpy(np.asarray(x[i : i + batch], np.float32)).to(device))
            outs["defocus"].append(y[0].float().cpu().numpy())
            outs["content"].append(torch.sigmoid(y[1]).float().cpu().numpy())
            if len(y) > 2:
                outs["magnitude"].append(y[2].float().cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in outs.items()}


def predict_autofocus(
    model: nn.Module, x: np.ndarray, batch: int = 512, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(defocus µm, content probability) per crop, in eval mode."""
    p = predict_autofocus_all(model, x, batch, device)
    return p["defocus"], p["content"]


def aggregate_tiles(
    defocus_true: np.ndarray, field: np.ndarray, pred: np.ndarray, content_p: np.ndarray
) -> dict[str, np.ndarray]:
    """Per tile (crops of one capture share field id and defocus): median prediction over the
    crops the model calls content; tiles with no such crop abstain (NaN)."""
    keys = np.stack([field.astype(np.float64), defocus_true.astype(np.float64)], 1)
    uniq, inv = np.unique(keys, axis=0, return_inverse=True)
    inv = inv.ravel()
    out_pred = np.full(len(uniq), np.nan)
    for t in range(len(uniq)):
        sel = (inv == t) & (content_p > 0.5)
        if sel.any():
            out_pred[t] = float(np.median(pred[sel]))
    return {"true": uniq[:, 1], "pred": out_pred}


NEAR_FOCUS_UM = 2.0  # autofocus_metrics' mae_near_focus_um: the tiles within this of focus


def autofocus_metrics(true: np.ndarray, pred: np.ndarray, max_abs_um: float = 10.0) -> dict[str, float]:
    ok = np.isfinite(pred) & (np.abs(true) <= max_abs_um)
    err = np.abs(pred[ok] - true[ok])
    big = ok & (np.abs(true) >= 1.0)
    near = ok & (np.abs(true) <= NEAR_FOCUS_UM)
    return {
        "tiles": int(ok.sum()),
        "abstained": int((~np.isfinite(pred) & (np.abs(true) <= max_abs_um)).sum()),
        "mae_um": float(err.mean()),
        "median_abs_error_um": float(np.median(err)),
        "within_half_dof": float(np.mean(err <= HALF_DOF_UM)),
        "mae_near_focus_um": float(np.abs(pred[near] - true[near]).mean()) if near.any() else float("nan"),
        "sign_accuracy_abs_ge_1um": float(np.mean(np.sign(pred[big]) == np.sign(true[big]))) if big.any() else 0.0,
    }


def magnitude_metrics(true: np.ndarray, magnitude: np.ndarray, max_abs_um: float = 10.0) -> dict[str, float]:
    """The magnitude head per tile against |true defocus|."""
    ok = np.isfinite(magnitude) & (np.abs(true) <= max_abs_um)
    err = np.abs(np.abs(magnitude[ok]) - np.abs(true[ok]))
    return {
        "tiles": int(ok.sum()),
        "mae_um": float(err.mean()) if ok.any() else float("nan"),
        "within_half_dof": float(np.mean(err <= HALF_DOF_UM)) if ok.any() else 0.0,
    }


def content_heldout_metrics(model: nn.Module, held: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """Held-out wider content (``heldout_content``): the signed estimate on objectives of the
    training sign, the magnitude on every objective."""
    p = predict_autofocus_all(model, held["x"], device=device)
    sk = held["sign_known"] > 0.5
    out: dict[str, Any] = {}
    t = aggregate_tiles(held["defocus_um"][sk], held["field"][sk], p["defocus"][sk], p["content"][sk])
    out["signed_training_sign_objectives"] = autofocus_metrics(t["true"], t["pred"])
    if len(p["magnitude"]):
        for name, sel in (("all", np.ones_like(sk)), ("unknown_sign_objectives", ~sk)):
            if sel.any():
                m = aggregate_tiles(held["defocus_um"][sel], held["field"][sel], p["magnitude"][sel], p["content"][sel])
                out[f"magnitude_{name}"] = magnitude_metrics(m["true"], m["pred"])
    return out


def _sign_known(d: dict[str, Any]) -> dict[str, Any]:
    """Data rendered before the objective families existed: every objective had the training sign."""
    if "sign_known" not in d:
        d = {**d, "sign_known": np.ones(len(d["defocus_um"]), np.float32)}
    return d


def _load_init(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's weights; a two-output head fills the first rows of a three-output one
    (the magnitude row keeps its fresh initialisation)."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape and key.startswith("head.3"):
            merged = own[key].clone()
            merged[: value.shape[0]] = value
            state = {**state, key: merged}
    model.load_state_dict(state)


def _recover_init_folder(
    folder_dir: Path, magnitude: bool, input_shape: tuple[int, ...]
) -> tuple[AutofocusNet, dict[str, Any]]:
    """The torch model of an autofocus model folder, for fine-tuning, and what model.json records of it."""
    from export.calibrate import recover_autofocus
    from runtime.ml.model_folder import load_model_folder

    folder = load_model_folder(folder_dir, "autofocus")
    if tuple(folder.input_shape) != tuple(input_shape):
        raise ValueError(
            f"{folder_dir}: input {tuple(folder.input_shape)}, this training makes {tuple(input_shape)} (--wide)"
        )
    model = recover_autofocus(folder)
    if model.magnitude != magnitude:
        raise ValueError(
            f"{folder_dir}: magnitude head {'present' if model.magnitude else 'absent'}; --content "
            f"{'adds' if magnitude else 'is what keeps'} it: train with the content flag the folder was trained with"
        )
    meta = {
        "folder": str(folder_dir),
        "onnx_sha256": folder.sha256,
        "commands": folder.meta.get("training", {}).get("commands", []),
    }
    return model, meta


def train_autofocus(
    data_dir: Path,
    out: Path,
    seed: int = 0,
    epochs: int = 14,
    batch: int = 128,
    lr: float = 3e-3,
    workers: int = 2,
    init: Path | None = None,
    far: bool = False,
    wide: int = 0,
    edge: bool = False,
    small: bool = False,
    optics: bool = False,
    content: bool = False,
    device: str = "cpu",
    tissue: bool = False,
    command: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """``init``: fine-tune from this checkpoint, or from an autofocus model folder (its weights recovered
    from the ONNX graph, :func:`export.calibrate.recover_autofocus`; BatchNorm stays folded);
    ``far``: add the far-from-focus set (``train_far``);
    ``wide`` > 0: the v2 model (``autofocus_v2`` input with a ``wide``-px window, 512-px tiles);
    ``edge`` (v2 only): add ``train_edge``, |defocus| 7-12.5 µm, past the range the model is used on;
    ``small`` (v2 only): add ``train_small``, 256-px frames (wide window mirror-padded);
    ``optics`` (v2 only): add ``train_optics``, 64 more objectives (aberration draws), |defocus| 2-12.5 µm;
    ``content`` (v2 only): add ``train_content`` (export.content_mix: stains, textures, photographs,
    objectives of every family) and the magnitude head; ``tissue`` (with ``content``): add
    ``train_tissue``, fields of the real training tissue images (export.content_mix.TRAINING_TISSUE);
    ``command``: the command line, recorded in the result; ``device``: a torch device ("cuda" trains
    on a GPU; the data are rendered on the CPU either way).

    After every epoch the run's state (weights, optimiser, schedule, random streams, history) is
    written to ``<out>.partial`` (:func:`epoch_state_path`), replaced atomically and removed when the
    checkpoint is written. ``resume``: continue from that file where an earlier run of the same
    plan stopped (a lease that ran out, a killed job); the result is the one an uninterrupted run
    gives. A ``.partial`` of another plan is refused with a ValueError naming what differs."""
    if (edge or small or optics or content or tissue) and not wide:
        raise ValueError(
            "the train_edge, train_small, train_optics, train_content and train_tissue sets exist for the v2 model "
            "only (give wide)"
        )
    if tissue and not content:
        raise ValueError("train_tissue needs the wider content's objectives and magnitude head (give content)")
    seed_everything(seed)
    t0 = time.time()
    pre = AutofocusPreprocess(wide=wide)
    train = _sign_known(_data("autofocus", "train", data_dir, seed, workers, wide))
    x_parts = [train.pop("x")]
    splits = ["train"]
    wanted = {"far": far, "edge": edge, "small": small, "optics": optics, "content": content, "tissue": tissue}
    for split, flag in EXTRA_TRAIN_SPLITS.items():  # a fixed order: the same flags give the same data
        if wanted.get(flag):
            extra = _sign_known(_data("autofocus", split, data_dir, seed, workers, wide))
            x_parts.append(extra.pop("x"))  # stacked lazily (StackedRows): no second copy of the inputs
            train = _concat(train, extra, ("defocus_um", "content", "sign_known"))
            splits.append(split)
    val = _data("autofocus", "val", data_dir, seed, workers, wide)
    held = _data("autofocus", "heldout", data_dir, seed, workers, wide)
    held_content = _data("autofocus", "heldout_content", data_dir, seed, workers, wide) if content else None
    data_s = time.time() - t0
    model = AutofocusNet(in_ch=pre.input_shape[0], magnitude=content)
    init_result: dict[str, Any] | None = None
    init_folder: dict[str, Any] | None = None
    if init is not None and Path(init).is_dir():
        model, init_folder = _recover_init_folder(Path(init), content, pre.input_shape)
    elif init is not None:
        ckpt = torch.load(init, map_location="cpu", weights_only=False)
        _load_init(model, ckpt["state_dict"])
        init_result = {k: ckpt["result"][k] for k in ("seed", "epochs", "lr", "train_samples", "train_seconds")}
        init_result.update({k: ckpt["result"][k] for k in ("train_splits", "wide") if k in ckpt["result"]})
        init_result["checkpoint"] = Path(init).name
    model.to(device)
    x = StackedRows([torch.from_numpy(p).to(device) for p in x_parts])  # float16, converted per batch
    del x_parts
    d = torch.from_numpy(train["defocus_um"]).to(device)
    c = torch.from_numpy(train["content"]).to(device)
    sk = torch.from_numpy(train["sign_known"]).to(device)
    n = len(x)
    steps = epochs * (n // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    bce = nn.BCEWithLogitsLoss()
    t1 = time.time()
    # What a saved state must match to be resumed (--resume): the arguments that shape the run.
    plan = dict(seed=seed, epochs=epochs, batch=batch, lr=lr, splits=splits, n=n, init=init)
    plan.update(wide=wide, magnitude=content)
    state_path, first, history = _start_epochs(out, plan, resume, model, opt, sched, g, device)
    for epoch in range(first, epochs):
        model.train()
        if init_folder is not None:  # folded BatchNorm: keep the identity statistics
            for mod in model.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.eval()
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(n // batch):
            idx = perm[i * batch : (i + 1) * batch].to(device)
            xb = _augment(x[idx].float(), g)
            y = model(xb)
            pd, pc = y[0], y[1]
            cb, db = c[idx], d[idx]
            # Defocus is only learnable where there is something to see: glass crops train the
            # content head only. Smooth L1 in µm: robust at ±10 µm, L1-like (MAE) beyond 0.2 µm.
            # The signed head learns objectives of the training sign only (no frame tells the sign
            # of the others); the magnitude head learns them all.
            ms = cb * sk[idx]
            reg = (nn.functional.smooth_l1_loss(pd, db, beta=0.2, reduction="none") * ms).sum() / ms.sum().clamp(min=1)
            loss = reg + 0.5 * bce(pc, cb)
            if len(y) > 2:
                mag = nn.functional.smooth_l1_loss(y[2], db.abs(), beta=0.2, reduction="none") * cb
                loss = loss + mag.sum() / cb.sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        vp, vc = predict_autofocus(model, val["x"], device=device)
        vt = aggregate_tiles(val["defocus_um"], val["field"], vp, vc)
        vm = autofocus_metrics(vt["true"], vt["pred"])
        history.append({"epoch": epoch, "loss": total / (n // batch), **{f"val_{k}": v for k, v in vm.items()}})
        print(json.dumps(history[-1]), flush=True)
        _save_epoch_state(state_path, plan, epoch, history, model, opt, sched, g)
    train_s = time.time() - t1
    hp, hc = predict_autofocus(model, held["x"], device=device)
    ht = aggregate_tiles(held["defocus_um"], held["field"], hp, hc)
    metrics: dict[str, Any] = dict(autofocus_metrics(ht["true"], ht["pred"]))
    content_acc = float(np.mean((hc > 0.5) == (held["content"] > 0.5)))
    if held_content is not None:
        metrics["heldout_content"] = content_heldout_metrics(model, held_content, device)
    result = {
        "kind": "autofocus",
        "seed": seed,
        "epochs": epochs,
        "batch": batch,
        "lr": lr,
        "train_samples": n,
        "train_splits": splits,
        "wide": wide,
        "init": init_result,
        "data": {s: vars(spec) for s, spec in (AUTOFOCUS_V2_DATA if wide else AUTOFOCUS_DATA).items()},
        "heldout_optics": held["optics"],
        "heldout_metrics": {**metrics, "content_crop_accuracy": content_acc},
        "history": history,
        "data_seconds": round(data_s, 1),
        "train_seconds": round(train_s, 1),
        "resumed_after_epoch": first - 1 if first else None,
        "macs_per_crop": count_macs(model.cpu(), pre.input_shape),
        "machine": f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}".strip()
        + (f" {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""),
        "magnitude_head": content,
    }
    if init_folder is not None:
        result["init_folder"] = init_folder
    if command:
        result["command"] = command
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "arch": "AutofocusNet",
            "preprocess": pre.to_dict(),
            "magnitude": content,
            "result": result,
        },
        out,
    )
    state_path.unlink(missing_ok=True)
    return result


def epoch_state_path(out: Path) -> Path:
    """Where a training run keeps its state between epochs: ``<out>.partial`` beside the checkpoint."""
    return out.with_name(out.name + ".partial")


def _save_epoch_state(
    path: Path,
    plan: dict[str, Any],
    epoch: int,
    history: list[dict[str, Any]],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    g: torch.Generator,
) -> None:
    """Everything the next epoch depends on, written whole or not at all (tmp file + rename)."""
    state = {
        "plan": plan,
        "epoch": epoch,
        "history": history,
        "state_dict": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": g.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _start_epochs(
    out: Path,
    plan: dict[str, Any],
    resume: bool,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    g: torch.Generator,
    device: str,
) -> tuple[Path, int, list[dict[str, Any]]]:
    """Where the run keeps its state, the first epoch to train and the history so far: from the state an
    earlier run of the same ``plan`` left (``resume``), else epoch 0 and none."""
    state_path = epoch_state_path(out)
    if not (resume and state_path.exists()):
        return state_path, 0, []
    first, history = _restore_epoch_state(state_path, plan, model, opt, sched, g, device)
    print(f"resumed from {state_path} after epoch {first - 1}", flush=True)
    return state_path, first, history


def _restore_epoch_state(
    path: Path,
    plan: dict[str, Any],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    g: torch.Generator,
    device: str,
) -> tuple[int, list[dict[str, Any]]]:
    """Load ``path`` into the run; returns the first epoch still to train and the history so far."""
    state = torch.load(path, map_location=device, weights_only=False)
    # Paths compared as text (an --init checkpoint or folder): the saved plan is the trainer's own dict.
    plan, saved = ({k: str(v) if isinstance(v, Path) else v for k, v in d.items()} for d in (plan, state["plan"]))
    differ = [
        f"{k} {saved.get(k)!r} != {plan.get(k)!r}"
        for k in sorted(plan.keys() | saved.keys())
        if plan.get(k) != saved.get(k)
    ]
    if differ:
        raise ValueError(
            f"{path}: saved by a run of other arguments ({'; '.join(differ)}); "
            "give the same ones, or delete it to start over"
        )
    model.load_state_dict(state["state_dict"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    g.set_state(state["generator"].cpu())
    torch.set_rng_state(state["torch_rng"].cpu())
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    return int(state["epoch"]) + 1, list(state["history"])


# --------------------------------------------------------------------------- classifier


def predict_classifier(model: nn.Module, x: np.ndarray, batch: int = 512, device: str = "cpu") -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits, _ = model(torch.from_numpy(np.asarray(x[i : i + batch], np.float32)).to(device))
            out.append(torch.softmax(logits, 1).float().cpu().numpy())
    return np.concatenate(out)


def classification_report(true: np.ndarray, pred: np.ndarray, classes: tuple[str, ...] = CLASSES) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for k, name in enumerate(classes):
        tp = int(np.sum((pred == k) & (true == k)))
        fp = int(np.sum((pred == k) & (true != k)))
        fn = int(np.sum((pred != k) & (true == k)))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        per[name] = {
            "precision": p,
            "recall": r,
            "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "support": int(np.sum(true == k)),
        }
    return {"accuracy": float(np.mean(pred == true)), "per_class": per}


def tissue_vs_glass_f1(true: np.ndarray, pred: np.ndarray) -> float:
    """Tissue (or artifact on tissue) vs glass, on tiles whose truth is background or tissue."""
    sel = true != 2
    t, p = true[sel] == 1, pred[sel] == 1
    tp, fp, fn = np.sum(t & p), np.sum(~t & p), np.sum(t & ~p)
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def train_classifier(
    data_dir: Path,
    out: Path,
    seed: int = 0,
    epochs: int = 30,
    batch: int = 64,
    lr: float = 3e-3,
    workers: int = 2,
    hard: bool = False,
    content: bool = False,
    device: str = "cpu",
    init: Path | None = None,
    extra_splits: tuple[str, ...] = (),
    command: str | None = None,
    threads: int = 2,
    resume: bool = False,
) -> dict[str, Any]:
    """``hard``: add the faint-stain / tinted-glass training set (``train_hard``); the held-out
    metrics then cover ``heldout_hard`` as well. ``content``: add ``train_content`` (tissue in
    random stains, textures and photographs, export.content_mix) and report ``heldout_content``.
    ``device``: a torch device ("cuda" trains on a GPU). ``extra_splits``: more ``CLASSIFIER_DATA``
    training splits (``train_artifacts``, ``train_folds``, ...). ``init``: a classifier model folder
    to fine-tune every layer of (weights recovered from its ONNX, whose BatchNorm is folded into the
    convolutions: the BatchNorm layers stay the identity, in eval mode, their affine part trained).
    ``command``: recorded as the command that made the checkpoint. ``threads``: torch CPU threads.
    ``resume``: continue from ``<out>.partial`` as :func:`train_autofocus` does (state after every epoch)."""
    seed_everything(seed, threads)
    t0 = time.time()
    train = _data("classifier", "train", data_dir, seed, workers)
    splits = ["train"]
    flagged = [s for s, flag in (("train_hard", hard), ("train_content", content)) if flag]
    for split in [*flagged, *(s for s in extra_splits if s not in flagged)]:
        if split not in CLASSIFIER_DATA or not split.startswith("train") or split in splits:
            raise ValueError(f"not a classifier training split (or given twice): {split!r}")
        extra = _data("classifier", split, data_dir, seed, workers)
        train = _concat(train, extra, ("x", "label"))
        splits.append(split)
    val = _data("classifier", "val", data_dir, seed, workers)
    held = _data("classifier", "heldout", data_dir, seed, workers)
    held_extra = {
        name: _data("classifier", name, data_dir, seed, workers)
        for name, flag in (("heldout_hard", hard), ("heldout_content", content))
        if flag
    }
    data_s = time.time() - t0
    init_meta: dict[str, Any] | None = None
    if init is not None:
        from export.classifier_finetune import load_onnx_classifier
        from runtime.ml.model_folder import load_model_folder

        model = load_onnx_classifier(init).to(device)
        folder = load_model_folder(init, "classifier")
        init_meta = {
            "folder": str(init),
            "onnx_sha256": folder.sha256,
            "commands": folder.meta.get("training", {}).get("commands", []),
        }
    else:
        model = TileClassifier().to(device)
    x = torch.from_numpy(train["x"]).to(device)
    y = torch.from_numpy(train["label"]).to(device)
    n = len(x)
    # Classes are unbalanced (artifacts are rare): weight the loss by inverse frequency.
    freq = np.bincount(train["label"], minlength=len(CLASSES)).astype(np.float64)
    weight = torch.tensor(freq.sum() / np.maximum(freq, 1) / len(CLASSES), dtype=torch.float32, device=device)
    steps = epochs * (n // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    ce = nn.CrossEntropyLoss(weight=weight)
    t1 = time.time()
    plan = dict(seed=seed, epochs=epochs, batch=batch, lr=lr, splits=splits, n=n, init=init)
    state_path, first, history = _start_epochs(out, plan, resume, model, opt, sched, g, device)
    for epoch in range(first, epochs):
        model.train()
        if init is not None:  # folded BatchNorm: keep the identity statistics
            for mod in model.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.eval()
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(n // batch):
            idx = perm[i * batch : (i + 1) * batch].to(device)
            logits, _ = model(_augment(x[idx].float(), g))
            loss = ce(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        vp = predict_classifier(model, val["x"], device=device).argmax(1)
        history.append(
            {"epoch": epoch, "loss": total / (n // batch), "val_accuracy": float(np.mean(vp == val["label"]))}
        )
        print(json.dumps(history[-1]), flush=True)
        _save_epoch_state(state_path, plan, epoch, history, model, opt, sched, g)
    train_s = time.time() - t1
    hp = predict_classifier(model, held["x"], device=device).argmax(1)
    rep = classification_report(held["label"], hp)
    result = {
        "kind": "classifier",
        "seed": seed,
        "epochs": epochs,
        "batch": batch,
        "lr": lr,
        "train_samples": n,
        "train_per_class": freq.astype(int).tolist(),
        "data": {s: vars(CLASSIFIER_DATA[s]) for s in CLASSIFIER_DATA},
        "heldout_optics": held["optics"],
        "train_splits": splits,
        "heldout_metrics": {**rep, "tissue_vs_glass_f1": tissue_vs_glass_f1(held["label"], hp)},
        "history": history,
        "data_seconds": round(data_s, 1),
        "train_seconds": round(train_s, 1),
        "resumed_after_epoch": first - 1 if first else None,
        "macs_per_window": count_macs(model.cpu(), (3, 64, 64)),
    }
    if init_meta is not None:
        result["init_folder"] = init_meta
    if command is not None:
        result["command"] = command
    model.to(device)
    for name, h in held_extra.items():
        hh = predict_classifier(model, h["x"], device=device).argmax(1)
        rep_h = classification_report(h["label"], hh)
        result[f"{name}_metrics"] = {**rep_h, "tissue_vs_glass_f1": tissue_vs_glass_f1(h["label"], hh)}
    model.cpu()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "arch": "TileClassifier", "result": result}, out)
    state_path.unlink(missing_ok=True)
    return result
