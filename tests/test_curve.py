"""CURVE on the control plane (issue 12, item 7): keys, authorised / unknown / missing client keys
over real TCP sockets on 127.0.0.1, events too, and remote binds allowed only with keys."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.__main__ import main as runtime_main
from runtime.config import ConfigError, RuntimeConfig, load_config
from runtime.control.client import ControlClient, DaemonUnavailable, EventSubscriber
from runtime.control.curve import ClientKeys, CurveError, ServerKeys, make_key_pair
from runtime.control.events import StateEvent
from runtime.control.protocol import RequestParams
from runtime.control.replies import PingResult
from runtime.control.server import ControlServer, _check_bindable


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """A server pair, an authorised client pair (its public key in the folder), a stranger's pair."""
    make_key_pair(tmp_path / "server", "server")
    make_key_pair(tmp_path / "clients", "ui")
    make_key_pair(tmp_path / "elsewhere", "stranger")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "ui.key").write_bytes((tmp_path / "clients" / "ui.key").read_bytes())
    return {
        "server_secret": tmp_path / "server" / "server.key_secret",
        "server_public": tmp_path / "server" / "server.key",
        "authorized": authorized,
        "ui_secret": tmp_path / "clients" / "ui.key_secret",
        "stranger_secret": tmp_path / "elsewhere" / "stranger.key_secret",
    }


def _ping(_params: RequestParams) -> PingResult:
    return PingResult(pong=True, pid=os.getpid(), state="idle")


@contextlib.contextmanager
def _serving(command: str, event: str, curve: ServerKeys) -> Iterator[tuple[str, str]]:
    """A control server in a thread, serving ping and publishing a state event every poll."""
    ready = threading.Event()
    stop = threading.Event()
    endpoints: list[str] = []

    def run() -> None:
        with ControlServer(command, event, _ping, curve=curve) as srv:
            endpoints.extend([srv.command_endpoint, srv.event_endpoint])
            ready.set()
            while not stop.is_set():
                srv.poll(10)
                srv.publish(StateEvent(state="idle"))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(10)
    try:
        yield endpoints[0], endpoints[1]
    finally:
        stop.set()
        t.join(10)


@pytest.fixture
def server(keys: dict[str, Path]) -> Iterator[tuple[str, str]]:
    """A CURVE control server on ephemeral loopback TCP ports."""
    with _serving(
        "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", ServerKeys(keys["server_secret"], keys["authorized"])
    ) as ep:
        yield ep


def test_an_authorised_key_is_answered_and_hears_events(server: tuple[str, str], keys: dict[str, Path]) -> None:
    ui = ClientKeys(keys["ui_secret"], keys["server_public"])
    with ControlClient(server[0], timeout_s=3.0, retries=1, curve=ui) as client:
        assert client.request("ping")["pong"] is True
    with EventSubscriber(server[1], curve=ui) as sub:
        event = sub.recv(5.0)
    assert event is not None and event["event"] == "state"


@pytest.mark.parametrize("who", ["stranger", "no key"])
def test_an_unknown_or_missing_key_gets_nothing(server: tuple[str, str], keys: dict[str, Path], who: str) -> None:
    curve = ClientKeys(keys["stranger_secret"], keys["server_public"]) if who == "stranger" else None
    with ControlClient(server[0], timeout_s=0.5, retries=2, curve=curve) as client, pytest.raises(DaemonUnavailable):
        client.request("ping")
    with EventSubscriber(server[1], curve=curve) as sub:
        assert sub.recv(1.0) is None  # the handshake fails: not even events get through


def test_the_ctl_command_line_takes_the_client_key(
    server: tuple[str, str], keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["ctl", "--endpoint", server[0], "--events", server[1], "--timeout", "3", "--retries", "1"]
    ok = ["--curve-key", str(keys["ui_secret"]), "--server-key", str(keys["server_public"])]
    assert runtime_main([*base, *ok, "ping"]) == 0
    assert '"pong": true' in capsys.readouterr().out
    assert runtime_main([*base, "--timeout", "0.3", "ping"]) == 2  # no key: no answer
    assert runtime_main([*base, "--curve-key", str(keys["ui_secret"]), "ping"]) == 2
    assert "go together" in capsys.readouterr().err


def test_keys_command_writes_a_private_pair_and_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert runtime_main(["keys", str(tmp_path), "--name", "scanner-7"]) == 0
    secret = tmp_path / "scanner-7.key_secret"
    assert secret.is_file() and (tmp_path / "scanner-7.key").is_file()
    assert stat.S_IMODE(secret.stat().st_mode) & 0o077 == 0
    before = secret.read_bytes()
    assert runtime_main(["keys", str(tmp_path), "--name", "scanner-7"]) == 2
    assert "exists" in capsys.readouterr().err and secret.read_bytes() == before
    assert runtime_main(["keys", str(tmp_path), "--name", "../evil"]) == 2


def test_remote_binds_need_keys_and_bad_keys_are_named(keys: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CURVE keys"):
        _check_bindable("tcp://0.0.0.0:5555")
    _check_bindable("tcp://0.0.0.0:5555", authenticated=True)  # no error
    with pytest.raises(CurveError, match="does not exist"):
        ServerKeys(tmp_path / "missing.key_secret", keys["authorized"]).check()
    with pytest.raises(CurveError, match="no secret key"):
        ServerKeys(keys["server_public"], keys["authorized"]).check()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CurveError, match="no client public key"):
        ServerKeys(keys["server_secret"], empty).check()
    with pytest.raises(CurveError, match="not a ZeroMQ certificate"):
        bad = tmp_path / "bad.key_secret"
        bad.write_text("not a certificate")
        ClientKeys(bad, keys["server_public"]).check()


def test_config_takes_both_keys_or_neither(tmp_path: Path, keys: dict[str, Path]) -> None:
    one = tmp_path / "one.toml"
    one.write_text(f'[control]\ncurve_secret_key = "{keys["server_secret"]}"\n')
    with pytest.raises(ConfigError, match="together"):
        load_config(one)
    both = tmp_path / "both.toml"
    both.write_text(
        f'[control]\ncurve_secret_key = "{keys["server_secret"]}"\ncurve_authorized_keys = "{keys["authorized"]}"\n'
    )
    cfg: RuntimeConfig = load_config(both)
    assert ServerKeys.from_config(cfg.control) == ServerKeys(keys["server_secret"], keys["authorized"])
    assert ServerKeys.from_config(RuntimeConfig().control) is None


def test_ipc_sockets_of_a_curve_server_stay_plain(keys: dict[str, Path], tmp_path: Path) -> None:
    """Local ipc clients (the scanner UI on the same machine) need no keys: file permissions guard them."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="wsirt-k-"))  # short: Unix socket paths max 107 bytes
    curve = ServerKeys(keys["server_secret"], keys["authorized"])
    with (
        _serving(f"ipc://{d}/c.sock", f"ipc://{d}/e.sock", curve) as (command, _),
        ControlClient(command, timeout_s=3.0, retries=1) as client,
    ):
        assert client.request("ping")["pong"] is True
