"""ControlClient (Lazy Pirate), EventSubscriber and the ctl CLI against real sockets."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from runtime.control.client import ControlClient, DaemonUnavailable, EventSubscriber, RequestFailed, main
from runtime.control.events import StateEvent
from runtime.control.protocol import RequestError, RequestParams, encode_event, encode_reply
from runtime.control.server import ControlServer


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="wsirt-c-"))  # short: Unix socket paths max 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def in_thread(target: Callable[[threading.Event], None]) -> Callable[[], None]:
    """Run ``target(stop)`` in a thread; return a function that stops and joins it."""
    stop = threading.Event()
    t = threading.Thread(target=target, args=(stop,), daemon=True)
    t.start()

    def finish() -> None:
        stop.set()
        t.join(5)

    return finish


def control_server(
    cmd: str, evt: str, handler: Callable[[RequestParams], Any], publish_every_s: float | None = None
) -> Callable[[], None]:
    ready = threading.Event()

    def run(stop: threading.Event) -> None:
        with ControlServer(cmd, evt, handler) as server:
            ready.set()
            last = 0.0
            while not stop.is_set():
                server.poll(10)
                if publish_every_s is not None and time.monotonic() - last > publish_every_s:
                    server.publish(StateEvent(state="idle"))
                    last = time.monotonic()

    finish = in_thread(run)
    assert ready.wait(5)
    return finish


def handler(params: RequestParams) -> dict[str, Any]:
    """Echoes the command and its params (as JSON, omitted ones left out)."""
    if params.COMMAND == "cancel":
        raise RequestError("not_running", "no scan is running")
    return {"command": params.COMMAND, "params": params.model_dump(mode="json", exclude_none=True)}


# ----------------------------------------------------------------------------- ControlClient


def test_no_daemon_gives_daemon_unavailable_after_all_tries(sock_dir: Path) -> None:
    endpoint = f"ipc://{sock_dir}/nobody.sock"
    client = ControlClient(endpoint, timeout_s=0.2, retries=3)
    start = time.monotonic()
    with pytest.raises(DaemonUnavailable) as info:
        client.request("ping")
    elapsed = time.monotonic() - start
    client.close()
    assert f"no reply from {endpoint} after 3 tries" in str(info.value)
    assert elapsed < 10  # 3 x 0.2 s plus slack: it gave up, it did not block forever


def test_bad_client_settings() -> None:
    with pytest.raises(ValueError, match="retries"):
        ControlClient("ipc:///nowhere", retries=0)
    with pytest.raises(ValueError, match="timeout_s"):
        ControlClient("ipc:///nowhere", timeout_s=0)


def _bound_router(endpoint: str) -> zmq.Socket[bytes]:
    """A ROUTER standing in for the daemon's control socket (a hand-written server per test)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    return router


def test_lazy_pirate_retries_with_the_same_request(sock_dir: Path) -> None:
    """A server that drops the first request: the client's second try (new socket) gets the answer."""
    endpoint = f"ipc://{sock_dir}/flaky.sock"
    seen: list[bytes] = []
    router = _bound_router(endpoint)

    def serve(stop: threading.Event) -> None:
        while not stop.is_set():
            if not router.poll(20):
                continue
            *envelope, payload = router.recv_multipart()
            seen.append(payload)
            if len(seen) > 1:
                router.send_multipart(
                    [*envelope, encode_reply(json.loads(payload)["id"], {"try": len(seen)})]
                )

    finish = in_thread(serve)
    try:
        with ControlClient(endpoint, timeout_s=0.3, retries=3) as client:
            assert client.request("start_scan", output_name="x") == {"try": 2}
    finally:
        finish()
        router.close()
    # Byte-identical resend: the daemon's reply cache can recognise the retry.
    assert len(seen) == 2 and seen[0] == seen[1]


