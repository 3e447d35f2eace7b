"""sd_notify against a real AF_UNIX datagram socket, as systemd would provide it."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.daemon import sdnotify


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    d = Path(tempfile.mkdtemp(prefix="wsirt-n-"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(d / "notify"))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(d / "notify"))
    yield sock
    sock.close()
    shutil.rmtree(d, ignore_errors=True)


def test_messages_arrive(notify_socket: socket.socket) -> None:
    assert sdnotify.ready()
    assert notify_socket.recv(4096) == b"READY=1"
    assert sdnotify.ready("idle")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=idle"
    assert sdnotify.status("scanning slide-7")
    assert notify_socket.recv(4096) == b"STATUS=scanning slide-7"
    assert sdnotify.watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"
    assert sdnotify.extend_timeout(2.5)
    assert notify_socket.recv(4096) == b"EXTEND_TIMEOUT_USEC=2500000"
    assert sdnotify.notify("STATUS=ü")
    assert notify_socket.recv(4096) == "STATUS=ü".encode()


def test_status_text_cannot_inject_assignments(notify_socket: socket.socket) -> None:
    assert sdnotify.status("failed\nREADY=1\nMAINPID=1")
    assert notify_socket.recv(4096) == b"STATUS=failed READY=1 MAINPID=1"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"wsirt-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_no_op_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.watchdog() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.status("x") is False


def test_unreachable_socket_returns_false(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sdnotify.ready() is False  # logged, never raised


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval_s() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval_s() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process (our parent)
    assert sdnotify.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_PID", "nonsense")
    assert sdnotify.watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("abc", "0", "-5"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval_s() is None
