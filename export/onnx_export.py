"""Export a trained checkpoint to a model folder: ``model.onnx`` (dynamic batch) + ``model.json``.

The export runs the same sample inputs through torch and ONNX Runtime and
raises :class:`ParityError` if any output differs by more than the tolerance:
a folder that is written is a folder whose ONNX computes what was trained.
"""

from __future__ import annotations

import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from export.datasets import EXTRA_TRAIN_SPLITS
from export.models import AutofocusNet, TileClassifier
from runtime.ml.model_folder import load_model_folder, sha256_file, write_model_json
from runtime.ml.preprocess import AutofocusPreprocess, ClassifierPreprocess

OPSET = 17
PIXEL_SIZE_UM = 0.25


class ParityError(RuntimeError):
    """torch and ONNX Runtime disagree beyond the tolerance."""


def _spec(arch: str, preprocess: dict[str, Any] | None = None, magnitude: bool = False) -> dict[str, Any]:
    """``preprocess``: the checkpoint's own preprocessing (v2 models record theirs); default v1.
    ``magnitude``: the autofocus model has the ``abs_defocus_um`` head."""
    if arch == "AutofocusNet":
        pre = AutofocusPreprocess.from_dict(preprocess) if preprocess else AutofocusPreprocess()
        outputs = [
            {
                "name": "defocus_um",
                "shape": ["batch"],
                "unit": "µm",
                "meaning": "signed defocus of the crop: stage z minus in-focus z (move to z - defocus)",
            },
            {
                "name": "content_logit",
                "shape": ["batch"],
                "unit": "logit",
                "meaning": "the crop has enough tissue to focus on (sigmoid > 0.5)",
            },
        ]
        if magnitude:
            outputs.append(
                {
                    "name": "abs_defocus_um",
                    "shape": ["batch"],
                    "unit": "µm",
                    "meaning": "|defocus| of the crop, learnt on objectives of either aberration sign "
                    "and aberration-free ones (the sign comes from defocus_um or the loop's second shot)",
                }
            )
        return {
            "task": "autofocus",
            "model": AutofocusNet(in_ch=pre.input_shape[0], magnitude=magnitude),
            "preprocess": pre.to_dict(),
            "input_shape": list(pre.input_shape),
            "outputs": outputs,
        }
    if arch == "TileClassifier":
        pre_c = ClassifierPreprocess()
        return {
            "task": "classifier",
            "model": TileClassifier(),
            "preprocess": pre_c.to_dict(),
            "input_shape": list(pre_c.input_shape),
            "classes": ["background", "tissue", "artifact"],
            "outputs": [
                {
                    "name": "logits",
                    "shape": ["batch", 3],
                    "unit": "logit",
                    "meaning": "class scores: background (glass), tissue, artifact (ink, bubble, dust, fold)",
                },
                {
                    "name": "embedding",
                    "shape": ["batch", 64],
                    "unit": "L2-normalised",
                    "meaning": "feature embedding of the window",
                },
            ],
        }
    raise ValueError(f"unknown architecture {arch!r}")


