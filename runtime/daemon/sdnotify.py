"""The systemd notify protocol (sd_notify(3)) without libsystemd.

With ``Type=notify`` systemd passes a datagram socket in ``$NOTIFY_SOCKET``;
the service sends newline-separated ``KEY=VALUE`` assignments to it:
``READY=1`` once it serves requests, ``STATUS=...`` for ``systemctl status``,
``WATCHDOG=1`` at least every ``WatchdogSec`` (else systemd kills and restarts
it), ``STOPPING=1`` when shutting down. Outside systemd (tests, a terminal,
a container) the variable is unset and every call is a cheap no-op returning
False, so callers never need to check where they run.

Failures to send are logged and reported as False, never raised: a service
must not crash because its supervisor's socket is briefly unavailable.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def _address() -> str | None:
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return None
    if raw.startswith("@"):
        # Linux abstract namespace: systemd writes it with '@', the kernel wants a leading NUL.
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    # systemd >= 254 may also hand out vsock: addresses (VMs); we only run on the host.
    log.debug("sdnotify: unsupported NOTIFY_SOCKET %r", raw)
    return None


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"`` or ``"STATUS=...\\nWATCHDOG=1"``); True if it was sent."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as err:
        log.warning("sdnotify: cannot send %r to %s: %s", state.split("\n", 1)[0], address.lstrip("\0"), err)
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Tell systemd start-up is complete (``systemctl start`` returns; dependants start)."""
    state = "READY=1"
    if status_text is not None:
        state += "\n" + _status_line(status_text)
    return notify(state)


def _status_line(text: str) -> str:
    # A newline would start a new assignment: status text could otherwise
    # forge e.g. "READY=1" or "MAINPID=..." lines.
    return "STATUS=" + " ".join(text.splitlines())


def status(text: str) -> bool:
    """One line shown by ``systemctl status``."""
    return notify(_status_line(text))


def watchdog() -> bool:
    """Keep-alive ping; send only while the service is really healthy."""
    return notify("WATCHDOG=1")


def stopping() -> bool:
    """Tell systemd an orderly shutdown has begun (so the stop timeout, not the watchdog, applies)."""
    return notify("STOPPING=1")


def extend_timeout(seconds: float) -> bool:
    """Ask for ``seconds`` more before the start/stop timeout fires (e.g. while finishing a slide file)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog_interval_s() -> float | None:
    """The watchdog period systemd expects (``WatchdogSec``), or None if no watchdog applies to us.

    Ping at about half of it. ``$WATCHDOG_PID``, when set, names the process
    the watchdog is meant for; a child that inherited the environment (a
    worker) gets None so it does not ping on the supervisor's behalf.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("sdnotify: ignoring invalid WATCHDOG_USEC=%r", usec)
        return None
    return value / 1_000_000 if value > 0 else None
