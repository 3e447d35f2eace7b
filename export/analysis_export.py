"""Export a slide-analysis model (tumour, nuclei, slide_mil) to a parity-checked model folder.

A keyword front to :func:`export.onnx_export.export_model` (``model.onnx`` + ``model.json``,
the folder replaced atomically, torch vs ONNX Runtime compared on real samples at batch 1 and
at full batch, the folder loaded back through :func:`runtime.ml.model_folder.load_model_folder`
before it replaces anything): each output names its own dynamic axes (the slide model's score
is one number per bag, not one per patch), and the model states its pixel size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from export.onnx_export import export_model


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
    """Write ``out_dir`` and return its ``model.json`` (:func:`export.onnx_export.export_model`).
    ``outputs``: dicts with ``name``, ``shape`` (``"batch"`` where the axis follows the input's
    first axis) and documentation keys."""
    spec = {
        "task": task,
        "input_shape": input_shape,
        "outputs": outputs,
        "preprocess": preprocess,
        "pixel_size_um": pixel_size_um,
    }
    return export_model(model, spec, Path(out_dir), samples, metrics, training, atol, extra)