def export_model(
    model: nn.Module,
    spec: dict[str, Any],
    out_dir: Path,
    samples: np.ndarray,
    metrics: dict[str, Any],
    training: dict[str, Any],
    atol: float = 1e-3,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/model.onnx`` and ``out_dir/model.json`` (replacing the folder atomically).

    ``spec``: ``task``, ``input_shape``, ``outputs`` (dicts with ``name``, ``shape`` -- ``"batch"``
    where an axis follows the input's first axis -- and documentation keys), ``preprocess``, and
    optionally ``classes`` and ``pixel_size_um`` (default: the simulator's). ``extra``: more
    top-level keys for ``model.json`` (e.g. ``calibration``). The folder passes the runtime's own
    checks (:func:`~runtime.ml.model_folder.load_model_folder`) before it replaces anything."""
    model.eval()
    out_names = [o["name"] for o in spec["outputs"]]
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    onnx_path = tmp / "model.onnx"
    example = torch.from_numpy(np.asarray(samples[:2], np.float32))
    # The TorchScript-based exporter: no onnxscript dependency, dynamic batch via dynamic_axes.
    torch.onnx.export(
        model,
        (example,),
        str(onnx_path),
        input_names=["input"],
        output_names=out_names,
        dynamic_axes=dynamic_axes(spec["outputs"]),
        opset_version=OPSET,
        dynamo=False,
    )
    onnx.checker.check_model(str(onnx_path))
    parity = check_parity(model, onnx_path, samples, out_names, atol)
    digest = sha256_file(onnx_path)
    meta = {
        "format": "wsi-model",
        "format_version": 1,
        "task": spec["task"],
        "onnx": "model.onnx",
        "onnx_sha256": digest,
        "opset": OPSET,
        "input": {"name": "input", "shape": ["batch", *spec["input_shape"]], "dtype": "float32"},
        "outputs": spec["outputs"],
        "preprocess": spec["preprocess"],
        "pixel_size_um": spec.get("pixel_size_um", PIXEL_SIZE_UM),
        **({"classes": spec["classes"]} if "classes" in spec else {}),
        "heldout_metrics": metrics,
        "parity": parity,
        "training": training,
        "versions": versions(),
        **(extra or {}),
    }
    write_model_json(tmp, meta)
    load_model_folder(tmp, spec["task"])  # the runtime's own checks, before the folder replaces anything
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return meta


def dynamic_axes(outputs: list[dict[str, Any]]) -> dict[str, dict[int, str]]:
    """ONNX dynamic axes: the input's first axis, and each output axis whose shape says ``"batch"``."""
    axes: dict[str, dict[int, str]] = {"input": {0: "batch"}}
    for o in outputs:
        batch = {i: "batch" for i, d in enumerate(o["shape"]) if d == "batch"}
        if batch:
            axes[o["name"]] = batch
    return axes


def versions() -> dict[str, str]:
    """The software a model folder was exported with (``model.json`` ``versions``)."""
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def check_parity(
    model: nn.Module, onnx_path: Path, samples: np.ndarray, out_names: list[str], atol: float
) -> dict[str, Any]:
    """Max abs difference per output between torch and ONNX Runtime CPU; raises past ``atol``.

    Batch sizes 1 and len(samples) both run, so a batch axis that did not export
    as dynamic fails here rather than on the scanner.
    """
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.asarray(samples, np.float32)
    worst: dict[str, float] = {}
    for batch in (x[:1], x):
        with torch.no_grad():
            ref = [t.numpy() for t in model(torch.from_numpy(batch))]
        got = sess.run(out_names, {"input": batch})
        for name, r, o in zip(out_names, ref, got, strict=True):
            if r.shape != o.shape:
                raise ParityError(f"{name}: torch shape {r.shape} != ONNX Runtime shape {o.shape}")
            worst[name] = max(worst.get(name, 0.0), float(np.max(np.abs(r - o))))
    bad = {k: v for k, v in worst.items() if not v <= atol}
    if bad:
        raise ParityError(f"torch vs ONNX Runtime differ beyond atol={atol}: {bad} (on {len(x)} samples)")
    return {"samples": len(x), "atol": atol, "max_abs_diff": worst}


def _extra_args(result: dict[str, Any], ckpt_path: Path) -> str:
    """The options beyond seed and epochs that the checkpoint was trained with."""
    init = result.get("init")
    args = f" --lr {result['lr']} --init out/models/{init['checkpoint']}" if init else ""
    for split in result.get("train_splits", []):
        if split in EXTRA_TRAIN_SPLITS:
            args += f" --{EXTRA_TRAIN_SPLITS[split]}"
    if result.get("wide"):
        args += f" --wide {result['wide']}"
    return args + f" --out out/models/{Path(ckpt_path).name}" if args else ""


def export_checkpoint(ckpt_path: Path, out_dir: Path, samples: np.ndarray, atol: float = 1e-3) -> dict[str, Any]:
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    spec = _spec(ckpt["arch"], ckpt.get("preprocess"), bool(ckpt.get("magnitude", False)))
    model = spec["model"]
    model.load_state_dict(ckpt["state_dict"])
    result = ckpt["result"]
    training = {k: v for k, v in result.items() if k not in ("heldout_metrics", "history")}
    training["final_epoch"] = result["history"][-1] if result.get("history") else None
    training["checkpoint"] = Path(ckpt_path).name
    kind = "autofocus" if ckpt["arch"] == "AutofocusNet" else "classifier"
    # Fine-tuned from a model folder (train-classifier --init): that folder's own commands first.
    commands = list(result.get("init_folder", {}).get("commands", []))
    init = result.get("init")
    if result.get("command"):  # recorded by the training run itself (options beyond the flags below)
        commands.append(result["command"])
    elif init:  # fine-tuned: the checkpoint it started from is trained first
        commands.append(
            f"python -m export train-{kind} --seed {init['seed']} --epochs {init['epochs']}"
            + _extra_args({**init, "init": None}, Path(init["checkpoint"]))
        )
    if not result.get("command"):
        commands.append(
            f"python -m export train-{kind} --seed {result['seed']} --epochs {result['epochs']}"
            + _extra_args(result, ckpt_path)
        )
    commands += [
        f"python -m export onnx {Path(ckpt_path).as_posix()} --out {Path(out_dir).as_posix()} --seed {result['seed']}",
    ]
    training["commands"] = commands
    extra = None
    splits = result.get("train_splits", [])
    tissue = any(s.startswith("train_tissue") for s in splits)  # train_tissue, train_tissue_clean
    if "train_content" in splits or tissue:
        from export.content_mix import describe

        extra = {"training_content": describe(tissue=tissue)}
    return export_model(model, spec, out_dir, samples, result["heldout_metrics"], training, atol, extra)
