"""``python -m bench inference``: every committed model folder on every inference backend that runs here.

For each model folder (the scan path's autofocus and classifier, the analysis's tumour, nuclei,
lesion head and slide models, and their int8 copies): each backend of :data:`runtime.ml.backends.BACKENDS`
is selected as the daemon selects it (built, then probed with one zero sample); the ones that are
not installed or fail say why. On the backends that run:

``ms``
    wall milliseconds per batch (median of the timed runs after ``--warmup`` runs), the copy of the
    input to the device and of the outputs back included (what the inference worker pays);
``items/s``
    samples per second at that batch size (for the slide model: bags per second, a bag being one batch);
``parity``
    the largest absolute difference of each output from ONNX Runtime CPU's on the same input,
    over the output's range on that input (a relative error; TensorRT builds FP16 engines, and ONNX
    Runtime's CUDA provider may use TF32 in convolutions), and the largest absolute difference in
    the output's own units (µm of defocus, logits, probability) with the output's name.

The input is seeded uniform noise in [0, 1) of the folder's input shape: it times the graph and checks
the backends agree on it; what a model reads on real tiles is scored by the other benches. CPU runs
use ``--cpu-threads`` intra-op threads (the inference worker's default is one per core, the analysis
worker's one). Run it on the scanner to see what its GPU gives: ``ort_cuda`` needs onnxruntime-gpu and
the CUDA / cuDNN libraries on the loader's path, ``tensorrt`` the TensorRT and pycuda packages.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

DESCRIPTION = "every committed model folder on every inference backend: ms per batch, items/s, parity with CPU"

BUILTIN = Path(__file__).resolve().parents[1] / "runtime" / "ml" / "builtin"
# The slide model's batch is one bag (its attention is a softmax over the bag).
BAG_SIZES = (256,)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models",
        type=Path,
        nargs="*",
        default=None,
        help="model folders (default: every committed one under runtime/ml/builtin)",
    )
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes (default 1 16)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per batch size (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    p.add_argument("--cpu-threads", type=int, default=1, help="ONNX Runtime CPU intra-op threads (default 1)")
    p.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="only these of tensorrt, ort_cuda, ort_cpu (default: all; ort_cpu always runs as the parity reference)",
    )
    p.add_argument("--engine-cache", type=Path, default=None, help="TensorRT engine cache (default: the daemon's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _input(shape: tuple[int, ...], batch: int, seed: int = 0) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).random((batch, *shape), dtype=np.float32)


def _median_ms(backend: Any, x: npt.NDArray[np.float32], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        backend.run(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        backend.run(x)
        times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times)


def _parity(got: dict[str, npt.NDArray[Any]], ref: dict[str, npt.NDArray[Any]]) -> tuple[float, float, str]:
    """The worst output's largest |difference| over its range (0 when identical), and the largest
    |difference| in the output's own units (µm, logits, probability) with that output's name."""
    rel, absolute, name = 0.0, 0.0, ""
    for key, r in ref.items():
        r64 = np.asarray(r, np.float64)
        scale = float(np.ptp(r64)) or float(np.abs(r64).max()) or 1.0
        diff = float(np.abs(np.asarray(got[key], np.float64) - r64).max())
        rel = max(rel, diff / scale)
        if diff > absolute or not name:
            absolute, name = diff, key
    return rel, absolute, name


def measure(a: argparse.Namespace) -> dict[str, Any]:
    from runtime.ml.backends import BACKENDS, BackendName, default_factories, installed_backends, select_backend
    from runtime.ml.model_folder import load_model_folder

    folders = a.models or sorted(p for p in BUILTIN.iterdir() if (p / "model.json").is_file())
    wanted = set(a.backends or BACKENDS) | {"ort_cpu"}
    unknown = wanted - set(BACKENDS)
    if unknown:
        raise ValueError(f"--backends: unknown {sorted(unknown)}; expected some of {list(BACKENDS)}")
    order: list[BackendName] = ["ort_cpu", *(n for n in BACKENDS if n in wanted and n != "ort_cpu")]
    installed = installed_backends()
    cache = a.engine_cache or Path.home() / ".cache" / "wsi-runtime" / "engines"
    factories = default_factories(cache, cpu_threads=a.cpu_threads)
    rows: list[dict[str, Any]] = []
    refused: dict[str, str] = {}
    for path in folders:
        mf = load_model_folder(path)
        batches = list(BAG_SIZES) if mf.task == "slide_mil" else list(a.batches)
        inputs = {b: _input(mf.input_shape, b) for b in batches}
        reference: dict[int, dict[str, npt.NDArray[Any]]] = {}
        # ort_cpu first: it is every other backend's parity reference.
        for name in order:
            if name == "tensorrt" and mf.task == "slide_mil":
                refused[f"{path.name}/{name}"] = "the slide model's bag runs as one batch: ONNX Runtime only"
                continue
            try:
                backend = select_backend(mf, name, cache, factories=factories, installed=installed).backend
            except Exception as err:
                refused[f"{path.name}/{name}"] = str(installed[name] or err)
                continue
            try:
                for b in batches:
                    out = backend.run(inputs[b])
                    if name == "ort_cpu":
                        reference[b] = out
                    ms = _median_ms(backend, inputs[b], a.runs, a.warmup)
                    rel, absolute, output = _parity(out, reference[b]) if b in reference else (None, None, None)
                    rows.append(
                        {
                            "model": path.name,
                            "task": mf.task,
                            "backend": name,
                            "batch": b,
                            "ms": ms,
                            "items_per_s": (1 if mf.task == "slide_mil" else b) * 1000.0 / ms,
                            "parity": rel,
                            "parity_abs": absolute,
                            "parity_output": output,
                        }
                    )
            finally:
                backend.close()
    return {
        "bench": "inference",
        "installed": {k: v or "yes" for k, v in installed.items()},
        "cpu_threads": a.cpu_threads,
        "runs": a.runs,
        "rows": rows,
        "refused": refused,
    }


def run(a: argparse.Namespace) -> int:
    from bench.report import Column, emit

    result = measure(a)
    columns = [
        Column("model", "model"),
        Column("backend", "backend"),
        Column("batch", "batch"),
        Column("ms", "ms/batch", ".2f"),
        Column("items_per_s", "items/s", ".0f"),
        Column("parity", "max |diff| / range vs ort_cpu", ".2e"),
        Column("parity_abs", "max |diff|", ".2e"),
        Column("parity_output", "in output"),
    ]
    notes = [
        "",
        f"Median of {a.runs} runs after {a.warmup} warm-up runs; seeded noise inputs; ONNX Runtime CPU with "
        f"{a.cpu_threads} intra-op thread(s). Slide model: one bag of {BAG_SIZES[0]} embeddings per batch.",
        "Installed: " + ", ".join(f"{k}: {v}" for k, v in result["installed"].items()),
    ]
    why_not: dict[str, list[str]] = {}  # one line per reason, naming the folders it refused
    for key, why in result["refused"].items():
        why_not.setdefault(f"{key.split('/')[1]}: {why}", []).append(key.split("/")[0])
    notes += [f"not run: {why} ({', '.join(names)})" for why, names in why_not.items()]
    emit(result, result["rows"], columns, as_json=a.json, title="Inference per model folder and backend", notes=notes)
    return 0
