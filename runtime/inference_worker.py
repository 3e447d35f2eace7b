"""The inference worker process: it owns the GPU, reads tiles from shared memory, answers requests.

Requests carry a ring slot id, never pixels. Scheduling: autofocus requests
are on the critical path of a capture (the stage waits for the answer), so
each is answered as soon as it is seen, before any classification; classify
requests are gathered for up to ``batch_window_s`` (or ``max_batch`` tiles)
and run as one batch, which is where a GPU earns its throughput.

Started with the ``spawn`` context (a CUDA context does not survive ``fork``),
the backend is selected inside the worker, so TensorRT/pycuda initialise in
the process that will use them.

:class:`InferenceClient` is the caller's side: ``estimate(slot)`` blocks for
the reply; ``classify_async(slot)`` returns at once and results are collected
with ``results()``.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import queue
import time
import traceback
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

from runtime.autofocus import load_models
from runtime.shm import AttachedRing, RingSpec


@dataclass(frozen=True)
class WorkerSettings:
    autofocus_dir: str | None = None
    classifier_dir: str | None = None
    backend: str = "auto"
    engine_cache_dir: str | None = None
    max_batch: int = 16
    batch_window_s: float = 0.005


@dataclass(frozen=True)
class AutofocusRequest:
    request_id: int
    slot: int


@dataclass(frozen=True)
class ClassifyRequest:
    request_id: int
    slot: int
    pixel_size_um: float


@dataclass(frozen=True)
class AutofocusReply:
    request_id: int
    defocus_um: float | None
    content_crops: int
    crops: int
    seconds: float


@dataclass(frozen=True)
class ClassifyReply:
    request_id: int
    label: str
    probabilities: tuple[float, float, float]
    embedding: tuple[float, ...]
    batch: int  # how many tiles shared the backend call


@dataclass(frozen=True)
class WorkerReady:
    backend: str
    refused: dict[str, str]


@dataclass(frozen=True)
class WorkerError:
    message: str


STOP = None


def inference_main(settings: WorkerSettings, ring: RingSpec, requests: Queue[Any], replies: Queue[Any]) -> None:
    """Process entry point (spawned)."""
    attached: AttachedRing | None = None
    try:
        af, cls, refused = load_models(
            Path(settings.autofocus_dir) if settings.autofocus_dir else None,
            Path(settings.classifier_dir) if settings.classifier_dir else None,
            settings.backend,  # type: ignore[arg-type]
            Path(settings.engine_cache_dir) if settings.engine_cache_dir else None,
        )
        attached = AttachedRing(ring)
        replies.put(WorkerReady(af.backend.name, refused))
        pending: list[ClassifyRequest] = []
        deadline = 0.0
        running = True
        while running:
            timeout = max(0.0, deadline - time.monotonic()) if pending else 0.2
            try:
                msgs = [requests.get(timeout=timeout)]
            except queue.Empty:
                msgs = []
            while True:  # drain what is already queued: autofocus first, whatever arrived
                try:
                    msgs.append(requests.get_nowait())
                except queue.Empty:
                    break
            for m in msgs:
                if m is STOP:
                    running = False
                elif isinstance(m, AutofocusRequest):
                    t = time.perf_counter()
                    est = af.estimate(attached.slot(m.slot))
                    replies.put(
                        AutofocusReply(
                            m.request_id, est.defocus_um, est.content_crops, est.crops, time.perf_counter() - t
                        )
                    )
                elif isinstance(m, ClassifyRequest):
                    if not pending:
                        deadline = time.monotonic() + settings.batch_window_s
                    pending.append(m)
            if pending and cls is None:
                raise RuntimeError("classify requested but no classifier model is loaded")
            if (
                pending
                and cls is not None
                and (len(pending) >= settings.max_batch or time.monotonic() >= deadline or not running)
            ):
                batch, pending = pending[: settings.max_batch], pending[settings.max_batch :]
                # Tiles of one batch share the pixel size in practice (one camera); group anyway.
                for px in sorted({r.pixel_size_um for r in batch}):
                    group = [r for r in batch if r.pixel_size_um == px]
                    out = cls.classify_batch([attached.slot(r.slot) for r in group], px)
                    for r, tc in zip(group, out, strict=True):
                        replies.put(ClassifyReply(r.request_id, tc.label, tc.probabilities, tc.embedding, len(group)))
                deadline = time.monotonic() + settings.batch_window_s
    except Exception as err:
        replies.put(WorkerError(f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None
    finally:
        if attached is not None:
            attached.close()


class InferenceClient:
    """Starts the worker and talks to it. Tiles must already be in ``ring`` slots."""

    def __init__(self, settings: WorkerSettings, ring: RingSpec, start_timeout_s: float = 120.0) -> None:
        ctx = mp.get_context("spawn")
        self._requests: Queue[Any] = ctx.Queue()
        self._replies: Queue[Any] = ctx.Queue()
        self._ids = itertools.count()
        self._classified: dict[int, ClassifyReply] = {}
        self.proc: SpawnProcess = ctx.Process(
            target=inference_main,
            args=(settings, ring, self._requests, self._replies),
            name="wsi-inference",
            daemon=True,
        )
        self.proc.start()
        first = self._get(start_timeout_s)
        if not isinstance(first, WorkerReady):
            raise RuntimeError(f"inference worker did not start: {first}")
        self.backend = first.backend
        self.refused = first.refused

    def _get(self, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                msg = self._replies.get(timeout=0.2)
            except queue.Empty:
                if not self.proc.is_alive():
                    raise RuntimeError(f"inference worker exited with code {self.proc.exitcode}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no reply from the inference worker within {timeout_s} s") from None
                continue
            if isinstance(msg, WorkerError):
                raise RuntimeError(f"inference worker failed: {msg.message}")
            return msg

    def estimate(self, slot: int, timeout_s: float = 30.0) -> AutofocusReply:
        rid = next(self._ids)
        self._requests.put(AutofocusRequest(rid, slot))
        while True:
            msg = self._get(timeout_s)
            if isinstance(msg, ClassifyReply):
                self._classified[msg.request_id] = msg
            elif isinstance(msg, AutofocusReply) and msg.request_id == rid:
                return msg

    def classify_async(self, slot: int, pixel_size_um: float) -> int:
        rid = next(self._ids)
        self._requests.put(ClassifyRequest(rid, slot, pixel_size_um))
        return rid

    def results(self, wait_for: set[int] | None = None, timeout_s: float = 30.0) -> dict[int, ClassifyReply]:
        """Classification replies received so far (waiting until ``wait_for`` ids have all arrived)."""
        need = set(wait_for or ())
        while not need <= set(self._classified):
            msg = self._get(timeout_s)
            if isinstance(msg, ClassifyReply):
                self._classified[msg.request_id] = msg
        out, self._classified = self._classified, {}
        return out

    def close(self) -> None:
        self._requests.put(STOP)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        for q in (self._requests, self._replies):
            q.cancel_join_thread()
            q.close()
