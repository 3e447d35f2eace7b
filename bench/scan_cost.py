"""A replay daemon kept running across scans, for ``python -m bench analysis --scan-cost``.

A scanner's daemon runs for days and scans come one after another; with ``[analysis] enabled``
its analysis worker is started with the daemon and kept warm (runtime/daemon/analysis_service.py).
So the cost of the analysis to a scan is measured on a daemon that is already up and whose
analysis worker is ready: :class:`ReplayDaemon` starts one (replay driver at a given pace),
waits for the analysis worker (``status.workers.analysis``), notes what the worker's start cost
(CPU seconds, paid once per daemon), and runs scans on it one after another, each timed from
``start_scan`` to its ``scan_finished`` event as ``bench e2e`` times one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from runtime.config import load_config, with_overrides

WAIT_S = 600.0


class ReplayDaemon:
    """A daemon child replaying ``recording`` at ``pace`` (0: as fast as the CPU allows) with the
    config file ``config``; scans are written under ``data_root`` and removed once read."""

    def __init__(self, config: Path, recording: Path, data_root: Path, pace: float) -> None:
        self.config, self.recording, self.data_root, self.pace = config, recording, data_root, pace
        self.worker_pid: int | None = None
        self.worker_start_cpu_s: float | None = None  # the analysis worker's start (imports, models)
        self.worker_ready_s: float | None = None  # from the daemon's start to the worker being ready

    def __enter__(self) -> ReplayDaemon:
        from hw_sim.replay_job import _replay_config
        from runtime.control.client import ControlClient, EventSubscriber
        from runtime.daemon.process import start_daemon_process

        self._tmp = tempfile.TemporaryDirectory(prefix="wsi-cost-")
        rec, runtime_dir = self.recording.resolve(), Path(self._tmp.name)
        base = _replay_config(load_config(self.config), rec, self.data_root / "x", runtime_dir)
        self.cfg = with_overrides(
            base, {"driver": {"options": {"recording": str(rec), "pace": self.pace}}}
        )
        t0 = time.monotonic()
        self.proc = start_daemon_process(self.cfg)
        self.client = ControlClient(self.cfg.endpoint("command"), timeout_s=2.0, retries=15)
        self.events = EventSubscriber(self.cfg.endpoint("event"))
        self.client.request("ping")
        if self.cfg.analysis.enabled:
            self._wait_for_analysis_worker(t0)
        time.sleep(0.2)  # ZeroMQ slow joiner: let the subscription reach the PUB socket
        return self

    def _wait_for_analysis_worker(self, t0: float) -> None:
        import psutil

        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            pid = self.client.request("status")["workers"].get("analysis")
            if pid is not None:
                self.worker_ready_s = time.monotonic() - t0
                self.worker_pid = int(pid)
                cpu = psutil.Process(self.worker_pid).cpu_times()
                self.worker_start_cpu_s = cpu.user + cpu.system
                return
            time.sleep(0.05)
        raise RuntimeError("the analysis worker did not become ready")

    def scan(self, name: str) -> dict[str, Any]:
        """One scan, start_scan -> scan_finished; its report with ``_wall_s`` added (the folder is removed)."""
        t0 = time.time()
        scan_id = self.client.request("start_scan", output_name=name)["scan_id"]
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            ev = self.events.recv(timeout_s=0.05)
            if ev is not None and ev.get("event") == "scan_finished" and ev["data"].get("scan_id") == scan_id:
                wall = time.time() - t0
                break
            if ev is None and not self.proc.is_alive():
                raise RuntimeError("the daemon exited during the scan")
        else:
            raise RuntimeError(f"scan {name} did not finish within {WAIT_S:.0f} s")
        folder = self.data_root / name
        report: dict[str, Any] = json.loads((folder / "report.json").read_text())
        if report["finish_reason"] != "completed":
            raise RuntimeError(f"scan {report['finish_reason']}: {report.get('error')}")
        shutil.rmtree(folder, ignore_errors=True)
        report["_wall_s"] = wall
        return report

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        from runtime.daemon.process import stop_daemon_process

        self.events.close()
        self.client.close()
        stop_daemon_process(self.proc, self.cfg, timeout_s=60)
        self._tmp.cleanup()
