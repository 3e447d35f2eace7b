"""Slide model (:class:`~runtime.analysis.types.SlideModel`): attention-MIL over patch embeddings.

The ONNX model (``runtime/ml/builtin/slide_mil``, trained by ``python -m export train-mil``) takes
one bag -- all of a slide's patches -- as rows of (embedding, centre y µm, centre x µm) along
its dynamic first axis, and answers ``score`` (1,), the probability that the slide contains
tumour, and ``attention`` (N,), each patch's weight in that decision (softmax over the bag).
The coordinates are centred on the bag inside the graph and encoded as sinusoids (see
``export/train_mil.py``).

The bag must run as one batch: a backend that splits its input into chunks (TensorRT's batch
profile) would compute a score per chunk. :func:`runtime.analysis.models.load_analysis_models`
therefore runs this model on ONNX Runtime only; it is a few small matrix products per patch.
"""

from __future__ import annotations

import numpy as np

from runtime.analysis.types import F32, SlideScore
from runtime.ml.backends import Backend
from runtime.ml.model_folder import ModelFolder, ModelFolderError


class AttentionMIL:
    """A slide_mil model folder behind an ONNX Runtime backend."""

    def __init__(self, folder: ModelFolder, backend: Backend) -> None:
        if folder.task != "slide_mil":
            raise ModelFolderError(f"{folder.path}: a {folder.task!r} model, expected a 'slide_mil' model")
        if set(folder.output_names) != {"score", "attention"}:
            raise ModelFolderError(
                f"{folder.path / 'model.json'}: a slide_mil model has outputs 'score' and 'attention', "
                f"got {list(folder.output_names)}"
            )
        self.folder = folder
        self.backend = backend
        self.embedding_dim = int(folder.meta["preprocess"]["embedding_dim"])

    def predict(self, embeddings: F32, coords_um: F32) -> SlideScore:
        """``embeddings`` (N, D), ``coords_um`` (N, 2) patch centres (y, x) in µm. A bag without
        patches (a slide with no tissue) scores 0 with no attention."""
        d = self.embedding_dim
        if embeddings.ndim != 2 or embeddings.shape[1] != d:
            raise ValueError(f"slide model needs embeddings of shape (N, {d}), got {embeddings.shape}")
        if coords_um.shape != (len(embeddings), 2):
            raise ValueError(
                f"slide model needs one (y, x) centre per embedding: coords {coords_um.shape}, "
                f"embeddings {embeddings.shape}"
            )
        if len(embeddings) == 0:
            return SlideScore(score=0.0, attention=np.zeros(0, np.float32))
        x = np.concatenate([embeddings, coords_um], axis=1).astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError("slide model input has non-finite embeddings or coordinates")
        out = self.backend.run(x)
        return SlideScore(
            score=float(np.asarray(out["score"]).reshape(-1)[0]),
            attention=np.asarray(out["attention"], np.float32).reshape(-1),
        )
