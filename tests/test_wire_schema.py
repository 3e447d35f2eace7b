"""The wire protocol as a published contract: the committed JSON Schema (runtime/control/schema/)
matches the typed definitions, and what a real daemon sends matches the committed schema."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import jsonschema
import pytest
import zmq

from runtime.config import FocusConfig
from runtime.control import json_schema
from runtime.control.client import ControlClient, EventSubscriber
from runtime.control.events import EVENTS, FieldDoneEvent, FinishReasonName, RunStateName, event_from_data
from runtime.control.protocol import (
    COMMANDS,
    EVENT_NAMES,
    FOCUS_OVERRIDES,
    FocusOverrides,
    ProtocolError,
    encode_event,
    encode_request,
    parse_request,
)
from runtime.control.replies import RESULTS, StatusResult
from runtime.daemon.process import start_daemon_process, stop_daemon_process
from runtime.daemon.state import FinishReason, RunState, ScanStatus
from tests.conftest import daemon_config

SCHEMA_DIR = json_schema.SCHEMA_DIR


def validator(name: str) -> jsonschema.protocols.Validator:
    """A validator for one committed schema file (the committed copy, not one generated now)."""
    schema = json.loads((SCHEMA_DIR / name).read_text("utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


# ----------------------------------------------------------------------------- code vs committed schema


def test_committed_schema_matches_the_typed_definitions() -> None:
    stale = json_schema.differences(SCHEMA_DIR)
    assert stale == [], f"{stale} out of date: regenerate with `python -m runtime.control.json_schema`"
    names = {p.name for p in SCHEMA_DIR.glob("*.json")}
    assert names == (
        {f"request-{c}.json" for c in COMMANDS}
        | {f"reply-{c}.json" for c in COMMANDS}
        | {"reply-error.json"}
        | {f"event-{e}.json" for e in EVENT_NAMES}
    )
    for name in names:
        validator(name)  # each is a valid JSON Schema of its dialect


def test_schema_command_writes_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "schema"
    assert json_schema.main(["--check", "--out", str(out)]) == 1
    assert "regenerate with" in capsys.readouterr().err
    assert json_schema.main(["--out", str(out)]) == 0
    (out / "event-retired.json").write_text("{}")
    (out / "event-state.json").write_text("{}")
    assert json_schema.differences(out) == ["event-retired.json", "event-state.json"]
    assert json_schema.main(["--out", str(out)]) == 0
    assert json_schema.main(["--check", "--out", str(out)]) == 0
    assert not (out / "event-retired.json").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in SCHEMA_DIR.glob("*.json"))


def test_models_cover_every_command_event_and_state() -> None:
    assert tuple(EVENTS) == EVENT_NAMES
    assert set(RESULTS) == set(COMMANDS)
    # The control layer spells the daemon's enums out (it may not import the daemon): they agree.
    assert set(get_args(RunStateName)) == {s.value for s in RunState}
    assert set(get_args(FinishReasonName)) == {r.value for r in FinishReason}
    assert set(StatusResult.model_fields) == {f.name for f in dataclasses.fields(ScanStatus)}
    StatusResult.model_validate(ScanStatus().to_dict())


def test_focus_overrides_take_their_bounds_from_the_config() -> None:
    assert tuple(FocusOverrides.model_fields) == FOCUS_OVERRIDES
    overrides = FocusOverrides.model_json_schema()["properties"]
    config = FocusConfig.model_json_schema()["properties"]
    for name in FOCUS_OVERRIDES:
        value_branch, null_branch = overrides[name]["anyOf"]
        assert null_branch == {"type": "null"}
        expected = {k: v for k, v in config[name].items() if k not in ("default", "title", "description")}
        assert value_branch == expected, name
        assert overrides[name].get("description") == config[name].get("description")
    # The config's limits, as the parser applies them: at the bound accepted, past it refused.
    steps = FocusConfig.model_fields["sweep_steps"].metadata
    low = next(m.ge for m in steps if hasattr(m, "ge"))
    high = next(m.le for m in steps if hasattr(m, "le"))
    for value, ok in ((low, True), (high, True), (low - 1, False), (high + 1, False)):
        payload = encode_request(1, "start_scan", {"focus": {"sweep_steps": value}})
        if ok:
            assert parse_request(payload).params_dict() == {"focus": {"sweep_steps": value}}
        else:
            with pytest.raises(ProtocolError, match=r"focus\.sweep_steps: Input should be"):
                parse_request(payload)


def schema_and_parser_verdicts(doc: dict[str, Any]) -> tuple[bool, bool]:
    """Whether request ``doc`` is valid by its command's JSON schema, and by the daemon's parser."""
    schema_ok = validator(f"request-{doc['command']}.json").is_valid(doc)
    try:
        parse_request(json.dumps(doc).encode())
    except ProtocolError:
        return schema_ok, False
    return schema_ok, True


@pytest.mark.parametrize(
    ("command", "params", "valid"),
    [
        ("ping", {}, True),
        ("ping", {"verbose": True}, False),
        ("status", None, True),
        ("start_scan", {}, True),
        (
            "start_scan",
            {
                "recording": "rec/a.zarr",
                "region": {"x_um": -5, "y_um": 0.5, "width_um": 100, "height_um": 50},
                "output_name": "slide-1.v2",
                "focus": {"strategy": "single_shot", "sweep_steps": 11, "metric": "brenner"},
            },
            True,
        ),
        ("start_scan", {"output_name": "../etc"}, False),
        ("start_scan", {"output_name": ".hidden"}, False),
        ("start_scan", {"output_name": "a..b"}, False),
        ("start_scan", {"recording": "a\x00b"}, False),
        ("start_scan", {"recording": ""}, False),
        ("start_scan", {"region": {"x_um": 0, "y_um": 0, "width_um": 0, "height_um": 5}}, False),
        ("start_scan", {"region": {"x_um": 0, "y_um": 0, "width_um": "10", "height_um": 5}}, False),
        ("start_scan", {"focus": {"sweep_steps": 2}}, False),
        ("start_scan", {"focus": {"sweep_half_range_um": 51.0}}, False),
        ("start_scan", {"focus": {"strategy": "neural"}}, False),
        ("start_scan", {"focus": {"speed": 1}}, False),
        ("cancel", {}, True),
        ("shutdown", {}, True),
    ],
)
def test_request_schema_agrees_with_the_parser(command: str, params: dict[str, Any] | None, valid: bool) -> None:
    doc: dict[str, Any] = {"id": "r1", "command": command}
    if params is not None:
        doc["params"] = params
    assert schema_and_parser_verdicts(doc) == (valid, valid)


def test_non_finite_event_values_are_null_and_match_the_schema() -> None:
    event = FieldDoneEvent(index=0, done=1, total=1, row=0, col=0, z_um=math.nan, captures=3)
    name, data = event.name_and_data()
    assert event_from_data(name, data) is not None
    body = json.loads(encode_event(1, name, data)[1])
    assert body["data"]["z_um"] is None
    validator("event-field_done.json").validate(body)
    with pytest.raises(ValueError, match="captures"):
        event_from_data("field_done", {**data, "captures": "three"})
    with pytest.raises(ValueError, match="unknown event"):
        event_from_data("field_dun", data)


# ----------------------------------------------------------------------------- a real daemon


@contextlib.contextmanager
def _daemon(tmp_path: Path, recording: Path) -> Iterator[tuple[Any, str, str]]:
    """A daemon replaying ``recording`` at 4x scanner speed (so a test can act mid-scan)."""
    runtime_dir = Path("/tmp") / f"wsirt-schema-{os.getpid()}"  # ipc paths must stay short
    driver = {"options": {"recording": str(recording), "pace": 4.0}}
    cfg = daemon_config(tmp_path / "data", runtime_dir, None, driver=driver)
    proc = start_daemon_process(cfg)
    try:
        with ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=15) as client:
            client.request("ping")  # up
        yield proc, cfg.endpoint("command"), cfg.endpoint("event")
    finally:
        stop_daemon_process(proc, cfg, timeout_s=60)


def _exchange(endpoint: str, payload: bytes) -> dict[str, Any]:
    """One request, the whole reply document (ControlClient would return only the result)."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(endpoint)
    try:
        sock.send(payload)
        reply: dict[str, Any] = json.loads(sock.recv())
        return reply
    finally:
        sock.close()


