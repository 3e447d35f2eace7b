"""ControlServer on real ipc:// sockets: replies, error handling, envelopes, events, bind safety."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq

from runtime.control.client import ControlClient, EventSubscriber, RequestFailed
from runtime.control.events import FieldDoneEvent, StateEvent
from runtime.control.protocol import MAX_REQUEST_BYTES, RequestError, RequestParams, decode_reply, encode_request
from runtime.control.replies import PingResult
from runtime.control.server import ControlServer


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Not tmp_path: Unix socket paths are limited to 107 bytes and pytest's
    # per-test directories can exceed that.
    d = Path(tempfile.mkdtemp(prefix="wsirt-t-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Recorder:
    """A handler that records calls (command, params as JSON) and can be told to fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, params: RequestParams) -> Any:
        command = params.COMMAND
        self.calls.append((command, params.model_dump(mode="json", exclude_none=True)))
        if command == "ping":
            return {"pong": True}
        if command == "cancel":
            raise RequestError("not_running", "no scan is running")
        if command == "shutdown":
            raise RuntimeError("boom")
        if command == "status":
            return ["not", "a", "dict"]
        return {"echo": params.model_dump(mode="json", exclude_none=True), "n": len(self.calls)}


class ServerThread:
    """Runs a ControlServer in its own thread; ZeroMQ sockets stay in the thread that made them."""

    def __init__(self, cmd: str, evt: str, handler: Callable[[RequestParams], Any]) -> None:
        self.cmd, self.evt = cmd, evt
        self._handler = handler
        self._jobs: queue.Queue[tuple[Callable[[ControlServer], Any], queue.Queue[Any]]] = queue.Queue()
        self._stop = threading.Event()
        self._ready: queue.Queue[BaseException | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            server = ControlServer(self.cmd, self.evt, self._handler)
        except BaseException as err:
            self._ready.put(err)
            return
        self._ready.put(None)
        with server:
            while not self._stop.is_set():
                server.poll(10)
                while not self._jobs.empty():
                    fn, out = self._jobs.get()
                    out.put(fn(server))

    def call(self, fn: Callable[[ControlServer], Any]) -> Any:
        out: queue.Queue[Any] = queue.Queue()
        self._jobs.put((fn, out))
        return out.get(timeout=5)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        err = self._ready.get(timeout=5)
        if err is not None:
            raise err
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@contextmanager
def serving(sock_dir: Path, handler: Callable[[RequestParams], Any]) -> Iterator[ServerThread]:
    with ServerThread(
        f"ipc://{sock_dir}/run/control.sock", f"ipc://{sock_dir}/run/events.sock", handler
    ) as st:
        yield st


def raw_exchange(endpoint: str, frames: list[bytes], kind: int = zmq.DEALER) -> list[bytes]:
    """Send frames from a raw socket, return the reply frames (fails the test after 5 s)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(endpoint)
        s.send_multipart(frames)
        assert s.poll(5000), "no reply"
        return s.recv_multipart()
    finally:
        s.close()


# ----------------------------------------------------------------------------- requests


def test_ping_and_params_reach_the_handler(sock_dir: Path) -> None:
    rec = Recorder()
    with serving(sock_dir, rec) as st, ControlClient(st.cmd, timeout_s=2.0) as client:
        assert client.request("ping") == {"pong": True}
        result = client.request(
            "start_scan", output_name="s1", region={"x_um": 1, "y_um": 2, "width_um": 3, "height_um": 4}
        )
    expected = {"output_name": "s1", "region": {"x_um": 1.0, "y_um": 2.0, "width_um": 3.0, "height_um": 4.0}}
    assert result == {"echo": expected, "n": 2}
    assert rec.calls == [("ping", {}), ("start_scan", expected)]


def test_ipc_directory_created_and_sockets_group_accessible(sock_dir: Path) -> None:
    with serving(sock_dir, Recorder()):
        for name in ("control.sock", "events.sock"):
            mode = (sock_dir / "run" / name).stat().st_mode
            assert stat.S_ISSOCK(mode)
            assert stat.S_IMODE(mode) == 0o660
    # close() removes the socket files so nobody mistakes them for a live daemon
    assert not (sock_dir / "run" / "control.sock").exists()


def test_handler_errors_become_error_replies_and_serving_continues(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    caplog.set_level(logging.INFO, logger="runtime.control.server")
    with serving(sock_dir, rec) as st, ControlClient(st.cmd) as client:
        with pytest.raises(RequestFailed) as info:
            client.request("cancel")
        assert (info.value.code, info.value.message) == ("not_running", "no scan is running")
        with pytest.raises(RequestFailed) as info:
            client.request("shutdown")
        assert info.value.code == "internal"
        assert "RuntimeError: boom" in info.value.message
        with pytest.raises(RequestFailed) as info:
            client.request("status")  # handler returns a list
        assert info.value.code == "internal"
        assert "expected StatusResult or a dict" in info.value.message
        assert client.request("ping") == {"pong": True}  # still serving
    assert any(r.levelno == logging.ERROR and "shutdown" in r.getMessage() for r in caplog.records)


def test_result_model_of_the_wrong_command_is_an_internal_error(sock_dir: Path) -> None:
    def handler(params: RequestParams) -> PingResult:
        return PingResult(pong=True, pid=1, state="idle")

    with serving(sock_dir, handler) as st, ControlClient(st.cmd) as client:
        assert client.request("ping") == {"pong": True, "pid": 1, "state": "idle"}
        with pytest.raises(RequestFailed) as info:
            client.request("status")
        assert info.value.code == "internal"
        assert "handler returned PingResult for 'status', expected StatusResult" in info.value.message


def test_invalid_requests_never_reach_the_handler(sock_dir: Path) -> None:
    rec = Recorder()
    with serving(sock_dir, rec) as st, ControlClient(st.cmd) as client:
        with pytest.raises(RequestFailed) as info:
            client.request("start_scan", output_name="../../etc")
        assert info.value.code == "invalid_params"
        assert "output_name" in info.value.message
        with pytest.raises(RequestFailed) as info:
            client.request("format_disk")
        assert info.value.code == "unknown_command"
    assert rec.calls == []


@pytest.mark.parametrize(
    ("kind", "frames"),
    [
        (zmq.REQ, [b"definitely not json"]),  # REQ adds the empty delimiter itself
        (zmq.DEALER, [b"", b"definitely not json"]),  # DEALER imitating REQ
        (zmq.DEALER, [b"definitely not json"]),  # bare DEALER, no delimiter
    ],
)
def test_malformed_bytes_from_raw_sockets_get_an_error_reply(
    sock_dir: Path, kind: int, frames: list[bytes]
) -> None:
    with serving(sock_dir, Recorder()) as st:
        reply = raw_exchange(st.cmd, frames, kind)
        # the reply comes back in the envelope the request used
        assert len(reply) == (2 if kind == zmq.DEALER and frames[0] == b"" else 1)
        doc = decode_reply(reply[-1])
        assert doc["id"] is None and doc["ok"] is False
        assert doc["error"]["code"] == "malformed"
        assert "not valid JSON" in doc["error"]["message"]
        # and the server still answers properly afterwards
        good = decode_reply(raw_exchange(st.cmd, [encode_request(1, "ping")])[-1])
        assert good == {"id": 1, "ok": True, "result": {"pong": True}}


def test_array_oversize_and_multiframe_requests(sock_dir: Path) -> None:
    with serving(sock_dir, Recorder()) as st:
        doc = decode_reply(raw_exchange(st.cmd, [b"[1, 2]"], zmq.REQ)[-1])
        assert doc["error"]["code"] == "malformed"
        assert "JSON object, got array" in doc["error"]["message"]
        big = encode_request(2, "ping", {"pad": "x" * 20_000})
        doc = decode_reply(raw_exchange(st.cmd, [big])[-1])
        assert doc["error"]["code"] == "malformed"
        assert f"the limit is {MAX_REQUEST_BYTES}" in doc["error"]["message"]
        doc = decode_reply(raw_exchange(st.cmd, [b"", b"{}", b"{}"])[-1])
        assert doc["error"]["code"] == "malformed"
        assert "expected 1 payload frame, got 2" in doc["error"]["message"]


def test_retried_non_idempotent_request_is_answered_not_rerun(sock_dir: Path) -> None:
    rec = Recorder()
    with serving(sock_dir, rec) as st:
        retry = encode_request("6f1c0d2a9b", "start_scan", {"output_name": "a"})
        first = raw_exchange(st.cmd, [retry])
        second = raw_exchange(st.cmd, [retry])
        assert first == second
        assert len(rec.calls) == 1
        # integer ids are counters that restart with the client: never deduplicated
        counter = encode_request(1, "start_scan", {"output_name": "a"})
        raw_exchange(st.cmd, [counter])
        raw_exchange(st.cmd, [counter])
        assert len(rec.calls) == 3
        # idempotent commands are always run
        ping = encode_request("6f1c0d2a9c", "ping")
        raw_exchange(st.cmd, [ping])
        raw_exchange(st.cmd, [ping])
        assert len(rec.calls) == 5


# ----------------------------------------------------------------------------- events


def test_events_have_increasing_sequence_numbers(sock_dir: Path) -> None:
    with serving(sock_dir, Recorder()) as st, EventSubscriber(st.evt) as sub:
        # Slow joiner: a subscription takes a moment to reach the PUB socket;
        # publish until the first event arrives, then count from there.
        deadline = time.monotonic() + 5
        first = None
        while first is None and time.monotonic() < deadline:
            st.call(lambda s: s.publish(StateEvent(state="idle")))
            first = sub.recv(0.05)
        assert first is not None
        while sub.recv(0.1) is not None:  # drain the rest of the slow-joiner loop's events
            pass
        seqs = st.call(lambda s: [s.publish(_field_done(i, 3)) for i in range(3)])
        got = [sub.recv(2) for _ in range(3)]
        assert all(e is not None and e["event"] == "field_done" and e["time"] > 1e9 for e in got)
        assert [e["seq"] for e in got if e] == seqs
        assert seqs == list(range(seqs[0], seqs[0] + 3))
        assert seqs[0] > first["seq"]
        assert [e["data"]["index"] for e in got if e] == [0, 1, 2]
        assert sub.missed == 0
        assert st.call(lambda s: s.last_seq) == seqs[-1]


def _field_done(index: int, total: int) -> FieldDoneEvent:
    return FieldDoneEvent(index=index, done=index + 1, total=total, row=0, col=index, z_um=0.0, captures=1)


def test_untyped_event_is_refused_without_using_a_number(sock_dir: Path) -> None:
    with serving(sock_dir, Recorder()) as st:
        n = st.call(lambda s: s.publish(StateEvent(state="idle")))

        def bad(s: ControlServer) -> str:
            try:
                s.publish({"state": "idle"})  # type: ignore[arg-type]
            except TypeError as err:
                return str(err)
            return "no error"

        assert "publish takes an event model" in st.call(bad)
        assert st.call(lambda s: s.publish(StateEvent(state="idle"))) == n + 1


# ----------------------------------------------------------------------------- binding


def test_second_server_on_a_live_endpoint_is_refused(sock_dir: Path) -> None:
    # libzmq would silently unlink the live socket and steal the endpoint.
    with serving(sock_dir, Recorder()) as st:
        with pytest.raises(RuntimeError, match="already served by another process"):
            ControlServer(st.cmd, f"ipc://{sock_dir}/other-events.sock", Recorder())
        with ControlClient(st.cmd) as client:
            assert client.request("ping") == {"pong": True}  # the first one still owns it


def test_stale_socket_file_is_replaced(sock_dir: Path) -> None:
    stale = sock_dir / "control.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens: what a SIGKILLed daemon leaves
    assert stale.exists()
    with (
        ServerThread(f"ipc://{stale}", f"ipc://{sock_dir}/events.sock", Recorder()) as st,
        ControlClient(st.cmd) as client,
    ):
        assert client.request("ping") == {"pong": True}


def test_refused_binds(sock_dir: Path) -> None:
    with pytest.raises(ValueError, match="CURVE"):
        ControlServer("tcp://0.0.0.0:5555", f"ipc://{sock_dir}/e.sock", Recorder())
    long_path = sock_dir / ("d" * 120) / "c.sock"
    with pytest.raises(ValueError, match="Unix sockets allow at most 107"):
        ControlServer(f"ipc://{long_path}", f"ipc://{sock_dir}/e.sock", Recorder())
    regular = sock_dir / "not-a-socket"
    regular.write_text("precious")
    with pytest.raises(ValueError, match="exists and is not a socket"):
        ControlServer(f"ipc://{regular}", f"ipc://{sock_dir}/e.sock", Recorder())
    assert regular.read_text() == "precious"
    # a failed event bind must not leave the command socket bound
    (sock_dir / "blocker").write_text("x")
    with pytest.raises(ValueError):
        ControlServer(f"ipc://{sock_dir}/c.sock", f"ipc://{sock_dir}/blocker", Recorder())
    with ServerThread(f"ipc://{sock_dir}/c.sock", f"ipc://{sock_dir}/e2.sock", Recorder()):
        pass


def test_loopback_tcp_is_allowed_and_wildcards_resolve() -> None:
    with ServerThread("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", Recorder()) as st:
        endpoints = st.call(lambda s: (s.command_endpoint, s.event_endpoint))
        assert all(e.startswith("tcp://127.0.0.1:") and not e.endswith("*") for e in endpoints)
        with ControlClient(endpoints[0]) as client:
            assert client.request("ping") == {"pong": True}


def test_poll_returns_count_and_close_is_idempotent(sock_dir: Path) -> None:
    server = ControlServer(f"ipc://{sock_dir}/c.sock", f"ipc://{sock_dir}/e.sock", Recorder())
    try:
        assert server.poll(0) == 0
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        dealers = [ctx.socket(zmq.DEALER) for _ in range(3)]
        for i, d in enumerate(dealers):
            d.setsockopt(zmq.LINGER, 0)
            d.connect(server.command_endpoint)
            d.send(encode_request(i, "ping"))
        handled, deadline = 0, time.monotonic() + 5
        while handled < 3 and time.monotonic() < deadline:
            handled += server.poll(50)
        assert handled == 3
        for i, d in enumerate(dealers):
            assert d.poll(2000)
            assert json.loads(d.recv())["id"] == i
            d.close()
        assert isinstance(server.fileno(), int)
    finally:
        server.close()
        server.close()
    with pytest.raises(RuntimeError, match="closed"):
        server.poll(0)
    assert not os.path.exists(f"{sock_dir}/c.sock")


def test_poll_ends_early_on_a_readable_wake_fd_and_still_answers_requests(sock_dir: Path) -> None:
    """``wake``: the supervisor's poll returns once a worker message waits (its queue's pipe is
    readable), without a request (0 answered) and long before its timeout; requests are still answered."""
    server = ControlServer(f"ipc://{sock_dir}/c.sock", f"ipc://{sock_dir}/e.sock", Recorder())
    r, w = os.pipe()
    try:
        os.write(w, b"x")
        result: queue.Queue[int] = queue.Queue()
        # An hour's timeout: only the readable fd can end this poll.
        t = threading.Thread(target=lambda: result.put(server.poll(3_600_000, wake=(r,))), daemon=True)
        t.start()
        assert result.get(timeout=30) == 0
        os.read(r, 1)
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.connect(server.command_endpoint)
        d.send(encode_request(7, "ping"))
        handled, deadline = 0, time.monotonic() + 5
        while handled < 1 and time.monotonic() < deadline:
            handled += server.poll(50, wake=(r,))  # the fd is empty again: the request ends the wait
        assert handled == 1
        assert d.poll(2000) and json.loads(d.recv())["id"] == 7
        d.close()
    finally:
        os.close(r)
        os.close(w)
        server.close()
