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
HEARTBEAT_TIMEOUT_S = 60.0  # see ReplayDaemon.__enter__


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
            base,
            {
                "driver": {"options": {"recording": str(rec), "pace": self.pace}},
                # A shared, loaded machine can starve a worker's heartbeat for more than the default 10 s.
                "daemon": {"heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S},
            },
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


# --------------------------------------------------------------------------- model throughput


def model_throughput(model_root: Path | None = None, seconds: float = 3.0, threads: int = 1) -> dict[str, Any]:
    """Inputs per second of each analysis model on ONNX Runtime CPU with ``threads`` intra-op
    threads (1: as the analysis worker runs them), on the content of a held-out bench slide: the
    tumour model on batches of 64 patches, the nuclei model on the windows of one pipeline region
    per call (as a scan runs it: ``per_s`` counts windows), the slide model on one bag of that slide's patch embeddings.
    Wall and CPU time of this process; run it on a quiet machine for figures to compare."""
    import os

    import numpy as np

    from bench.analysis import render_slide
    from runtime.analysis.models import load_nuclei_model, load_slide_model, load_tumour_model

    def folder(name: str) -> Path | None:
        return model_root / name if model_root is not None else None

    tumour = load_tumour_model(folder("tumour"), "ort_cpu", cpu_threads=threads)
    nuclei = load_nuclei_model(folder("nuclei"), "ort_cpu", cpu_threads=threads)
    slide = load_slide_model(folder("slide_mil"), "ort_cpu", cpu_threads=threads)
    level0 = render_slide(900_000, 0, 800.0).levels[0]  # held out; 0.5 µm/px, the nuclei model's
    rng = np.random.default_rng(0)

    def crops(img: Any, side: int, n: int) -> Any:
        ys = rng.integers(0, img.shape[0] - side, n)
        xs = rng.integers(0, img.shape[1] - side, n)
        return np.stack([img[y : y + side, x : x + side] for y, x in zip(ys, xs, strict=True)])

    import cv2

    t_scale = nuclei.pixel_size_um / tumour.pixel_size_um  # tumour patches from a resampled level
    t_level = cv2.resize(level0, None, fx=t_scale, fy=t_scale, interpolation=cv2.INTER_AREA)
    patches = crops(t_level, tumour.patch_px, 64)
    size = nuclei.params.size
    windows = nuclei.heatmaps  # the model call the detector makes, without its peak picking
    wins = crops(level0, size, 24)
    emb = tumour.predict(patches).embedding
    bag = np.concatenate([emb] * 8)  # ~500 patches: a 2 x 2 mm tissue area at subdivide 1
    coords = rng.uniform(0, 2000, (len(bag), 2)).astype(np.float32)

    def timed(fn: Any, items: int) -> dict[str, float]:
        fn()
        n, w0, c0 = 0, time.perf_counter(), os.times()
        while time.perf_counter() - w0 < seconds:
            fn()
            n += items
        wall, c1 = time.perf_counter() - w0, os.times()
        cpu = (c1.user - c0.user) + (c1.system - c0.system)
        return {"per_s": round(n / wall, 1), "cpu_ms_each": round(1000 * cpu / n, 3)}

    from runtime.analysis.pipeline import NUCLEI_REGION

    per_region = max(1, round(NUCLEI_REGION / nuclei.step_px)) ** 2  # the windows of one pipeline region
    k = iter(range(1 << 30))

    def one_region() -> Any:
        i = next(k) % (len(wins) - per_region + 1)
        return windows(wins[i : i + per_region])

    return {
        "backend": "ort_cpu",
        "threads": threads,
        "tumour": {
            "input": f"{tumour.patch_px} px at {tumour.pixel_size_um} µm/px, batches of 64",
            **timed(lambda: tumour.predict(patches), 64),
        },
        "nuclei": {
            "input": f"{size} px windows at {nuclei.pixel_size_um} µm/px ({nuclei.step_px}-px core), {per_region} "
            f"per call: one pipeline region ({NUCLEI_REGION} px square)",
            "windows_per_region": per_region,
            **timed(one_region, per_region),
        },
        "slide_mil": {"input": f"bags of {len(bag)} embeddings", **timed(lambda: slide.predict(bag, coords), 1)},
    }


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.scan_cost", description="analysis models' throughput")
    p.add_argument("--models", type=Path, default=None, help="model root (tumour, nuclei, slide_mil); default: builtin")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    print(json.dumps(model_throughput(a.models, a.seconds, a.threads), indent=2))
