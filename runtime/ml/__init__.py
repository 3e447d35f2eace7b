"""Inference on frames: model folders, their preprocessing, the backends that run them, the two tasks.

Modules:

* ``model_folder``: ``load_model_folder``, a ``model.onnx`` + ``model.json`` folder checked before
  anything runs (``ModelFolder``; ``MODELS_DIR``, the default and built-in folders);
* ``preprocess``: ``AutofocusPreprocess``, ``ClassifierPreprocess``, the model inputs, shared by
  training (``export/``) and inference;
* ``backends``: ``select_backend``: TensorRT, ONNX Runtime CUDA or ONNX Runtime CPU behind one
  ``Backend`` interface (``OrtBackend``; ``EngineCache``, TensorRT engines built once per model);
* ``tasks``: ``AutofocusModel`` (defocus from a frame) and ``TileClassifierModel`` (background,
  tissue or artifact), loaded by ``load_models`` or, as ``[models]`` says, ``load_configured_models``;
* ``artifact_context``: ``ArtifactContext``, the classifier's artifact flags grown over a grid of
  windows or a scan's fields (hysteresis, enclosed cells), applied at a scan's end;
* ``builtin/``: the committed model folders (data, not code).

May import: the base modules and ``runtime.devices`` (the frame type).

Re-exports are lazy (PEP 562 ``__getattr__`` imports a name's module on its first access; type
checkers and IDEs read the imports under ``TYPE_CHECKING``): ``export/`` (training, with torch)
imports ``preprocess`` and ``model_folder``, and should not load the inference side with them
(``backends``, ``tasks`` and through them the configuration and ``runtime.devices``).
ONNX Runtime and TensorRT themselves are imported only when a backend is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.ml.backends import (
        BACKENDS,
        Backend,
        EngineCache,
        EngineKey,
        InferenceError,
        OrtBackend,
        installed_backends,
        select_backend,
    )
    from runtime.ml.model_folder import (
        MODELS_DIR,
        ModelFolder,
        ModelFolderError,
        builtin_autofocus_dir,
        default_model_dir,
        load_model_folder,
        sha256_file,
        write_model_json,
    )
    from runtime.ml.preprocess import AutofocusPreprocess, ClassifierPreprocess, PreprocessError
    from runtime.ml.tasks import AutofocusModel, TileClass, TileClassifierModel, load_configured_models, load_models
else:
    from runtime.lazy import lazy_exports

    _MODULES = {  # module -> the names it gives this package
        "backends": (
            "BACKENDS",
            "Backend",
            "EngineCache",
            "EngineKey",
            "InferenceError",
            "OrtBackend",
            "installed_backends",
            "select_backend",
        ),
        "model_folder": (
            "MODELS_DIR",
            "ModelFolder",
            "ModelFolderError",
            "builtin_autofocus_dir",
            "default_model_dir",
            "load_model_folder",
            "sha256_file",
            "write_model_json",
        ),
        "preprocess": ("AutofocusPreprocess", "ClassifierPreprocess", "PreprocessError"),
        "tasks": ("AutofocusModel", "TileClass", "TileClassifierModel", "load_configured_models", "load_models"),
    }

    __getattr__, __dir__ = lazy_exports(__name__, _MODULES, globals())


__all__ = [
    "BACKENDS",
    "MODELS_DIR",
    "AutofocusModel",
    "AutofocusPreprocess",
    "Backend",
    "ClassifierPreprocess",
    "EngineCache",
    "EngineKey",
    "InferenceError",
    "ModelFolder",
    "ModelFolderError",
    "OrtBackend",
    "PreprocessError",
    "TileClass",
    "TileClassifierModel",
    "builtin_autofocus_dir",
    "default_model_dir",
    "installed_backends",
    "load_configured_models",
    "load_model_folder",
    "load_models",
    "select_backend",
    "sha256_file",
    "write_model_json",
]
