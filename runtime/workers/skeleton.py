"""What every worker process does around its own work, in one place.

The four worker mains (acquisition, inference, stitcher, writer) share a life cycle, and
getting any step wrong leaks something the supervisor cannot reclaim (a camera, the GPU, the
ring's pages) or loses the reason a scan failed. :func:`run_worker` does those steps, and the
worker's own code is a ``body(worker)`` function:

1. :func:`~runtime.ipc.lifetime.bind_to_parent` first: the worker dies with its supervisor.
2. Heartbeats: :meth:`WorkerContext.beat` from the body's own loop (not a side thread, so a
   worker stuck in its loop stops beating and the scan job notices).
3. The ring: :meth:`WorkerContext.wait_for_ring` waits for the ring spec where the worker starts
   before the ring exists; :meth:`WorkerContext.attach` maps it and the skeleton closes it.
4. An ``Exception`` from the body is logged with its traceback
   (:func:`~runtime.errors.log_failure`) and reported as one line -- :class:`WorkerFailed` on the
   events queue, first, so the scan job learns the reason before anything downstream reacts --
   then the body's :meth:`~WorkerContext.on_failure` callbacks run (end a stream, abort a file,
   tell a waiting client), and the process exits with code 1 (``SystemExit(1)``).
5. On every exit path -- return, failure, ``SystemExit`` of an orphaned worker -- the
   :meth:`~WorkerContext.on_exit` callbacks run in the order they were registered (acquisition
   ends the tile stream before it closes the devices, so the stitcher is not kept waiting), then
   the ring is closed.

A worker main is therefore only its arguments and ``run_worker(name, events, body)``.
"""

from __future__ import annotations

import errno
import logging
import queue
from collections.abc import Callable
from multiprocessing.queues import Queue
from typing import TypeVar

from runtime.errors import log_failure
from runtime.ipc.lifetime import bind_to_parent, orphaned
from runtime.ipc.messages import EndOfStream, EventQueue, HeartbeatSender, WorkerFailed
from runtime.ipc.ring import AttachedRing, RingSpec

M = TypeVar("M")

POLL_S = 0.2
"""How long a worker's loop waits on a queue before it beats and checks again."""


class WorkerContext:
    """One worker process's handle on the skeleton: heartbeat, parent, ring, exit callbacks.

    ``events`` None: nobody watches this worker's heartbeats (an inference worker owned by an
    :class:`~runtime.workers.inference.InferenceClient` outside the daemon); :meth:`beat` then
    sends nothing, and loops check :meth:`orphaned` themselves.
    """

    def __init__(self, name: str, events: EventQueue | None) -> None:
        self.name = name
        self.events = events
        self.parent = bind_to_parent()  # die with the supervisor (runtime/ipc/lifetime.py)
        self._hb = HeartbeatSender(name, events) if events is not None else None
        self._on_failure: list[Callable[[str], object]] = []
        self._on_exit: list[Callable[[], object]] = []
        self.ring: AttachedRing | None = None

    def beat(self) -> None:
        """A heartbeat, at most one per interval; raises ``SystemExit`` if the parent is gone."""
        if self._hb is not None:
            self._hb.beat()

    def orphaned(self) -> bool:
        """Has the process that spawned this worker gone (this one was re-parented)?"""
        return orphaned(self.parent)

    def on_failure(self, callback: Callable[[str], object]) -> None:
        """Call ``callback(one_line_reason)`` if the body fails, after the failure is reported."""
        self._on_failure.append(callback)

    def on_exit(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` on every exit path (in the order registered), before the ring closes."""
        self._on_exit.append(callback)

    def wait_for_ring(self, source: Queue[M], stopping: Callable[[], bool]) -> RingSpec | None:
        """Wait for the ring spec on ``source``, beating meanwhile.

        The scan job creates the ring once acquisition knows the frame shape, so workers that
        start before that wait here. None when ``stopping()`` turns true, the parent is gone, or
        the stream ends first (:class:`EndOfStream`). Anything else that arrives first is
        dropped: no caller sends requests before the worker said it is ready.
        """
        while not stopping() and not self.orphaned():
            self.beat()
            try:
                msg = source.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if isinstance(msg, RingSpec):
                return msg
            if isinstance(msg, EndOfStream):
                return None
            self._log.warning("dropped %r: it came before the ring", msg)
        return None

    def attach(self, spec: RingSpec) -> AttachedRing:
        """Map the ring's slots into this process; the skeleton closes the mapping on exit."""
        if self.ring is not None:
            raise RuntimeError(f"{self.name} worker: the ring is attached already")
        self.ring = AttachedRing(spec)
        return self.ring

    @property
    def _log(self) -> logging.Logger:
        return logging.getLogger(f"wsi.{self.name}")

    def _failed(self, err: Exception) -> None:
        message = log_failure(self._log, f"{self.name} worker failed", err)
        if disk_full(err):
            message = f"disk full: {message}"
        if self.events is not None:
            self.events.put(WorkerFailed(self.name, message))
        for callback in self._on_failure:
            try:
                callback(message)
            except Exception as cb_err:  # already failing: the reason above is the one that counts
                log_failure(self._log, f"{self.name} worker: cleaning up after the failure", cb_err)

    def _close(self) -> None:
        """Every exit callback runs even if one fails (the stream must end, the devices close);
        the first error is raised once all have run (the process then exits non-zero)."""
        first: Exception | None = None
        for callback in self._on_exit:
            try:
                callback()
            except Exception as err:
                first = first or err
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if first is not None:
            raise first


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` is, or was raised while handling or because of, an ENOSPC (or EDQUOT)."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def run_worker(name: str, events: EventQueue | None, body: Callable[[WorkerContext], None]) -> None:
    """Run ``body`` as worker ``name`` inside the skeleton described in the module docstring.

    Call it first thing in a worker's process entry point. A failure of the body ends the
    process with ``SystemExit(1)`` once reported; the scan job reads the reason from the events
    queue and the exit code from the process.
    """
    worker = WorkerContext(name, events)
    try:
        body(worker)
    except Exception as err:  # report, then exit non-zero; the supervisor cleans up
        worker._failed(err)
        raise SystemExit(1) from None
    finally:
        worker._close()
