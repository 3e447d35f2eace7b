"""The control-plane wire protocol: JSON requests, replies and events.

Everything on the wire is UTF-8 JSON (never pickle: a pickle from the network
is remote code execution). One request or reply is one ZeroMQ frame.

Request::

    {"id": "4f1c...", "command": "start_scan", "params": {"output_name": "slide-42"}}

``id`` is a string or an integer chosen by the client and echoed in the reply,
so a client can tell a late reply to an earlier request from the one it is
waiting for. ``params`` may be omitted when a command takes none.

Replies::

    {"id": "4f1c...", "ok": true, "result": {...}}
    {"id": "4f1c...", "ok": false, "error": {"code": "busy", "message": "a scan is already running"}}

``id`` is ``null`` in an error reply when the request was too broken to read
an id from. Error codes are in :data:`ERROR_CODES`.

Events (PUB socket) are two frames: the event name (so subscribers can filter
by ZeroMQ topic prefix) and the JSON body::

    {"seq": 17, "event": "field_done", "time": 1718000000.123, "data": {...}}

``seq`` increases by one per published event for the life of the daemon
process; it restarts at 1 when the daemon restarts. A subscriber that sees a
jump has missed events (PUB drops them for slow subscribers) and should
re-read the state with ``status``.

The typed definitions of every message are the contract: the params models
here (:data:`COMMANDS`), the result models in :mod:`runtime.control.replies`,
the event payload models in :mod:`runtime.control.events`. The JSON Schema
committed under ``runtime/control/schema/`` is generated from them
(``python -m runtime.control.json_schema``; a test fails when the two disagree).

Retried requests: clients retry when a reply is late (Lazy Pirate), so a
daemon can receive the same request twice. Requests for commands in
:data:`NON_IDEMPOTENT` whose id is a *string* are treated as unique tokens:
the control server answers an identical repeat from a short reply cache
instead of running it again (a retried ``start_scan`` must not answer
"busy" because its first copy already started the scan). Integer ids are
usually per-connection counters that restart at 1, so they are never
deduplicated.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final, Literal, TypeAlias, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from runtime.config import AnalysisConfig, FocusConfig

MAX_REQUEST_BYTES: Final = 16 * 1024
"""Largest request accepted. Commands are small (a full ``start_scan`` is well under 5 KiB); a
bigger payload is a bug or abuse."""

MAX_ID_CHARS: Final = 128

MAX_JSON_DEPTH: Final = 16
"""Deepest nesting of arrays and objects accepted in a request (``start_scan`` needs 3).