def _events_until(sub: EventSubscriber, seen: list[dict[str, Any]], name: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        event = sub.recv(timeout_s=1.0)
        if event is not None:
            seen.append(event)
            if event["event"] == name:
                return
    raise AssertionError(f"no {name} event within {timeout_s} s; got {[e['event'] for e in seen]}")


def test_replies_and_events_of_replayed_scans_match_the_committed_schema(tmp_path: Path, small_recording: Path) -> None:
    # A recording whose first field is truncated: that scan fails (scan_failed, then scan_finished).
    broken = tmp_path / "data" / "broken.zarr"
    shutil.copytree(small_recording, broken)
    for chunk in (p for p in (broken / "stacks" / "c" / "0").rglob("*") if p.is_file()):
        chunk.write_bytes(chunk.read_bytes()[:100])

    replies: list[tuple[str, dict[str, Any]]] = []  # (schema file, reply)
    events: list[dict[str, Any]] = []

    with _daemon(tmp_path, small_recording) as (proc, cmd, evt), EventSubscriber(evt) as sub:
        time.sleep(0.3)  # the subscription reaches the PUB socket

        def ask(command: str, params: dict[str, Any] | None = None, request_id: str | int | None = None) -> Any:
            rid = uuid.uuid4().hex if request_id is None else request_id
            reply = _exchange(cmd, encode_request(rid, command, params))
            assert reply["id"] == rid
            replies.append((f"reply-{command}.json" if reply["ok"] else "reply-error.json", reply))
            return reply["result"] if reply["ok"] else reply["error"]

        assert ask("ping", request_id=1)["state"] == "idle"
        assert ask("status")["state"] == "idle"
        assert ask("cancel")["code"] == "not_running"
        assert ask("start_scan", {"output_name": "../x"})["code"] == "invalid_params"
        assert ask("self_destruct")["code"] == "unknown_command"
        broken_reply = _exchange(cmd, b"\xff not json")
        assert broken_reply["id"] is None and broken_reply["error"]["code"] == "malformed"
        replies.append(("reply-error.json", broken_reply))

        # 1. a scan that completes: every event of it, and the replies while it runs
        started = ask("start_scan", {"output_name": "complete"})
        assert ask("start_scan", {"output_name": "second"})["code"] == "busy"
        _events_until(sub, events, "field_done")
        running = ask("status")
        assert running["scan_id"] == started["scan_id"] and running["workers"]
        _events_until(sub, events, "scan_finished")
        assert events[-1]["data"]["reason"] == "completed"

        # 2. a scan cancelled mid-way
        ask("start_scan", {"output_name": "cancelled"})
        _events_until(sub, events, "field_done")
        assert ask("cancel")["cancelling"] is True
        _events_until(sub, events, "scan_finished")
        assert events[-1]["data"]["reason"] == "cancelled"

        # 3. a scan that fails
        ask("start_scan", {"output_name": "failed", "recording": "broken.zarr"})
        _events_until(sub, events, "scan_finished")
        assert events[-1]["data"]["reason"] == "failed"
        _events_until(sub, events, "state")  # back to idle
        assert events[-1]["data"]["state"] == "idle"
        assert ask("status")["last_finish"] == "failed"

        # 4. z-stacks recorded at two fields (record_zstacks): the same events, job "zstacks"
        ask("record_zstacks", {"output_name": "stacks", "z_half_range_um": 0.5, "max_fields": 2})
        _events_until(sub, events, "scan_finished")
        assert events[-1]["data"]["reason"] == "completed" and events[-1]["data"]["job"] == "zstacks"
        _events_until(sub, events, "state")  # back to idle
        assert ask("status")["job"] == "zstacks"
        assert ask("shutdown")["stopping"] is True
        proc.join(60)
        assert proc.exitcode == 0
        assert sub.missed == 0

    names = [e["event"] for e in events]
    assert {"state", "scan_started", "field_done", "scan_finished", "scan_failed"} <= set(names), names
    assert names.count("scan_finished") == 4 and names.count("scan_failed") == 1
    assert {e["data"]["state"] for e in events if e["event"] == "state"} >= {"scanning", "cancelling", "idle"}
    for event in events:
        validator(f"event-{event['event']}.json").validate(event)
    kinds = {name for name, _ in replies}
    assert kinds == {f"reply-{c}.json" for c in COMMANDS} | {"reply-error.json"}, kinds
    for name, reply in replies:
        validator(name).validate(reply)
