"""The control plane: the wire protocol and its two ends, the daemon's server and the clients.

Modules:

* ``protocol``: the wire format: typed request params (``RequestParams``, ``StartScanParams``, ...),
  ``parse_request``, the ``encode_*``/``decode_*`` functions, limits (``MAX_REQUEST_BYTES``, ...)
  and errors (``RequestError``, ``ProtocolError``);
* ``replies``: the results of the commands (``Result``, ``StatusResult``, ...; ``RESULTS``);
* ``events``: the event payloads (``Event``, ``StateEvent``, ...; ``EVENTS``, ``event_from_data``);
* ``server``: ``ControlServer``, the daemon's ROUTER socket for requests and PUB socket for events;
* ``curve``: CURVE keys for TCP sockets (``ServerKeys``, ``ClientKeys``, ``make_key_pair``,
  ``CurveError``): authenticated, encrypted remote control;
* ``client``: ``ControlClient`` (requests with retries), ``EventSubscriber``, and the ``ctl`` CLI
  (``add_ctl_parser``, ``run_ctl``; also ``python -m runtime.control.client``);
* ``json_schema``: ``python -m runtime.control.json_schema``, the committed JSON Schema in
  ``schema/`` generated from the models (a command: use the module itself, nothing is re-exported);

May import: the base modules only. It knows nothing of workers or scans, only of the messages.

Re-exports are lazy (PEP 562 ``__getattr__`` imports a name's module on its first access; type
checkers and IDEs read the imports under ``TYPE_CHECKING``): the clients (``ctl``, ``hw_sim``,
``bench``) need only ``client``, not the server; and ``client`` and ``json_schema`` also run as
``python -m``, which an eager package import would load twice (runpy's RuntimeWarning).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.control.client import (
        ControlClient,
        DaemonUnavailable,
        EventSubscriber,
        RequestFailed,
        add_ctl_parser,
        run_ctl,
    )
    from runtime.control.curve import ClientKeys, CurveError, ServerKeys, make_key_pair
    from runtime.control.events import (
        EVENTS,
        AnalysisReadyEvent,
        Event,
        FieldDoneEvent,
        FinishReasonName,
        JobKind,
        RunStateName,
        ScanFailedEvent,
        ScanFinishedEvent,
        ScanStartedEvent,
        StateEvent,
        event_from_data,
    )
    from runtime.control.protocol import (
        COMMANDS,
        ERROR_CODES,
        EVENT_NAMES,
        FOCUS_OVERRIDES,
        MAX_JSON_DEPTH,
        MAX_REGION_UM,
        MAX_REQUEST_BYTES,
        MAX_ZSTACK_PLANES,
        CancelParams,
        FocusOverrides,
        JobParams,
        ModelOverrides,
        PingParams,
        ProtocolError,
        RecordZstacksParams,
        RequestError,
        RequestParams,
        ShutdownParams,
        StartScanParams,
        StatusParams,
        decode_event,
        decode_reply,
        encode_error,
        encode_event,
        encode_reply,
        encode_request,
        parse_request,
        request_id_of,
        resolve_under,
    )
    from runtime.control.replies import (
        RESULTS,
        CancelResult,
        PingResult,
        Result,
        ShutdownResult,
        StartScanResult,
        StatusResult,
    )
    from runtime.control.server import MAX_FRAME_BYTES, MAX_FRAMES, ControlServer
else:
    from runtime.lazy import lazy_exports

    _MODULES = {  # module -> the names it gives this package
        "client": (
            "ControlClient",
            "DaemonUnavailable",
            "EventSubscriber",
            "RequestFailed",
            "add_ctl_parser",
            "run_ctl",
        ),
        "events": (
            "EVENTS",
            "AnalysisReadyEvent",
            "Event",
            "FieldDoneEvent",
            "FinishReasonName",
            "JobKind",
            "RunStateName",
            "ScanFailedEvent",
            "ScanFinishedEvent",
            "ScanStartedEvent",
            "StateEvent",
            "event_from_data",
        ),
        "protocol": (
            "COMMANDS",
            "ERROR_CODES",
            "EVENT_NAMES",
            "FOCUS_OVERRIDES",
            "MAX_JSON_DEPTH",
            "MAX_REGION_UM",
            "MAX_REQUEST_BYTES",
            "MAX_ZSTACK_PLANES",
            "CancelParams",
            "FocusOverrides",
            "JobParams",
            "ModelOverrides",
            "PingParams",
            "ProtocolError",
            "RecordZstacksParams",
            "RequestError",
            "RequestParams",
            "ShutdownParams",
            "StartScanParams",
            "StatusParams",
            "decode_event",
            "decode_reply",
            "encode_error",
            "encode_event",
            "encode_reply",
            "encode_request",
            "parse_request",
            "request_id_of",
            "resolve_under",
        ),
        "replies": (
            "RESULTS",
            "CancelResult",
            "PingResult",
            "Result",
            "ShutdownResult",
            "StartScanResult",
            "StatusResult",
        ),
        "server": ("MAX_FRAME_BYTES", "MAX_FRAMES", "ControlServer"),
        "curve": ("ClientKeys", "CurveError", "ServerKeys", "make_key_pair"),
    }

    __getattr__, __dir__ = lazy_exports(__name__, _MODULES, globals())


__all__ = [
    "COMMANDS",
    "ERROR_CODES",
    "EVENTS",
    "EVENT_NAMES",
    "FOCUS_OVERRIDES",
    "MAX_FRAMES",
    "MAX_FRAME_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_REGION_UM",
    "MAX_REQUEST_BYTES",
    "MAX_ZSTACK_PLANES",
    "RESULTS",
    "AnalysisReadyEvent",
    "CancelParams",
    "CancelResult",
    "ClientKeys",
    "ControlClient",
    "ControlServer",
    "CurveError",
    "DaemonUnavailable",
    "Event",
    "EventSubscriber",
    "FieldDoneEvent",
    "FinishReasonName",
    "FocusOverrides",
    "JobKind",
    "JobParams",
    "ModelOverrides",
    "PingParams",
    "PingResult",
    "ProtocolError",
    "RecordZstacksParams",
    "RequestError",
    "RequestFailed",
    "RequestParams",
    "Result",
    "RunStateName",
    "ScanFailedEvent",
    "ScanFinishedEvent",
    "ScanStartedEvent",
    "ServerKeys",
    "ShutdownParams",
    "ShutdownResult",
    "StartScanParams",
    "StartScanResult",
    "StateEvent",
    "StatusParams",
    "StatusResult",
    "add_ctl_parser",
    "decode_event",
    "decode_reply",
    "encode_error",
    "encode_event",
    "encode_reply",
    "encode_request",
    "event_from_data",
    "make_key_pair",
    "parse_request",
    "request_id_of",
    "resolve_under",
    "run_ctl",
]
