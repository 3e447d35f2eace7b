"""A worker whose heartbeat is late is killed only if it is hung, not if a loaded machine slows it
(runtime/daemon/liveness.py). The job's clock is a fake one: nothing here depends on how fast the
machine is, only on what /proc says the child processes did."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runtime.config import RuntimeConfig, with_overrides
from runtime.daemon import job as job_module
from runtime.daemon.job import WorkerJob
from runtime.daemon.liveness import SLOW_FACTOR, LateBeats, Usage, read_usage
from runtime.daemon.state import FinishReason, ScanPhase

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")

LIMIT = 10.0


class Clock:
    """Stands in for the job module's ``time``: monotonic() is set by the test."""

    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def time(self) -> float:
        return time.time()


class Child:
    """A process as the job sees its workers (pid, exitcode, kill)."""

    def __init__(self, code: str) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", f"print('ready', flush=True)\n{code}"], stdout=subprocess.PIPE)
        self.pid = self.p.pid
        assert self.p.stdout is not None and self.p.stdout.readline() == b"ready\n"  # started: no more imports

    @property
    def exitcode(self) -> int | None:
        return self.p.poll()

    def kill(self) -> None:
        self.p.kill()
        self.p.wait(30)


BUSY = "while True: pass"  # a worker slowed down: it runs, it does not beat
IDLE = "import time\ntime.sleep(600)"  # a worker deadlocked: it neither runs nor beats


class ProbeJob(WorkerJob):
    KIND = "scan"

    def _handle(self, msg: Any) -> None:
        pass

    def _finish(self, reason: FinishReason) -> None:
        self.phase = ScanPhase.DONE
        self.finish_reason = reason

    def report(self) -> dict[str, Any]:
        return {}


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(job_module, "time", c)
    return c


def _job(tmp_path: Path, child: Child, clock: Clock, late_s: float) -> ProbeJob:
    cfg = with_overrides(RuntimeConfig(), {"daemon": {"data_root": str(tmp_path), "heartbeat_timeout_s": LIMIT}})
    job = ProbeJob(cfg, "probe", tmp_path, lambda event: None)
    job.procs = {"stitcher": child}  # type: ignore[dict-item]
    job.heartbeats = {"stitcher": clock.t - late_s}
    return job


def _ran_since(pid: int, before: Usage) -> None:
    """Wait (bounded) until the child has used CPU since ``before``: a busy process gets some, even on a
    loaded machine; the bound only keeps a broken test from hanging."""
    deadline = time.monotonic() + 60
    while (u := read_usage(pid)) is not None and u.cpu_ticks <= before.cpu_ticks:
        assert time.monotonic() < deadline, "the busy child got no CPU in 60 s"
        time.sleep(0.05)


def test_a_worker_that_runs_without_beating_is_let_run_then_killed_after_the_cap(tmp_path: Path, clock: Clock) -> None:
    child = Child(BUSY)
    try:
        job = _job(tmp_path, child, clock, late_s=LIMIT / 2 + 1)
        job._check_workers()  # half the limit late: the job notes what the worker did so far
        before = read_usage(child.pid)
        assert before is not None
        _ran_since(child.pid, before)
        clock.t += LIMIT / 2  # past the limit: it ran meanwhile, so it is slowed, not hung
        job._check_workers()
        assert not job.done and child.exitcode is None, job.error
        assert job.heartbeats_fresh()  # the systemd watchdog is still fed meanwhile
        while clock.t - job.heartbeats["stitcher"] <= SLOW_FACTOR * LIMIT:
            before = read_usage(child.pid)
            assert before is not None
            _ran_since(child.pid, before)
            clock.t += LIMIT / 2
            job._check_workers()
            if clock.t - job.heartbeats["stitcher"] <= SLOW_FACTOR * LIMIT:
                assert not job.done, job.error
        # Past SLOW_FACTOR limits even a running worker counts as hung (an endless loop).
        assert job.done and job.finish_reason is FinishReason.FAILED
        assert job.error is not None and "stitcher worker sent no heartbeat for 6" in job.error, job.error
        assert "(let run past 10 s while it ran or waited on the disk) (killed)" in job.error
        assert child.exitcode is not None
    finally:
        if child.exitcode is None:
            child.kill()


@pytest.mark.parametrize("how", ["idle", "stopped"])
def test_a_worker_that_neither_runs_nor_beats_is_killed_at_the_limit(tmp_path: Path, clock: Clock, how: str) -> None:
    child = Child(IDLE if how == "idle" else BUSY)
    try:
        if how == "stopped":  # a deadlocked native call looks like this from outside (SIGSTOP)
            child.p.send_signal(signal.SIGSTOP)
        job = _job(tmp_path, child, clock, late_s=LIMIT / 2 + 1)
        job._check_workers()
        assert not job.done
        time.sleep(0.2)  # it would have used CPU by now if it could (no timing is asserted)
        clock.t += LIMIT / 2
        job._check_workers()
        assert job.done and job.finish_reason is FinishReason.FAILED
        assert job.error == f"stitcher worker sent no heartbeat for {LIMIT:.0f} s (killed)"
        assert not job.heartbeats_fresh() or child.exitcode is not None
    finally:
        if child.exitcode is None:
            child.kill()


def test_waiting_on_the_disk_counts_as_progress_and_no_proc_as_none() -> None:
    """The decision alone, with usages given: a thread in D (an fsync) is progress without CPU; a process
    /proc cannot read is hung at the limit, as before this check existed."""
    usages: dict[int, Usage | None] = {1: Usage(100, False), 2: None}
    beats = LateBeats(read=lambda pid: usages[pid])
    assert not beats.hung("stitcher", 1, 0.0, 6.0, LIMIT)  # noted
    usages[1] = Usage(100, True)  # no CPU, but waiting on the disk
    assert not beats.hung("stitcher", 1, 0.0, 11.0, LIMIT)
    assert beats.slowed("stitcher", 0.0)
    usages[1] = Usage(100, False)  # the fsync returned, nothing since: the next look finds it hung
    assert not beats.hung("stitcher", 1, 0.0, 13.0, LIMIT)  # not half a limit since the last look
    assert beats.hung("stitcher", 1, 0.0, 16.5, LIMIT)
    assert not beats.hung("writer", 2, 0.0, 6.0, LIMIT)
    assert beats.hung("writer", 2, 0.0, 10.5, LIMIT)
    # A beat resets it: the next late beat starts over.
    assert not beats.hung("stitcher", 1, 20.0, 26.0, LIMIT)
    assert not beats.slowed("stitcher", 20.0)


def test_a_hard_limit_is_not_stretched(tmp_path: Path, clock: Clock) -> None:
    """A worker loading its models has the start timeout, a hard limit (the load runs all along)."""

    class Loading(ProbeJob):
        def _may_be_slowed(self, name: str) -> bool:
            return False

    child = Child(BUSY)
    try:
        job = _job(tmp_path, child, clock, late_s=LIMIT / 2 + 1)
        job.__class__ = Loading
        job._check_workers()
        before = read_usage(child.pid)
        assert before is not None
        _ran_since(child.pid, before)
        clock.t += LIMIT / 2
        job._check_workers()
        assert job.done and job.error == f"stitcher worker sent no heartbeat for {LIMIT:.0f} s (killed)"
    finally:
        if child.exitcode is None:
            child.kill()
