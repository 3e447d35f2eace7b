"""Export a slide-analysis model (tumour, nuclei, slide_mil) to a parity-checked model folder.

The same contract as :func:`export.onnx_export.export_model` (``model.onnx`` + ``model.json``,
the folder replaced atomically, torch vs ONNX Runtime compared on real samples at batch 1 and
at full batch, :class:`~export.onnx_export.ParityError` past the tolerance), with what these
models need beyond it: each output names its own dynamic axes (the slide model's score is one
number per bag, not one per patch), the model's pixel size, and any number of extra keys
(the nuclei model's peak-picking parameters, the held-out metrics of each split). The written
folder is loaded back through :func:`runtime.ml.model_folder.load_model_folder`, so a folder
the runtime would refuse is never left behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from export.onnx_export import OPSET, check_parity, versions
from runtime.ml.model_folder import load_model_folder, sha256_file


def export_analysis_model(
    model: nn.Module,
    out_dir: Path,
    *,
    task: str,
    preprocess: dict[str, Any],
    input_shape: list[int],
    outputs: list[dict[str, Any]],
    pixel_size_um: float,
    samples: np.ndarray,
    metrics: dict[str, Any],
    training: dict[str, Any],
    atol: float = 1e-3,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``out_dir`` and return its ``model.json``. ``outputs``: dicts with ``name``, ``shape``
    (``"batch"`` where the axis follows the input's first axis) and documentation keys."""
    model.eval()
    out_names = [o["name"] for o in outputs]
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    onnx_path = tmp / "model.onnx"
    example = torch.from_numpy(np.asarray(samples[:2], np.float32))
    dynamic = {"input": {0: "batch"}}
    for o in outputs:
        axes = {i: "batch" for i, d in enumerate(o["shape"]) if d == "batch"}
        if axes:
            dynamic[o["name"]] = axes
    torch.onnx.export(
        model,
        (example,),
        str(onnx_path),
        input_names=["input"],
        output_names=out_names,
        dynamic_axes=dynamic,
        opset_version=OPSET,
        dynamo=False,
    )
    onnx.checker.check_model(str(onnx_path))
    parity = check_parity(model, onnx_path, samples, out_names, atol)
    meta = {
        "format": "wsi-model",
        "format_version": 1,
        "task": task,
        "onnx": "model.onnx",
        "onnx_sha256": sha256_file(onnx_path),
        "opset": OPSET,
        "input": {"name": "input", "shape": ["batch", *input_shape], "dtype": "float32"},
        "outputs": outputs,
        "preprocess": preprocess,
        "pixel_size_um": pixel_size_um,
        "heldout_metrics": metrics,
        "parity": parity,
        "training": training,
        "versions": versions(),
        **(extra or {}),
    }
    (tmp / "model.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    load_model_folder(tmp, task)  # the runtime's own checks, before the folder replaces anything
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return meta

