"""The daemon's acquisition state machine and its frozen status snapshots.

States move IDLE -> SCANNING -> WRITING -> IDLE (or CANCELLING/FAILED back to
IDLE); every transition is published as a ``state`` event. A late subscriber
gets the current picture from the ``status`` request, which returns a
:class:`ScanStatus` snapshot.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class RunState(enum.StrEnum):
    IDLE = "idle"
    STARTING = "starting"
    SCANNING = "scanning"
    WRITING = "writing"
    CANCELLING = "cancelling"
    STOPPING = "stopping"


class FinishReason(enum.StrEnum):
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(frozen=True)
class ScanStatus:
    """A snapshot; never mutated, replaced on every change."""

    state: RunState = RunState.IDLE
    scan_id: str | None = None
    output_dir: str | None = None
    fields_total: int = 0
    fields_done: int = 0
    last_finish: FinishReason | None = None
    last_error: str | None = None
    last_output: str | None = None
    workers: dict[str, int] = field(default_factory=dict)  # name -> pid

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        d["last_finish"] = self.last_finish.value if self.last_finish else None
        return d