def test_reply_with_another_id_is_refused(sock_dir: Path) -> None:
    endpoint = f"ipc://{sock_dir}/liar.sock"
    router = _bound_router(endpoint)

    def serve(stop: threading.Event) -> None:
        while not stop.is_set():
            if router.poll(20):
                *envelope, _ = router.recv_multipart()
                router.send_multipart([*envelope, encode_reply("someone-else", {})])

    finish = in_thread(serve)
    try:
        with (
            ControlClient(endpoint, timeout_s=1.0, retries=1) as client,
            pytest.raises(RequestFailed) as info,
        ):
            client.request("ping")
    finally:
        finish()
        router.close()
    assert info.value.code == "malformed"
    assert "'someone-else' does not match" in info.value.message


def test_error_replies_raise_request_failed(sock_dir: Path) -> None:
    cmd, evt = f"ipc://{sock_dir}/c.sock", f"ipc://{sock_dir}/e.sock"
    finish = control_server(cmd, evt, handler)
    try:
        with ControlClient(cmd) as client:
            with pytest.raises(RequestFailed) as info:
                client.request("cancel")
            assert (info.value.code, info.value.message) == ("not_running", "no scan is running")
            # None-valued params are dropped, not sent as null
            assert client.request("start_scan", recording=None, output_name="n") == {
                "command": "start_scan",
                "params": {"output_name": "n"},
            }
    finally:
        finish()


# ----------------------------------------------------------------------------- EventSubscriber


def _publisher(endpoint: str) -> zmq.Socket[bytes]:
    pub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(endpoint)
    return pub


def _wait_joined(pub: zmq.Socket[bytes], sub: EventSubscriber) -> int:
    """Publish until the subscriber receives (slow joiner); return the last seq used."""
    seq = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        seq += 1
        pub.send_multipart(encode_event(seq, "state", {"state": "idle"}))
        if sub.recv(0.05) is not None:
            while sub.recv(0.1) is not None:
                pass
            return sub.last_seq or seq
    raise AssertionError("subscriber never joined")


def test_subscriber_counts_gaps_and_restarts(sock_dir: Path) -> None:
    endpoint = f"ipc://{sock_dir}/ev.sock"
    pub = _publisher(endpoint)
    try:
        with EventSubscriber(endpoint) as sub:
            last = _wait_joined(pub, sub)
            assert sub.missed == 0  # events before joining are not "missed"
            for seq in (last + 1, last + 2, last + 5, last + 6):
                pub.send_multipart(encode_event(seq, "field_done", {"index": seq}))
            got = [sub.recv(2) for _ in range(4)]
            assert [e["seq"] for e in got if e] == [last + 1, last + 2, last + 5, last + 6]
            assert sub.missed == 2
            pub.send_multipart(encode_event(1, "state", {"state": "idle"}))  # daemon restarted
            assert sub.recv(2) is not None
            assert (sub.restarts, sub.missed, sub.last_seq) == (1, 2, 1)
            pub.send_multipart([b"state", b"not json"])  # skipped, not raised
            pub.send_multipart(encode_event(2, "state", {"state": "idle"}))
            ev = sub.recv(2)
            assert ev is not None and ev["seq"] == 2
            assert sub.recv(0.05) is None  # nothing more: times out with None
    finally:
        pub.close()


def test_subscriber_detects_real_drops(sock_dir: Path) -> None:
    """A slow subscriber behind a flood: PUB drops at the high-water mark, seq gaps reveal it."""
    endpoint = f"ipc://{sock_dir}/flood.sock"
    pub = _publisher(endpoint)
    pub.setsockopt(zmq.SNDHWM, 10)
    try:
        with EventSubscriber(endpoint) as sub:
            sub.socket.setsockopt(zmq.RCVHWM, 10)
            first = _wait_joined(pub, sub)
            n = 20_000
            for seq in range(first + 1, first + n + 1):
                pub.send_multipart(encode_event(seq, "field_done", {"index": seq, "pad": "x" * 200}))
            received = 0
            while sub.recv(0.3) is not None:
                received += 1
            assert 0 < received < n
            last = sub.last_seq
            assert last is not None
            assert received + sub.missed == last - first
    finally:
        pub.close()


