"""Resume bench: scans SIGKILLed at a random field (daemon and every worker at once), resumed.

A synthetic recording (synthesised here: ``--fields NX NY --tile T``, several z planes so the
contrast sweep works) is scanned once without interruption through the daemon (the reference).
Then ``--scans`` times: a daemon scans it at ``--pace`` x scanner speed (so that a kill lands
mid-scan), and when ``field_done`` reaches a random field (uniform in 1 .. fields - 1) every
process of the daemon is stopped and SIGKILLed at once (a power cut); a new daemon is started,
``status`` must list the scan as interrupted, and ``start_scan {"resume": id}`` finishes it.
Reported per scan and in total:

``durable``
    fields the journal held at the kill (never captured again).
``lost``
    fields missing from the resumed scan's report (0 expected), plus journaled fields captured
    a second time after the resume (0 expected).
``pos err``
    the largest difference of a tile position from the reference scan's (px).
``PSNR``
    level 0 of the resumed slide against the reference slide (dB; inf: identical).
``shm left``
    shared-memory segments (``wsirt_<pid>_*``) and recorded semaphores of any daemon of the
    run still present at the end (0 expected: the next daemon sweeps the killed one's).
``restart -> capture``
    from starting the new daemon to the first ``field_done`` of the resumed scan (s); and
    ``resume -> capture``, from the ``start_scan`` request (s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import Column, emit

DESCRIPTION = "scans SIGKILLed at a random field and resumed: fields lost, position error, PSNR, leaks, restart time"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scans", type=int, default=20, help="interrupted scans (default 20)")
    p.add_argument("--fields", type=int, nargs=2, default=(4, 4), metavar=("NX", "NY"), help="default 4 4")
    p.add_argument("--tile", type=int, default=256, help="camera frame edge (px)")
    p.add_argument("--seed", type=int, default=3, help="recording and kill points")
    p.add_argument("--pace", type=float, default=2.0, help="the killed scans run at this x scanner time")
    p.add_argument("--chunk", type=int, default=64, help="mosaic chunk = slide tile (px): small rows flush early")
    p.add_argument("--workdir", type=Path, help="where the recording and scans go (default: temp)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _config(root: Path, runtime_dir: Path, recording: Path, chunk: int, pace: float) -> Any:
    from runtime.config import RuntimeConfig, with_overrides

    return with_overrides(
        RuntimeConfig(),
        {
            "daemon": {"data_root": str(root), "runtime_dir": str(runtime_dir), "heartbeat_timeout_s": 10.0},
            "driver": {"options": {"recording": str(recording), "pace": pace}},
            "mosaic": {"chunk": chunk, "keep_after_export": True},  # the journal is read afterwards
            "writer": {"tile": chunk, "min_level_size": 2 * chunk},
        },
    )


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _positions(report: dict[str, Any]) -> dict[int, tuple[float, float]]:
    return {p["index"]: (p["y_px"], p["x_px"]) for p in report["stitch"]["positions"]}


def _left_behind(pids: list[int], runtime_dir: Path) -> int:
    shm = [n for n in os.listdir("/dev/shm") if any(n.startswith(f"wsirt_{p}_") for p in pids)]
    registries = [p for p in runtime_dir.glob("semaphores-*") if int(p.name.split("-")[1]) in pids]
    return len(shm) + len(registries)


def _first_field_after(events: Any, scan_id: str, timeout_s: float = 120) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ev = events.recv(timeout_s=0.5)
        if ev is not None and ev.get("event") == "field_done":
            return time.monotonic()
        if ev is not None and ev.get("event") == "scan_finished" and ev["data"]["scan_id"] == scan_id:
            return time.monotonic()  # nothing left to capture (killed after the last field)
    raise RuntimeError("no field_done after the resume")


def _one(
    n: int, kill_at: int, root: Path, runtime_dir: Path, recording: Path, a: argparse.Namespace, ref: Path
) -> dict[str, Any]:
    import psutil
    import tifffile

    from runtime.control.client import EventSubscriber
    from runtime.daemon.process import daemon_running, wait_finished
    from runtime.output.journal import JOURNAL_NAME, read_journal

    name = f"killed-{n:02d}"
    slow = _config(root, runtime_dir, recording, a.chunk, a.pace)
    pids: list[int] = []
    with daemon_running(slow) as (proc, client):
        scan_id = client.request("start_scan", output_name=name)["scan_id"]
        deadline = time.monotonic() + 300
        while client.request("status")["fields_done"] < kill_at:
            if time.monotonic() > deadline:
                raise RuntimeError(f"scan {n} did not reach field {kill_at}")
            time.sleep(0.01)
        pid = proc.pid
        assert pid is not None
        everyone = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
        for pid in everyone:
            os.kill(pid, signal.SIGSTOP)
        for pid in everyone:
            os.kill(pid, signal.SIGKILL)
        proc.join(10)
        pids += everyone
    folder = root / name
    durable = len(read_journal(folder / JOURNAL_NAME).fields)
    fast = _config(root, runtime_dir, recording, a.chunk, 0.0)
    t_restart = time.monotonic()
    with daemon_running(fast) as (proc2, client):
        events = EventSubscriber(fast.endpoint("event"))
        try:
            listed = [s["scan_id"] for s in client.request("status")["interrupted"]]
            if scan_id not in listed:
                raise RuntimeError(f"status does not list {scan_id} as interrupted: {listed}")
            time.sleep(0.2)  # the subscription reaches the PUB socket
            t_resume = time.monotonic()
            client.request("start_scan", resume=scan_id)
            pids += list(client.request("status")["workers"].values())
            t_capture = _first_field_after(events, scan_id)
        finally:
            events.close()
        st = wait_finished(client, scan_id, timeout_s=600)
        if st["last_finish"] != "completed":
            return {
                "scan": n,
                "kill_at": kill_at,
                "durable": durable,
                "finish": st["last_finish"],
                "error": st["last_error"],
                "lost": None,
            }
        assert proc2.pid is not None
        pids.append(proc2.pid)
    report = json.loads((folder / "report.json").read_text())
    state = read_journal(folder / JOURNAL_NAME)
    indices = [f.index for f in state.fields]
    recaptured = len(indices) - len(set(indices))
    got, want = _positions(report), _positions(json.loads((ref / "report.json").read_text()))
    err = max((abs(got[i][k] - want[i][k]) for i in want if i in got for k in (0, 1)), default=float("nan"))
    level0 = tifffile.imread(folder / "slide.ome.tif", level=0)
    ref0 = tifffile.imread(ref / "slide.ome.tif", level=0)
    return {
        "scan": n,
        "kill_at": kill_at,
        "durable": durable,
        "finish": st["last_finish"],
        "lost": (report["fields_total"] - report["fields_done"]) + recaptured,
        "pos_err_px": err,
        "psnr_db": _psnr(level0, ref0) if level0.shape == ref0.shape else float("nan"),
        "shm_left": _left_behind(pids, runtime_dir),
        "restart_to_capture_s": t_capture - t_restart,
        "resume_to_capture_s": t_capture - t_resume,
    }


def run(a: argparse.Namespace) -> int:
    from hw_sim.synth import SynthParams, synthesize
    from runtime.daemon.process import daemon_running, wait_finished

    rng = random.Random(a.seed)
    with contextlib.ExitStack() as stack:
        work = a.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-resume-")))
        work.mkdir(parents=True, exist_ok=True)
        runtime_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wsirt-br-", dir="/tmp")))
        recording = work / "recording.zarr"
        if not (recording / "zarr.json").exists():
            params = SynthParams(
                fields_x=a.fields[0], fields_y=a.fields[1], seed=a.seed, tile=a.tile, z_planes=9, z_step_um=0.5
            )
            synthesize(recording, params, overwrite=True, progress=False)
        root = work / "data"
        root.mkdir(exist_ok=True)
        total = a.fields[0] * a.fields[1]
        ref = root / "reference"
        if not (ref / "report.json").exists():
            with daemon_running(_config(root, runtime_dir, recording, a.chunk, 0.0)) as (_, client):
                scan_id = client.request("start_scan", output_name="reference")["scan_id"]
                if wait_finished(client, scan_id, timeout_s=600)["last_finish"] != "completed":
                    raise RuntimeError("the reference scan did not complete")
        rows = []
        for n in range(a.scans):
            name = root / f"killed-{n:02d}"
            if name.exists():
                raise RuntimeError(f"{name} exists: use a new --workdir")
            rows.append(_one(n, rng.randint(1, total - 1), root, runtime_dir, recording, a, ref))
    done = [r for r in rows if r["finish"] == "completed"]
    summary = {
        "scans": len(rows),
        "fields": total,
        "completed": sum(r["finish"] == "completed" for r in rows),
        "lost": sum(r["lost"] for r in done),
        "max_pos_err_px": max((r["pos_err_px"] for r in done), default=None),
        "min_psnr_db": min((r["psnr_db"] for r in done), default=None),
        "shm_left": sum(r["shm_left"] for r in done),
        "restart_to_capture_s": _spread([r["restart_to_capture_s"] for r in done]),
        "resume_to_capture_s": _spread([r["resume_to_capture_s"] for r in done]),
        "failures": [r["error"] for r in rows if r["finish"] != "completed"],
    }
    columns = [
        Column("scan", "scan"),
        Column("kill_at", "killed at field"),
        Column("durable", "durable"),
        Column("lost", "lost"),
        Column("pos_err_px", "pos err px", ".4f"),
        Column("psnr_db", "PSNR dB", ".1f"),
        Column("shm_left", "shm left"),
        Column("restart_to_capture_s", "restart -> capture s", ".2f"),
        Column("resume_to_capture_s", "resume -> capture s", ".2f"),
    ]
    notes = [
        f"{summary['completed']}/{summary['scans']} resumed scans completed; fields lost {summary['lost']}; "
        f"max position error {summary['max_pos_err_px']} px; min PSNR {summary['min_psnr_db']} dB; "
        f"shared memory / semaphore registries left {summary['shm_left']}",
        f"restart -> capture {summary['restart_to_capture_s']} s; resume -> capture {summary['resume_to_capture_s']} s",
    ]
    title = f"resume: {a.scans} scans of {a.fields[0]} x {a.fields[1]} fields of {a.tile} px, SIGKILLed and resumed"
    emit({"summary": summary, "scans": rows}, rows, columns, as_json=a.json, title=title, notes=notes)
    ok = summary["completed"] == summary["scans"] and summary["lost"] == 0 and summary["shm_left"] == 0
    return 0 if ok else 1


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = np.asarray(values)
    return {"median": round(float(np.median(v)), 3), "min": round(float(v.min()), 3), "max": round(float(v.max()), 3)}
