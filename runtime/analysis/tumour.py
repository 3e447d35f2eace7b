"""Tumour patch classifier (:class:`~runtime.analysis.types.TumourModel`) behind an inference backend.

The ONNX model (``runtime/ml/builtin/tumour``, trained by ``python -m export train-tumour``) reads
``patch_px``-px RGB patches at ``pixel_size_um`` (64 px at 1 µm/px: 64 µm of tissue, a few dozen
cells), scaled as ``(x / 255 - mean) / std``, and answers the probability that the patch is
carcinoma and the patch's embedding (the slide model's input).
"""

from __future__ import annotations

import numpy as np

from runtime.analysis.types import U8, TumourOutput
from runtime.ml.backends import Backend
from runtime.ml.model_folder import ModelFolder, ModelFolderError

MAX_BATCH = 64


class TumourClassifier:
    """A tumour model folder behind an inference backend."""

    def __init__(self, folder: ModelFolder, backend: Backend) -> None:
        if folder.task != "tumour":
            raise ModelFolderError(f"{folder.path}: a {folder.task!r} model, expected a 'tumour' model")
        self.folder = folder
        self.backend = backend
        pre = folder.meta["preprocess"]
        self._mean, self._std = np.float32(pre["mean"]), np.float32(pre["std"])
        self._patch = int(folder.input_shape[1])
        outs = {o["name"]: o for o in folder.meta["outputs"]}
        if set(outs) != {"probability", "embedding"}:
            raise ModelFolderError(
                f"{folder.path / 'model.json'}: a tumour model has outputs 'probability' and 'embedding', "
                f"got {sorted(outs)}"
            )
        shape = outs["embedding"].get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0):
            raise ModelFolderError(
                f"{folder.path / 'model.json'}: output 'embedding' needs shape ['batch', D], got {shape}"
            )
        self._dim = int(shape[1])

    @property
    def patch_px(self) -> int:
        return self._patch

    @property
    def pixel_size_um(self) -> float:
        return self.folder.pixel_size_um

    @property
    def embedding_dim(self) -> int:
        return self._dim

    def predict(self, patches: U8) -> TumourOutput:
        """``patches`` (N, patch_px, patch_px, 3) uint8 RGB; N may be 0."""
        p = self._patch
        if patches.ndim != 4 or patches.shape[1:] != (p, p, 3) or patches.dtype != np.uint8:
            raise ValueError(
                f"tumour model needs uint8 RGB patches of shape (N, {p}, {p}, 3), got {patches.dtype} {patches.shape}"
            )
        n = len(patches)
        prob = np.empty(n, np.float32)
        emb = np.empty((n, self._dim), np.float32)
        for i in range(0, n, MAX_BATCH):
            x = (patches[i : i + MAX_BATCH].astype(np.float32) / np.float32(255.0) - self._mean) / self._std
            out = self.backend.run(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
            prob[i : i + MAX_BATCH] = out["probability"].reshape(-1)
            emb[i : i + MAX_BATCH] = out["embedding"]
        return TumourOutput(probability=prob, embedding=emb)
