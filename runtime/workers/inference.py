"""The inference worker process: it owns the GPU, reads tiles from shared memory, answers requests.

In the daemon the scan job spawns it (``[models] worker = "process"``, the
default) beside acquisition, stitcher and writer, and watches it like them:
heartbeats on the events queue, exit codes, stopped on every exit path. The
acquisition worker is its only client there.

Requests carry a ring slot id, never pixels. Scheduling:

* autofocus requests are on the critical path of a capture (the stage waits
  for the answer): each is answered as soon as it is seen, before any
  classification that is waiting;
* classify requests are run in batches. A request marked ``urgent`` (the
  caller blocks on it: the background decision on a field's first frame) is
  run at once, together with every classify request already queued; other
  requests wait up to ``batch_window_s`` (or ``max_batch`` tiles) for company,
  which is where a GPU earns its throughput.

Start-up: the backend is selected inside the worker (``spawn`` context: a
CUDA context does not survive ``fork``, and TensorRT/pycuda must initialise in
the process that uses them). A first TensorRT engine build runs inside one
native call that can take minutes, during which no heartbeat can be sent: the
worker reports :class:`~runtime.ipc.messages.InferenceReady` once its models are
loaded, and until then the scan job allows ``models.worker_start_timeout_s``
instead of the heartbeat timeout. A hung build is still bounded by that, which
a heartbeat thread beating through the build would not be.

:class:`~runtime.ipc.inference_channel.InferenceChannel` is the caller's side of the queues; :class:`InferenceClient`
additionally starts and owns a worker (tests and benchmarks, outside the daemon).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import time
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

from runtime.errors import log_failure
from runtime.ipc.inference_channel import (
    STOP,
    AutofocusReply,
    AutofocusRequest,
    ClassifyReply,
    ClassifyRequest,
    InferenceChannel,
    WorkerError,
    WorkerReady,
)
from runtime.ipc.lifetime import bind_to_parent, orphaned
from runtime.ipc.messages import HeartbeatSender, InferenceDone, InferenceReady, WorkerFailed, peak_rss_bytes
from runtime.ipc.ring import AttachedRing, RingSpec
from runtime.ml.tasks import load_models

log = logging.getLogger("wsi.inference")


@dataclass(frozen=True)
class WorkerSettings:
    autofocus_dir: str | None = None
    classifier_dir: str | None = None
    backend: str = "auto"
    engine_cache_dir: str | None = None
    max_batch: int = 16
    batch_window_s: float = 0.005


@dataclass
class _Stats:
    autofocus_requests: int = 0
    autofocus_seconds: float = 0.0
    classify_requests: int = 0
    classify_batches: int = 0
    largest_batch: int = 0

    def as_dict(self) -> dict[str, Any]:
        n = self.autofocus_requests
        return {
            "autofocus_requests": n,
            "autofocus_mean_ms": round(1000 * self.autofocus_seconds / n, 2) if n else None,
            "classify_requests": self.classify_requests,
            "classify_batches": self.classify_batches,
            "largest_classify_batch": self.largest_batch,
        }


def _wait_for_ring(requests: Queue[Any], hb: HeartbeatSender | None, parent: int | None) -> RingSpec | None:
    """The scan job sends the ring once acquisition knows the frame shape."""
    while not orphaned(parent):
        if hb is not None:
            hb.beat()
        try:
            msg = requests.get(timeout=0.2)
        except queue.Empty:
            continue
        if isinstance(msg, RingSpec):
            return msg
        if msg is STOP:
            return None
    return None


def inference_main(
    settings: WorkerSettings, requests: Queue[Any], replies: Queue[Any], events: Queue[Any] | None = None
) -> None:
    """Process entry point (spawned).

    ``requests``: a :class:`RingSpec` first, then requests, then ``STOP``. ``replies``: to the
    one client. ``events``: the scan job's queue (heartbeats, ready, done, failure); None when
    an :class:`InferenceClient` owns the worker outside the daemon.
    """
    # A SIGKILLed daemon (or client) cannot stop its workers; this one holds the GPU. Beside the
    # parent-death signal, the loops check for a lost parent themselves: an InferenceClient's
    # worker sends no heartbeats, whose check would otherwise notice (runtime/ipc/lifetime.py).
    parent = bind_to_parent()
    hb = HeartbeatSender("inference", events) if events is not None else None
    attached: AttachedRing | None = None
    stats = _Stats()
    try:
        # The ring first: its slot shape is the camera's frame, which picks the builtin autofocus
        # model (v2 needs 512 px frames). Loading after it costs the scan start the load time
        # (ONNX Runtime: well under a second; TensorRT: the engine is cached on disk).
        spec = _wait_for_ring(requests, hb, parent)
        if spec is None:
            return
        t0 = time.monotonic()
        af, cls, refused = load_models(
            Path(settings.autofocus_dir) if settings.autofocus_dir else None,
            Path(settings.classifier_dir) if settings.classifier_dir else None,
            settings.backend,  # type: ignore[arg-type]
            Path(settings.engine_cache_dir) if settings.engine_cache_dir else None,
            (spec.height, spec.width),
        )
        if events is not None:
            events.put(InferenceReady(af.backend.name, refused, time.monotonic() - t0, af.describe()))
        attached = AttachedRing(spec)
        replies.put(WorkerReady(af.backend.name, refused))
        pending: list[ClassifyRequest] = []
        deadline = 0.0
        running = True
        while running:
            if hb is not None:
                hb.beat()
            if orphaned(parent):
                break
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
                    dt = time.perf_counter() - t
                    stats.autofocus_requests += 1
                    stats.autofocus_seconds += dt
                    replies.put(AutofocusReply(m.request_id, est.defocus_um, est.content_crops, est.crops, dt))
                elif isinstance(m, ClassifyRequest):
                    if not pending:
                        deadline = time.monotonic() + settings.batch_window_s
                    pending.append(m)
            if pending and cls is None:
                raise RuntimeError("classify requested but no classifier model is loaded")
            urgent = any(r.urgent for r in pending)
            while (
                pending
                and cls is not None
                and (urgent or len(pending) >= settings.max_batch or time.monotonic() >= deadline or not running)
            ):
                batch, pending = pending[: settings.max_batch], pending[settings.max_batch :]
                stats.classify_requests += len(batch)
                # Tiles of one batch share the pixel size in practice (one camera); group anyway.
                for px in sorted({r.pixel_size_um for r in batch}):
                    group = [r for r in batch if r.pixel_size_um == px]
                    out = cls.classify_batch([attached.slot(r.slot) for r in group], px)
                    stats.classify_batches += 1
                    stats.largest_batch = max(stats.largest_batch, len(group))
                    for r, tc in zip(group, out, strict=True):
                        replies.put(ClassifyReply(r.request_id, tc.label, tc.probabilities, tc.embedding, len(group)))
                urgent = any(r.urgent for r in pending)
                deadline = time.monotonic() + settings.batch_window_s
        if events is not None:
            events.put(InferenceDone(af.backend.name, stats.as_dict(), peak_rss_bytes()))
    except Exception as err:
        message = log_failure(log, "inference worker failed", err)
        replies.put(WorkerError(message))
        if events is not None:
            events.put(WorkerFailed("inference", message))
        raise SystemExit(1) from None
    finally:
        # Replies matter only to a client that is still waiting; a client that is gone must not
        # keep this process from exiting (a queue's feeder thread flushes on exit).
        replies.cancel_join_thread()
        if attached is not None:
            attached.close()


class InferenceClient(InferenceChannel):
    """Starts a worker of its own and talks to it (outside the daemon). Tiles must already be in
    ``ring`` slots when they are asked about."""

    def __init__(self, settings: WorkerSettings, ring: RingSpec, start_timeout_s: float = 120.0) -> None:
        ctx = mp.get_context("spawn")
        requests: Queue[Any] = ctx.Queue()
        replies: Queue[Any] = ctx.Queue()
        self.proc: SpawnProcess = ctx.Process(
            target=inference_main, args=(settings, requests, replies, None), name="wsi-inference", daemon=True
        )
        super().__init__(requests, replies, alive=self._exit_reason)
        self.proc.start()
        requests.put(ring)
        self.wait_ready(start_timeout_s)

    def _exit_reason(self) -> str | None:
        return None if self.proc.is_alive() else f"exited with code {self.proc.exitcode}"

    def close(self) -> None:
        self._requests.put(STOP)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        for q in (self._requests, self._replies):
            q.cancel_join_thread()
            q.close()
