"""The nuclei detector: 128-px RGB windows at 0.5 µm/px -> a centroid heatmap at 1 µm per cell.

**Data** (:func:`export.analysis_data.render_nuclei_regions`): regions centred on lesions, mimics
and random tissue of small synthetic slides, with the truth centroid of every nucleus the
slide draws (benign, tumour, lymphoid and hyperplastic). The target is a Gaussian blob
(sigma ``SIGMA_CELLS`` cells = 1 µm) at each centroid, the maximum where blobs overlap.

**Model** (:class:`NucleiNet`): a small U-Net-like encoder-decoder (stride-2 stem, three
scales, additive skips) ending at stride 2, one sigmoid channel; ~30 M multiply-accumulates
per window. Binary cross-entropy against the blob targets, positives weighted up (nuclei
centres are a few % of the cells). Augmentation: 96-px crops at even offsets, flips and
transposes, colour gain and offset.

**Peak picking** is the runtime's own (:func:`runtime.analysis.nuclei.find_peaks`); its
threshold is chosen on validation regions of training seeds (best F1 within 4 µm) and written
into ``model.json``; the held-out F1 (seeds 900000+) is measured through the exported ONNX and
the runtime wrapper, i.e. exactly what the pipeline runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import nn

from export.analysis_data import NUCLEI_PIXEL_UM, NUCLEI_PX, cached, nuclei_regions
from export.analysis_export import export_analysis_model
from export.analysis_metrics import f1_report, match_points
from export.models import count_macs
from export.train import seed_everything
from runtime.analysis.nuclei import find_peaks
from runtime.ml.model_folder import write_model_json

STRIDE: Final = 2
HALO: Final = 16  # px at 0.5 µm/px: 8 µm, more than the largest nucleus radius (6.5 µm)
SIGMA_CELLS: Final = 1.0
MIN_DISTANCES: Final = (1, 2)  # cells (1 µm): the peak neighbourhood, chosen on validation regions
MATCH_UM: Final = 4.0
MEAN, STD = 0.5, 0.25
VAL_SHARE: Final = 0.1
CROP: Final = 96
# The exported window: 320 px answer for a 288-px core (the pipeline's nuclei region) in one call,
# ~30 % fewer model pixels per slide pixel than 128-px windows with the same halo (export/nuclei_window.py).
WINDOW: Final = 320


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class NucleiNet(nn.Module):
    """(N, 3, S, S) standardised RGB -> ((N, 1, S/2, S/2) centroid heatmap in [0, 1],)."""

    def __init__(self, w: int = 12) -> None:
        super().__init__()
        self.e1 = nn.Sequential(_block(3, w, 2), _block(w, w))  # S/2
        self.e2 = nn.Sequential(_block(w, 2 * w, 2), _block(2 * w, 2 * w))  # S/4
        self.e3 = nn.Sequential(_block(2 * w, 3 * w, 2), _block(3 * w, 3 * w))  # S/8
        self.l3 = nn.Conv2d(3 * w, 2 * w, 1)
        self.d2 = _block(2 * w, 2 * w)
        self.l2 = nn.Conv2d(2 * w, w, 1)
        self.d1 = _block(w, w)
        self.head = nn.Conv2d(w, 1, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.e1(x)
        f2 = self.e2(f1)
        f3 = self.e3(f2)
        u2 = self.d2(f2 + self.up(self.l3(f3)))
        u1 = self.d1(f1 + self.up(self.l2(u2)))
        return self.head(u1)  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.sigmoid(self.logits(x)),)  # a tuple, as the export's parity check reads outputs


def to_input(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(((images.astype(np.float32) / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2))


def targets(centroids: np.ndarray, size: int) -> np.ndarray:
    """(N, MAX, 2) NaN-padded centroids (region pixel indices) -> (N, size/STRIDE, size/STRIDE) blobs."""
    cells = size // STRIDE
    grid = np.arange(cells, dtype=np.float32) + 0.5
    out = np.zeros((len(centroids), cells, cells), np.float32)
    for i, c in enumerate(centroids):
        c = c[np.isfinite(c[:, 0])]
        if len(c) == 0:
            continue
        cc = (c + 0.5) / STRIDE
        gy = np.exp(-((grid[None, :] - cc[:, :1]) ** 2) / (2 * SIGMA_CELLS**2))  # (K, cells)
        gx = np.exp(-((grid[None, :] - cc[:, 1:]) ** 2) / (2 * SIGMA_CELLS**2))
        out[i] = (gy[:, :, None] * gx[:, None, :]).max(axis=0)
    return out


def _truth_inside(c: np.ndarray, size: int) -> np.ndarray:
    c = c[np.isfinite(c[:, 0])]
    return c[(c[:, 0] >= -0.5) & (c[:, 0] < size - 0.5) & (c[:, 1] >= -0.5) & (c[:, 1] < size - 0.5)]


def detection_f1(
    heat: np.ndarray, centroids: np.ndarray, threshold: float, min_distance: int, margin: int = 0
) -> dict[str, Any]:
    """F1 of the peaks of ``heat`` (N, cells, cells) against the truth within 4 µm; ``margin``
    px at the window edge are left out of the scoring (the runtime overlaps windows there)."""
    size = heat.shape[1] * STRIDE
    tp = fp = fn = 0
    for h, c in zip(heat, centroids, strict=True):
        pk = find_peaks(h, threshold, min_distance) * STRIDE - 0.5
        t = _truth_inside(c, size)
        lo, hi = margin - 0.5, size - margin - 0.5
        pk = pk[(pk >= lo).all(1) & (pk < hi).all(1)]
        t = t[(t >= lo).all(1) & (t < hi).all(1)]
        a, b, d = match_points(pk, t, MATCH_UM / NUCLEI_PIXEL_UM)
        tp, fp, fn = tp + a, fp + b, fn + d
    return f1_report(tp, fp, fn)


def _predict(model: nn.Module, images: np.ndarray, batch: int = 64) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(model(torch.from_numpy(to_input(images[i : i + batch])))[0][:, 0].numpy())
    return np.concatenate(out)


def load_regions(data_dir: Path, split: str, slides: int, per_slide: int, workers: int = 2) -> dict[str, Any]:
    return cached(
        data_dir / f"nuclei-{split}-{slides}x{per_slide}.npz", lambda: nuclei_regions(split, slides, per_slide, workers)
    )


def train_nuclei(
    data_dir: Path,
    out: Path,
    seed: int = 0,
    epochs: int = 12,
    batch: int = 32,
    lr: float = 4e-3,
    train_slides: int = 80,
    per_slide: int = 30,
    heldout_slides: int = 20,
    workers: int = 2,
    width: int = 12,
    heldout_per_slide: int = 10,
    window: int = WINDOW,
) -> dict[str, Any]:
    """Train, choose the peak threshold on validation regions, export ``out``, score held-out regions.
    ``window``: the exported folder's window side (:mod:`export.nuclei_window`; the network trains on
    crops and is fully convolutional), scored again at that size."""
    from runtime.analysis.nuclei import NucleiDetector
    from runtime.ml.backends import OrtBackend
    from runtime.ml.model_folder import load_model_folder

    seed_everything(seed)
    t0 = time.time()
    data = load_regions(data_dir, "train", train_slides, per_slide, workers)
    held = load_regions(data_dir, "heldout", heldout_slides, heldout_per_slide, workers)
    data_s = time.time() - t0
    seeds = np.unique(data["slide_seed"])
    val_seeds = seeds[-max(1, int(len(seeds) * VAL_SHARE)) :]
    is_val = np.isin(data["slide_seed"], val_seeds)
    x_tr, c_tr = data["images"][~is_val], data["centroids"][~is_val]
    y_tr = torch.from_numpy(targets(c_tr, NUCLEI_PX))
    x_tr_t = torch.from_numpy(x_tr)
    n = len(x_tr)
    model = NucleiNet(width)
    steps = epochs * (n // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(10, steps), pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    history = []
    t1 = time.time()
    cells = CROP // STRIDE
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(n // batch):
            b = perm[i * batch : (i + 1) * batch]
            oy, ox = (int(v) * STRIDE for v in torch.randint(0, (NUCLEI_PX - CROP) // STRIDE + 1, (2,), generator=g))
            x = x_tr_t[b, oy : oy + CROP, ox : ox + CROP].permute(0, 3, 1, 2).float()
            x = (x / 255.0 - MEAN) / STD
            y = y_tr[b, oy // STRIDE : oy // STRIDE + cells, ox // STRIDE : ox // STRIDE + cells][:, None]
            k = int(torch.randint(0, 8, (1,), generator=g))
            if k & 1:
                x, y = x.flip(3), y.flip(3)
            if k & 2:
                x, y = x.flip(2), y.flip(2)
            if k & 4:
                x, y = x.transpose(2, 3), y.transpose(2, 3)
            x = x * (1.0 + 0.2 * (torch.rand(len(b), 3, 1, 1, generator=g) - 0.5)) + 0.3 * (
                torch.rand(len(b), 3, 1, 1, generator=g) - 0.5
            )
            logit = model.logits(x)
            weight = 1.0 + 9.0 * y
            loss = nn.BCEWithLogitsLoss(weight=weight)(logit, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        history.append({"epoch": epoch, "loss": total / max(1, n // batch), "seconds": round(time.time() - t1, 1)})
        print(json.dumps(history[-1]), flush=True)
    train_s = time.time() - t1
    vh = _predict(model, data["images"][is_val])
    vc = data["centroids"][is_val]
    sweep = {
        f"{t:.2f}/{md}": detection_f1(vh, vc, float(t), md, HALO)["f1"]
        for t in np.arange(0.1, 0.75, 0.05)
        for md in MIN_DISTANCES
    }
    best = max(sweep, key=lambda k: sweep[k])
    threshold, min_distance = float(best.split("/")[0]), int(best.split("/")[1])
    print(json.dumps({"sweep_f1 (threshold/min_distance)": sweep, "chosen": best}), flush=True)
    preprocess = {
        "kind": "rgb_window_v1", "size": NUCLEI_PX, "mean": MEAN, "std": STD, "halo": HALO, "stride": STRIDE,
        "threshold": threshold, "min_distance": min_distance,
    }
    result: dict[str, Any] = {
        "kind": "nuclei",
        "seed": seed,
        "epochs": epochs,
        "batch": batch,
        "lr": lr,
        "width": width,
        "target": f"Gaussian blobs (sigma {SIGMA_CELLS * STRIDE * NUCLEI_PIXEL_UM} µm) at the truth centroids of "
        "every nucleus hw_sim draws (SyntheticSlide.nuclei: benign, tumour and mimic nuclei)",
        "train_regions": n,
        "val_regions": int(is_val.sum()),
        "train_slide_seeds": [int(seeds.min()), int(seeds.max())],
        "val_sweep_f1 (threshold/min_distance cells)": sweep,
        "history": history,
        "data_seconds": round(data_s, 1),
        "train_seconds": round(train_s, 1),
        "macs_per_window": count_macs(model, (3, NUCLEI_PX, NUCLEI_PX)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "commands": [f"python -m export train-nuclei --seed {seed} --epochs {epochs} --out {out.as_posix()}"],
    }
    samples = to_input(held["images"][:32])
    # Held-out F1 through the exported ONNX and the runtime wrapper, on whole regions (edges included,
    # every truth nucleus whose centre lies inside the region counted).
    export_analysis_model(
        model, out, task="nuclei", preprocess=preprocess, input_shape=[3, NUCLEI_PX, NUCLEI_PX],
        outputs=[{"name": "heatmap", "shape": ["batch", 1, NUCLEI_PX // STRIDE, NUCLEI_PX // STRIDE],
                  "unit": "probability",
                  "meaning": f"nucleus centre within ~1 µm of the cell (one cell = {STRIDE} px)"}],
        pixel_size_um=NUCLEI_PIXEL_UM, samples=samples, metrics={}, training=result,
    )
    folder = load_model_folder(out, "nuclei")
    det = NucleiDetector(folder, OrtBackend(folder, cuda=False))
    metrics = heldout_f1(det, held)
    metrics["heldout_slide_seeds"] = [int(s) for s in np.unique(held["slide_seed"])]
    print(json.dumps(metrics), flush=True)
    # The metrics go into model.json afterwards (the ONNX and its sha256 are unchanged).
    meta = dict(folder.meta, heldout_metrics=metrics)
    write_model_json(out, meta)
    load_model_folder(out, "nuclei")
    if window != NUCLEI_PX:
        from export.nuclei_window import rewindow_folder

        metrics = rewindow_folder(out, out, window, held)["heldout_metrics"]
        print(json.dumps({"window": window, **metrics}), flush=True)
    return {"heldout_metrics": metrics, **result}


def heldout_f1(det: Any, held: dict[str, Any]) -> dict[str, Any]:
    """F1 within 4 µm of ``det.detect`` on whole held-out regions, overall and per region kind."""
    size = held["images"].shape[1]
    counts: dict[str, list[int]] = {}
    for img, c, kind in zip(held["images"], held["centroids"], held["kind"], strict=True):
        pk = det.detect(img)
        t = _truth_inside(c, size)
        r = match_points(pk, t, MATCH_UM / NUCLEI_PIXEL_UM)
        for key in ("all", ("benign", "tumour", "mimic")[int(kind)]):
            acc = counts.setdefault(key, [0, 0, 0])
            for j in range(3):
                acc[j] += r[j]
    out = {k: f1_report(*v) for k, v in counts.items()}
    return {"match_um": MATCH_UM, "regions": len(held["images"]), **out["all"],
            "by_region": {k: v for k, v in out.items() if k != "all"}}
