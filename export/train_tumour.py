"""The tumour patch classifier: 64-px RGB patches at 1 µm/px -> tumour probability + a 32-d embedding.

**Data** (:mod:`export.analysis_data`): the grid patches of small synthetic slides with lesions
and mimics; the target of a patch is its tumour fraction (soft binary cross-entropy), so patches
cut by a lesion edge teach the boundary instead of being forced to one side. Patches are
re-balanced per epoch: every patch touching a lesion or a mimic, and as many plain benign
patches again, drawn afresh each epoch, plus negatives that are not tissue at all (textures
and photographs of :mod:`export.content_mix`: without them the model called 100% of brick
and 2/3 of the textures tumour). Every 10th training slide is in the validation set
(reported per epoch; no model selection); after training the logit is shifted to fit the
validation slides' prevalence (:func:`calibrate`). Held-out slides (seeds 900000+) and held-out
content (:mod:`export.analysis_unseen`) are scored once at the end.

**Model** (:class:`TumourNet`): five conv/BN/ReLU blocks (64 -> 8 px), mean and max pooling,
a 32-d ReLU embedding and one logit from it. The embedding is the slide model's input: the
tumour evidence is linear in it. ~7.5 M multiply-accumulates per patch, 74 k parameters (300 KB of ONNX).
Augmentation: random 48-px crops, the eight flips/transposes and a per-patch colour gain and
offset (stain and white balance vary between labs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import nn

from export.analysis_data import (
    SLIDE_UM,
    TUMOUR_PIXEL_UM,
    TUMOUR_PX,
    benign_grids,
    cached,
    seed_ranges,
    slide_grids,
    small_lesion_grids,
)
from export.analysis_export import export_analysis_model
from export.analysis_metrics import roc_auc
from export.analysis_unseen import other_content_patches, record_unseen
from export.models import count_macs
from export.train import seed_everything

EMBED_DIM: Final = 32
MEAN, STD = 0.5, 0.25
VAL_SLIDES: Final = 10
SMALL_SHARE: Final = 0.8  # small-lesion training slides (analysis_data.small_lesion_grids) per ordinary one
FINE_TUNE_LR: Final = 1e-3  # the peak learning rate when continuing from a checkpoint (--init)
CROP: Final = 48
PREPROCESS: Final = {"kind": "rgb_patch_v1", "size": TUMOUR_PX, "mean": MEAN, "std": STD}


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TumourNet(nn.Module):
    """(N, 3, 64, 64) standardised RGB -> probability (N,), embedding (N, EMBED_DIM)."""

    def __init__(self, width: int = 16, embed: int = EMBED_DIM) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(3, w, 2),  # 32
            _block(w, 2 * w, 2),  # 16
            _block(2 * w, 2 * w, 1),
            _block(2 * w, 4 * w, 2),  # 8
            _block(4 * w, 4 * w, 1),
        )
        self.embed = nn.Linear(8 * w, embed)
        self.classify = nn.Linear(embed, 1)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        e = torch.relu(self.embed(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)))
        return self.classify(e)[:, 0], e

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit, e = self.logits(x)
        return torch.sigmoid(logit), e


def to_input(patches: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, as the runtime wrapper feeds the ONNX."""
    return np.ascontiguousarray(((patches.astype(np.float32) / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2))


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    k = int(torch.randint(0, 8, (1,), generator=g))
    if k & 1:
        x = x.flip(3)
    if k & 2:
        x = x.flip(2)
    if k & 4:
        x = x.transpose(2, 3)
    n = x.shape[0]
    gain = 1.0 + 0.12 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 2
    offset = 0.15 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 2
    return x * gain + offset


def predict(model: nn.Module, patches: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(probability (N,), embedding (N, D)) of uint8 patches, in torch."""
    model.eval()
    ps, es = [], []
    with torch.no_grad():
        for i in range(0, len(patches), batch):
            p, e = model(torch.from_numpy(to_input(patches[i : i + batch])))
            ps.append(p.numpy())
            es.append(e.numpy())
    if not ps:
        return np.zeros(0, np.float32), np.zeros((0, EMBED_DIM), np.float32)
    return np.concatenate(ps), np.concatenate(es)


def patch_metrics(prob: np.ndarray, d: dict[str, Any]) -> dict[str, Any]:
    """Patch-level figures against the truth fractions: a patch is tumour at >= 50% tumour area."""
    t, m = d["tumour_fraction"], d["mimic_fraction"]
    y = t >= 0.5
    call = prob >= 0.5
    clear = (t <= 0.05) | (t >= 0.95)
    benign = t == 0
    return {
        "patches": len(t),
        "tumour_patches": int(y.sum()),
        "auc": roc_auc(y, prob),
        "auc_clear": roc_auc(y[clear], prob[clear]),
        "accuracy": float(np.mean(call == y)),
        "sensitivity": float(np.mean(call[y])) if y.any() else float("nan"),
        "specificity": float(np.mean(~call[~y])) if (~y).any() else float("nan"),
        "false_positive_rate_benign": float(np.mean(call[benign])) if benign.any() else float("nan"),
        "false_positive_rate_mimic": float(np.mean(call[benign & (m >= 0.5)])) if (benign & (m >= 0.5)).any()
        else float("nan"),
        "mimic_patches": int((benign & (m >= 0.5)).sum()),
    }


def calibrate(model: TumourNet, val: dict[str, Any]) -> float:
    """Shift the logit so that probability 0.5 is the best operating point on the validation slides.

    Training re-balances patches (lesion and mimic patches, then as many plain ones), so the raw
    logit is not calibrated to a slide's prevalence. The shift that maximises the validation F1
    of "tumour patch" (>= 50% tumour area) at probability 0.5 -- what a tumour mask thresholded
    at 0.5 scores on Dice -- is folded into the classifier's bias. (Fitting the cross-entropy to
    the prevalence instead gave -1.45 and a held-out sensitivity of 0.67 at 0.5.)"""
    y = val["tumour_fraction"] >= 0.5
    if int(y.sum()) < 20:
        return 0.0  # too few tumour patches to choose from (tiny test runs)
    model.eval()
    with torch.no_grad():
        logit = torch.cat([model.logits(torch.from_numpy(to_input(val["patches"][i : i + 512])))[0]
                           for i in range(0, len(val["patches"]), 512)])
    lg = logit.numpy()
    shifts = np.arange(-4.0, 4.0, 0.05)
    f1 = []
    for s in shifts:
        call = lg + s >= 0
        tp = int((call & y).sum())
        f1.append(2 * tp / max(1, int(call.sum()) + int(y.sum())))
    best = float(shifts[int(np.argmax(f1))])
    with torch.no_grad():
        model.classify.bias.add_(best)
    return round(best, 3)


def _other(seed: int, images: int) -> dict[str, Any]:
    tex, pho = other_content_patches(np.random.default_rng([seed, 31]), images, images, 20)
    return {"patches": np.concatenate([tex, pho])}


def vesicular_suffix(vesicular_max: float) -> str:
    """The cache-name suffix of a carcinoma look (empty for the default look); the lesion head's window
    cache names its looks the same way (:func:`export.train_lesion_head.cache_name`)."""
    return f"-ves{vesicular_max:g}" if vesicular_max else ""


def look_suffix(size_um: float, vesicular_max: float) -> str:
    """The cache-name suffix of a slide size and carcinoma look (empty for the defaults)."""
    return ("" if size_um == SLIDE_UM else f"-{size_um:g}um") + vesicular_suffix(vesicular_max)


def load_grids(
    data_dir: Path,
    split: str,
    slides: int,
    workers: int = 2,
    size_um: float = SLIDE_UM,
    vesicular_max: float = 0.0,
) -> dict[str, Any]:
    """The cached grids of ``slides`` slides (60% with tumour in training, 50% held out)."""
    share = 0.6 if split == "train" else 0.5
    name = f"grids-{split}-{slides}" + look_suffix(size_um, vesicular_max)
    return cached(
        data_dir / f"{name}.npz", lambda: slide_grids(split, slides, workers, share, size_um, vesicular_max)
    )


def load_training_grids(
    data_dir: Path,
    train_slides: int,
    small_slides: int = 0,
    workers: int = 2,
    size_um: float = SLIDE_UM,
    benign_slides: int = 0,
    vesicular_max: float = 0.0,
    both_looks: bool = False,
) -> dict[str, Any]:
    """The ordinary training grids, then ``small_slides`` small-lesion slide grids
    (:func:`export.analysis_data.small_lesion_grids`) and ``benign_slides`` tumour-free ones
    (:func:`export.analysis_data.benign_grids`), numbered after them (slide ``train_slides`` + i,
    then + ``small_slides`` + i): all training slides (:func:`val_slides_mask` picks validation
    slides among the first ``train_slides`` only). ``vesicular_max``: the carcinoma look of the
    slides with lesions (:func:`export.analysis_data.analysis_slide`). ``both_looks`` (with a
    ``vesicular_max``): every slide twice, in the default look and in that one, under the same slide
    number, so that a validation slide is held out in both looks; the per-slide facts once."""
    if both_looks and vesicular_max:
        args = (data_dir, train_slides, small_slides, workers, size_um, benign_slides)
        plain, drawn = load_training_grids(*args), load_training_grids(*args, vesicular_max=vesicular_max)
        n = len(plain["slide"])
        return {k: np.concatenate([v, drawn[k]]) if len(v) == n else v for k, v in plain.items()}
    grids = load_grids(data_dir, "train", train_slides, workers, size_um, vesicular_max)
    parts, first = [grids], train_slides
    makers: tuple[tuple[str, int, Callable[[], dict[str, Any]]], ...] = (
        ("small", small_slides, partial(small_lesion_grids, small_slides, workers, size_um, vesicular_max)),
        ("benign", benign_slides, partial(benign_grids, benign_slides, workers, size_um)),  # no lesions: no look
    )
    for kind, n, make in makers:
        if n <= 0:
            continue
        look = look_suffix(size_um, vesicular_max if kind == "small" else 0.0)
        extra = cached(data_dir / f"grids-train-{kind}-{n}{look}.npz", make)
        parts.append({**extra, "slide": extra["slide"] + first})
        first += n
    if len(parts) == 1:
        return grids
    return {k: np.concatenate([p[k] for p in parts]) for k in grids}


def val_slides_mask(slide: np.ndarray, train_slides: int, val_slides: int) -> np.ndarray:
    """Which grid rows belong to the validation slides: every k-th training slide (k = train /
    val), so that validation holds slides with and without tumour."""
    k = max(1, train_slides // max(1, val_slides))
    return np.asarray((slide % k == k - 1) & (slide // k < val_slides), bool)


def _subset(d: dict[str, Any], sel: np.ndarray) -> dict[str, Any]:
    n = len(d["slide"])
    return {k: (v[sel] if len(v) == n else v) for k, v in d.items()}


def train_tumour(
    data_dir: Path,
    out: Path,
    seed: int = 0,
    epochs: int = 6,
    batch: int = 128,
    lr: float | None = None,
    train_slides: int = 100,
    heldout_slides: int = 40,
    workers: int = 2,
    width: int = 16,
    val_slides: int = VAL_SLIDES,
    slide_um: float = SLIDE_UM,
    other_content: int = 150,
    init: Path | None = None,
    small_slides: int | None = None,
    vesicular_max: float = 0.0,
    both_looks: bool = False,
) -> dict[str, Any]:
    """Train, score on the held-out slides and write ``out`` (a model folder, parity-checked).
    ``slide_um``: smaller slides (tests). ``other_content``: that many textures and as many
    photographs (export.content_mix) give negatives that are not tissue (0: none).
    ``small_slides``: small-lesion training slides added to the ``train_slides`` ordinary ones
    (default ``SMALL_SHARE`` x ``train_slides``).
    ``lr``: peak learning rate (default 4e-3 from scratch, ``FINE_TUNE_LR`` from ``init``).
    ``vesicular_max``: the training slides' carcinoma look (:attr:`hw_sim.slide.SlideSpec.vesicular_max`;
    each lesion draws its own degree up to it); the held-out figures are scored on the default
    look and, when it is > 0, also on held-out slides of that look (``heldout_vesicular``).
    ``both_looks``: train on every slide in both looks (:func:`load_training_grids`)."""
    seed_everything(seed)
    both_looks = both_looks and bool(vesicular_max)  # without a second look there is one look
    if lr is None:
        lr = 4e-3 if init is None else FINE_TUNE_LR
    if small_slides is None:
        small_slides = round(SMALL_SHARE * train_slides)
    t0 = time.time()
    grids = load_training_grids(
        data_dir, train_slides, small_slides, workers, slide_um, vesicular_max=vesicular_max, both_looks=both_looks
    )
    held = load_grids(data_dir, "heldout", heldout_slides, workers, slide_um)
    held_ves = None
    if vesicular_max:
        held_ves = load_grids(data_dir, "heldout", heldout_slides, workers, slide_um, vesicular_max)
    data_s = time.time() - t0
    is_val = val_slides_mask(grids["slide"], train_slides, val_slides)
    val, train = _subset(grids, is_val), _subset(grids, ~is_val)
    t_f, m_f = train["tumour_fraction"], train["mimic_fraction"]
    special = np.flatnonzero((t_f > 0) | (m_f > 0))
    plain = np.flatnonzero((t_f == 0) & (m_f == 0))
    patches, labels = train["patches"], t_f.astype(np.float32)
    other = np.zeros(0, np.int64)
    if other_content:
        o = cached(data_dir / f"other-content-seed{seed}-{other_content}.npz", lambda: _other(seed, other_content))
        other = len(patches) + np.arange(len(o["patches"]))
        patches = np.concatenate([patches, o["patches"]])
        labels = np.concatenate([labels, np.zeros(len(o["patches"]), np.float32)])
    x_all = torch.from_numpy(patches)  # uint8 NHWC; converted per batch
    y_all = torch.from_numpy(labels)
    model = TumourNet(width)
    init_result = None
    if init is not None:  # continue from a checkpoint (epochs 0: only re-calibrate and re-export)
        ck = torch.load(init, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["state_dict"])
        init_result = {k: v for k, v in ck["result"].items() if k not in ("history", "validation")}
    rng = np.random.default_rng(seed)
    n_other = min(len(other), len(special) // 2)
    per_epoch = len(special) + min(len(plain), len(special)) + n_other
    steps = epochs * (per_epoch // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(10, steps), pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    bce = nn.BCEWithLogitsLoss()
    history = []
    t1 = time.time()
    for epoch in range(epochs):
        model.train()
        idx = np.concatenate([
            special,
            rng.choice(plain, min(len(plain), len(special)), replace=False),
            rng.choice(other, n_other, replace=False),
        ])
        rng.shuffle(idx)
        total = 0.0
        for i in range(per_epoch // batch):
            b = torch.from_numpy(idx[i * batch : (i + 1) * batch])
            # A random 48-px crop: half the compute of 64 px, and the position of the evidence varies
            # (the network is convolutional with global pooling: it runs on 64 px at inference).
            oy, ox = (int(v) for v in torch.randint(0, TUMOUR_PX - CROP + 1, (2,), generator=g))
            x = (x_all[b, oy : oy + CROP, ox : ox + CROP].permute(0, 3, 1, 2).float() / 255.0 - MEAN) / STD
            logit, _ = model.logits(_augment(x, g))
            loss = bce(logit, y_all[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        vp, _ = predict(model, val["patches"])
        vm = patch_metrics(vp, val)  # validation: a report per epoch, no model selection
        history.append({"epoch": epoch, "loss": total / max(1, per_epoch // batch), "val_auc": vm["auc"],
                        "val_accuracy": vm["accuracy"], "seconds": round(time.time() - t1, 1)})
        print(json.dumps(history[-1]), flush=True)
    train_s = time.time() - t1
    shift = calibrate(model, val)
    vm = patch_metrics(predict(model, val["patches"])[0], val)
    hp, _ = predict(model, held["patches"])
    metrics = patch_metrics(hp, held)
    metrics["heldout_slide_seeds"] = [int(s) for s in held["slide_seed"]]
    if held_ves is not None:  # the same held-out slides, their carcinoma drawn with the training look
        metrics["heldout_vesicular"] = {
            "vesicular_max": vesicular_max, **patch_metrics(predict(model, held_ves["patches"])[0], held_ves)
        }
    result = {
        "kind": "tumour",
        "seed": seed,
        "epochs": epochs,
        "batch": batch,
        "lr": lr,
        "width": width,
        "train_slides": train_slides - val_slides + small_slides,
        "small_lesion_slides": small_slides,
        "val_slides": val_slides,
        "vesicular_max": vesicular_max,
        "both_looks": both_looks,
        "slide_um": slide_um,
        "train_patches": len(t_f),
        "other_content_patches": len(other),
        "other_content": f"{other_content} random textures and {other_content} photographs of export.content_mix "
        "(20 patches each at most) as negatives",
        "patches_per_epoch": per_epoch,
        "train_slide_seeds": seed_ranges(grids["slide_seed"]),
        "validation": vm,
        "calibration_logit_shift": shift,
        **({"init": init_result, "init_checkpoint": Path(init).name} if init is not None else {}),
        "history": history,
        "data_seconds": round(data_s, 1),
        "train_seconds": round(train_s, 1),
        "macs_per_patch": count_macs(model, (3, TUMOUR_PX, TUMOUR_PX)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "commands": [
            *(init_result["commands"] if init_result else []),
            f"python -m export train-tumour --seed {seed} --epochs {epochs} --out {out.as_posix()}"
            + (f" --init {Path(init).as_posix()}" if init is not None else "")
            + (f" --vesicular-max {vesicular_max:g}" if vesicular_max else "")
            + (" --both-looks" if both_looks else ""),
        ],
    }
    print(json.dumps(metrics), flush=True)
    ckpt = data_dir / "checkpoints" / f"tumour-seed{seed}.pt"  # to re-export or fine-tune without retraining
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "width": width, "result": result}, ckpt)
    rng_s = np.random.default_rng(seed)
    samples = to_input(held["patches"][np.sort(rng_s.choice(len(hp), min(64, len(hp)), replace=False))])
    export_analysis_model(
        model,
        out,
        task="tumour",
        preprocess=dict(PREPROCESS),
        input_shape=[3, TUMOUR_PX, TUMOUR_PX],
        outputs=[
            {"name": "probability", "shape": ["batch"], "unit": "probability",
             "meaning": "the patch is tumour (carcinoma): trained on the tumour area fraction of the patch"},
            {"name": "embedding", "shape": ["batch", EMBED_DIM], "unit": "ReLU features",
             "meaning": "the patch's feature vector (the probability is a logistic function of it): "
             "the slide model's input"},
        ],
        pixel_size_um=TUMOUR_PIXEL_UM,
        samples=samples,
        metrics=metrics,
        training=result,
    )
    result["unseen_content"] = record_unseen(out)
    print(json.dumps(result["unseen_content"]), flush=True)
    return {"heldout_metrics": metrics, **result}
