"""Fine-tune a tile classifier folder's last conv block(s) and head on cached features of its frozen front.

``python -m export.classifier_finetune --out out/models/classifier-ft.pt [--init DIR] [--freeze-blocks 4]
[--splits train train_hard train_content train_artifacts] [--epochs 16] [--lr 2e-3]``, then
``python -m export.classifier_finetune --export out/models/classifier-ft.pt --out-dir FOLDER`` and
``python -m export.classifier_decision --model FOLDER --write``.

Retraining the classifier from scratch takes hours on a 2-core CPU (README); this starts from the
committed ONNX (its BatchNorm is folded into the convolutions, so the torch model gets identity
BatchNorm layers and the conv biases: exact, checked against ONNX Runtime), keeps conv blocks
1..``freeze_blocks`` as they are, runs them once over every training window in each of its
``transforms`` flips/transposes (cached, float16) and trains the remaining blocks, the embedding and
the classification layer on those features, each sample in a random one of its cached transforms
(the augmentation of :func:`export.train._augment`). Same loss as ``train-classifier``: cross-entropy
weighted by inverse class frequency; ``artifact_weight`` multiplies the artifact class's weight.

The checkpoint has the ``train-classifier`` layout (``arch`` TileClassifier, ``state_dict``,
``result``), so the ONNX export and its parity check are the usual ones; ``--export`` writes the
folder with the commands that made it (not ``train-classifier``'s).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from export import calibrate
from export.datasets import CLASSES, CLASSIFIER_DATA, cached, classifier_data
from export.models import TileClassifier, count_macs
from export.train import _data, classification_report, seed_everything, tissue_vs_glass_f1

FT_SPLITS = ("train", "train_hard", "train_content")


def load_onnx_classifier(folder_dir: Path) -> TileClassifier:
    """A :class:`TileClassifier` with the weights of a folder's ``model.onnx`` (conv + folded BatchNorm:
    each BatchNorm becomes the identity plus the conv's bias, so the torch model computes the ONNX's)."""
    m = onnx.load(str(Path(folder_dir) / "model.onnx"))
    init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    model = TileClassifier()
    blocks = list(model.features)
    if len(convs) != len(blocks):
        raise ValueError(f"{folder_dir}: {len(convs)} Conv nodes, the TileClassifier has {len(blocks)} blocks")
    state = model.state_dict()
    for k, node in enumerate(convs):
        w, b = init[node.input[1]], init[node.input[2]]
        block = blocks[k]
        assert isinstance(block, nn.Sequential)
        bn = block[1]
        assert isinstance(bn, nn.BatchNorm2d)
        state[f"features.{k}.0.weight"] = torch.from_numpy(w.copy())
        state[f"features.{k}.1.weight"] = torch.ones(len(b))
        state[f"features.{k}.1.bias"] = torch.from_numpy(b.copy())
        state[f"features.{k}.1.running_mean"] = torch.zeros(len(b))
        state[f"features.{k}.1.running_var"] = torch.full((len(b),), 1.0 - bn.eps)
    for name in ("embed.weight", "embed.bias", "classify.weight", "classify.bias"):
        state[name] = torch.from_numpy(init[name].copy())
    model.load_state_dict(state)
    return model.eval()


def front_features(front: nn.Module, x: np.ndarray, transforms: int, batch: int = 256) -> np.ndarray:
    """(transforms, N, C, H, W) float16: the frozen blocks' output for the first ``transforms`` of each
    window's 8 flips/transposes (:func:`export.calibrate.front_features`, as numpy for the cache)."""
    return calibrate.front_features(front, x, batch, transforms).numpy()


class _Tail(nn.Module):
    """The trained part: the blocks after the frozen front, pooling, embedding and classification."""

    def __init__(self, model: TileClassifier, freeze_blocks: int) -> None:
        super().__init__()
        self.rest = model.features[freeze_blocks:]
        self.embed = model.embed
        self.classify = model.classify

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = self.rest(f)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        logits: torch.Tensor = self.classify(torch.relu(self.embed(pooled)))
        return logits


def _freeze_bn(model: nn.Module) -> None:
    """BatchNorm stays in eval mode with its (identity) statistics; its affine bias still trains."""
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.eval()


