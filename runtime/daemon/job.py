"""What every job of the daemon shares: worker processes, their events, heartbeats, phases, ending.

A job is one request's work on the scanner -- a scan (:class:`~runtime.daemon.scan_job.ScanJob`)
or a z-stack recording (:class:`~runtime.daemon.zstack_job.ZstackJob`) -- and the supervisor owns
at most one at a time. :class:`WorkerJob` is what they have in common: the worker start
(``daemon.worker_start``: forked from the daemon's fork server, or spawned; runtime/daemon/process.py)
and the events queue every worker reports on, the cancel event, the processes and their heartbeats
(a worker that exits non-zero or stops beating fails the job with a one-line error), the phase
(:class:`~runtime.daemon.state.ScanPhase`, moved only along
:data:`~runtime.daemon.state.TRANSITIONS`), cancel / fail / abort, stopping the workers on every
exit path, and ``report.json`` written exclusively into the job's folder. A subclass spawns its
workers, handles their messages (:meth:`WorkerJob._handle`) and says how it ends
(:meth:`WorkerJob._finish`) and what it reports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, ClassVar, Protocol

from runtime.config import RuntimeConfig
from runtime.control.events import Event, FieldDoneEvent, JobKind, ScanStartedEvent
from runtime.daemon.liveness import LateBeats
from runtime.daemon.process import worker_context, worker_server_usage
from runtime.daemon.state import FinishReason, ScanPhase, check_transition
from runtime.ipc.lifetime import record_semaphores, semaphore_names
from runtime.ipc.messages import EventQueue, FieldRecord, ScanPrepared, WorkerEvent, cpu_seconds, peak_rss_bytes
from runtime.paths import folder_identity, write_file_exclusive

log = logging.getLogger("wsi.job")

Publish = Callable[[Event], None]
REPORT_NAME = "report.json"


@dataclass
class _Stopping:
    """A stop in progress (:meth:`WorkerJob.stop_workers_then`): until ``deadline`` the workers may
    exit by themselves (stage 0), then they are terminated (1), then killed (2); ``then`` runs once
    all are gone."""

    deadline: float
    stage: int
    then: Callable[[], object]


def terminate_then_kill(proc: BaseProcess, wait_s: float = 2.0) -> None:
    """A worker that did not exit in time: SIGTERM, then SIGKILL, waiting ``wait_s`` after each."""
    for stop in (proc.terminate, proc.kill):
        if not proc.is_alive():
            return
        stop()
        proc.join(wait_s)


class JobQueue(Protocol):
    """What the job does with each of its queues once the workers are gone (any message type)."""

    def cancel_join_thread(self) -> None: ...

    def close(self) -> None: ...


class WorkerJob:
    """One job's worker processes and phase; subclasses add their workers and messages."""

    KIND: ClassVar[JobKind]

    def __init__(self, cfg: RuntimeConfig, scan_id: str, output_dir: Path, publish: Publish) -> None:
        self.cfg = cfg
        self.scan_id = scan_id
        self.output_dir = output_dir
        self.publish = publish
        self.started = time.time()
        self._t0 = time.monotonic()
        self._cpu0 = cpu_seconds()  # the supervisor's CPU is reported for the job's life only
        self.ctx = worker_context(cfg.daemon.worker_start)
        self.events: EventQueue = self.ctx.Queue()
        self.cancel_event = self.ctx.Event()
        self.procs: dict[str, BaseProcess] = {}
        self.heartbeats: dict[str, float] = {}
        self.worker_cores: dict[str, list[int]] = {}  # each worker's CPU affinity when it started (Linux)
        self._late = LateBeats()  # hung, or only slowed by the machine's load?
        self.records: list[FieldRecord] = []
        self.fields_total = 0
        self.peak_rss: dict[str, int] = {}
        self.cpu_s: dict[str, float] = {}  # per worker, from its done message (cpu_seconds)
        self.simulated_time_s: float | None = None
        self.phase = ScanPhase.STARTING
        self.finish_reason: FinishReason | None = None  # set with ScanPhase.DONE
        self.error: str | None = None
        self._stopping: _Stopping | None = None
        # The supervisor made (or claimed) the folder (runtime.paths.make_output_folder); remember
        # which one, so the report is never written into a folder swapped in for it.
        self._output_id = folder_identity(output_dir)

    # -- what a subclass provides ------------------------------------------------------------
    def _queues(self) -> tuple[JobQueue, ...]:
        """Every queue of the job (closed when the workers are stopped); the events queue first."""
        return (self.events,)

    def _handle(self, msg: WorkerEvent) -> None:
        raise NotImplementedError

    def _finish(self, reason: FinishReason) -> None:
        """Go to DONE with ``reason``: stop the workers, settle the output, write the report."""
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        raise NotImplementedError

    def outputs(self) -> dict[str, str | None]:
        """The paths the job's last event names (``slide``, ``mosaic``, ``recording``), null when none."""
        return {"slide": None, "mosaic": None, "recording": None}

    @property
    def output(self) -> str | None:
        """What ``status.last_output`` names once the job is done: its main product, if written."""
        out = self.outputs()
        return out["slide"] or out["recording"]

    def _after_workers_stopped(self) -> None:
        """Read what the stopped workers left on the queues (before they are closed)."""

    def _release(self) -> None:
        """Free what the job owns besides its processes (shared memory)."""

    # -- processes ---------------------------------------------------------------------------
    def _record_semaphores(self) -> None:
        """Name this job's POSIX semaphores (inside the queues and the event) in the supervisor's
        registry, so that they are swept if the whole daemon is SIGKILLed (runtime/ipc/lifetime.py).
        Call it once the subclass has made all its queues."""
        try:
            record_semaphores(self.cfg.daemon.runtime_dir, semaphore_names(*self._queues(), self.cancel_event))
        except OSError as err:  # not worth failing a job over: RemoveIPC= and a reboot still clean up
            log.warning("could not record the job's semaphores: %s", err)

    def _spawn(self, name: str, target: Callable[..., None], args: tuple[Any, ...]) -> None:
        proc = self.ctx.Process(target=target, args=args, name=f"wsi-{name}", daemon=True)
        proc.start()
        self.procs[name] = proc
        self.heartbeats[name] = time.monotonic()
        # Read now: a short-lived worker (the acquisition of a small scan) may be gone before anyone asks.
        with contextlib.suppress(OSError, AttributeError, TypeError):  # not Linux, or it exited already
            self.worker_cores[name] = sorted(os.sched_getaffinity(proc.pid))  # type: ignore[arg-type]

    @property
    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items() if p.pid is not None}

    def _to(self, phase: ScanPhase) -> None:
        self.phase = check_transition(self.phase, phase)

    @property
    def done(self) -> bool:
        return self.phase is ScanPhase.DONE

    @property
    def settled(self) -> bool:
        """Done, and its workers are gone and its ending is written (report): the supervisor may let go."""
        return self.done and self._stopping is None

    # -- message pump ------------------------------------------------------------------------
    # The phases in which a worker's message is waited for by something else -- the first fields wait
    # for the ring (ScanPrepared), the client for scan_finished -- so the supervisor wakes on it at once
    # instead of at its next poll (50 ms: stop 29 measured 16-52 ms from ScanPrepared sent to handled in
    # `bench e2e`, on the way to the first tile). While acquiring, the many FieldDone and heartbeats wait
    # for the poll as before: nothing downstream waits for the supervisor then, and a wake-up per message
    # would be CPU taken from the stitcher.
    WAKE_PHASES: ClassVar[frozenset[ScanPhase]] = frozenset(
        {ScanPhase.STARTING, ScanPhase.FLUSHING, ScanPhase.WRITING, ScanPhase.CANCELLING}
    )

    def wake_fds(self) -> tuple[int, ...]:
        """File descriptors that are readable when a worker message waits (the events queue's pipe),
        for the supervisor's poll in :data:`WAKE_PHASES`; empty in the other phases, or where the queue
        does not expose its pipe. Never while done: :meth:`pump` reads nothing then, and a readable pipe
        nobody reads would make the poll spin."""
        if self.phase not in self.WAKE_PHASES:
            return ()
        reader = getattr(self.events, "_reader", None)  # multiprocessing.Queue's receiving Connection
        try:
            return (int(reader.fileno()),) if reader is not None else ()
        except (OSError, ValueError, AttributeError):  # closed
            return ()

    def pump(self, max_messages: int = 1000) -> None:
        """Handle pending worker messages, then check the workers are alive and beating."""
        if self.done:
            self.poll_stop()
            return
        for _ in range(max_messages):
            if self.done:  # queues are closed once the job has ended
                self.poll_stop()
                return
            try:
                msg = self.events.get_nowait()
            except queue.Empty:
                break
            self._handle(msg)
        self._check_workers()

    def _started(self, msg: ScanPrepared, mosaic_shape: tuple[int, int]) -> None:
        """The worker planned the job: count its fields, publish scan_started."""
        self.fields_total = len(msg.plan.fields)
        self.publish(
            ScanStartedEvent(
                scan_id=self.scan_id,
                fields=self.fields_total,
                rows=msg.plan.rows,
                cols=msg.plan.cols,
                mosaic_shape=mosaic_shape,
                pixel_size_um=msg.pixel_size_um,
                job=self.KIND,
            )
        )

    def _field_done(self, record: FieldRecord) -> None:
        """One field captured: keep its record, publish field_done."""
        self.records.append(record)
        self.publish(
            FieldDoneEvent(
                index=record.index,
                done=len(self.records),
                total=self.fields_total,
                row=record.row,
                col=record.col,
                z_um=record.z_um,
                captures=record.captures,
                job=self.KIND,
            )
        )

    def _heartbeat_limit(self, name: str) -> float:
        return self.cfg.daemon.heartbeat_timeout_s

    def _silent(self, name: str) -> str:
        """How a worker that beat too late failed (for the error)."""
        return "sent no heartbeat"

    def _may_be_slowed(self, name: str) -> bool:
        """Whether a worker late past its limit but running or waiting on the disk is let run (see
        :mod:`runtime.daemon.liveness`); False: its limit is a hard one."""
        return True

    def _check_workers(self) -> None:
        if self.done:
            return
        now = time.monotonic()
        for name, proc in self.procs.items():
            if proc.exitcode not in (None, 0):
                # A worker that failed put its WorkerFailed (the reason) on the queue before
                # exiting; it may sit behind messages not yet handled. Read them first, so the
                # job fails with the reason rather than with the bare exit code.
                self._drain_events()
                self._fail(f"{name} worker exited with code {proc.exitcode}")
                return
            limit = self._heartbeat_limit(name)
            last = self.heartbeats[name]
            # Late by half the limit: from then on the job looks whether the worker is hung or only slowed
            # by a loaded machine (running, or waiting on the disk), which it lets run (runtime/daemon/liveness.py).
            if proc.exitcode is None and now - last > limit / 2 and self._hung(name, proc.pid, last, now, limit):
                # Hung (stopped, deadlocked in a native call): nothing it holds can be saved by
                # waiting for it. Killed at once; the others flush what they hold and exit.
                proc.kill()
                late = f"{limit:.0f} s"
                if self._late.slowed(name, last):
                    late = f"{now - last:.0f} s (let run past {limit:.0f} s while it ran or waited on the disk)"
                self._fail(f"{name} worker {self._silent(name)} for {late} (killed)")
                return

    def _hung(self, name: str, pid: int | None, last: float, now: float, limit: float) -> bool:
        if self._may_be_slowed(name):
            return self._late.hung(name, pid, last, now, limit)
        return now - last > limit

    def _drain_events(self) -> None:
        with contextlib.suppress(queue.Empty, ValueError, OSError):
            while not self.done:
                self._handle(self.events.get(timeout=0.05))

    def heartbeats_fresh(self) -> bool:
        now = time.monotonic()
        return all(
            p.exitcode is not None
            or now - self.heartbeats[n] <= self._heartbeat_limit(n)
            or self._late.slowed(n, self.heartbeats[n])  # let run: a loaded machine, not a hang
            for n, p in self.procs.items()
        )

    # -- ending ------------------------------------------------------------------------------
    def cancel(self, why: str | None = None) -> None:
        """Stop after the current field; what was captured is kept."""
        if self.phase in (ScanPhase.CANCELLING, ScanPhase.DONE):
            return
        self._to(ScanPhase.CANCELLING)
        if why and self.error is None:
            self.error = why
        self.cancel_event.set()

    def _fail(self, error: str) -> None:
        if self.done:
            return
        self.error = error
        self._finish(FinishReason.FAILED)

    def abort(self, error: str) -> None:
        """An unexpected supervisor error, or a stop that could not wait: end now, keep the output."""
        self._fail(error)
        self.stop_now()

    def stop_workers_then(self, grace_s: float, then: Callable[[], object]) -> None:
        """Stop the workers without blocking: :meth:`poll_stop` (from :meth:`pump`) lets them exit
        within ``grace_s``, then terminates, then kills them, and calls ``then`` once all are gone."""
        self._stopping = _Stopping(time.monotonic() + grace_s, 0, then)
        self.poll_stop()

    def poll_stop(self) -> None:
        """One non-blocking step of a stop in progress (see :meth:`stop_workers_then`)."""
        st = self._stopping
        if st is None:
            return
        alive = [p for p in self.procs.values() if p.is_alive()]
        now = time.monotonic()
        if alive and now < st.deadline:
            return
        if alive and st.stage < 2:
            for p in alive:
                p.terminate() if st.stage == 0 else p.kill()
            st.stage += 1
            st.deadline = now + 2.0
            return
        if alive:
            log.error("workers %s outlived SIGKILL; not waiting for them", [p.name for p in alive])
        self._stopping = None
        self._close_queues()
        st.then()

    def stop_now(self) -> None:
        """Finish a stop in progress here and now (blocking: for a daemon that is exiting)."""
        st = self._stopping
        if st is None:
            return
        self._stopping = None
        self.stop_workers(max(0.0, st.deadline - time.monotonic()) if st.stage == 0 else 0.0)
        st.then()

    def stop_workers(self, grace_s: float) -> None:
        """Join workers; terminate, then kill, those that do not exit in time."""
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            terminate_then_kill(proc)
        self._close_queues()

    def _close_queues(self) -> None:
        self._after_workers_stopped()
        for q in self._queues():
            q.cancel_join_thread()
            q.close()

    # -- report ------------------------------------------------------------------------------
    def common_report(self) -> dict[str, Any]:
        """The report keys every job has (the subclass's report adds its own)."""
        rss = {"supervisor": peak_rss_bytes(), **self.peak_rss}
        return {
            "job": self.KIND,
            "scan_id": self.scan_id,
            "finish_reason": self.finish_reason.value if self.finish_reason else None,
            "phase": self.phase.value,
            "error": self.error,
            "fields_total": self.fields_total,
            "fields_done": len(self.records),
            "simulated_scan_time_s": self.simulated_time_s,
            "wall_time_s": time.monotonic() - self._t0,
            "started_at": self.started,
            "peak_rss_bytes": rss,
            "peak_rss_mib": {k: round(v / 2**20, 1) for k, v in rss.items()},
            # daemon.memory_budget_mib against the processes' peaks added up (an upper bound of
            # what they held at once); the stitcher's summary shows its own part (stitch.*_mib).
            "memory_budget_mib": self.cfg.daemon.memory_budget_mib,
            "peak_rss_total_mib": round(sum(rss.values()) / 2**20, 1),
            # CPU seconds (user + system, all threads) per process: the supervisor's since the job
            # began, each worker's from its start to its done message.
            "cpu_seconds": {"supervisor": round(cpu_seconds() - self._cpu0, 3), **self.cpu_s},
            # How the workers were started. A forked worker's CPU seconds begin at the fork: the fork
            # server's imports are paid once per daemon, not per job; its own figures (CPU since it
            # started, peak RSS, mostly pages its workers share) are here, in no sum above.
            "worker_start": self.cfg.daemon.worker_start,
            "worker_server": worker_server_usage() if self.cfg.daemon.worker_start == "forkserver" else None,
            # The cores each worker was allowed when it started (inherited from the supervisor: bench e2e --cores).
            "worker_cores": dict(self.worker_cores),
        }

    def write_report(self) -> Path:
        """``report.json`` via ``report.json.partial``, created exclusively, never through a link."""
        data = json.dumps(self.report(), indent=2).encode("utf-8")
        return write_file_exclusive(self.output_dir, REPORT_NAME, data, folder_id=self._output_id)

    def close(self) -> None:
        """Last resort on every path: no worker and no segment outlives the job."""
        with contextlib.suppress(Exception):
            self.stop_workers(grace_s=0.0)
        self._release()
