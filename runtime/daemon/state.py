"""The scan job's phases, the daemon's run state derived from them, and status snapshots.

A scan job (:class:`~runtime.daemon.scan_job.ScanJob`) is in one :class:`ScanPhase` at a
time and moves only along :data:`TRANSITIONS` (see the diagram in ScanJob's docstring).
A z-stack recording job (:class:`~runtime.daemon.zstack_job.ZstackJob`) uses the same phases and
table, a subset of it: STARTING -> ACQUIRING -> DONE, with CANCELLING on a cancel; it has no
mosaic to flush and no slide to write (its worker writes the recording as it goes).
The supervisor does not keep a state of its own beside it: its :class:`RunState` (what
``status`` and the ``state`` event report) is :func:`run_state` of the job's phase, or
``idle`` without a job, or ``stopping`` while the daemon shuts down. A late subscriber
gets the current picture from the ``status`` request, a :class:`ScanStatus` snapshot.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class RunState(enum.StrEnum):
    """What the daemon is doing, as clients see it."""

    IDLE = "idle"
    SCANNING = "scanning"
    WRITING = "writing"
    CANCELLING = "cancelling"
    STOPPING = "stopping"


class ScanPhase(enum.StrEnum):
    """Where one scan job is. Every change goes through :func:`check_transition`."""

    STARTING = "starting"  # workers spawned: devices opening, models loading, no plan yet
    ACQUIRING = "acquiring"  # the plan and the ring exist: fields are being captured
    FLUSHING = "flushing"  # acquisition is done: the stitcher finishes the mosaic
    WRITING = "writing"  # the mosaic is complete: the writer finishes the slide
    CANCELLING = "cancelling"  # a cancel: what was captured still flows into the mosaic
    DONE = "done"  # finished (the job's FinishReason says how); workers stopped, report written


TRANSITIONS: dict[ScanPhase, frozenset[ScanPhase]] = {
    ScanPhase.STARTING: frozenset({ScanPhase.ACQUIRING, ScanPhase.CANCELLING, ScanPhase.DONE}),
    # MosaicDone may overtake AcquisitionDone on the events queue (two processes, two feeder
    # threads): ACQUIRING -> WRITING directly is not an error.
    ScanPhase.ACQUIRING: frozenset({ScanPhase.FLUSHING, ScanPhase.WRITING, ScanPhase.CANCELLING, ScanPhase.DONE}),
    ScanPhase.FLUSHING: frozenset({ScanPhase.WRITING, ScanPhase.CANCELLING, ScanPhase.DONE}),
    ScanPhase.WRITING: frozenset({ScanPhase.CANCELLING, ScanPhase.DONE}),
    ScanPhase.CANCELLING: frozenset({ScanPhase.DONE}),
    ScanPhase.DONE: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A phase change the table does not allow: a bug in the scan job, never a client's doing."""


def check_transition(old: ScanPhase, new: ScanPhase) -> ScanPhase:
    """Return ``new`` if ``old -> new`` is in :data:`TRANSITIONS`; raise IllegalTransition otherwise."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"scan job cannot go from {old} to {new}")
    return new


_RUN_STATE: dict[ScanPhase, RunState] = {
    ScanPhase.STARTING: RunState.SCANNING,
    ScanPhase.ACQUIRING: RunState.SCANNING,
    ScanPhase.FLUSHING: RunState.SCANNING,
    ScanPhase.WRITING: RunState.WRITING,
    ScanPhase.CANCELLING: RunState.CANCELLING,
    ScanPhase.DONE: RunState.IDLE,
}


def run_state(phase: ScanPhase | None, stopping: bool = False) -> RunState:
    """The daemon's run state: ``stopping`` while it shuts down with a scan, else from the phase."""
    if phase is None or phase is ScanPhase.DONE:
        return RunState.IDLE
    return RunState.STOPPING if stopping else _RUN_STATE[phase]


class FinishReason(enum.StrEnum):
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(frozen=True)
class ScanStatus:
    """A snapshot; never mutated, replaced on every change."""

    state: RunState = RunState.IDLE
    job: str | None = None  # "scan" or "zstacks" (the job's KIND)
    scan_id: str | None = None
    output_dir: str | None = None
    fields_total: int = 0
    fields_done: int = 0
    last_finish: FinishReason | None = None
    last_error: str | None = None
    last_output: str | None = None
    workers: dict[str, int] = field(default_factory=dict)  # name -> pid
    # Scans in the data root that can be resumed (runtime.output.journal.InterruptedScan.to_json()).
    interrupted: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["interrupted"] = [dict(x) for x in self.interrupted]
        d["state"] = self.state.value
        d["last_finish"] = self.last_finish.value if self.last_finish else None
        return d
