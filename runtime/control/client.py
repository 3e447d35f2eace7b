"""Clients of the control plane: requests with retries, an event subscriber, and the ``ctl`` CLI.

:class:`ControlClient` follows the ZeroMQ guide's Lazy Pirate pattern: a REQ
socket, a poll with a timeout, and on timeout the socket is thrown away (a REQ
socket that sent without receiving is stuck in its state machine) and a new one
retries. So a dead or hung daemon gives :class:`DaemonUnavailable` after
``timeout_s * retries`` instead of blocking a UI forever.

Retries resend byte-identical requests (same id), which lets the daemon answer
a repeated ``start_scan`` from its reply cache instead of running it twice
(see :mod:`runtime.control.protocol`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import zmq

from runtime.control.curve import ClientKeys, CurveError
from runtime.control.protocol import ProtocolError, decode_event, decode_reply, encode_request

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_REQUEST_FAILED = 1
EXIT_UNAVAILABLE = 2


class DaemonUnavailable(ConnectionError):
    """No reply within the timeout after every retry (daemon down, hung, or wrong endpoint)."""


class RequestFailed(Exception):
    """The daemon answered with an error (or with a reply we cannot accept)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ControlClient:
    """Request/reply client for the daemon's ROUTER socket, with Lazy Pirate retries."""

    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 2.0,
        retries: int = 3,
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve: ClientKeys | None = None,
    ) -> None:
        """``curve``: this client's CURVE keys, for a daemon whose TCP sockets require them."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if retries < 1:
            raise ValueError(f"retries must be at least 1, got {retries}")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retries = retries
        self._ctx = context if context is not None else zmq.Context.instance()
        self._curve = curve
        self._sock: zmq.Socket[bytes] | None = None

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            sock: zmq.Socket[bytes] = self._ctx.socket(zmq.REQ)
            # LINGER 0: an unanswered request must not keep the process alive at exit.
            sock.setsockopt(zmq.LINGER, 0)
            # A REQ socket's send blocks until some connection is usable; one that never becomes
            # usable (a CURVE handshake the daemon refuses) would block forever: time it out.
            sock.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout_s * 1000)))
            if self._curve is not None:
                self._curve.apply(sock)
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def request(self, command: str, **params: Any) -> dict[str, Any]:
        """Send ``command`` with ``params`` (None values dropped); return the reply's ``result``.

        Raises :class:`RequestFailed` for an error reply, :class:`DaemonUnavailable`
        when no reply arrives after ``retries`` attempts of ``timeout_s`` each.
        """
        request_id = uuid.uuid4().hex
        payload = encode_request(request_id, command, {k: v for k, v in params.items() if v is not None})
        timeout_ms = max(1, int(self.timeout_s * 1000))
        for attempt in range(1, self.retries + 1):
            sock = self._socket()
            try:
                sock.send(payload)
            except zmq.Again:  # no usable connection within the timeout: as good as no reply
                pass
            else:
                if sock.poll(timeout_ms, zmq.POLLIN):
                    return self._result(sock.recv(), request_id)
            log.info("no reply from %s to %s (try %d/%d)", self.endpoint, command, attempt, self.retries)
            self._reset()
        raise DaemonUnavailable(
            f"no reply from {self.endpoint} after {self.retries} tries ({self.timeout_s:g} s each); "
            "is the daemon running and is the endpoint right?"
        )

    @staticmethod
    def _result(raw: bytes, request_id: str) -> dict[str, Any]:
        try:
            reply = decode_reply(raw)
        except ProtocolError as err:
            raise RequestFailed(err.code, err.message) from None
        if reply["id"] is not None and reply["id"] != request_id:
            # Cannot happen with a fresh REQ socket per try; if it does, the
            # peer is not speaking this protocol and its answer is not ours.
            raise RequestFailed("malformed", f"reply id {reply['id']!r} does not match request id {request_id!r}")
        if not reply["ok"]:
            raise RequestFailed(reply["error"]["code"], str(reply["error"]["message"]))
        result: dict[str, Any] = reply["result"]
        return result

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class EventSubscriber:
    """SUB socket on the daemon's event endpoint.

    ``missed`` counts events lost to gaps in ``seq`` since the first event
    received (PUB drops for slow subscribers; a subscriber also misses
    whatever was published before it connected, which is not counted: ask
    ``status`` for the current state after subscribing). A ``seq`` going
    backwards means the daemon restarted: counted in ``restarts``, not as a gap.
    Gap detection only works when subscribed to all events (``topics`` empty),
    since filtered-out events look like gaps.
    """

    def __init__(
        self,
        endpoint: str,
        topics: Iterable[str] = (),
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve: ClientKeys | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.topics = tuple(topics)
        self.missed = 0
        self.restarts = 0
        self.last_seq: int | None = None
        self._ctx = context if context is not None else zmq.Context.instance()
        self._sock: zmq.Socket[bytes] = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        for topic in self.topics or ("",):
            self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        if curve is not None:
            curve.apply(self._sock)
        self._sock.connect(endpoint)

    def recv(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """Next event, or None if none arrives within ``timeout_s`` (None: wait forever).

        Malformed events are logged and skipped.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if not self._sock.poll(remaining_ms, zmq.POLLIN):
                return None
            frames = self._sock.recv_multipart()
            try:
                event = decode_event(frames)
            except ProtocolError as err:
                log.warning("skipping event from %s: %s", self.endpoint, err.message)
                continue
            self._track(event["seq"])
            return event

    def _track(self, seq: int) -> None:
        if self.last_seq is not None:
            if seq <= self.last_seq:
                self.restarts += 1
            elif not self.topics:
                self.missed += seq - self.last_seq - 1
        self.last_seq = seq

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            event = self.recv()
            if event is not None:
                yield event

    @property
    def socket(self) -> zmq.Socket[bytes]:
        return self._sock

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> EventSubscriber:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- CLI


