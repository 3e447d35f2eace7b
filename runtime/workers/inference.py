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
additionally starts and owns a worker (tests and benchmarks, outside the daemon). The worker's
settings are the ``[models]`` config section itself; only the batching policy (not a config key)
comes beside it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import time
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from typing import Any, assert_never

from runtime.config import ModelsConfig
from runtime.ipc.inference_channel import (
    AutofocusReply,
    AutofocusRequest,
    ClassifyReply,
    ClassifyRequest,
    InferenceChannel,
    InferenceRequest,
    ReplyQueue,
    RequestQueue,
    WorkerError,
    WorkerReady,
)
from runtime.ipc.messages import EndOfStream, EventQueue, InferenceDone, InferenceReady, peak_rss_bytes
from runtime.ipc.ring import RingSpec
from runtime.ml.tasks import load_configured_models
from runtime.workers.skeleton import POLL_S, WorkerContext, run_worker

log = logging.getLogger("wsi.inference")


@dataclass(frozen=True)
class Batching:
    """How classify requests are batched: at most ``max_batch`` tiles per backend call, a request
    waiting at most ``window_s`` for company. Not a config key: the defaults suit the scan path
    (one request in flight), and tests widen the window to make the scheduling visible."""

    max_batch: int = 16
    window_s: float = 0.005


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


def inference_main(
    models: ModelsConfig,
    requests: RequestQueue,
    replies: ReplyQueue,
    events: EventQueue | None = None,
    batching: Batching | None = None,
) -> None:
    """Process entry point (spawned).

    ``requests``: a :class:`RingSpec` first, then requests, then :class:`EndOfStream`.
    ``replies``: to the one client. ``events``: the scan job's queue (heartbeats, ready, done,
    failure); None when an :class:`InferenceClient` owns the worker outside the daemon.
    """
    policy = batching or Batching()

    def body(worker: WorkerContext) -> None:
        # Replies matter only to a client that is still waiting; a client that is gone must not
        # keep this process from exiting (a queue's feeder thread flushes on exit).
        worker.on_exit(replies.cancel_join_thread)
        worker.on_failure(lambda message: replies.put(WorkerError(message)))
        # The ring first: its slot shape is the camera's frame, which picks the builtin autofocus
        # model (v2 needs 512 px frames). Loading after it costs the scan start the load time
        # (ONNX Runtime: well under a second; TensorRT: the engine is cached on disk).
        spec = worker.wait_for_ring(requests, stopping=lambda: False)
        if spec is None:
            return
        t0 = time.monotonic()
        af, cls, refused = load_configured_models(models, (spec.height, spec.width))
        if events is not None:
            events.put(InferenceReady(af.backend.name, refused, time.monotonic() - t0, af.describe()))
        ring = worker.attach(spec)
        replies.put(WorkerReady(af.backend.name, refused))
        stats = _Stats()
        pending: list[ClassifyRequest] = []
        deadline = 0.0
        running = True
        while running:
            worker.beat()
            # A SIGKILLed daemon (or client) cannot stop its workers, and this one holds the GPU.
            # Beside the parent-death signal, check for a lost parent here: an InferenceClient's
            # worker sends no heartbeats, whose check would otherwise notice (and wait_for_ring
            # checks too).
            if worker.orphaned():
                break
            timeout = max(0.0, deadline - time.monotonic()) if pending else POLL_S
            msgs: list[InferenceRequest]
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
                match m:
                    case EndOfStream():
                        running = False
                    case AutofocusRequest():
                        t = time.perf_counter()
                        est = af.estimate(ring.slot(m.slot))
                        dt = time.perf_counter() - t
                        stats.autofocus_requests += 1
                        stats.autofocus_seconds += dt
                        replies.put(
                            AutofocusReply(
                                m.request_id,
                                est.defocus_um,
                                est.content_crops,
                                est.crops,
                                dt,
                                est.sign_agreement,
                                est.spread_um,
                                est.signed_um,
                            )
                        )
                    case ClassifyRequest():
                        if not pending:
                            deadline = time.monotonic() + policy.window_s
                        pending.append(m)
                    case RingSpec():
                        log.warning("ignored a second ring %s: the worker serves %s", m.name, spec.name)
                    case _:
                        assert_never(m)
            if pending and cls is None:
                raise RuntimeError("classify requested but no classifier model is loaded")
            urgent = any(r.urgent for r in pending)
            while (
                pending
                and cls is not None
                and (urgent or len(pending) >= policy.max_batch or time.monotonic() >= deadline or not running)
            ):
                batch, pending = pending[: policy.max_batch], pending[policy.max_batch :]
                stats.classify_requests += len(batch)
                # Tiles of one batch share the pixel size in practice (one camera); group anyway.
                for px in sorted({r.pixel_size_um for r in batch}):
                    group = [r for r in batch if r.pixel_size_um == px]
                    out = cls.classify_batch([ring.slot(r.slot) for r in group], px)
                    stats.classify_batches += 1
                    stats.largest_batch = max(stats.largest_batch, len(group))
                    for r, tc in zip(group, out, strict=True):
                        replies.put(
                            ClassifyReply(
                                r.request_id,
                                tc.label,
                                tc.probabilities,
                                tc.embedding,
                                len(group),
                                tc.window_p_artifact,
                                tc.window_artifact,
                            )
                        )
                urgent = any(r.urgent for r in pending)
                deadline = time.monotonic() + policy.window_s
        if events is not None:
            events.put(InferenceDone(af.backend.name, stats.as_dict(), peak_rss_bytes()))

    run_worker("inference", events, body)


class InferenceClient(InferenceChannel):
    """Starts a worker of its own and talks to it (outside the daemon). Tiles must already be in
    ``ring`` slots when they are asked about."""

    def __init__(
        self, models: ModelsConfig, ring: RingSpec, start_timeout_s: float = 120.0, batching: Batching | None = None
    ) -> None:
        ctx = mp.get_context("spawn")
        requests: RequestQueue = ctx.Queue()
        replies: ReplyQueue = ctx.Queue()
        self.proc: SpawnProcess = ctx.Process(
            target=inference_main,
            args=(models, requests, replies, None, batching),
            name="wsi-inference",
            daemon=True,
        )
        super().__init__(requests, replies, alive=self._exit_reason)
        self.proc.start()
        requests.put(ring)
        self.wait_ready(start_timeout_s)

    def _exit_reason(self) -> str | None:
        return None if self.proc.is_alive() else f"exited with code {self.proc.exitcode}"

    def close(self) -> None:
        self._requests.put(EndOfStream("the client closed"))
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        for q in (self._requests, self._replies):
            q.cancel_join_thread()
            q.close()
