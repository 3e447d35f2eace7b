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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtime.analysis.nuclei import NucleiDetector
from runtime.analysis.slide_mil import AttentionMIL
from runtime.analysis.tumour import TumourClassifier
from runtime.ml.backends import Preference, installed_backends, select_backend
from runtime.ml.model_folder import ModelFolderError, default_model_dir, load_model_folder

CPU_THREADS = 1  # ONNX Runtime CPU intra-op threads per analysis session (see the module docstring)

__all__ = [
    "CPU_THREADS",
    "AnalysisModels",
    "load_analysis_models",
    "load_nuclei_model",
    "load_slide_model",
    "load_tumour_model",
]


@dataclass(frozen=True)
class AnalysisModels:
    """The three models of slide analysis, ready to run."""

    tumour: TumourClassifier
    nuclei: NucleiDetector
    slide: AttentionMIL


def load_tumour_model(
    folder: Path | str | None = None,
    backend: Preference = "auto",
    cache_dir: Path | None = None,
    cpu_threads: int = CPU_THREADS,
) -> TumourClassifier:
    mf = load_model_folder(folder or default_model_dir("tumour"), "tumour")
    return TumourClassifier(mf, select_backend(mf, backend, cache_dir, cpu_threads=cpu_threads).backend)


def load_nuclei_model(
    folder: Path | str | None = None,
    backend: Preference = "auto",
    cache_dir: Path | None = None,
    cpu_threads: int = CPU_THREADS,
) -> NucleiDetector:
    mf = load_model_folder(folder or default_model_dir("nuclei"), "nuclei")
    return NucleiDetector(mf, select_backend(mf, backend, cache_dir, cpu_threads=cpu_threads).backend)


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
    if trained_on is not None and trained_on != t.folder.sha256:
        raise ModelFolderError(
            f"{s.folder.path}: the slide model was trained on the embeddings of tumour model sha256 "
            f"{trained_on[:12]}..., not of {t.folder.path} (sha256 {t.folder.sha256[:12]}...); "
            "retrain it with python -m export train-mil --tumour FOLDER"
        )
    return AnalysisModels(tumour=t, nuclei=load_nuclei_model(nuclei, backend, cache_dir, cpu_threads), slide=s)