def add_ctl_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``ctl`` sub-command to ``subparsers`` (from ``parser.add_subparsers()``); return its parser.

    Usage: ``ctl [--config FILE | --endpoint E --events E] [--timeout S] [--retries N] ACTION``
    with ACTION one of ``ping``, ``status``, ``start-scan [--recording R] [--region X Y W H]
    [--name N] [--autofocus-model DIR] [ANALYSIS]``, ``record-zstacks [--recording R] [--region X Y W H]
    [--z-center Z] [--z-range HALF] [--z-step S] [--fields N] --output N``, ``cancel``,
    ``shutdown``, ``events [--count N] [--wait S]``.
    ANALYSIS (the scan's ``analysis`` parameter, :data:`ANALYSIS_FLAGS`): ``--analysis``/``--no-analysis``,
    ``--analysis-models trained|baseline``, ``--tumour-model DIR``, ``--nuclei-model DIR``,
    ``--slide-model DIR|none``, ``--nuclei``/``--no-nuclei``, ``--analysis-subdivide N``,
    ``--analysis-threshold P``; what is not given is the daemon config's.
    The chosen action is in ``args.ctl_action``; pass the namespace to :func:`run_ctl`.
    """
    ctl = subparsers.add_parser(
        "ctl",
        help="send a command to the running daemon",
        description="Send a command to the running daemon and print the JSON result. "
        "Exit status: 0 ok, 1 the daemon refused the request, 2 daemon unavailable or bad arguments.",
    )
    ctl.add_argument("--config", type=Path, help="daemon config file (its [control] endpoints are used)")
    ctl.add_argument("--endpoint", help="command endpoint, e.g. ipc:///run/wsi-runtime/control.sock")
    ctl.add_argument("--events", dest="events_endpoint", help="event endpoint (for 'events')")
    ctl.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each try (default 2)")
    ctl.add_argument("--retries", type=int, default=3, help="tries before giving up (default 3)")
    ctl.add_argument("--curve-key", type=Path, help="this client's CURVE NAME.key_secret (a daemon with CURVE keys)")
    ctl.add_argument("--server-key", type=Path, help="the daemon's CURVE public NAME.key (with --curve-key)")
    actions = ctl.add_subparsers(dest="ctl_action", metavar="ACTION", required=True)
    actions.add_parser("ping", help="check that the daemon answers")
    actions.add_parser("status", help="print the daemon's state")
    start = actions.add_parser("start-scan", help="start a scan")
    record = actions.add_parser(
        "record-zstacks", help="record a z-stack at each field of a region (or at --fields of them) as a recording"
    )
    for job in (start, record):
        job.add_argument("--recording", help="recording to replay (path under the data root)")
        job.add_argument(
            "--region", nargs=4, type=float, metavar=("X", "Y", "W", "H"), help="stage region in micrometres"
        )
        job.add_argument("--name", "--output", dest="output_name", help="output folder name under the data root")
    start.add_argument(
        "--autofocus-model",
        help="autofocus model folder for this scan: under the data root, in the config's models.allowed_dirs, "
        "or 'builtin'",
    )
    for flag, key, kwargs in ANALYSIS_FLAGS:
        start.add_argument(flag, dest=f"analysis_{key}", **kwargs)
    record.add_argument(
        "--z-center", type=float, help="centre plane's z in µm (default: the config's focus.start_z_um)"
    )
    record.add_argument("--z-range", type=float, help="planes from centre - Z to centre + Z µm (default 10)")
    record.add_argument("--z-step", type=float, help="µm between planes (default 0.5)")
    record.add_argument("--fields", type=int, help="record only N fields, spread evenly over the plan")
    actions.add_parser("cancel", help="cancel the running scan")
    actions.add_parser("shutdown", help="stop the daemon")
    events = actions.add_parser("events", help="print events as JSON lines")
    events.add_argument("--count", type=int, default=0, help="stop after N events (default: never)")
    events.add_argument("--wait", type=float, default=None, help="give up after S seconds without an event")
    return ctl


def _finite_float(text: str) -> float:
    """An argparse type: a finite number (NaN would reach the daemon as null, i.e. "not given")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


_MODEL_DIR = "under the data root or the config's models.allowed_dirs, or 'builtin'"

# ``start-scan``'s flags for the scan's ``analysis`` parameter: (flag, key in ``analysis`` (the
# namespace's ``analysis_<key>``), add_argument keywords). Each flag sets one key of the config's
# ``[analysis]`` section for this scan; types are checked here, bounds and folders by the daemon
# (one place: ``AnalysisConfig``), whose refusal names ``analysis.<key>``. Not offered, as in
# ``start_scan``: how the daemon's worker runs (backend, batch_size, nice, backlog_mpx, ...).
ANALYSIS_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    (
        "--analysis",
        "enabled",
        {"action": argparse.BooleanOptionalAction, "help": "analyse this scan's slide, or not (--no-analysis)"},
    ),
    (
        "--analysis-models",
        "models",
        {"choices": ("trained", "baseline"), "help": "trained: the model folders; baseline: the classical baselines"},
    ),
    ("--tumour-model", "tumour_dir", {"metavar": "DIR", "help": f"tumour classifier model folder: {_MODEL_DIR}"}),
    ("--nuclei-model", "nuclei_dir", {"metavar": "DIR", "help": f"nuclei detector model folder: {_MODEL_DIR}"}),
    (
        "--slide-model",
        "slide_dir",
        {
            "metavar": "DIR",
            "help": f"slide (attention-MIL) model folder: {_MODEL_DIR}; 'none': score = max patch probability",
        },
    ),
    (
        "--nuclei",
        "nuclei",
        {"action": argparse.BooleanOptionalAction, "help": "detect nuclei, or not (--no-nuclei)"},
    ),
    (
        "--analysis-subdivide",
        "subdivide",
        {"type": int, "metavar": "N", "help": "tumour grid cells per patch side (the config allows 1-4)"},
    ),
    (
        "--analysis-threshold",
        "threshold",
        {"type": _finite_float, "metavar": "P", "help": "tumour probability that outlines a lesion (0 < P < 1)"},
    ),
)


