"""Inference backends behind one interface: TensorRT, ONNX Runtime CUDA, ONNX Runtime CPU.

Chosen at start-up by what is installed *and what works*: each candidate is
built and probed with one zero batch, in order of preference, and the first
that runs and returns the shapes ``model.json`` promises wins. Configuration
can force one backend; a forced backend that fails is an error, never a
silent fallback (an operator who asked for TensorRT must learn it is not used).

TensorRT (10.x API): the engine is built on the device from the ONNX, FP16,
with one optimisation profile over the batch axis, and cached on disk under a
key of ONNX sha256, TensorRT version, GPU name, precision and profile shapes.
Nothing is rebuilt needlessly, and a change of any of them builds exactly once
(the build holds a file lock, so concurrent workers do not build twice).
The TensorRT code path is NOT run on the development machines (no GPU): the
selection logic and the cache keying are tested without it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from runtime.ml.model_folder import ModelFolder
from runtime.paths import write_file_exclusive

F32 = npt.NDArray[np.float32]
BackendName = Literal["tensorrt", "ort_cuda", "ort_cpu"]
BACKENDS: tuple[BackendName, ...] = ("tensorrt", "ort_cuda", "ort_cpu")
Preference = Literal["auto", "tensorrt", "ort_cuda", "ort_cpu"]
DEFAULT_MAX_BATCH = 64


class InferenceError(RuntimeError):
    """No backend can run the model (the message lists why each candidate was refused)."""


class Backend(Protocol):
    name: str

    def run(self, x: F32) -> dict[str, npt.NDArray[Any]]:
        """Outputs by name for a (batch, *input_shape) float32 input."""
        ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- ONNX Runtime


class OrtBackend:
    """ONNX Runtime on CPU, or with the CUDA execution provider."""

    def __init__(self, model: ModelFolder, cuda: bool, threads: int = 0) -> None:
        import onnxruntime as ort

        self.name = "ort_cuda" if cuda else "ort_cpu"
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list[Any] = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self._sess = ort.InferenceSession(str(model.onnx_path), so, providers=providers)
        if cuda and "CUDAExecutionProvider" not in self._sess.get_providers():
            # ORT falls back to CPU quietly when CUDA libraries are missing; that is not ort_cuda.
            raise InferenceError("ONNX Runtime created no CUDA session (CUDA/cuDNN libraries missing?)")
        self._input = model.input_name
        self._outputs = list(model.output_names)

    def run(self, x: F32) -> dict[str, npt.NDArray[Any]]:
        got = self._sess.run(self._outputs, {self._input: np.ascontiguousarray(x, np.float32)})
        return dict(zip(self._outputs, got, strict=True))

    def close(self) -> None:
        del self._sess


# --------------------------------------------------------------------------- TensorRT engine cache


@dataclass(frozen=True)
class EngineKey:
    """Everything that makes a serialized TensorRT engine valid: change any, rebuild once."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    precision: Literal["fp16", "fp32"]
    input_shape: tuple[int, ...]  # without batch
    min_batch: int
    opt_batch: int
    max_batch: int

    def digest(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        return {
            "onnx_sha256": self.onnx_sha256,
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "precision": self.precision,
            "input_shape": list(self.input_shape),
            "batch": [self.min_batch, self.opt_batch, self.max_batch],
        }

    def filename(self) -> str:
        return f"{self.onnx_sha256[:12]}-{self.precision}-{self.digest()[:16]}.engine"


class EngineCache:
    """Serialized engines on disk, one file per key (plus a JSON sidecar that records the key).

    The cache sits in the data root by default, where a local user might plant links: a
    deserialized engine is code the GPU runs, so the folder must be a real folder (not a
    link) and every file is opened without following links and written through
    :func:`runtime.paths.write_file_exclusive` (a ``.partial`` then a rename).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _check_root(self) -> None:
        if self.root.is_symlink() or (self.root.exists() and not self.root.is_dir()):
            raise InferenceError(f"engine cache {self.root} is a link or not a folder; refusing to use it")

    def path(self, key: EngineKey) -> Path:
        return self.root / key.filename()

    def get_or_build(self, key: EngineKey, build: Callable[[], bytes]) -> tuple[bytes, bool]:
        """The engine bytes for ``key`` and whether they were built now (False: from the cache)."""
        self._check_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_root()
        path = self.path(key)
        with _locked(path.with_suffix(".lock")):
            cached = self._read(path, key)
            if cached is not None:
                return cached, False
            blob = build()
            if not blob:
                raise InferenceError(f"TensorRT produced an empty engine for {key.as_dict()}")
            write_file_exclusive(self.root, path.name, blob)
            sidecar = json.dumps(key.as_dict(), indent=2).encode()
            write_file_exclusive(self.root, path.with_suffix(".json").name, sidecar)
            return blob, True

    @staticmethod
    def _read(path: Path, key: EngineKey) -> bytes | None:
        side = path.with_suffix(".json")
        try:
            if json.loads(_read_nofollow(side)) != key.as_dict():  # a digest-prefix collision or a stray file
                return None
            blob = _read_nofollow(path)
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        except OSError as err:  # ELOOP: a link planted where an engine should be
            raise InferenceError(f"cannot read cached engine {path}: {err.strerror}") from None
        return blob or None


def _read_nofollow(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return f.read()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- TensorRT backend


class TensorRTBackend:
    """TensorRT 10: named IO tensors, ``set_tensor_address``, ``execute_async_v3``; pycuda buffers.

    Not run on the development machines (no GPU); written to the TensorRT 10 Python API.
    """

    name = "tensorrt"

    def __init__(
        self,
        model: ModelFolder,
        cache_dir: Path,
        precision: Literal["fp16", "fp32"] = "fp16",
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        import pycuda.driver as cuda
        import tensorrt as trt

        self._cuda = cuda
        cuda.init()
        self._ctx = cuda.Device(0).make_context()  # this process owns the GPU
        try:
            self._trt = trt
            self._logger = trt.Logger(trt.Logger.WARNING)
            self.key = EngineKey(
                onnx_sha256=model.sha256,
                tensorrt_version=trt.__version__,
                gpu_name=cuda.Device(0).name(),
                precision=precision,
                input_shape=model.input_shape,
                min_batch=1,
                opt_batch=min(16, max_batch),
                max_batch=max_batch,
            )
            blob, self.built = EngineCache(cache_dir).get_or_build(self.key, lambda: self._build(model))
            runtime = trt.Runtime(self._logger)
            self._engine = runtime.deserialize_cuda_engine(blob)
            if self._engine is None:
                raise InferenceError(f"TensorRT could not deserialize the cached engine {self.key.filename()}")
            self._context = self._engine.create_execution_context()
            self._stream = cuda.Stream()
            self._input = model.input_name
            self._outputs = list(model.output_names)
            self._max_batch = max_batch
            self._buffers: dict[str, Any] = {}
            for i in range(self._engine.num_io_tensors):
                name = self._engine.get_tensor_name(i)
                shape = list(self._engine.get_tensor_shape(name))
                shape[0] = max_batch  # the batch axis is dynamic (-1): size buffers for the profile's max
                dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
                self._buffers[name] = cuda.mem_alloc(int(np.prod(shape)) * dtype.itemsize)
                self._context.set_tensor_address(name, int(self._buffers[name]))
        finally:
            self._ctx.pop()

    def _build(self, model: ModelFolder) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(model.onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise InferenceError(f"TensorRT cannot parse {model.onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 256 << 20)
        if self.key.precision == "fp16":
            # FP16, not INT8: the defocus head is a regression; INT8 costs it accuracy.
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        shape = self.key.input_shape
        profile.set_shape(
            model.input_name,
            (self.key.min_batch, *shape),
            (self.key.opt_batch, *shape),
            (self.key.max_batch, *shape),
        )
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise InferenceError(f"TensorRT failed to build an engine for {model.onnx_path}")
        return bytes(serialized)

    def run(self, x: F32) -> dict[str, npt.NDArray[Any]]:
        cuda = self._cuda
        x = np.ascontiguousarray(x, np.float32)
        outs: dict[str, list[npt.NDArray[Any]]] = {n: [] for n in self._outputs}
        self._ctx.push()
        try:
            for i in range(0, len(x), self._max_batch):
                chunk = x[i : i + self._max_batch]
                self._context.set_input_shape(self._input, chunk.shape)
                cuda.memcpy_htod_async(self._buffers[self._input], chunk, self._stream)
                host = {}
                for name in self._outputs:
                    shape = tuple(self._context.get_tensor_shape(name))
                    dtype = np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(name)))
                    host[name] = np.empty(shape, dtype)
                if not self._context.execute_async_v3(self._stream.handle):
                    raise InferenceError("TensorRT execute_async_v3 failed")
                for name in self._outputs:
                    cuda.memcpy_dtoh_async(host[name], self._buffers[name], self._stream)
                self._stream.synchronize()
                for name in self._outputs:
                    outs[name].append(host[name].astype(np.float32))
        finally:
            self._ctx.pop()
        return {n: np.concatenate(v) for n, v in outs.items()}

    def close(self) -> None:
        self._ctx.push()
        try:
            for buf in self._buffers.values():
                buf.free()
            del self._context, self._engine
        finally:
            self._ctx.pop()
            self._ctx.detach()


# --------------------------------------------------------------------------- selection


def installed_backends() -> dict[BackendName, str | None]:
    """Per backend: None if its libraries are importable here, else why not (cheap, no GPU work)."""
    out: dict[BackendName, str | None] = {}
    missing = [m for m in ("tensorrt", "pycuda") if importlib.util.find_spec(m) is None]
    out["tensorrt"] = f"not installed ({', '.join(missing)} missing)" if missing else None
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        out["ort_cuda"] = None if "CUDAExecutionProvider" in providers else "onnxruntime has no CUDAExecutionProvider"
        out["ort_cpu"] = None
    except ImportError:
        out["ort_cuda"] = out["ort_cpu"] = "onnxruntime not installed"
    return out


BackendFactory = Callable[[ModelFolder], Backend]


def default_factories(
    cache_dir: Path, precision: Literal["fp16", "fp32"] = "fp16", cpu_threads: int = 0
) -> dict[BackendName, BackendFactory]:
    """``cpu_threads``: ONNX Runtime CPU's intra-op threads (0: its default, one per core)."""
    return {
        "tensorrt": lambda m: TensorRTBackend(m, cache_dir, precision),
        "ort_cuda": lambda m: OrtBackend(m, cuda=True),
        "ort_cpu": lambda m: OrtBackend(m, cuda=False, threads=cpu_threads),
    }


def probe(backend: Backend, model: ModelFolder) -> None:
    """Run one zero sample; the outputs must be finite and have a batch axis of 1."""
    out = backend.run(np.zeros((1, *model.input_shape), np.float32))
    for name in model.output_names:
        if name not in out:
            raise InferenceError(f"{backend.name}: output {name!r} missing")
        a = out[name]
        if a.shape[:1] != (1,) or not np.all(np.isfinite(a)):
            raise InferenceError(f"{backend.name}: output {name!r} has shape {a.shape} or non-finite values")


@dataclass
class Selection:
    backend: Backend
    refused: dict[str, str]  # backends tried before the chosen one, and why they were refused


def select_backend(
    model: ModelFolder,
    preference: Preference = "auto",
    cache_dir: Path | None = None,
    factories: Mapping[BackendName, BackendFactory] | None = None,
    installed: Mapping[BackendName, str | None] | None = None,
    cpu_threads: int = 0,
) -> Selection:
    """The first backend in preference order that is installed, builds and passes the probe.
    ``cpu_threads``: intra-op threads of ONNX Runtime CPU (0: one per core); a background worker
    takes 1 (no thread pool whose spinning workers burn the cores the scan needs)."""
    if preference != "auto" and preference not in BACKENDS:
        raise InferenceError(f"unknown inference backend {preference!r}; expected auto or one of {BACKENDS}")
    facts = factories or default_factories(
        cache_dir or Path.home() / ".cache" / "wsi-runtime" / "engines", cpu_threads=cpu_threads
    )
    inst = installed if installed is not None else installed_backends()
    order: tuple[BackendName, ...] = BACKENDS if preference == "auto" else (preference,)
    refused: dict[str, str] = {}
    for name in order:
        why = inst.get(name, "unknown backend")
        if why is not None:
            refused[name] = why
            continue
        backend: Backend | None = None
        try:
            backend = facts[name](model)
            probe(backend, model)
        except Exception as err:  # any failure to build or run refuses this backend, with the reason
            refused[name] = f"{type(err).__name__}: {err}"
            if backend is not None:
                with contextlib.suppress(Exception):
                    backend.close()
            continue
        return Selection(backend, refused)
    detail = "; ".join(f"{k}: {v}" for k, v in refused.items())
    if preference != "auto":
        raise InferenceError(f"inference backend {preference!r} was forced but cannot run {model.path}: {detail}")
    raise InferenceError(f"no inference backend can run {model.path}: {detail}")
