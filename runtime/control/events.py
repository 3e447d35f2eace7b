"""The payloads of the daemon's events (the ``data`` of an event body), one model per event name.

The daemon publishes these models, never bare dicts: :meth:`ControlServer.publish
<runtime.control.server.ControlServer.publish>` takes one, so a payload that does not match its
model fails where it is built (in tests), not at a client. The JSON Schema of each event
(``runtime/control/schema/event-<name>.json``) is generated from these models.

The wire's enumerations (run states, finish reasons) are spelled out here as ``Literal`` types: the
control layer does not import the daemon's enums (:mod:`runtime.daemon.state`); a test checks that
the two agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field

RunStateName: TypeAlias = Literal["idle", "scanning", "writing", "cancelling", "stopping"]
"""The daemon's run state on the wire (``runtime.daemon.state.RunState`` values)."""

FinishReasonName: TypeAlias = Literal["completed", "cancelled", "failed"]
"""How a scan ended on the wire (``runtime.daemon.state.FinishReason`` values)."""


JobKind: TypeAlias = Literal["scan", "zstacks"]
"""Which kind of job an event or status is about: a scan (``start_scan``) or z-stacks (``record_zstacks``)."""

_SCAN: JobKind = "scan"
_JOB = Field(_SCAN, description="the job: scan (start_scan) or zstacks (record_zstacks)")


class EventPayload(BaseModel):
    """Base of the event payloads; ``EVENT`` is the event's name (its ZeroMQ topic)."""

    # Not strict: the daemon builds these from its own values (enum members, numpy scalars).
    model_config = ConfigDict(extra="forbid", frozen=True)

    EVENT: ClassVar[str]

    def name_and_data(self) -> tuple[str, dict[str, Any]]:
        """The event name and the payload as JSON-able data: what a ``publish(name, data)`` callable takes."""
        return self.EVENT, self.model_dump(mode="json")


class StateEvent(EventPayload):
    """The run state changed (also published for every transition of a scan)."""

    EVENT: ClassVar[str] = "state"

    state: RunStateName


class ScanStartedEvent(EventPayload):
    """Acquisition opened the devices and planned the scan; field_done events follow."""

    EVENT: ClassVar[str] = "scan_started"

    scan_id: str
    fields: int = Field(ge=0, description="fields planned")
    rows: int = Field(ge=0, description="rows of the field grid")
    cols: int = Field(ge=0, description="columns of the field grid")
    mosaic_shape: tuple[int, int] = Field(description="mosaic size in pixels: [height, width]")
    pixel_size_um: float = Field(gt=0.0, description="micrometres per pixel")
    job: JobKind = _JOB


class FieldDoneEvent(EventPayload):
    """One field was captured (progress)."""

    EVENT: ClassVar[str] = "field_done"

    index: int = Field(ge=0, description="the field's index in the plan")
    done: int = Field(ge=1, description="fields captured so far in this scan")
    total: int = Field(ge=0, description="fields planned")
    row: int = Field(ge=0)
    col: int = Field(ge=0)
    z_um: float | None = Field(description="chosen focus z; null when not a finite number")
    captures: int = Field(ge=0, description="frames captured for this field (focus included)")
    job: JobKind = _JOB


class ScanFinishedEvent(EventPayload):
    """Every job's last event, whatever the ending (a failure also sends scan_failed first)."""

    EVENT: ClassVar[str] = "scan_finished"

    scan_id: str
    reason: FinishReasonName
    slide: str | None = Field(description="the OME-TIFF; null when none was written")
    report: str | None = Field(description="the scan's report.json; null when it could not be written (disk full)")
    mosaic: str | None = Field(description="the Zarr mosaic, when it was kept (cancelled, failed, or configured)")
    recording: str | None = Field(None, description="zstacks: the recording (recording.zarr), when one was written")
    job: JobKind = _JOB


class ScanFailedEvent(EventPayload):
    """A job failed (a worker died or hung, a device failed); scan_finished follows."""

    EVENT: ClassVar[str] = "scan_failed"

    scan_id: str
    error: str = Field(description="what went wrong, one line")
    report: str | None = Field(description="the scan's report.json; null when it could not be written (disk full)")
    job: JobKind = _JOB


class AnalysisReadyEvent(EventPayload):
    """A completed scan's slide analysis (``[analysis] enabled``) is written, or failed (``error``);
    published before scan_finished. The figures are those of ``report.json``'s ``analysis``."""

    EVENT: ClassVar[str] = "analysis_ready"

    scan_id: str
    error: str | None = Field(description="why there is no analysis (models missing, analysis failed); null when ok")
    slide_score: float | None = Field(description="probability that the slide contains tumour")
    tumour_burden_mm2: float | None = Field(description="total lesion area")
    tumour_burden_pct: float | None = Field(description="lesion area as % of the tissue area")
    lesion_count: int | None = Field(description="lesions outlined")
    largest_lesion_diameter_mm: float | None = Field(description="largest distance across a lesion")
    tissue_mm2: float | None = Field(description="tissue area")
    nuclei_count: int | None = Field(description="nuclei detected; null when nuclei were not detected")
    nuclei_density_in_lesions_per_mm2: float | None = Field(description="nuclei per mm² inside lesions")
    nuclei_density_outside_per_mm2: float | None = Field(description="nuclei per mm² of tissue outside lesions")
    annotations: str | None = Field(description="the QuPath GeoJSON of the lesions, tissue and artifacts")
    heatmap: str | None = Field(description="the tumour heatmap (pyramidal OME-TIFF aligned to the slide)")
    job: JobKind = _JOB


class ErrorEvent(EventPayload):
    """A problem outside a scan. Reserved: the daemon does not publish it yet."""

    EVENT: ClassVar[str] = "error"

    message: str


Event: TypeAlias = (
    StateEvent
    | ScanStartedEvent
    | FieldDoneEvent
    | ScanFinishedEvent
    | ScanFailedEvent
    | ErrorEvent
    | AnalysisReadyEvent
)
"""Every event the daemon may publish."""

EVENTS: Final[Mapping[str, type[Event]]] = {
    model.EVENT: model
    for model in (
        StateEvent,
        ScanStartedEvent,
        FieldDoneEvent,
        ScanFinishedEvent,
        ScanFailedEvent,
        ErrorEvent,
        AnalysisReadyEvent,
    )
}
"""Event name -> payload model, in the order of :data:`runtime.control.protocol.EVENT_NAMES`."""


def event_from_data(name: str, data: Mapping[str, Any]) -> Event:
    """The typed event for a ``(name, data)`` pair; ValueError (pydantic's ValidationError is one)
    when the name is unknown or the data does not match the event's model."""
    model = EVENTS.get(name)
    if model is None:
        raise ValueError(f"unknown event {name!r}; expected one of {', '.join(EVENTS)}")
    return model.model_validate(data)
