"""The inference worker's queues, from both sides: requests, replies, and the caller's channel.

Requests carry a ring slot id, never pixels (the tile is already in the shared-memory
ring). The acquisition worker holds an :class:`InferenceChannel`; the inference worker
(:mod:`runtime.workers.inference`) answers on the replies queue.

The requests queue carries :data:`InferenceRequest`: the ring first (:class:`RingSpec`: the
worker loads its models once it knows the frame size), then autofocus and classify requests,
then :class:`~runtime.ipc.messages.EndOfStream`. The replies queue carries
:data:`InferenceReply`: :class:`WorkerReady` once, then the answers, or :class:`WorkerError`.
"""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.queues import Queue
from typing import TypeAlias, assert_never

from runtime.ipc.messages import EndOfStream
from runtime.ipc.ring import RingSpec


@dataclass(frozen=True)
class AutofocusRequest:
    request_id: int
    slot: int


@dataclass(frozen=True)
class ClassifyRequest:
    request_id: int
    slot: int
    pixel_size_um: float
    urgent: bool = False  # the caller waits for it: run now, with whatever classify work is queued


@dataclass(frozen=True)
class AutofocusReply:
    request_id: int
    defocus_um: float | None
    content_crops: int
    crops: int
    seconds: float
    sign_agreement: float = 1.0  # share of content crops with the median's sign
    spread_um: float = 0.0  # the content crops' median absolute deviation
    signed_um: float | None = None  # a model with a magnitude head: the signed head's median


@dataclass(frozen=True)
class ClassifyReply:
    request_id: int
    label: str
    probabilities: tuple[float, float, float]
    embedding: tuple[float, ...]
    batch: int  # how many tiles shared the backend call
    # Per window, row by row: p(artifact) and the decision's artifact flag (TileClass).
    window_p_artifact: tuple[tuple[float, ...], ...] = ()
    window_artifact: tuple[tuple[bool, ...], ...] = ()


@dataclass(frozen=True)
class WorkerReady:
    """On the replies queue: models loaded and the ring attached; requests can come."""

    backend: str
    refused: dict[str, str]


@dataclass(frozen=True)
class WorkerError:
    """On the replies queue: the worker failed (its one-line reason); nothing follows."""

    message: str


InferenceRequest: TypeAlias = RingSpec | AutofocusRequest | ClassifyRequest | EndOfStream
"""Caller (or scan job) -> inference worker."""

InferenceReply: TypeAlias = WorkerReady | AutofocusReply | ClassifyReply | WorkerError
"""Inference worker -> its one caller."""

# Quoted: multiprocessing.queues.Queue is not subscriptable at run time before Python 3.12.
RequestQueue: TypeAlias = "Queue[InferenceRequest]"
ReplyQueue: TypeAlias = "Queue[InferenceReply]"


class InferenceStopped(RuntimeError):
    """The caller is stopping and the worker did not answer within the grace period (it is gone)."""


class InferenceChannel:
    """The caller's side of a worker's queues: blocking estimate/classify, asynchronous classify.

    ``idle`` is called about every 0.2 s while waiting (the acquisition worker beats its own
    heartbeat there, so waiting on inference never makes acquisition look hung). ``stopping``
    says the caller's scan is ending: a reply is then awaited for ``stop_grace_s`` at most (the
    worker may be dead: the scan job stops a scan when a worker dies), then
    :class:`InferenceStopped` is raised. ``alive`` (when the caller owns the process) turns a dead
    worker into an error at once.
    """

    def __init__(
        self,
        requests: RequestQueue,
        replies: ReplyQueue,
        idle: Callable[[], None] = lambda: None,
        stopping: Callable[[], bool] = lambda: False,
        alive: Callable[[], str | None] | None = None,
        reply_timeout_s: float = 60.0,
        stop_grace_s: float = 2.0,
    ) -> None:
        self._requests = requests
        self._replies = replies
        self._idle = idle
        self._stopping = stopping
        self._alive = alive
        self.reply_timeout_s = reply_timeout_s
        self.stop_grace_s = stop_grace_s
        self._ids = itertools.count()
        self._classified: dict[int, ClassifyReply] = {}
        self.backend: str | None = None
        self.refused: dict[str, str] = {}

    def _get(self, timeout_s: float | None) -> InferenceReply:
        """The next reply, waiting at most ``timeout_s`` (see the class for ``idle``/``stopping``)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        stop_seen: float | None = None
        while True:
            try:
                msg = self._replies.get(timeout=0.2)
            except queue.Empty:
                self._idle()
                now = time.monotonic()
                if self._alive is not None and (why := self._alive()) is not None:
                    raise RuntimeError(f"inference worker {why}") from None
                if self._stopping():
                    stop_seen = now if stop_seen is None else stop_seen
                    if now - stop_seen > self.stop_grace_s:
                        raise InferenceStopped("stopping; the inference worker did not answer") from None
                if deadline is not None and now > deadline:
                    raise TimeoutError(f"no reply from the inference worker within {timeout_s:.0f} s") from None
                continue
            return msg

    def _receive(self, timeout_s: float | None) -> WorkerReady | AutofocusReply | None:
        """Handle the next reply: a classification is kept for :meth:`classify`/:meth:`results`
        (None is returned), a worker error is raised, the others are returned to the caller."""
        msg = self._get(timeout_s)
        match msg:
            case ClassifyReply():
                self._classified[msg.request_id] = msg
                return None
            case WorkerError():
                raise RuntimeError(f"inference worker failed: {msg.message}")
            case WorkerReady() | AutofocusReply():
                return msg
            case _:
                assert_never(msg)

    def wait_ready(self, timeout_s: float | None = None) -> WorkerReady:
        """Block until the worker has loaded its models and attached the ring (None: no limit here;
        the scan job bounds the start-up with ``models.worker_start_timeout_s``)."""
        msg = self._receive(timeout_s)
        if not isinstance(msg, WorkerReady):
            raise RuntimeError(f"inference worker did not start: {msg}")
        self.backend, self.refused = msg.backend, msg.refused
        return msg

    def estimate(self, slot: int) -> AutofocusReply:
        rid = next(self._ids)
        self._requests.put(AutofocusRequest(rid, slot))
        while True:
            msg = self._receive(self.reply_timeout_s)
            if isinstance(msg, AutofocusReply) and msg.request_id == rid:
                return msg

    def classify(self, slot: int, pixel_size_um: float) -> ClassifyReply:
        """Classify one tile now (urgent: it skips the batch window)."""
        rid = self.classify_async(slot, pixel_size_um, urgent=True)
        self._wait_classified({rid})
        return self._classified.pop(rid)  # other replies stay for results()

    def classify_async(self, slot: int, pixel_size_um: float, urgent: bool = False) -> int:
        rid = next(self._ids)
        self._requests.put(ClassifyRequest(rid, slot, pixel_size_um, urgent))
        return rid

    def results(self, wait_for: set[int] | None = None) -> dict[int, ClassifyReply]:
        """Classification replies received so far (waiting until ``wait_for`` ids have all arrived)."""
        self._wait_classified(set(wait_for or ()))
        out, self._classified = self._classified, {}
        return out

    def _wait_classified(self, ids: set[int]) -> None:
        while not ids <= self._classified.keys():
            self._receive(self.reply_timeout_s)  # classifications are kept, anything else is not awaited
