"""Loading the three slide-analysis models: tumour classifier, nuclei detector, slide model.

:func:`load_analysis_models` opens each model folder (the committed ones in
``runtime/ml/builtin/{tumour,nuclei,slide_mil}`` unless a folder is given), validates it
(:func:`runtime.ml.model_folder.load_model_folder`: files, sha256, task, graph signature,
preprocess), checks that the slide model reads the tumour model's embeddings (same
dimension, and the tumour model it was trained on, when the folder records it), picks an
inference backend for each and returns them behind the Protocols of
:mod:`runtime.analysis.types`. Any problem is a :class:`~runtime.ml.model_folder.ModelFolderError`
or :class:`~runtime.ml.backends.InferenceError` that names the folder and what is wrong.

The tumour and nuclei models run on the preferred backend (TensorRT, ONNX Runtime CUDA or
CPU); the slide model runs on ONNX Runtime only, since its bag must be one batch
(:mod:`runtime.analysis.slide_mil`).

On ONNX Runtime CPU each session runs with ``cpu_threads`` intra-op threads, 1 by default: the
analysis is a niced background worker beside capture, stitching and writing, and ORT's default
pool (one spinning thread per core) spent about twice the CPU per nuclei window for no gain in
wall time on a shared 2-core machine (measured 2.8-3.6 ms vs 1.1-1.9 ms of CPU per 128-px window).

The committed tumour and nuclei models have int8 copies (``runtime/ml/builtin/{tumour,nuclei}_int8``,
made by ``python -m export.quantize_analysis``: static QDQ quantization calibrated on the windows and
patches the analyzer sends on training-range slides, parity against the float model in their
model.json; one thread on this CPU: 3.1 vs 3.8 ms per 320-px nuclei window, 0.043 vs 0.069 ms per
tumour patch). Without a folder, the nuclei model that runs on ONNX Runtime CPU is its int8 copy
(:data:`INT8_TASKS`); TensorRT and ONNX Runtime CUDA keep the float model, which its folder path
(``nuclei_dir``) also names on the CPU. The int8 tumour model is taken by naming its folder
(``tumour_dir``); the slide model, trained on the float tumour model's embeddings, reads its int8
copy's (:func:`tumour_identities`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.analysis.nuclei import NucleiDetector
from runtime.analysis.slide_mil import AttentionMIL
from runtime.analysis.tumour import TumourClassifier
from runtime.ml.backends import Backend, Preference, installed_backends, select_backend
from runtime.ml.model_folder import ModelFolder, ModelFolderError, default_model_dir, load_model_folder

CPU_THREADS = 1  # ONNX Runtime CPU intra-op threads per analysis session (see the module docstring)
# Builtin CNNs whose committed int8 copy is taken on ONNX Runtime CPU (see the module docstring). The
# tumour model's copy (tumour_int8) is committed but not taken by default: on the second held-out bench
# set it lost one faint lesion (sensitivity at 0.5 FP 0.957 -> 0.935; set 1, Dice, AUC unchanged).
INT8_TASKS = ("nuclei",)

__all__ = [
    "CPU_THREADS",
    "INT8_TASKS",
    "AnalysisModels",
    "int8_dir",
    "load_analysis_models",
    "load_nuclei_model",
    "load_slide_model",
    "load_tumour_model",
    "tumour_identities",
]


@dataclass(frozen=True)
class AnalysisModels:
    """The three models of slide analysis, ready to run."""

    tumour: TumourClassifier
    nuclei: NucleiDetector
    slide: AttentionMIL


def int8_dir(task: str) -> Path:
    """The committed int8 copy of a builtin CNN (``runtime/ml/builtin/<task>_int8``)."""
    return default_model_dir(task).with_name(f"{task}_int8")


def _folder_and_backend(
    task: str, folder: Path | str | None, backend: Preference, cache_dir: Path | None, cpu_threads: int
) -> tuple[ModelFolder, Backend]:
    """``folder`` on the backend ``backend`` selects; without a folder the committed model, and where
    that runs on ONNX Runtime CPU its committed int8 copy (:data:`INT8_TASKS`; TensorRT and CUDA keep
    the float one)."""
    mf = load_model_folder(folder or default_model_dir(task), task)
    be = select_backend(mf, backend, cache_dir, cpu_threads=cpu_threads).backend
    if folder is None and task in INT8_TASKS and be.name == "ort_cpu" and int8_dir(task).is_dir():
        be.close()
        mf = load_model_folder(int8_dir(task), task)
        be = select_backend(mf, "ort_cpu", cache_dir, cpu_threads=cpu_threads).backend
    return mf, be


def tumour_identities(meta: dict[str, Any], sha256: str) -> tuple[str, ...]:
    """The tumour model's sha256 and, for an int8 copy (``python -m export.quantize_analysis``: a
    ``quantized`` record), the float model's it was made from: a slide model trained on the float
    model's embeddings reads the copy's (its parity against the float one is in its model.json)."""
    src = (meta.get("quantized") or {}).get("from") or {}
    base = src.get("onnx_sha256") if isinstance(src, dict) else None
    return (sha256, base) if isinstance(base, str) else (sha256,)


def load_tumour_model(
    folder: Path | str | None = None,
    backend: Preference = "auto",
    cache_dir: Path | None = None,
    cpu_threads: int = CPU_THREADS,
) -> TumourClassifier:
    mf, be = _folder_and_backend("tumour", folder, backend, cache_dir, cpu_threads)
    return TumourClassifier(mf, be)


def load_nuclei_model(
    folder: Path | str | None = None,
    backend: Preference = "auto",
    cache_dir: Path | None = None,
    cpu_threads: int = CPU_THREADS,
) -> NucleiDetector:
    mf, be = _folder_and_backend("nuclei", folder, backend, cache_dir, cpu_threads)
    return NucleiDetector(mf, be)


def load_slide_model(
    folder: Path | str | None = None, backend: Preference = "auto", cpu_threads: int = CPU_THREADS
) -> AttentionMIL:
    """``backend``: "auto" takes ONNX Runtime CUDA if it works, else CPU; "tensorrt" is refused."""
    mf = load_model_folder(folder or default_model_dir("slide_mil"), "slide_mil")
    if backend == "tensorrt":
        raise ModelFolderError(
            f"{mf.path}: the slide model runs on ONNX Runtime only (a bag is one batch; TensorRT splits batches)"
        )
    installed = dict(installed_backends())
    installed["tensorrt"] = "the slide model's bag must run as one batch (ONNX Runtime only)"
    return AttentionMIL(mf, select_backend(mf, backend, installed=installed, cpu_threads=cpu_threads).backend)


def load_analysis_models(
    tumour: Path | str | None = None,
    nuclei: Path | str | None = None,
    slide: Path | str | None = None,
    backend: Preference = "auto",
    cache_dir: Path | None = None,
    cpu_threads: int = CPU_THREADS,
) -> AnalysisModels:
    """The three models from these folders (None: the committed builtin ones)."""
    t = load_tumour_model(tumour, backend, cache_dir, cpu_threads)
    s = load_slide_model(slide, "auto" if backend == "tensorrt" else backend, cpu_threads)
    if s.embedding_dim != t.embedding_dim:
        raise ModelFolderError(
            f"{s.folder.path}: the slide model reads {s.embedding_dim}-d embeddings but the tumour model "
            f"{t.folder.path} gives {t.embedding_dim}-d ones; use the slide model trained on this tumour model"
        )
    trained_on = s.folder.meta.get("tumour_model", {}).get("sha256")
    if trained_on is not None and trained_on not in tumour_identities(t.folder.meta, t.folder.sha256):
        raise ModelFolderError(
            f"{s.folder.path}: the slide model was trained on the embeddings of tumour model sha256 "
            f"{trained_on[:12]}..., not of {t.folder.path} (sha256 {t.folder.sha256[:12]}...); "
            "retrain it with python -m export train-mil --tumour FOLDER"
        )
    return AnalysisModels(tumour=t, nuclei=load_nuclei_model(nuclei, backend, cache_dir, cpu_threads), slide=s)
