"""Running the daemon: in this process (systemd's ExecStart) or in a child process (hw_sim, tests)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from multiprocessing.context import SpawnProcess
from typing import TYPE_CHECKING, Any

from runtime.config import RuntimeConfig

if TYPE_CHECKING:
    from runtime.control.client import ControlClient


# OpenCV's thread pool (stitcher, acquisition) spins while it waits for work: the calling thread up to
# 10,000 pause loops, each worker 2,000, on every parallel call (thousands of small filters per scan).
# On a few shared cores that spinning is CPU another process needed. OpenCV reads these once, when it
# is loaded, so they are set here, before any worker is spawned (each inherits the environment).
# An operator's own setting wins. Measured on the stitcher's work alone (the 16 x 12 e2e recording
# through the accumulator in one process, OpenCV's 2 threads, 4 alternated pairs at load 11-14):
# 40.2 instead of 45.3 CPU-s per Gpx, and a shorter wall time in 3 of 4 (notes/h15-cpu.md).
QUIET_OPENCV_POOL = {"OPENCV_THREAD_POOL_ACTIVE_WAIT_WORKER": "0", "OPENCV_THREAD_POOL_ACTIVE_WAIT_MAIN": "0"}


def quiet_opencv_pool() -> None:
    """:data:`QUIET_OPENCV_POOL` into this process's environment (what the workers it spawns inherit),
    except for a variable already set."""
    for name, value in QUIET_OPENCV_POOL.items():
        os.environ.setdefault(name, value)


def run_daemon(cfg: RuntimeConfig, log_level: str = "INFO") -> None:
    """Serve until shutdown (blocking). The entry point of ``python -m runtime daemon``."""
    quiet_opencv_pool()
    from runtime.daemon.supervisor import Supervisor

    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    Supervisor(cfg).run()


def start_daemon_process(cfg: RuntimeConfig, log_level: str = "WARNING") -> SpawnProcess:
    """Start the daemon (supervisor and, per scan, its workers) as a child process."""
    proc = mp.get_context("spawn").Process(target=run_daemon, args=(cfg, log_level), name="wsi-supervisor")
    proc.start()
    return proc


def stop_daemon_process(proc: SpawnProcess, cfg: RuntimeConfig, timeout_s: float = 30.0) -> int | None:
    """Ask the daemon to shut down over its socket (it finishes cleanly); escalate to SIGTERM,
    then SIGKILL, if it does not answer or exit in time. Returns its exit code."""
    from runtime.control.client import ControlClient  # late: keeps this module light for systemd's start

    if proc.is_alive():
        try:
            with ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=1) as client:
                client.request("shutdown")
        except Exception:
            proc.terminate()
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    return proc.exitcode


@contextlib.contextmanager
def daemon_running(cfg: RuntimeConfig, retries: int = 15) -> Iterator[tuple[SpawnProcess, ControlClient]]:
    """A daemon child process and a client that has reached it (ping); the daemon is shut down
    afterwards unless it is gone already (a caller may kill it)."""
    from runtime.control.client import ControlClient

    proc = start_daemon_process(cfg)
    client = ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=retries)
    try:
        client.request("ping")
        yield proc, client
    finally:
        client.close()
        if proc.is_alive():
            stop_daemon_process(proc, cfg)


def wait_finished(client: ControlClient, scan_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Poll ``status`` until job ``scan_id`` has finished; returns that status (``last_finish`` ...)."""
    deadline = time.monotonic() + timeout_s
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = client.request("status")
        if st["state"] == "idle" and st["scan_id"] == scan_id and st["last_finish"]:
            return st
        time.sleep(0.05)
    raise TimeoutError(f"job {scan_id} did not finish within {timeout_s:.0f} s: {st}")
