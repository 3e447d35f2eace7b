"""What a scan starts before its devices are open (runtime/daemon/scan_job.py).

The scan job forks the writer and the stitcher with the acquisition worker, while the devices open:
the writer needs nothing the plan decides, and the stitcher waits for its job (the plan's geometry and
the ring) on a queue. The first tiles then wait for no fork. A scan that fails before its plan ends
both waiting workers cleanly.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

from runtime.control.client import ControlClient
from runtime.daemon.process import start_daemon_process, stop_daemon_process
from runtime.devices.protocols import ScanArea
from runtime.devices.scan_plan import serpentine_plan
from runtime.ipc.messages import EndOfStream
from runtime.ipc.ring import RingSpec
from runtime.stitching.accumulator import MosaicGeometry
from runtime.workers.skeleton import WorkerContext
from runtime.workers.stitcher import StitchJob, wait_for_job
from tests.conftest import daemon_config


def _wait(client: ControlClient, what: str, cond: Any, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = client.request("status")
        if cond(st):
            return st
        time.sleep(0.02)
    raise AssertionError(f"{what}: not reached in {timeout_s} s: {st}")


def test_writer_and_stitcher_are_running_while_the_devices_open_and_the_scan_completes(
    tmp_path: Path, small_recording: Path
) -> None:
    gate = tmp_path / "gate"
    driver = {
        "factory": "tests.gated_driver:open_gated",
        "options": {"recording": str(small_recording), "gate": str(gate)},
    }
    runtime_dir = Path("/tmp") / f"wsirt-start-{os.getpid()}"  # ipc paths must stay short
    cfg = daemon_config(tmp_path / "data", runtime_dir, None, driver=driver)
    proc = start_daemon_process(cfg)
    client = ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=15)
    try:
        started = client.request("start_scan", output_name="gated")
        st = _wait(client, "workers started", lambda s: len(s.get("workers") or {}) == 3)
        # Acquisition is still opening the devices (the gate is shut): no plan, no ring yet.
        assert st["state"] == "scanning" and st["fields_total"] == 0
        assert set(st["workers"]) == {"acquisition", "stitcher", "writer"}
        gate.touch()
        st = _wait(client, "scan finished", lambda s: s["state"] == "idle" and s["last_finish"] is not None)
        assert st["last_finish"] == "completed", st
        report = json.loads((Path(started["output_dir"]) / "report.json").read_text())
        assert report["finish_reason"] == "completed" and Path(report["slide"]).is_file()
        assert {"acquisition", "stitcher", "writer"} <= set(report["cpu_seconds"])
    finally:
        client.close()
        stop_daemon_process(proc, cfg, timeout_s=60)
    assert proc.exitcode == 0


def test_a_scan_that_fails_before_its_plan_ends_the_waiting_workers(tmp_path: Path) -> None:
    """The driver cannot open: acquisition fails before ScanPrepared. The stitcher and the writer, forked
    with it and waiting, are told (EndOfStream: see the next test for the stitcher's side); the scan fails
    with the driver's reason."""
    driver = {"factory": "tests.gated_driver:open_missing", "options": {}}
    runtime_dir = Path("/tmp") / f"wsirt-startf-{os.getpid()}"
    cfg = daemon_config(tmp_path / "data", runtime_dir, None, driver=driver)
    proc = start_daemon_process(cfg)
    client = ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=15)
    try:
        started = client.request("start_scan", output_name="fails")
        st = _wait(client, "scan finished", lambda s: s["state"] == "idle" and s["last_finish"] is not None)
        assert st["last_finish"] == "failed" and "no recording here" in st["last_error"], st
        report = json.loads((Path(started["output_dir"]) / "report.json").read_text())
        assert report["error"] == st["last_error"]
    finally:
        client.close()
        stop_daemon_process(proc, cfg, timeout_s=60)
    assert proc.exitcode == 0


def test_the_stitcher_waits_for_its_job_and_ends_without_one() -> None:
    ctx = mp.get_context("spawn")
    jobs: Queue[Any] = ctx.Queue()
    worker = WorkerContext("stitcher", None)  # no events: nobody watches its heartbeats here
    try:
        job = StitchJob(
            MosaicGeometry(serpentine_plan(ScanArea(0, 0, 100, 100), 60, 60, 0.1), 240, 240, 0.25),
            RingSpec("wsirt_test", 2, 240, 240),
            "/nowhere/mosaic.zarr",
        )
        jobs.put(job)
        assert wait_for_job(worker, jobs) == job
        jobs.put(EndOfStream("the scan failed before its plan"))
        assert wait_for_job(worker, jobs) is None
    finally:
        jobs.cancel_join_thread()
        jobs.close()
