"""Running the daemon: in this process (systemd's ExecStart) or in a child process (hw_sim, tests)."""

from __future__ import annotations

import logging
import multiprocessing as mp
from multiprocessing.context import SpawnProcess

from runtime.config import RuntimeConfig


def run_daemon(cfg: RuntimeConfig, log_level: str = "INFO") -> None:
    """Serve until shutdown (blocking). The entry point of ``python -m runtime daemon``."""
    from runtime.supervisor import Supervisor

    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    Supervisor(cfg).run()


def start_daemon_process(cfg: RuntimeConfig, log_level: str = "WARNING") -> SpawnProcess:
    """Start the daemon (supervisor and, per scan, its workers) as a child process."""
    proc = mp.get_context("spawn").Process(target=run_daemon, args=(cfg, log_level), name="wsi-supervisor")
    proc.start()
    return proc
