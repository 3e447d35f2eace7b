"""The results of the daemon's commands (the ``result`` of a success reply) and the error reply.

The daemon's command handler returns these models; :class:`~runtime.control.server.ControlServer`
refuses a result model of the wrong type for the command (an "internal" error), and building a
model checks its values, so a reply that does not match its model fails in tests, not at a
client. The JSON Schema of each reply (``runtime/control/schema/reply-<command>.json``,
``reply-error.json``) is generated from these models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field

from runtime.control.events import FinishReasonName, JobKind, RunStateName
from runtime.control.protocol import ErrorCode, WireRequestId


class _Result(BaseModel):
    # Not strict: the daemon builds these from its own values (enum members, paths as str).
    model_config = ConfigDict(extra="forbid", frozen=True)


class PingResult(_Result):
    """``ping``: the daemon answers, with its pid and run state."""

    pong: Literal[True]
    pid: int
    state: RunStateName


class InterruptedScanInfo(_Result):
    """One interrupted scan, from its journal (runtime/output/journal.py)."""

    scan_id: str
    output_dir: str
    fields_durable: int = Field(ge=0, description="fields journaled: in the mosaic or kept on disk, never recaptured")
    fields_total: int = Field(ge=0)
    reason: str = Field(description="why it stopped, one line")


class StatusResult(_Result):
    """``status``: the current picture (what a late subscriber reads first); ``last_*`` describe
    the previous scan."""

    state: RunStateName
    job: JobKind | None = Field(description="what the running (or last started) job is: a scan or z-stacks")
    scan_id: str | None = Field(description="the running (or last started) scan")
    output_dir: str | None = Field(description="the running (or last started) scan's folder")
    fields_total: int = Field(ge=0)
    fields_done: int = Field(ge=0)
    last_finish: FinishReasonName | None
    last_error: str | None
    last_output: str | None = Field(
        description="the last job's output: a scan's OME-TIFF, or the z-stacks' recording, when one was written"
    )
    workers: dict[str, int] = Field(
        description="worker name -> pid: the scan's workers while a scan runs; the analysis worker whenever it is ready"
    )
    interrupted: list[InterruptedScanInfo] = Field(
        default_factory=list,
        description="scans in the data root that did not complete and can be resumed "
        '(start_scan {"resume": scan_id}), oldest id first',
    )


class StartScanResult(_Result):
    """``start_scan`` and ``record_zstacks``: the job was started (progress comes as events)."""

    scan_id: str
    output_dir: str


class CancelResult(_Result):
    """``cancel``: the scan stops after the current field; scan_finished follows."""

    scan_id: str
    cancelling: Literal[True]


class ShutdownResult(_Result):
    """``shutdown``: the daemon stops (a running scan is cancelled and its mosaic kept)."""

    stopping: Literal[True]


Result: TypeAlias = PingResult | StatusResult | StartScanResult | CancelResult | ShutdownResult
"""Every command's result."""

RESULTS: Final[Mapping[str, type[Result]]] = {
    "ping": PingResult,
    "status": StatusResult,
    "start_scan": StartScanResult,
    "record_zstacks": StartScanResult,
    "cancel": CancelResult,
    "shutdown": ShutdownResult,
}
"""Command -> result model (the same commands as :data:`runtime.control.protocol.COMMANDS`)."""


class ErrorBody(_Result):
    code: ErrorCode
    message: str


class ErrorReply(_Result):
    """An error reply; ``id`` is null when the request was too broken to read an id from."""

    id: WireRequestId | None
    ok: Literal[False]
    error: ErrorBody