def test_topic_filter_disables_gap_counting(sock_dir: Path) -> None:
    endpoint = f"ipc://{sock_dir}/topics.sock"
    pub = _publisher(endpoint)
    try:
        with EventSubscriber(endpoint, topics=["scan_finished", "state"]) as sub:
            last = _wait_joined(pub, sub)
            pub.send_multipart(encode_event(last + 1, "field_done", {}))
            pub.send_multipart(encode_event(last + 2, "scan_finished", {"reason": "completed"}))
            ev = sub.recv(2)
            assert ev is not None and ev["event"] == "scan_finished"
            assert sub.missed == 0
    finally:
        pub.close()


# ----------------------------------------------------------------------------- ctl CLI


def test_ctl_cli_requests(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cmd, evt = f"ipc://{sock_dir}/c.sock", f"ipc://{sock_dir}/e.sock"
    finish = control_server(cmd, evt, handler)
    base = ["ctl", "--endpoint", cmd, "--events", evt]
    try:
        assert main([*base, "ping"]) == 0
        assert json.loads(capsys.readouterr().out) == {"command": "ping", "params": {}}
        assert main([*base, "start-scan", "--region", "1", "2", "300", "400.5", "--name", "s7"]) == 0
        assert json.loads(capsys.readouterr().out)["params"] == {
            "output_name": "s7",
            "region": {"x_um": 1.0, "y_um": 2.0, "width_um": 300.0, "height_um": 400.5},
        }
        assert main([*base, "cancel"]) == 1
        assert "error [not_running]: no scan is running" in capsys.readouterr().err
        assert main([*base, "start-scan", "--name", "../x"]) == 1
        assert "invalid_params" in capsys.readouterr().err
    finally:
        finish()


def test_ctl_cli_endpoints_from_config(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = sock_dir / "run"
    cfg = sock_dir / "runtime.toml"
    cfg.write_text(f'[daemon]\nruntime_dir = "{run_dir}"\n')
    finish = control_server(f"ipc://{run_dir}/control.sock", f"ipc://{run_dir}/events.sock", handler)
    try:
        assert main(["ctl", "--config", str(cfg), "status"]) == 0
        assert json.loads(capsys.readouterr().out)["command"] == "status"
    finally:
        finish()


def test_ctl_cli_events(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cmd, evt = f"ipc://{sock_dir}/c.sock", f"ipc://{sock_dir}/e.sock"
    finish = control_server(cmd, evt, handler, publish_every_s=0.02)
    try:
        assert main(["ctl", "--endpoint", cmd, "--events", evt, "events", "--count", "2", "--wait", "5"]) == 0
    finally:
        finish()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    events = [json.loads(line) for line in lines]
    assert all(e["event"] == "state" for e in events)
    assert events[1]["seq"] > events[0]["seq"]


def test_ctl_cli_unavailable_and_bad_config(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nobody = f"ipc://{sock_dir}/none.sock"
    assert (
        main(["ctl", "--endpoint", nobody, "--events", nobody, "--timeout", "0.1", "--retries", "2", "ping"])
        == 2
    )
    assert "no reply from" in capsys.readouterr().err
    assert main(["ctl", "--endpoint", nobody, "--events", nobody, "events", "--wait", "0.1"]) == 2
    assert "no event from" in capsys.readouterr().err
    assert main(["ctl", "--config", str(sock_dir / "missing.toml"), "ping"]) == 2
    assert "cannot read config file" in capsys.readouterr().err
    assert main(["ctl", "--endpoint", nobody, "--events", nobody, "--retries", "0", "ping"]) == 2
    with pytest.raises(SystemExit) as info:
        main(["ctl", "frobnicate"])
    assert info.value.code == 2
