"""The analysis worker the daemon keeps warm across scans, and its supervision.

With ``[analysis] enabled`` the supervisor starts one analysis worker
(:mod:`runtime.workers.analysis`) with the daemon, and every scan uses it: the worker's start --
interpreter, imports, ONNX Runtime sessions, about 0.8 CPU s -- is paid once per daemon instead
of once per scan. The worker re-loads its models only when a scan asks for other ones.

:class:`AnalysisService` is the supervisor's side of it:

* it spawns the worker from the supervisor's main thread (so the worker dies with the daemon:
  :func:`runtime.ipc.lifetime.bind_to_parent`), with a fresh pair of queues each time -- a worker
  killed inside a queue operation can leave that queue's lock held, so a new worker never inherits
  the old one's queues -- and records their semaphores for the sweep after a SIGKILLed daemon;
* :meth:`AnalysisService.pump` (each turn of the supervisor's loop, also between scans) reads the
  worker's heartbeats and results and checks it: a worker that exits, or sends no heartbeat for
  ``daemon.heartbeat_timeout_s`` (``models.worker_start_timeout_s`` while it loads models, at its
  start and when a scan asks for other ones: loading cannot beat), is killed if need be and
  started again; the scan it was serving gets an error (its slide is not affected). Restarts of
  a worker that keeps failing before it is ready back off (1 s, 2 s, ... 60 s); a scan that
  begins meanwhile starts it at once;
* the scan job (:class:`AnalysisPort`) begins a scan, relays the stitcher's row announcements,
  picks up the scan's outcome, and abandons a scan that ended otherwise (cancel, failure, or the
  analysis ran past ``analysis.finish_timeout_s``: the worker is then killed and restarted).
  Results of a scan that is no longer the current one are dropped.
* :meth:`AnalysisService.close` stops the worker on the daemon's exit (EndOfStream, then
  SIGTERM, then SIGKILL) and closes the queues.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol, assert_never

from runtime import paths
from runtime.config import AnalysisConfig, RuntimeConfig
from runtime.control.protocol import AnalysisOverrides, RequestError
from runtime.daemon.job import terminate_then_kill
from runtime.daemon.model_request import requested_model_dir
from runtime.daemon.process import worker_context
from runtime.errors import one_line
from runtime.ipc.lifetime import record_semaphores, semaphore_names
from runtime.ipc.messages import (
    AcquisitionDone,
    AnalysisBegin,
    AnalysisCancel,
    AnalysisDone,
    AnalysisLoading,
    AnalysisQueue,
    AnalysisReady,
    EndOfStream,
    EventQueue,
    FieldDone,
    Heartbeat,
    InferenceDone,
    InferenceReady,
    MosaicDone,
    MosaicRows,
    ScanPrepared,
    WorkerEvent,
    WorkerFailed,
    WriterDone,
)
from runtime.workers.analysis import analysis_main

log = logging.getLogger("wsi.analysis_service")

MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class AnalysisOutcome:
    """How one scan's analysis ended: the worker's :class:`AnalysisDone`, or why there is none
    (the worker died or hung while serving it)."""

    done: AnalysisDone | None
    error: str | None


class AnalysisPort(Protocol):
    """What a scan job needs of the analysis worker (:class:`AnalysisService` provides it)."""

    @property
    def starts(self) -> int: ...

    def begin(self, scan_id: str, out_dir: Path, mosaic_path: Path, cfg: AnalysisConfig) -> None: ...

    def relay(self, scan_id: str, msg: MosaicRows | MosaicDone) -> None: ...

    def outcome(self, scan_id: str) -> AnalysisOutcome | None: ...

    def abandon(self, scan_id: str, why: str, *, kill: bool = False) -> None: ...


class AnalysisService:
    """The daemon's analysis worker: started with the daemon, supervised, serving one scan at a time."""

    def __init__(self, cfg: RuntimeConfig) -> None:
        self.cfg = cfg
        self.ctx = worker_context(cfg.daemon.worker_start)  # forked from the daemon's fork server, or spawned
        self.proc: BaseProcess | None = None
        self._inbox: AnalysisQueue | None = None
        self._events: EventQueue | None = None
        self._heartbeat = 0.0
        self._failure: str | None = None  # the running worker's WorkerFailed message, if any
        self.ready: AnalysisReady | None = None  # the running worker's, once it has loaded its models
        self._loading = False  # it re-loads models for a scan (AnalysisLoading .. AnalysisReady)
        self._starts = 0
        self._failed_starts = 0  # consecutive workers that died before they were ready
        self._restart_at: float | None = None
        self._scan: str | None = None  # the scan being served
        self._outcomes: dict[str, AnalysisOutcome] = {}

    # -- the worker process ------------------------------------------------------------------
    @property
    def starts(self) -> int:
        """How many worker processes this daemon has started (1 while the first one lives)."""
        return self._starts

    @property
    def pid(self) -> int | None:
        """The worker's pid once it is ready to serve (models loaded), else None."""
        proc = self.proc
        if proc is None or self.ready is None or proc.exitcode is not None:
            return None
        return proc.pid

    @property
    def _limit_s(self) -> float:
        # Loading models cannot beat (a TensorRT engine build is one native call): from the start
        # to AnalysisReady, and from an AnalysisLoading to the next AnalysisReady, the start
        # timeout applies; otherwise the heartbeat timeout, as for every worker.
        if self.ready is None or self._loading:
            return max(self.cfg.daemon.heartbeat_timeout_s, self.cfg.models.worker_start_timeout_s)
        return self.cfg.daemon.heartbeat_timeout_s

    def start(self) -> None:
        """Spawn the worker (from the supervisor's main thread: it dies with the daemon)."""
        if self.proc is not None:
            return
        self._inbox, self._events = self.ctx.Queue(), self.ctx.Queue()
        try:
            record_semaphores(self.cfg.daemon.runtime_dir, semaphore_names(self._inbox, self._events))
        except OSError as err:  # as for a job's queues: RemoveIPC= and a reboot still clean up
            log.warning("could not record the analysis worker's semaphores: %s", err)
        proc = self.ctx.Process(
            target=analysis_main, args=(self.cfg.analysis, self._inbox, self._events), name="wsi-analysis", daemon=True
        )
        proc.start()
        self.proc = proc
        self._starts += 1
        self._heartbeat = time.monotonic()
        self._failure = None
        self.ready = None
        self._loading = False
        self._restart_at = None

    def _gone(self, why: str) -> None:
        """The worker died or was killed: fail the scan it served, free its queues, plan a restart."""
        proc = self.proc
        if proc is not None and proc.exitcode is None:
            proc.kill()
            proc.join(2.0)
        if self.ready is None:
            self._failed_starts += 1
        self.proc, self.ready = None, None
        self._close_queues()
        log.warning("%s; restarting it", why)
        if self._scan is not None:
            self._outcomes[self._scan] = AnalysisOutcome(None, why)
            self._scan = None
        backoff = 0.0 if self._failed_starts <= 1 else min(MAX_BACKOFF_S, 2.0 ** (self._failed_starts - 2))
        self._restart_at = time.monotonic() + backoff

    def _close_queues(self) -> None:
        for q in (self._inbox, self._events):
            if q is not None:
                q.cancel_join_thread()  # a dead reader: never wait to flush to it
                q.close()
        self._inbox = self._events = None

    def pump(self, max_messages: int = 1000) -> None:
        """Read the worker's messages, check it is alive and beating, restart it when due."""
        events = self._events
        for _ in range(max_messages if events is not None else 0):
            try:
                assert events is not None
                msg = events.get_nowait()
            except (queue.Empty, OSError, ValueError):
                break
            self._handle(msg)
        proc = self.proc
        now = time.monotonic()
        if proc is None:
            if self._restart_at is not None and now >= self._restart_at:
                self.start()
        elif proc.exitcode is not None:
            self._drain()  # its WorkerFailed or AnalysisDone may be queued still: the reason
            if self.proc is not None:
                reason = f": {self._failure}" if self._failure else ""
                self._gone(f"analysis worker exited with code {proc.exitcode}{reason}")
        elif now - self._heartbeat > self._limit_s:
            self._gone(f"analysis worker sent no heartbeat for {self._limit_s:.0f} s (killed)")

    def _drain(self) -> None:
        events = self._events
        with contextlib.suppress(queue.Empty, OSError, ValueError):
            while events is not None:
                self._handle(events.get(timeout=0.05))

    def _handle(self, msg: WorkerEvent) -> None:
        match msg:
            case Heartbeat():
                self._heartbeat = time.monotonic()
            case AnalysisLoading():
                self._heartbeat = time.monotonic()
                self._loading = True
            case AnalysisReady():
                self._heartbeat = time.monotonic()
                self.ready = msg
                self._loading = False
                self._failed_starts = 0
                if msg.error:
                    log.warning("analysis worker ready without models: %s", msg.error)
            case AnalysisDone():
                if msg.scan_id == self._scan:
                    self._outcomes[msg.scan_id] = AnalysisOutcome(msg, None)
                    self._scan = None
            case WorkerFailed():
                self._failure = one_line(msg.message)
            case (
                ScanPrepared()
                | FieldDone()
                | AcquisitionDone()
                | InferenceReady()
                | InferenceDone()
                | MosaicDone()
                | WriterDone()
            ):
                log.warning("analysis worker: unexpected %s", type(msg).__name__)  # a scan worker's message
            case _:
                assert_never(msg)

    # -- scans (AnalysisPort) ------------------------------------------------------------------
    def begin(self, scan_id: str, out_dir: Path, mosaic_path: Path, cfg: AnalysisConfig) -> None:
        """Scan ``scan_id`` starts: the worker analyses its mosaic as rows become final."""
        if self._scan is not None:
            self.abandon(self._scan, "a new scan began")
        if self.proc is None:
            self.start()  # restarting after a failure (or backing off): a scan wants it now
        self._scan = scan_id
        self._put(AnalysisBegin(scan_id, str(out_dir), str(mosaic_path), cfg))

    def relay(self, scan_id: str, msg: MosaicRows | MosaicDone) -> None:
        """A row announcement or the mosaic's end, from the scan's stitcher."""
        if scan_id == self._scan:
            self._put(msg)

    def outcome(self, scan_id: str) -> AnalysisOutcome | None:
        """The scan's outcome once there is one (handed out once)."""
        return self._outcomes.pop(scan_id, None)

    def abandon(self, scan_id: str, why: str, *, kill: bool = False) -> None:
        """The scan no longer waits for its analysis (``why``, for the log). ``kill``: the worker is
        stuck on it (past the finish timeout): kill and restart it rather than let it run on."""
        self._outcomes.pop(scan_id, None)
        if scan_id != self._scan:
            return
        self._scan = None
        if kill and self.proc is not None:
            self._gone(f"analysis of {scan_id} abandoned ({why})")
        else:
            self._put(AnalysisCancel(scan_id))

    def _put(self, msg: AnalysisBegin | MosaicRows | MosaicDone | AnalysisCancel | EndOfStream) -> None:
        if self._inbox is not None:
            self._inbox.put(msg)

    # -- the daemon's exit ---------------------------------------------------------------------
    def close(self, grace_s: float = 5.0) -> None:
        """Stop the worker (it finishes the message in hand), then terminate / kill it; close the queues."""
        proc = self.proc
        if proc is not None:
            self._put(EndOfStream("the daemon is stopping"))
            proc.join(grace_s)
            terminate_then_kill(proc)
        self.proc, self.ready, self._restart_at = None, None, None
        self._close_queues()


