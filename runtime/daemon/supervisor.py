"""The daemon's main process: control plane, scan lifecycle, systemd integration.

One loop, no threads: poll the ZeroMQ command socket, pump the running scan's
worker messages, publish events, and tell systemd we are alive -- but only
while every worker's heartbeat is fresh, so a hung worker leads to a restart.
SIGTERM/SIGINT stop a running scan cleanly (its Zarr is kept) and exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, assert_never

from runtime import paths
from runtime.config import ConfigError, RuntimeConfig, with_overrides
from runtime.control.curve import ServerKeys
from runtime.control.events import Event, ScanFailedEvent, ScanFinishedEvent, StateEvent
from runtime.control.protocol import (
    CancelParams,
    JobParams,
    PingParams,
    RecordZstacksParams,
    RequestError,
    RequestParams,
    ShutdownParams,
    StartScanParams,
    StatusParams,
)
from runtime.control.replies import (
    CancelResult,
    InterruptedScanInfo,
    PingResult,
    Result,
    ShutdownResult,
    StartScanResult,
    StatusResult,
)
from runtime.control.server import ControlServer
from runtime.daemon import sdnotify
from runtime.daemon.analysis_service import analysis_service, requested_analysis
from runtime.daemon.job import REPORT_NAME, WorkerJob
from runtime.daemon.model_request import requested_model_dir
from runtime.daemon.process import start_worker_server
from runtime.daemon.scan_job import ScanJob
from runtime.daemon.state import FinishReason, ScanStatus, run_state
from runtime.daemon.zstack_job import ZstackJob
from runtime.devices.protocols import ScanArea
from runtime.errors import log_failure
from runtime.ipc.lifetime import forget_semaphores, remove_stale_semaphores
from runtime.ipc.ring import remove_stale_segments
from runtime.output.journal import JOURNAL_NAME, InterruptedScan, JournalError, find_interrupted, read_journal
from runtime.stitching.backends import StitchBackendError, check_stitch_backend
from runtime.workers.recorder import ZstackRecordJob

log = logging.getLogger("wsi.supervisor")


@contextlib.contextmanager
def _refused_as_invalid() -> Iterator[None]:
    """A path that would leave the data root (or write through a link) is a bad parameter."""
    try:
        yield
    except paths.UnsafePath as err:
        raise RequestError("invalid_params", str(err)) from None


@dataclass(frozen=True)
class _Prepared:
    """A job request checked by :meth:`Supervisor._prepare`: its id, folder name, region, driver options."""

    scan_id: str
    name: str
    area: ScanArea | None
    driver_options: dict[str, Any]


class Supervisor:
    def __init__(self, cfg: RuntimeConfig) -> None:
        # A forced stitch.backend that cannot be found here is refused at start (a ConfigError: exit 2,
        # the key named), not by every scan's stitcher. A module lookup only: no CUDA context here.
        check_stitch_backend(cfg.stitch.backend)
        self.cfg = cfg
        self.job: WorkerJob | None = None
        self.status = ScanStatus()
        self._stop = False
        self._stopping_scan = False  # SIGTERM/shutdown while a scan runs: the run state says "stopping"
        self._last_watchdog = 0.0
        self._watchdog_interval = sdnotify.watchdog_interval_s()
        self.server: ControlServer | None = None
        self.interrupted: list[InterruptedScan] = []  # scans that can be resumed (refreshed when a job ends)
        # [analysis] enabled: one analysis worker for the daemon's life, warm for every scan
        # (runtime/daemon/analysis_service.py); started in run(), from this (the main) thread.
        self.analysis = analysis_service(cfg)

    # -- state -------------------------------------------------------------------------------
    def _set(self, **changes: Any) -> None:
        """Replace the status snapshot; the run state is always derived from the job's phase."""
        old = self.status.state
        phase = self.job.phase if self.job is not None else None
        state = run_state(phase, stopping=self._stopping_scan)
        self.status = dataclasses.replace(self.status, **changes, state=state)
        if self.status.state is not old:
            self._publish(StateEvent(state=self.status.state.value))
            sdnotify.status(f"{self.status.state.value} {self.status.scan_id or ''}".strip())

    def _publish(self, event: Event) -> None:
        if self.server is not None:
            self.server.publish(event)

    # -- requests ----------------------------------------------------------------------------
    def handle(self, params: RequestParams) -> Result:
        """The control server's handler: the params model's type is the command."""
        match params:
            case PingParams():
                return PingResult(pong=True, pid=os.getpid(), state=self.status.state.value)
            case StatusParams():
                return self._status_result()
            case StartScanParams():
                return self._start_scan(params)
            case RecordZstacksParams():
                return self._record_zstacks(params)
            case CancelParams():
                if self.job is None or self.job.done:
                    raise RequestError("not_running", "no scan or z-stack recording is running")
                self.job.cancel()
                self._set()
                return CancelResult(scan_id=self.job.scan_id, cancelling=True)
            case ShutdownParams():
                self.request_stop()
                return ShutdownResult(stopping=True)
            case _:
                assert_never(params)

    def _status_result(self) -> StatusResult:
        d = self.status.to_dict()
        if self.job is not None:
            d["fields_total"] = self.job.fields_total
            d["fields_done"] = len(self.job.records)
            d["workers"] = self.job.pids
        if self.analysis is not None and self.analysis.pid is not None:
            # The daemon's analysis worker, listed once its models are loaded (between scans too).
            d["workers"] = {**d.get("workers", {}), "analysis": self.analysis.pid}
        running = self.job.scan_id if self.job is not None else None
        d["interrupted"] = [InterruptedScanInfo.model_validate(s) for s in d["interrupted"] if s["scan_id"] != running]
        return StatusResult.model_validate(d)

    def refresh_interrupted(self) -> None:
        """Read the data root's journals again: which scans did not complete (status lists them)."""
        found, problems = find_interrupted(self.cfg.daemon.data_root)
        for problem in problems:
            log.warning("unreadable scan journal: %s", problem)
        self.interrupted = found
        self._set(interrupted=tuple(s.to_json() for s in found))

    def _prepare(self, params: JobParams, kind: str, resume_id: str | None = None) -> _Prepared:
        """What every job request needs, checked in order: not busy, a usable output folder name, the
        recording (replay drivers) inside the data root, the region. The folder is made last
        (:meth:`_start`), once the job-specific checks have passed too. ``resume_id``: a resumed
        scan's id (its folder exists)."""
        if self.job is not None:
            raise RequestError("busy", f"{self.job.KIND} job {self.job.scan_id} is still {self.status.state.value}")
        scan_id = resume_id or time.strftime(f"{kind}-%Y%m%d-%H%M%S")
        root = self.cfg.daemon.data_root
        name = params.output_name or scan_id
        if resume_id is None:
            with _refused_as_invalid():
                # Looked at first (a refused name should not wait for a recording's walk), made last.
                paths.check_output_folder(paths.output_folder(root, name, "output_name"), "output_name")
        driver_options: dict[str, Any] = {}
        if params.recording:
            with _refused_as_invalid():
                rec = paths.resolve_under(root, params.recording, "recording")
                if not rec.exists():
                    raise RequestError("invalid_params", f"recording {rec} does not exist")
                # Every file the replay driver could open, links followed, must be in the data root too.
                paths.check_tree_within(rec, root, "recording")
            driver_options["recording"] = str(rec)
        region = params.region
        area = ScanArea(**region.model_dump()) if region else None
        return _Prepared(scan_id, name, area, driver_options)

    def _start(self, prepared: _Prepared, make_job: Callable[[Path], WorkerJob]) -> StartScanResult:
        with _refused_as_invalid():
            output_dir = paths.make_output_folder(self.cfg.daemon.data_root, prepared.name, "output_name")
        self.job = make_job(output_dir)
        self._set(
            job=self.job.KIND, scan_id=prepared.scan_id, output_dir=str(output_dir), fields_total=0, fields_done=0
        )
        return StartScanResult(scan_id=prepared.scan_id, output_dir=str(output_dir))

    def _start_scan(self, params: StartScanParams) -> StartScanResult:
        if params.resume is not None:
            return self._resume_scan(params.resume)
        prep = self._prepare(params, "scan")
        cfg = self._scan_config(params)
        request = params.model_dump(mode="json", exclude_none=True)
        return self._start(
            prep,
            lambda out: ScanJob(
                cfg, prep.scan_id, out, prep.area, prep.driver_options, self._publish, request, analysis=self.analysis
            ),
        )

    def _resume_scan(self, scan_id: str) -> StartScanResult:
        """``start_scan {"resume": scan_id}``: continue an interrupted scan in its folder, with the
        parameters its journal recorded."""
        if self.job is not None:
            raise RequestError("busy", f"{self.job.KIND} job {self.job.scan_id} is still {self.status.state.value}")
        self.refresh_interrupted()
        match = [s for s in self.interrupted if s.scan_id == scan_id]
        if not match:
            raise RequestError(
                "invalid_params", f"resume: no interrupted scan {scan_id!r} in the data root (status lists them)"
            )
        folder = Path(match[0].output_dir)
        with _refused_as_invalid():
            # The folder must still be a plain folder under the data root (no link swapped in).
            folder = paths.resolve_under(self.cfg.daemon.data_root, folder.name, "resume")
        try:
            state = read_journal(folder / JOURNAL_NAME)
            assert state.header is not None  # read_journal refuses a journal without one
            original = StartScanParams.model_validate(state.header.get("request") or {})
        except (JournalError, ValueError) as err:
            raise RequestError("invalid_params", f"resume {scan_id}: {err}") from None
        prep = self._prepare(original, "scan", resume_id=scan_id)
        cfg = self._scan_config(original)
        request = original.model_dump(mode="json", exclude_none=True)
        try:
            self.job = ScanJob(
                cfg,
                scan_id,
                folder,
                prep.area,
                prep.driver_options,
                self._publish,
                request,
                resume=state,
                analysis=self.analysis,
            )
        except (ValueError, TypeError, KeyError) as err:  # a journal this runtime cannot continue
            raise RequestError("invalid_params", f"resume {scan_id}: {err}") from None
        self._set(job=self.job.KIND, scan_id=scan_id, output_dir=str(folder), fields_total=0, fields_done=0)
        return StartScanResult(scan_id=scan_id, output_dir=str(folder))

    def _scan_config(self, params: StartScanParams) -> RuntimeConfig:
        """The config with the request's per-scan overrides, validated like the config file."""
        overrides: dict[str, Any] = {}
        focus = params.focus.model_dump(exclude_none=True) if params.focus else {}
        if focus:  # per-scan focus overrides, validated like the config file
            overrides["focus"] = focus
        if params.models is not None and params.models.autofocus_dir is not None:
            with _refused_as_invalid():
                overrides["models"] = {"autofocus_dir": requested_model_dir(self.cfg, params.models.autofocus_dir)}
        analysis = requested_analysis(self.cfg, params.analysis)  # its model folders checked like autofocus_dir
        if analysis:
            overrides["analysis"] = analysis
        cfg = self.cfg
        for section, values in overrides.items():
            try:
                cfg = with_overrides(cfg, {section: values})
            except ConfigError as err:
                raise RequestError("invalid_params", f"{section}: {err}") from None
        try:  # checked at start too; a package removed since would otherwise fail in the stitcher
            check_stitch_backend(cfg.stitch.backend)
        except StitchBackendError as err:
            raise RequestError("invalid_params", str(err)) from None
        return cfg

    def _record_zstacks(self, params: RecordZstacksParams) -> StartScanResult:
        prep = self._prepare(params, "zstacks")
        z_center = self.cfg.focus.start_z_um if params.z_center_um is None else params.z_center_um
        return self._start(
            prep,
            lambda out: ZstackJob(
                self.cfg,
                prep.scan_id,
                ZstackRecordJob(
                    output_dir=str(out),
                    z_center_um=z_center,
                    offsets_um=params.plane_offsets_um(),
                    area=prep.area,
                    max_fields=params.max_fields,
                    driver_options=prep.driver_options,
                ),
                self._publish,
            ),
        )

    # -- the loop ----------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        self._stop = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        self.request_stop()

    def _tick_job(self) -> None:
        job = self.job
        if job is None:
            return
        try:
            job.pump()
        except Exception as err:  # a supervisor bug must not leave workers or segments behind
            job.abort(f"supervisor error: {log_failure(log, 'scan job error', err)}")
        if not job.done:
            self._set()  # the phase may have moved (writing)
            return
        if not job.settled:
            return  # its workers are still stopping: keep serving meanwhile (pump polls them)
        job.close()
        self.job = None
        reason = job.finish_reason
        assert reason is not None  # set with ScanPhase.DONE
        report: str | None = str(job.output_dir / REPORT_NAME)
        if isinstance(job, ScanJob) and not job.report_written:
            report = None
        if reason is FinishReason.FAILED:
            # A failed job always has its error (WorkerJob._fail); the fallback keeps the event valid.
            error = job.error or f"{job.KIND} job failed"
            self._publish(ScanFailedEvent(scan_id=job.scan_id, error=error, report=report, job=job.KIND))
        self._publish(
            ScanFinishedEvent(scan_id=job.scan_id, reason=reason.value, report=report, job=job.KIND, **job.outputs())
        )
        self._set(
            last_finish=reason,
            last_error=job.error,
            last_output=job.output,
            fields_total=job.fields_total,
            fields_done=len(job.records),
        )
        if isinstance(job, ScanJob):
            self.refresh_interrupted()

    def _watchdog(self) -> None:
        if self._watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_watchdog < self._watchdog_interval / 2:
            return
        if self.job is None or self.job.heartbeats_fresh():
            sdnotify.watchdog()
            self._last_watchdog = now

    def _stop_running_scan(self, grace_s: float = 30.0) -> None:
        """On SIGTERM: cancel, let the workers flush what was captured into the mosaic, then exit.

        ``grace_s`` must stay below the unit's TimeoutStopSec.
        """
        assert self.job is not None
        sdnotify.stopping()
        self._stopping_scan = True
        self.job.cancel("daemon stopped during the scan")
        self._set()
        deadline = time.monotonic() + grace_s
        while self.job is not None and time.monotonic() < deadline:
            time.sleep(0.05)
            self._tick_job()
        if self.job is not None:
            self.job.abort("daemon stopped during the scan; workers did not finish in time")
            self._tick_job()

    def _serve_once(self) -> None:
        """One turn of the main loop. Nothing raised in it ends the daemon: the control server
        already answers every request it can read, so what arrives here is a supervisor bug;
        it is logged and the loop goes on (a pause keeps a persistent fault from spinning)."""
        assert self.server is not None
        try:
            # Woken early by the job's worker messages while they are waited for (WorkerJob.wake_fds).
            self.server.poll(50, wake=self.job.wake_fds() if self.job is not None else ())
            if self.analysis is not None:
                self.analysis.pump()  # before the job: it picks up the outcome in the same turn
            self._tick_job()
            self._watchdog()
        except Exception as err:
            log_failure(log, "main loop error (serving on)", err)
            time.sleep(0.05)

    def _start_worker_server(self) -> None:
        """``daemon.worker_start = "forkserver"``: start the fork server now, from this (the main)
        thread, and let it import the runtime before the daemon serves requests (so the first scan's
        start does not wait for it). A failure is logged; the first worker start tries again (and
        fails the job with the reason if it cannot)."""
        t0 = time.monotonic()
        try:
            pid = start_worker_server(self.cfg.daemon.worker_start)
        except OSError as err:
            log.warning("could not start the worker fork server (the first scan tries again): %s", err)
            return
        if pid is not None:
            log.info("worker fork server: pid %d, ready in %.2f s", pid, time.monotonic() - t0)

    def run(self) -> None:
        """Serve until shutdown is requested or a signal arrives."""
        self._start_worker_server()
        removed = remove_stale_segments()
        if removed:
            log.warning("removed stale shared memory left by a dead daemon: %s", ", ".join(removed))
        self.cfg.daemon.data_root.mkdir(parents=True, exist_ok=True)
        self.cfg.daemon.runtime_dir.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_semaphores(self.cfg.daemon.runtime_dir)
        if removed:
            log.warning("removed stale semaphores left by a dead daemon: %s", ", ".join(removed))
        self.refresh_interrupted()
        if self.interrupted:
            ids = [s.scan_id for s in self.interrupted]
            log.warning("interrupted scans (resume with start_scan resume=<id>): %s", ids)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.server = ControlServer(
            self.cfg.endpoint("command"),
            self.cfg.endpoint("event"),
            self.handle,
            curve=ServerKeys.from_config(self.cfg.control),
        )
        try:
            if self.analysis is not None:
                self.analysis.start()  # loads its models while the daemon waits for its first scan
            sdnotify.ready()
            sdnotify.status("idle")
            while not self._stop:
                self._serve_once()
            if self.job is not None:
                self._stop_running_scan()
        finally:
            if self.job is not None:
                self.job.close()
            if self.analysis is not None:
                self.analysis.close()
            self.server.close()
            self.server = None
            # Clean exit: the scan job's semaphores go with this process (multiprocessing unlinks
            # them at exit), so the record kept for a SIGKILL goes now.
            forget_semaphores(self.cfg.daemon.runtime_dir)