def _resolve_endpoints(args: argparse.Namespace, endpoints: tuple[str, str] | None) -> tuple[str, str]:
    command = getattr(args, "endpoint", None)
    event = getattr(args, "events_endpoint", None)
    if command and event:
        return command, event
    config_path = getattr(args, "config", None)
    if config_path is not None or endpoints is None:
        from runtime.config import load_config  # late: ConfigError handling lives in run_ctl

        cfg = load_config(config_path)
        endpoints = (cfg.endpoint("command"), cfg.endpoint("event"))
    return command or endpoints[0], event or endpoints[1]


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True), flush=True)


def run_ctl(args: argparse.Namespace, endpoints: tuple[str, str] | None = None) -> int:
    """Run the ``ctl`` action parsed by :func:`add_ctl_parser`; return the process exit status.

    Endpoints, first found wins: ``--endpoint``/``--events``; the ``--config``
    file's ``[control]`` section; ``endpoints`` (command, event) from the
    caller; the built-in config defaults. Prints the JSON result on stdout and
    errors on stderr. Returns 0 ok, 1 the daemon refused the request, 2 daemon
    unavailable (no reply, no events within ``--wait``) or bad arguments/config.
    """
    from runtime.config import ConfigError

    try:
        command_ep, event_ep = _resolve_endpoints(args, endpoints)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    action: str = args.ctl_action
    curve: ClientKeys | None = None
    if (args.curve_key is None) != (args.server_key is None):
        print("error: --curve-key and --server-key go together", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.curve_key is not None:
        curve = ClientKeys(args.curve_key, args.server_key)
        try:
            curve.check()
        except CurveError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_UNAVAILABLE
    if action == "events":
        return _run_events(event_ep, args.count, args.wait, curve)
    params: dict[str, Any] = {}
    if action in ("start-scan", "record-zstacks"):
        params = {"recording": args.recording, "output_name": args.output_name}
        if args.region is not None:
            x, y, w, h = args.region
            params["region"] = {"x_um": x, "y_um": y, "width_um": w, "height_um": h}
    if action == "start-scan" and args.autofocus_model is not None:
        params["models"] = {"autofocus_dir": args.autofocus_model}
    if action == "start-scan":
        given = {key: getattr(args, f"analysis_{key}") for _, key, _ in ANALYSIS_FLAGS}
        analysis = {key: value for key, value in given.items() if value is not None}
        if analysis:
            params["analysis"] = analysis
    if action == "record-zstacks":
        params.update(
            z_center_um=args.z_center, z_half_range_um=args.z_range, z_step_um=args.z_step, max_fields=args.fields
        )
    try:
        with ControlClient(command_ep, timeout_s=args.timeout, retries=args.retries, curve=curve) as client:
            result = client.request(action.replace("-", "_"), **params)
    except ValueError as err:  # bad --timeout/--retries
        print(f"error: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except DaemonUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except RequestFailed as err:
        print(f"error [{err.code}]: {err.message}", file=sys.stderr)
        return EXIT_REQUEST_FAILED
    _print_json(result)
    return EXIT_OK


def _run_events(endpoint: str, count: int, wait_s: float | None, curve: ClientKeys | None = None) -> int:
    received = 0
    try:
        with EventSubscriber(endpoint, curve=curve) as sub:
            while count <= 0 or received < count:
                event = sub.recv(wait_s)
                if event is None:
                    print(f"error: no event from {endpoint} within {wait_s:g} s", file=sys.stderr)
                    return EXIT_UNAVAILABLE
                print(json.dumps(event, sort_keys=True), flush=True)
                received += 1
            if sub.missed:
                print(f"warning: missed {sub.missed} event(s)", file=sys.stderr)
    except KeyboardInterrupt:
        return 130  # the shell's convention for SIGINT
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``python -m runtime.control.client ctl ...``: the ctl CLI without the rest of the runtime's entry point."""
    parser = argparse.ArgumentParser(prog="python -m runtime.control.client")
    add_ctl_parser(parser.add_subparsers(dest="command", required=True))
    return run_ctl(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
