"""Waiting for processes to end, for the tests of worker lifetimes (test_orphans, test_worker_start)."""

from __future__ import annotations

import time

import psutil


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init to reap it: it runs no more)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def survivors(pids: list[int], timeout_s: float) -> list[int]:
    """Those of ``pids`` still running after up to ``timeout_s`` (sooner once none is)."""
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in pids if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


class Discard:
    """Stands in for the events queue: heartbeats go nowhere."""

    def put(self, _: object) -> None:
        pass