_FOLDER_TASKS = (("tumour_dir", "tumour"), ("nuclei_dir", "nuclei"), ("slide_dir", "slide_mil"))


def requested_analysis(cfg: RuntimeConfig, requested: AnalysisOverrides | None) -> dict[str, Any]:
    """A ``start_scan``'s ``analysis`` overrides for the scan's config (``with_overrides`` then
    validates the whole ``[analysis]`` section like the config file), each model folder resolved and
    checked as a requested model folder (:func:`~runtime.daemon.model_request.requested_model_dir`:
    where it may be, who owns it, and that it loads as that task's model folder). A daemon whose
    config has the analysis off runs no analysis worker: a scan may then only say ``enabled: false``.
    Raises ``RequestError("invalid_params")`` naming the parameter (``analysis.tumour_dir``, ...)."""
    values = requested.model_dump(exclude_none=True) if requested is not None else {}
    if not cfg.analysis.enabled and values and values != {"enabled": False}:
        raise RequestError(
            "invalid_params",
            "analysis: this daemon runs no analysis worker ([analysis] enabled = false in its config); "
            "a scan cannot turn the analysis on or choose its models",
        )
    for key, task in _FOLDER_TASKS:
        value = values.get(key)
        if value is not None and not (key == "slide_dir" and value == "none"):
            try:
                values[key] = requested_model_dir(cfg, value, f"analysis.{key}", task)
            except paths.UnsafePath as err:
                raise RequestError("invalid_params", str(err)) from None
    return values


def analysis_service(cfg: RuntimeConfig) -> AnalysisService | None:
    """The daemon's analysis worker, when ``[analysis] enabled`` (not started yet)."""
    return AnalysisService(cfg) if cfg.analysis.enabled else None


__all__ = ["AnalysisOutcome", "AnalysisPort", "AnalysisService", "analysis_service", "requested_analysis"]
