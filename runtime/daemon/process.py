"""Running the daemon: in this process (systemd's ExecStart) or in a child process (hw_sim, tests)."""

from __future__ import annotations

import logging
import multiprocessing as mp
from multiprocessing.context import SpawnProcess

from runtime.config import RuntimeConfig


def run_daemon(cfg: RuntimeConfig, log_level: str = "INFO") -> None:
    """Serve until shutdown (blocking). The entry point of ``python -m runtime daemon``."""
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
