"""The wire protocol: bad requests are refused with an error code and a message naming the problem."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from runtime.control.protocol import (
    COMMANDS,
    ERROR_CODES,
    EVENT_NAMES,
    MAX_REQUEST_BYTES,
    ProtocolError,
    RequestError,
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


def raw(doc: object) -> bytes:
    return json.dumps(doc).encode()


def refused(payload: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_request(payload)
    return info.value


# ----------------------------------------------------------------------------- good requests


def test_minimal_requests_parse() -> None:
    for command in COMMANDS:
        if command == "start_scan":
            continue
        req = parse_request(raw({"id": 7, "command": command}))
        assert (req.id, req.command, req.params_dict()) == (7, command, {})


def test_start_scan_full_params() -> None:
    req = parse_request(
        raw(
            {
                "id": "a1",
                "command": "start_scan",
                "params": {
                    "recording": "rec/slide1.zarr",
                    "region": {"x_um": -100, "y_um": 0.5, "width_um": 2000, "height_um": 1500.5},
                    "output_name": "slide-42_v1.0",
                    "focus": {"strategy": "contrast_sweep", "sweep_steps": 11},
                },
            }
        )
    )
    assert req.id == "a1"
    assert req.params_dict() == {
        "recording": "rec/slide1.zarr",
        "region": {"x_um": -100.0, "y_um": 0.5, "width_um": 2000.0, "height_um": 1500.5},
        "output_name": "slide-42_v1.0",
        "focus": {"strategy": "contrast_sweep", "sweep_steps": 11},
    }


def test_start_scan_omitted_params_stay_absent() -> None:
    # The handler fills in config defaults; None values would shadow them.
    assert parse_request(raw({"id": 1, "command": "start_scan", "params": {}})).params_dict() == {}


# ----------------------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "must be a JSON object, got array"),
        (b'"ping"', "must be a JSON object, got string"),
        (b"null", "must be a JSON object, got null"),
        (raw({"command": "ping"}), "no 'id'"),
        (raw({"id": True, "command": "ping"}), "'id' must be a string or an integer, got boolean"),
        (raw({"id": 1.5, "command": "ping"}), "'id' must be a string or an integer, got number"),
        (raw({"id": None, "command": "ping"}), "got null"),
        (raw({"id": "", "command": "ping"}), "'id' must be 1-128 characters"),
        (raw({"id": "x" * 129, "command": "ping"}), "'id' must be 1-128 characters"),
        (b'{"id": 1, "id": 2, "command": "ping"}', "duplicate key 'id'"),
        (b'{"id": 1, "command": "start_scan", "params": {"region": {"x_um": NaN}}}', "NaN is not valid JSON"),
    ],
)
def test_malformed_requests_have_no_id(payload: bytes, words: str) -> None:
    err = refused(payload)
    assert err.code == "malformed"
    assert words in err.message
    assert err.request_id is None


def test_malformed_with_readable_id_keeps_it() -> None:
    err = refused(raw({"id": "r9", "command": 5}))
    assert (err.code, err.request_id) == ("malformed", "r9")
    assert "'command' must be a string, got number" in err.message
    err = refused(raw({"id": 3}))
    assert (err.code, err.request_id) == ("malformed", 3)
    assert "'command'" in err.message
    err = refused(raw({"id": 3, "command": "ping", "parms": {}}))
    assert err.code == "malformed"
    assert "unexpected key(s) 'parms'" in err.message


def test_oversized_request_is_refused_before_parsing() -> None:
    payload = raw({"id": 1, "command": "ping", "params": {"pad": "x" * MAX_REQUEST_BYTES}})
    err = refused(payload)
    assert err.code == "malformed"
    assert f"{len(payload)} bytes; the limit is {MAX_REQUEST_BYTES}" in err.message


# ----------------------------------------------------------------------------- unknown / invalid


def test_unknown_command_lists_known_ones() -> None:
    err = refused(raw({"id": 4, "command": "self_destruct"}))
    assert (err.code, err.request_id) == ("unknown_command", 4)
    assert "'self_destruct'" in err.message
    assert "start_scan" in err.message and "ping" in err.message


@pytest.mark.parametrize(
    ("params", "words"),
    [
        (
            {"region": {"x_um": 0, "y_um": 0, "width_um": "10", "height_um": 5}},
            "region.width_um: Input should be",
        ),
        (
            {"region": {"x_um": 0, "y_um": 0, "width_um": -1, "height_um": 5}},
            "region.width_um: Input should be greater",
        ),
        ({"region": {"x_um": 0, "y_um": 0, "width_um": 0, "height_um": 5}}, "region.width_um"),
        ({"region": {"x_um": 0, "y_um": 0, "width_um": 1}}, "region.height_um: required"),
        ({"region": [0, 0, 1, 1]}, "region: Input should be"),
        ({"region": {"x_um": True, "y_um": 0, "width_um": 1, "height_um": 1}}, "region.x_um"),
        ({"recording": 5}, "recording: Input should be a valid string"),
        ({"recording": ""}, "recording"),
        ({"recording": "a\x00b"}, "recording: must not contain NUL"),
        ({"output_dir": "x"}, "output_dir: unknown parameter"),
        ({"focus": {"strategy": "neural"}}, "focus.strategy"),
        ({"focus": {"sweep_steps": 2}}, "focus.sweep_steps: Input should be greater than or equal to 3"),
        ({"focus": {"speed": 1}}, "focus.speed: unknown parameter"),
    ],
)
def test_invalid_start_scan_params_name_the_param(params: dict[str, object], words: str) -> None:
    err = refused(raw({"id": 5, "command": "start_scan", "params": params}))
    assert (err.code, err.request_id) == ("invalid_params", 5)
    assert err.message.startswith("start_scan: ")
    assert words in err.message


@pytest.mark.parametrize(
    "name",
    ["..", ".", "../etc", "a/b", "a\\b", "/abs", "x" * 65, "", ".hidden", "a..b", "sp ace", "é", "a\nb"],
)
def test_output_name_must_be_a_plain_folder_name(name: str) -> None:
    err = refused(raw({"id": 6, "command": "start_scan", "params": {"output_name": name}}))
    assert err.code == "invalid_params"
    assert "output_name: must be a plain folder name" in err.message
    assert repr(name) in err.message  # the operator sees what was refused


@pytest.mark.parametrize("name", ["slide-1", "a", "x" * 64, "2024.06.01_run.3", "A_B-c"])
def test_output_name_accepts_plain_names(name: str) -> None:
    req = parse_request(raw({"id": 6, "command": "start_scan", "params": {"output_name": name}}))
    assert req.params_dict() == {"output_name": name}


def test_commands_without_params_refuse_extras_and_non_objects() -> None:
    err = refused(raw({"id": 1, "command": "ping", "params": {"verbose": True}}))
    assert err.code == "invalid_params"
    assert "ping: verbose: unknown parameter" in err.message
    err = refused(raw({"id": 1, "command": "status", "params": [1]}))
    assert err.code == "invalid_params"
    assert "'params' must be a JSON object, got array" in err.message


# ----------------------------------------------------------------------------- encoding


def test_reply_round_trip() -> None:
    ok = decode_reply(encode_reply("q", {"output": Path("/data/s1"), "shape": (2, 3), "z": math.nan}))
    assert ok == {"id": "q", "ok": True, "result": {"output": "/data/s1", "shape": [2, 3], "z": None}}
    err = decode_reply(encode_error(None, "malformed", "request is not valid JSON"))
    assert err == {
        "id": None,
        "ok": False,
        "error": {"code": "malformed", "message": "request is not valid JSON"},
    }


def test_numpy_scalars_and_non_finite_values_encode() -> None:
    np = pytest.importorskip("numpy")
    doc = decode_reply(encode_reply(1, {"a": np.float32("nan"), "b": np.int64(3), "c": [np.float64(1.5)]}))
    assert doc["result"] == {"a": None, "b": 3, "c": [1.5]}


def test_unserialisable_results_fail_loudly() -> None:
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        encode_reply(1, {"x": object()})


def test_error_codes_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown error code"):
        encode_error(1, "oops", "x")
    with pytest.raises(ValueError, match="unknown error code"):
        RequestError("oops", "x")
    assert set(ERROR_CODES) == {
        "malformed",
        "unknown_command",
        "invalid_params",
        "busy",
        "not_running",
        "internal",
    }


def test_decode_reply_rejects_non_replies() -> None:
    for bad in (
        b"[]",
        b'{"id": 1}',
        b'{"id": 1, "ok": true}',
        b'{"id": 1, "ok": false, "error": "x"}',
        b"\x00",
    ):
        with pytest.raises(ProtocolError) as info:
            decode_reply(bad)
        assert info.value.code == "malformed"


def test_request_encoding_parses_back() -> None:
    req = parse_request(encode_request("id-1", "start_scan", {"output_name": "s"}))
    assert (req.id, req.command, req.params_dict()) == ("id-1", "start_scan", {"output_name": "s"})
    assert request_id_of(b'{"id": "z", "command": 1}') == "z"
    assert request_id_of(b"garbage") is None


def test_events() -> None:
    assert {"state", "scan_started", "field_done", "scan_finished", "scan_failed", "error"} <= set(
        EVENT_NAMES
    )
    frames = encode_event(3, "field_done", {"index": 2, "total": 9}, time_s=100.0)
    assert frames[0] == b"field_done"
    assert decode_event(frames) == {
        "seq": 3,
        "event": "field_done",
        "time": 100.0,
        "data": {"index": 2, "total": 9},
    }
    with pytest.raises(ValueError, match="unknown event 'field_dun'"):
        encode_event(1, "field_dun", {})
    with pytest.raises(ProtocolError):
        decode_event([b"state", b'{"seq": "1", "event": "state", "data": {}}'])


# ----------------------------------------------------------------------------- paths


def test_resolve_under_keeps_paths_in_the_data_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "rec").mkdir(parents=True)
    assert resolve_under(root, "rec/a.zarr", "recording") == (root / "rec/a.zarr").resolve()
    assert resolve_under(root, str(root / "rec"), "recording") == (root / "rec").resolve()
    for bad in ("../outside", "/etc/passwd", "rec/../../x"):
        with pytest.raises(RequestError) as info:
            resolve_under(root, bad, "recording")
        assert info.value.code == "invalid_params"
        assert info.value.message.startswith(f"recording: {bad!r} is outside the data root")
    (root / "escape").symlink_to(tmp_path)
    with pytest.raises(RequestError, match="outside the data root"):
        resolve_under(root, "escape/x", "recording")
