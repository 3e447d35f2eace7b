"""The supervisor's wake-up on worker messages (``WorkerJob.wake_fds``, runtime/daemon/job.py).

While a job starts (the first fields wait for the ring, which the supervisor makes on ScanPrepared) and
while it finishes (the client waits for scan_finished), the supervisor's poll ends as soon as a worker
message waits on the job's events queue, instead of at its next 50 ms turn. While acquiring it does not
(a wake-up per FieldDone and heartbeat would be CPU taken from the stitcher), and never once the job is
done (nothing reads the queue then: a readable pipe would make the poll spin)."""

from __future__ import annotations

import select
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from runtime.config import RuntimeConfig, with_overrides
from runtime.control.events import JobKind
from runtime.daemon.job import WorkerJob
from runtime.daemon.state import FinishReason, ScanPhase
from runtime.ipc.messages import Heartbeat, WorkerEvent


class _Job(WorkerJob):
    """A job without workers: records what the pump hands it."""

    KIND: ClassVar[JobKind] = "scan"

    def __init__(self, cfg: RuntimeConfig, folder: Path) -> None:
        super().__init__(cfg, "scan-test", folder, lambda _: None)
        self.handled: list[WorkerEvent] = []

    def _handle(self, msg: WorkerEvent) -> None:
        self.handled.append(msg)

    def _finish(self, reason: FinishReason) -> None:
        self._to(ScanPhase.DONE)
        self.finish_reason = reason


def _readable(fd: int, timeout_s: float) -> bool:
    return bool(select.select([fd], [], [], timeout_s)[0])


@pytest.fixture()
def job(tmp_path: Path) -> Iterator[_Job]:
    cfg = with_overrides(
        RuntimeConfig(), {"daemon": {"data_root": str(tmp_path), "runtime_dir": str(tmp_path / "run")}}
    )
    j = _Job(cfg, tmp_path)
    yield j
    j._close_queues()


def test_the_events_pipe_wakes_the_supervisor_while_starting_and_is_drained_by_the_pump(job: _Job) -> None:
    assert job.phase is ScanPhase.STARTING
    (fd,) = job.wake_fds()
    assert not _readable(fd, 0)
    job.events.put(Heartbeat("acquisition", 0.0))
    assert _readable(fd, 30), "a waiting message did not make the fd readable"
    job.pump()
    assert [type(m) for m in job.handled] == [Heartbeat]
    assert not _readable(fd, 0), "the pump left the pipe readable: the poll would spin"


@pytest.mark.parametrize(
    ("path", "wakes"),
    [
        ((ScanPhase.ACQUIRING,), False),
        ((ScanPhase.ACQUIRING, ScanPhase.FLUSHING), True),
        ((ScanPhase.ACQUIRING, ScanPhase.WRITING), True),
        ((ScanPhase.CANCELLING,), True),
        ((ScanPhase.ACQUIRING, ScanPhase.DONE), False),
    ],
)
def test_which_phases_wake_the_supervisor(job: _Job, path: tuple[ScanPhase, ...], wakes: bool) -> None:
    for phase in path:
        job._to(phase)
    assert bool(job.wake_fds()) is wakes