``json.loads`` recurses once per level: a 2 KB request of ``[[[[...`` raises ``RecursionError``,
which is caught like any other parse error; shallower but still absurd nesting is refused after
parsing."""

MAX_STAGE_UM: Final = 1_000_000.0
"""Stage coordinates (x, y) accepted in a request: within +-1 m of the stage origin."""

MAX_REGION_UM: Final = 100_000.0
"""Largest region side accepted (100 mm: a 2 x 3 inch slide is 76 x 51 mm)."""

MAX_Z_UM: Final = 100_000.0
"""Stage z accepted in a request (a z-stack's centre): within +-100 mm of the stage's zero."""

MAX_ZSTACK_PLANES: Final = 201
"""Most planes of one z-stack (``record_zstacks``): +-10 µm at 0.1 µm is 201."""

DEFAULT_Z_HALF_RANGE_UM: Final = 10.0
DEFAULT_Z_STEP_UM: Final = 0.5
"""``record_zstacks`` defaults: 41 planes over +-10 µm (what calibration and the benchmarks use)."""

MAX_ZSTACK_FIELDS: Final = 10_000
"""Most fields ``record_zstacks`` may pick with ``max_fields`` (calibration needs about 8)."""

ErrorCode = Literal["malformed", "unknown_command", "invalid_params", "busy", "not_running", "internal"]
ERROR_CODES: Final[tuple[str, ...]] = get_args(ErrorCode)

EVENT_NAMES: Final[tuple[str, ...]] = (
    # The payload models are in runtime.control.events (one per name, same order).
    "state",  # run state changed: {"state": "idle"|"scanning"|"writing"|"cancelling"|"stopping"|...}
    # The scan_* and field_done events serve every job: "job" says which ("scan" or "zstacks").
    "scan_started",  # planned: {"scan_id", "job", "fields", "rows", "cols", "mosaic_shape": [h, w], "pixel_size_um"}
    "field_done",  # progress: {"index", "done", "total", "row", "col", "z_um" (null if not finite), "captures", "job"}
    "scan_finished",  # every job's last event: {"scan_id", "reason": "completed"|"cancelled"|"failed",
    #                   "slide": path or null, "report": path, "mosaic": path or null, "recording", "job"}
    "scan_failed",  # before scan_finished when a job fails: {"scan_id", "error", "report": path, "job"}
    "error",  # reserved, not published yet: a problem outside a scan: {"message"}
    "analysis_ready",  # a completed scan's slide analysis, before scan_finished: {"scan_id", "error", "slide_score",
    #                    "tumour_burden_mm2", "lesion_count", ..., "annotations": path, "heatmap": path, "job"}
)

NON_IDEMPOTENT: Final[frozenset[str]] = frozenset({"start_scan", "record_zstacks", "cancel", "shutdown"})

RequestId = str | int

WireRequestId: TypeAlias = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)] | int
"""A request id as the schema describes it (:func:`parse_request` checks the same by hand, with clearer errors)."""


class RequestError(Exception):
    """A request cannot be served; ``code`` is one of :data:`ERROR_CODES`.

    Command handlers raise this (e.g. ``RequestError("busy", "a scan is
    already running")``); the control server turns it into an error reply.
    """

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}; expected one of {', '.join(ERROR_CODES)}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ProtocolError(RequestError):
    """A request could not be parsed or validated; carries the id if one could be read."""

    def __init__(self, code: str, message: str, request_id: RequestId | None = None) -> None:
        super().__init__(code, message)
        self.request_id = request_id


# --------------------------------------------------------------------------- params


class _Params(BaseModel):
    # strict: "10" is not a number on this wire; a UI sending strings has a bug worth seeing.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class PingParams(_Params):
    COMMAND: ClassVar[str] = "ping"


class StatusParams(_Params):
    COMMAND: ClassVar[str] = "status"


class CancelParams(_Params):
    COMMAND: ClassVar[str] = "cancel"


class ShutdownParams(_Params):
    COMMAND: ClassVar[str] = "shutdown"


class Region(_Params):
    """A stage rectangle in micrometres: top-left corner and size."""

    x_um: float = Field(ge=-MAX_STAGE_UM, le=MAX_STAGE_UM)
    y_um: float = Field(ge=-MAX_STAGE_UM, le=MAX_STAGE_UM)
    width_um: float = Field(gt=0.0, le=MAX_REGION_UM)
    height_um: float = Field(gt=0.0, le=MAX_REGION_UM)


FOCUS_OVERRIDES: Final[tuple[str, ...]] = ("strategy", "sweep_half_range_um", "sweep_steps", "metric")
"""The ``[focus]`` keys a ``start_scan`` may override (each keeps its type and bounds from FocusConfig)."""


def optional_overrides(
    config: type[BaseModel], names: tuple[str, ...], model_name: str, doc: str, base: type[_Params] = _Params
) -> type[_Params]:
    """A params model of ``config``'s fields ``names``, each optional (None: keep the config value).

    Types, bounds and descriptions are taken from ``config``'s field definitions, so the
    wire's limits cannot drift from the config file's; the model is strict like all params.
    ``base`` may add fields of its own (path parameters, with the wire's bounds for paths).
    """
    fields: dict[str, Any] = {}
    for name in names:
        info = config.model_fields[name]
        kind: Any = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[name] = (kind | None, Field(None, description=info.description))
    return create_model(model_name, __base__=base, __doc__=doc, __module__=__name__, **fields)


if TYPE_CHECKING:
    # The checker sees a params model; the fields are FocusConfig's (read them there).
    FocusOverrides: TypeAlias = _Params
else:
    FocusOverrides = optional_overrides(
        FocusConfig,
        FOCUS_OVERRIDES,
        "FocusOverrides",
        "Per-scan overrides of the ``[focus]`` config section; omitted keys keep the config value.",
    )


_OUTPUT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# The same rule for the schema (the validator below gives the clearer error).
_OUTPUT_NAME_PATTERN = r"^(?!\.)(?!.*\.\.)[A-Za-z0-9._-]{1,64}$"


_PATH_FIELD: Final[dict[str, Any]] = {
    "min_length": 1,
    "max_length": 4096,
    "json_schema_extra": {"pattern": "^[^\\u0000]*$"},
}
"""The bounds of a path parameter (its rules under the data root are applied by the daemon)."""


def _no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


class ModelOverrides(_Params):
    """Per-scan model folders: ``"builtin"``, a folder under the data root, or an absolute path in one of
    the config's ``models.allowed_dirs`` (checked by the daemon; then validated like the config file)."""

    autofocus_dir: str | None = Field(
        None, description="autofocus model folder (model.onnx + model.json) for this scan", **_PATH_FIELD
    )

    _paths = field_validator("autofocus_dir")(_no_nul)


ANALYSIS_FOLDERS: Final[tuple[str, ...]] = ("tumour_dir", "nuclei_dir", "slide_dir")
"""The ``[analysis]`` model folders a ``start_scan`` may name (checked by the daemon like ``autofocus_dir``)."""

ANALYSIS_OVERRIDES: Final[tuple[str, ...]] = ("enabled", "models", "nuclei", "subdivide", "threshold")
"""The other ``[analysis]`` keys a ``start_scan`` may override: what the scan's analysis is. The
rest of the section (``backend``, ``batch_size``, ``nice``, ``finish_timeout_s``) is how the
daemon's one analysis worker runs on this machine: the operator's, not a scan's."""


class _AnalysisFolders(_Params):
    """The model folders of :data:`ANALYSIS_FOLDERS`, each a path parameter (the daemon checks where it is)."""

    tumour_dir: str | None = Field(None, description="tumour classifier model folder for this scan", **_PATH_FIELD)
    nuclei_dir: str | None = Field(None, description="nuclei detector model folder for this scan", **_PATH_FIELD)
    slide_dir: str | None = Field(
        None, description="slide (attention-MIL) model folder for this scan, or 'none'", **_PATH_FIELD
    )

    _paths = field_validator(*ANALYSIS_FOLDERS)(_no_nul)


if TYPE_CHECKING:
    AnalysisOverrides: TypeAlias = _AnalysisFolders
else:
    AnalysisOverrides = optional_overrides(
        AnalysisConfig,
        ANALYSIS_OVERRIDES,
        "AnalysisOverrides",
        "Per-scan overrides of the ``[analysis]`` config section; omitted keys keep the config value. "
        "The whole section is then validated like the config file.",
        base=_AnalysisFolders,
    )


class JobParams(_Params):
    """What every job on the scanner takes: where (driver, region) and the output folder."""

    recording: str | None = Field(None, description="replay drivers: recording path under the data root", **_PATH_FIELD)
    region: Region | None = None
    output_name: str | None = Field(
        None,
        description="folder name under the data root for this job (default: the job id)",
        json_schema_extra={"pattern": _OUTPUT_NAME_PATTERN},
    )

    _paths = field_validator("recording")(_no_nul)

    @field_validator("output_name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        # The name becomes a directory under the data root: anything that could
        # climb out of it or hide (leading dot, "..") is refused outright rather
        # than sanitised, so the operator sees exactly what they asked for.
        if value is None:
            return value
        if not _OUTPUT_NAME.fullmatch(value) or value.startswith(".") or ".." in value:
            raise ValueError(
                "must be a plain folder name: 1-64 characters of A-Z a-z 0-9 . _ -, "
                f"not starting with '.' and without '..' (got {value!r})"
            )
        return value


class StartScanParams(JobParams):
    """``start_scan``: every field optional; the daemon fills in config defaults."""

    COMMAND: ClassVar[str] = "start_scan"

    focus: FocusOverrides | None = None
    models: ModelOverrides | None = None
    analysis: AnalysisOverrides | None = None
    resume: str | None = Field(
        None,
        description="continue this interrupted scan (a scan_id from status.interrupted) with the parameters "
        "it was started with; no other parameter may be given",
        json_schema_extra={"pattern": _OUTPUT_NAME_PATTERN},
    )

    @field_validator("resume")
    @classmethod
    def _plain_scan_id(cls, value: str | None) -> str | None:
        if value is not None and (not _OUTPUT_NAME.fullmatch(value) or value.startswith(".") or ".." in value):
            raise ValueError(f"must be a scan id as status.interrupted lists it (got {value!r})")
        return value

    @model_validator(mode="after")
    def _resume_alone(self) -> StartScanParams:
        if self.resume is not None:
            names = ("recording", "region", "output_name", "focus", "models", "analysis")
            others = [k for k in names if getattr(self, k) is not None]
            if others:
                raise ValueError(f"resume continues the scan with its journaled parameters; remove {', '.join(others)}")
        return self


class RecordZstacksParams(JobParams):
    """``record_zstacks``: a z-stack at each field of the region's plan (or at ``max_fields`` of them,
    spread evenly), written as a recording (``recording.zarr``, no truth) with ``report.json``."""

    COMMAND: ClassVar[str] = "record_zstacks"

    z_center_um: float | None = Field(
        None, ge=-MAX_Z_UM, le=MAX_Z_UM, description="centre plane's stage z (default: the config's focus.start_z_um)"
    )
    z_half_range_um: float | None = Field(
        None, ge=0.0, le=1000.0, description="planes from centre - this to centre + this (default 10 µm)"
    )
    z_step_um: float | None = Field(None, gt=0.0, le=100.0, description="distance between planes (default 0.5 µm)")
    max_fields: int | None = Field(
        None, ge=1, le=MAX_ZSTACK_FIELDS, description="record only this many fields, spread evenly over the plan"
    )

    @property
    def step_um(self) -> float:
        return DEFAULT_Z_STEP_UM if self.z_step_um is None else self.z_step_um

    @property
    def planes(self) -> int:
        """Planes per stack: the centre and every whole step within the half range on each side."""
        half = DEFAULT_Z_HALF_RANGE_UM if self.z_half_range_um is None else self.z_half_range_um
        return 2 * math.floor(half / self.step_um + 1e-9) + 1

    @model_validator(mode="after")
    def _few_enough_planes(self) -> RecordZstacksParams:
        if self.planes > MAX_ZSTACK_PLANES:
            raise ValueError(
                f"z_half_range_um / z_step_um gives {self.planes} planes per stack; the limit is "
                f"{MAX_ZSTACK_PLANES} (MAX_ZSTACK_PLANES)"
            )
        return self

    def plane_offsets_um(self) -> tuple[float, ...]:
        """Each plane's z relative to the centre, increasing."""
        half = self.planes // 2
        return tuple((k - half) * self.step_um for k in range(self.planes))


RequestParams: TypeAlias = (
    PingParams | StatusParams | StartScanParams | RecordZstacksParams | CancelParams | ShutdownParams
)
"""What a command handler receives: the params model tells which command it is."""

COMMANDS: Final[Mapping[str, type[RequestParams]]] = {
    model.COMMAND: model
    for model in (PingParams, StatusParams, StartScanParams, RecordZstacksParams, CancelParams, ShutdownParams)
}


@dataclass(frozen=True)
class Request:
    """A parsed, validated request."""

    id: RequestId
    command: str
    params: RequestParams

    def params_dict(self) -> dict[str, Any]:
        """Params as plain JSON-able data, omitted optional fields left out (not ``None``)."""
        return self.params.model_dump(mode="json", exclude_none=True)


# --------------------------------------------------------------------------- parsing


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # {"id": 1, "id": 2}: which one did the sender mean? Refuse rather than guess.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def json_depth(doc: Any) -> int:
    """How deeply arrays and objects nest in a parsed JSON document (a scalar is 0).

    Iterative, so it is safe on whatever ``json.loads`` managed to build.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            deepest = max(deepest, depth + 1)
            stack.extend((v, depth + 1) for v in value)
    return deepest


def _loads(raw: bytes) -> Any:
    return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
    }.get(type(value), type(value).__name__)


def describe_validation_error(err: ValidationError) -> str:
    """One line per problem, each naming the parameter: ``region.width_um: Input should be ...``."""
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "params"
        if e["type"] == "extra_forbidden":
            parts.append(f"{key}: unknown parameter")
        elif e["type"] == "missing":
            parts.append(f"{key}: required")
        elif e["type"] == "value_error":
            parts.append(f"{key}: {e['ctx']['error']}")
        else:
            parts.append(f"{key}: {e['msg']} (got {e['input']!r})")
    return "; ".join(parts)


def parse_request(raw: bytes) -> Request:
    """Parse and validate one request frame; raise :class:`ProtocolError` naming the problem."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise ProtocolError("malformed", f"request is {len(raw)} bytes; the limit is {MAX_REQUEST_BYTES}")
    try:
        doc = _loads(raw)
    except UnicodeDecodeError as err:
        raise ProtocolError("malformed", f"request is not UTF-8 text: {err.reason} at byte {err.start}") from None
    except ValueError as err:  # json.JSONDecodeError is a ValueError, as are the hooks' errors
        raise ProtocolError("malformed", f"request is not valid JSON: {err}") from None
    except RecursionError:  # json.loads recurses once per level (C stack guarded by the interpreter)
        raise ProtocolError("malformed", f"request nests too deeply; the limit is {MAX_JSON_DEPTH}") from None
    depth = json_depth(doc)
    if depth > MAX_JSON_DEPTH:
        raise ProtocolError("malformed", f"request nests {depth} levels deep; the limit is {MAX_JSON_DEPTH}")
    if not isinstance(doc, dict):
        raise ProtocolError("malformed", f"request must be a JSON object, got {_json_type(doc)}")
    if "id" not in doc:
        raise ProtocolError("malformed", "request has no 'id'")
    request_id = doc["id"]
    if isinstance(request_id, bool) or not isinstance(request_id, str | int):
        raise ProtocolError("malformed", f"'id' must be a string or an integer, got {_json_type(request_id)}")
    if isinstance(request_id, str) and not 1 <= len(request_id) <= MAX_ID_CHARS:
        raise ProtocolError("malformed", f"'id' must be 1-{MAX_ID_CHARS} characters, got {len(request_id)}")
    extra = sorted(set(doc) - {"id", "command", "params"})
    if extra:
        raise ProtocolError("malformed", f"unexpected key(s) {', '.join(map(repr, extra))} in request", request_id)
    command = doc.get("command")
    if not isinstance(command, str):
        raise ProtocolError("malformed", f"'command' must be a string, got {_json_type(command)}", request_id)
    model = COMMANDS.get(command)
    if model is None:
        known = ", ".join(sorted(COMMANDS))
        raise ProtocolError("unknown_command", f"unknown command {command[:64]!r}; known: {known}", request_id)
    params = doc.get("params", {})
    if not isinstance(params, dict):
        raise ProtocolError(
            "invalid_params",
            f"{command}: 'params' must be a JSON object, got {_json_type(params)}",
            request_id,
        )
    try:
        validated = model.model_validate(params)
    except ValidationError as err:
        raise ProtocolError("invalid_params", f"{command}: {describe_validation_error(err)}", request_id) from None
    return Request(id=request_id, command=command, params=validated)


def request_id_of(raw: bytes) -> RequestId | None:
    """Best-effort id of a request frame that may be invalid (for logging and caching)."""
    try:
        doc = _loads(raw)
    except (ValueError, RecursionError):
        return None
    rid = doc.get("id") if isinstance(doc, dict) else None
    return rid if isinstance(rid, str | int) and not isinstance(rid, bool) else None


# --------------------------------------------------------------------------- encoding


def _json_default(value: Any) -> Any:
    # Paths are the common non-JSON value in results (output folders), numpy
    # scalars the common one in measurements; anything else unknown is a bug
    # and fails loudly rather than being str()-ed.
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    if hasattr(value, "dtype") and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _finite(doc: Any) -> Any:
    if hasattr(doc, "dtype") and hasattr(doc, "item") and getattr(doc, "ndim", None) == 0:
        doc = doc.item()
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: _finite(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [_finite(v) for v in doc]
    return doc


def dumps(doc: Any) -> bytes:
    """Compact UTF-8 JSON. NaN/Infinity become null.

    They are not JSON (other parsers reject them), and a failed focus fit
    reporting NaN must not turn a progress event or a status reply into an
    error: null is the honest "no value".
    """
    try:
        text = json.dumps(doc, separators=(",", ":"), allow_nan=False, default=_json_default)
    except ValueError:
        text = json.dumps(_finite(doc), separators=(",", ":"), allow_nan=False, default=_json_default)
    return text.encode("utf-8")


def encode_request(request_id: RequestId, command: str, params: Mapping[str, Any] | None = None) -> bytes:
    """A request frame (clients use this; the daemon never sends requests)."""
    return dumps({"id": request_id, "command": command, "params": dict(params or {})})


def encode_reply(request_id: RequestId, result: BaseModel | Mapping[str, Any]) -> bytes:
    """A success reply: a result model (:mod:`runtime.control.replies`) or a plain mapping.

    Raises TypeError/ValueError if ``result`` is not JSON-able.
    """
    doc = result.model_dump(mode="json") if isinstance(result, BaseModel) else dict(result)
    return dumps({"id": request_id, "ok": True, "result": doc})


def encode_error(request_id: RequestId | None, code: str, message: str) -> bytes:
    """An error reply; ``request_id`` is None when the request's id could not be read."""
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    return dumps({"id": request_id, "ok": False, "error": {"code": code, "message": message}})


def decode_reply(raw: bytes) -> dict[str, Any]:
    """Parse a reply frame and check its shape; raise ProtocolError("malformed", ...) otherwise."""
    try:
        doc = _loads(raw)
    except ValueError as err:
        raise ProtocolError("malformed", f"reply is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or "id" not in doc or not isinstance(doc.get("ok"), bool):
        raise ProtocolError("malformed", f"reply is not a protocol reply: {raw[:200]!r}")
    if doc["ok"] and not isinstance(doc.get("result"), dict):
        raise ProtocolError("malformed", "reply has ok=true but no 'result' object")
    if not doc["ok"]:
        error = doc.get("error")
        if not isinstance(error, dict) or not isinstance(error.get("code"), str):
            raise ProtocolError("malformed", "reply has ok=false but no 'error' object with a 'code'")
        error.setdefault("message", "")
    return doc


def encode_event(seq: int, event: str, data: Mapping[str, Any], time_s: float | None = None) -> list[bytes]:
    """The two frames of an event: topic (event name) and JSON body."""
    if event not in EVENT_NAMES:
        raise ValueError(f"unknown event {event!r}; expected one of {', '.join(EVENT_NAMES)}")
    body = {"seq": seq, "event": event, "time": time.time() if time_s is None else time_s, "data": dict(data)}
    return [event.encode("ascii"), dumps(body)]


def decode_event(frames: list[bytes]) -> dict[str, Any]:
    """Parse an event (two frames, or one JSON frame); raise ProtocolError("malformed", ...) otherwise."""
    if not 1 <= len(frames) <= 2:
        raise ProtocolError("malformed", f"event has {len(frames)} frames, expected 2")
    try:
        doc = _loads(frames[-1])
    except ValueError as err:
        raise ProtocolError("malformed", f"event is not valid JSON: {err}") from None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("seq"), int)
        or not isinstance(doc.get("event"), str)
        or not isinstance(doc.get("data"), dict)
    ):
        raise ProtocolError("malformed", f"event is not a protocol event: {frames[-1][:200]!r}")
    return doc


# --------------------------------------------------------------------------- paths


def resolve_under(root: Path, value: str, param: str) -> Path:
    """Resolve a path parameter against ``root`` and refuse anything outside it.

    Relative paths are taken relative to ``root``; absolute ones must already
    lie inside it. Symlinks are resolved first, so a link pointing out of the
    data root is refused too. Raises ``RequestError("invalid_params", ...)``
    naming the parameter. The path rules live in :mod:`runtime.paths` (this
    is :func:`runtime.paths.resolve_under` with the protocol's error).
    """
    from runtime import paths  # the one tie between the wire format and the path rules

    try:
        return paths.resolve_under(root, value, param)
    except paths.UnsafePath as err:
        raise RequestError("invalid_params", str(err)) from None