def fine_tune(
    model: TileClassifier,
    feats: np.ndarray,
    labels: np.ndarray,
    freeze_blocks: int,
    epochs: int,
    lr: float,
    seed: int,
    batch: int = 128,
    artifact_weight: float = 1.0,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """Train the tail on cached front features ``feats`` (transforms, N, ...) in place; per epoch the
    loss and, with ``val`` (features (1, M, ...) of the untransformed windows, labels), the
    validation accuracy and artifact recall (one pass, argmax)."""
    for p in model.features[:freeze_blocks].parameters():
        p.requires_grad = False
    tail = _Tail(model, freeze_blocks)
    params = [p for p in tail.parameters() if p.requires_grad]
    n, k = feats.shape[1], feats.shape[0]
    freq = np.bincount(labels, minlength=len(CLASSES)).astype(np.float64)
    w = freq.sum() / np.maximum(freq, 1) / len(CLASSES)
    w[2] *= artifact_weight
    ce = nn.CrossEntropyLoss(weight=torch.tensor(w, dtype=torch.float32))
    steps = max(1, epochs * (n // batch))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    y = torch.from_numpy(labels)
    history: list[dict[str, Any]] = []
    for epoch in range(epochs):
        tail.train()
        _freeze_bn(tail)
        perm = torch.randperm(n, generator=g)
        pick = torch.randint(0, k, (n,), generator=g)
        total = 0.0
        for i in range(n // batch):
            idx = perm[i * batch : (i + 1) * batch].numpy()
            fb = torch.from_numpy(feats[pick[idx].numpy(), idx].astype(np.float32))
            loss = ce(tail(fb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        rec: dict[str, Any] = {"epoch": epoch, "loss": total / max(1, n // batch)}
        if val is not None:
            vp = predict_tail(tail, val[0][0]).argmax(1)
            rec["val_accuracy"] = float(np.mean(vp == val[1]))
            rec["val_artifact_recall"] = float(np.mean(vp[val[1] == 2] == 2))
        history.append(rec)
        print(json.dumps(rec), flush=True)
    return history


def predict_tail(tail: nn.Module, f: np.ndarray, batch: int = 1024) -> np.ndarray:
    tail.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(f), batch):
            out.append(torch.softmax(tail(torch.from_numpy(f[i : i + batch].astype(np.float32))), 1).numpy())
    return np.concatenate(out)


def split_data(name: str, data_dir: Path, seed: int, workers: int) -> dict[str, Any]:
    """``SPLIT`` or ``SPLIT:SCALE`` (slides per config x SCALE, cached as ``classifier-SPLIT_xSCALE``)."""
    split, _, sc = name.partition(":")
    if split not in CLASSIFIER_DATA or not split.startswith("train"):
        raise ValueError(f"not a classifier training split: {split!r}")
    scale = float(sc) if sc else 1.0
    if scale == 1.0:
        return _data("classifier", split, data_dir, seed, workers)
    tag = f"{scale:g}"
    return cached(
        data_dir / f"classifier-{split}_x{tag}-seed{seed}.npz",
        lambda: classifier_data(split, seed, workers=workers, scale=scale),
    )


def run_fine_tune(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from runtime.ml.model_folder import default_model_dir

    seed_everything(args.seed)
    init_dir = Path(args.init) if args.init else default_model_dir("classifier")
    model = load_onnx_classifier(init_dir)
    front = model.features[: args.freeze_blocks]
    t0 = time.time()
    xs, ys = [], []
    for name in args.splits:
        d = split_data(name, args.data, args.seed, args.workers)
        xs.append(d["x"])
        ys.append(d["label"])
    x, labels = np.concatenate(xs), np.concatenate(ys)
    val = _data("classifier", "val", args.data, args.seed, args.workers)
    data_s = time.time() - t0
    c0 = time.process_time()
    t1 = time.time()
    feats = front_features(front, x, args.transforms)
    vfeats = front_features(front, val["x"], 1)
    cache_s, cache_cpu = time.time() - t1, time.process_time() - c0
    print(f"cached front features {feats.shape} in {cache_s:.0f} s ({cache_cpu:.0f} CPU-s)", flush=True)
    c1, t2 = time.process_time(), time.time()
    history = fine_tune(
        model,
        feats,
        labels,
        args.freeze_blocks,
        args.epochs,
        args.lr,
        args.seed,
        batch=args.batch,
        artifact_weight=args.artifact_weight,
        val=(vfeats, val["label"]),
    )
    train_s, train_cpu = time.time() - t2, time.process_time() - c1
    model.eval()
    held = _data("classifier", "heldout", args.data, args.seed, args.workers)
    from export.train import predict_classifier

    hp = predict_classifier(model, held["x"]).argmax(1)
    rep = classification_report(held["label"], hp)
    result: dict[str, Any] = {
        "kind": "classifier",
        "method": {
            "name": "frozen_front",
            "init": str(init_dir),
            "frozen_blocks": args.freeze_blocks,
            "trained": f"conv blocks {args.freeze_blocks + 1}-{len(model.features)} + embedding + classification",
            "cached_transforms": args.transforms,
            "artifact_weight": args.artifact_weight,
        },
        "seed": args.seed,
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "train_samples": len(labels),
        "train_per_class": np.bincount(labels, minlength=3).tolist(),
        "data": {s: {k: v for k, v in vars(CLASSIFIER_DATA[s]).items()} for s in CLASSIFIER_DATA},
        "train_splits": list(args.splits),
        "heldout_optics": held["optics"],
        "heldout_metrics": {**rep, "tissue_vs_glass_f1": tissue_vs_glass_f1(held["label"], hp)},
        "history": history,
        "data_seconds": round(data_s, 1),
        "cache_seconds": round(cache_s, 1),
        "cache_cpu_seconds": round(cache_cpu, 1),
        "train_seconds": round(train_s, 1),
        "train_cpu_seconds": round(train_cpu, 1),
        "macs_per_window": count_macs(model, (3, 64, 64)),
        "command": "python -m export.classifier_finetune " + shlex.join(argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "arch": "TileClassifier", "result": result}, args.out)
    return result


def export(ckpt_path: Path, out_dir: Path, data: Path, seed: int, export_command: str) -> dict[str, Any]:
    """The checkpoint to a model folder (ONNX parity-checked), with the commands that made it."""
    from export.content_mix import describe
    from export.onnx_export import _spec, export_model

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    spec = _spec("TileClassifier")
    model = spec["model"]
    model.load_state_dict(ckpt["state_dict"])
    result = ckpt["result"]
    training = {k: v for k, v in result.items() if k not in ("heldout_metrics", "history", "command")}
    training["final_epoch"] = result["history"][-1] if result.get("history") else None
    training["checkpoint"] = Path(ckpt_path).name
    training["commands"] = [result["command"], export_command]
    held = _data("classifier", "heldout", data, seed, 2)
    splits = result["train_splits"]
    tissue = any(s.partition(":")[0].startswith("train_tissue") for s in splits)
    used = tissue or any(s.partition(":")[0] == "train_content" for s in splits)
    extra = {"training_content": describe(tissue=tissue)} if used else None
    return export_model(model, spec, out_dir, held["x"][:64], result["heldout_metrics"], training, 1e-3, extra)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m export.classifier_finetune", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--init", type=Path, default=None, help="classifier model folder to start from (default: committed)"
    )
    ap.add_argument("--data", type=Path, default=Path("out/export-data"), help="dataset cache folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--splits", nargs="+", default=list(FT_SPLITS), help="training splits, SPLIT or SPLIT:SCALE (slides x SCALE)"
    )
    ap.add_argument("--freeze-blocks", type=int, default=4, help="conv blocks 1..N kept (1-5)")
    ap.add_argument(
        "--transforms", type=int, default=4, choices=(1, 2, 4, 8), help="flips/transposes cached per window"
    )
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--artifact-weight", type=float, default=1.0, help="x the artifact class's loss weight")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="checkpoint (fine-tune) or model folder (--export)")
    ap.add_argument("--export", type=Path, default=None, help="export this checkpoint to the folder --out-dir")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.export is not None:
        if args.out_dir is None:
            ap.error("--export needs --out-dir")
        meta = export(
            args.export, args.out_dir, args.data, args.seed, "python -m export.classifier_finetune " + shlex.join(argv)
        )
        print(f"wrote {args.out_dir}/model.onnx (sha256 {meta['onnx_sha256'][:12]}...), parity {meta['parity']}")
        return 0
    if args.out is None:
        ap.error("--out CHECKPOINT is required")
    if not 0 < args.freeze_blocks < len(TileClassifier().features):
        ap.error("--freeze-blocks must be 1..5")
    r = run_fine_tune(args, argv)
    print(json.dumps({k: r[k] for k in ("heldout_metrics", "train_cpu_seconds", "cache_cpu_seconds")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
