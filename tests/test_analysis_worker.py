"""The daemon's warm analysis worker (runtime/daemon/analysis_service.py, runtime/workers/analysis.py):
started with the daemon, it serves scan after scan without a second start, re-loads its models only
when their folders change, and is restarted when it dies -- the scan it served still completes."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import psutil

from runtime.config import AnalysisConfig
from runtime.control.client import ControlClient
from runtime.ml.model_folder import default_model_dir
from runtime.workers.analysis import _Models, model_key
from tests.test_daemon import _wait_for, _wait_idle, live_daemon


def _analysis_pid(client: ControlClient, other_than: int | None = None, timeout_s: float = 60) -> int:
    """The analysis worker's pid once it is ready (status lists it then), and not ``other_than``."""
    st = _wait_for(
        client, lambda st: st["workers"].get("analysis", other_than) != other_than, timeout_s=timeout_s
    )
    return int(st["workers"]["analysis"])


def _scan(client: ControlClient, data: Path, name: str) -> dict[str, Any]:
    client.request("start_scan", output_name=name)
    st = _wait_idle(client)
    assert st["last_finish"] == "completed" and st["scan_id"], st
    report: dict[str, Any] = json.loads((data / name / "report.json").read_text())
    assert report["complete"] and report["error"] is None and Path(report["slide"]).is_file()
    return report


def _model_copies(root: Path) -> dict[str, str]:
    dirs = {}
    for key, task in (("tumour_dir", "tumour"), ("nuclei_dir", "nuclei"), ("slide_dir", "slide_mil")):
        shutil.copytree(default_model_dir(task), root / task)
        dirs[key] = str(root / task)
    return dirs


def _swap_in_copy(folder: Path) -> None:
    """Replace ``folder`` by a copy of itself, as ``python -m export`` swaps a new export in."""
    new = folder.with_name(folder.name + ".new")
    shutil.copytree(folder, new)
    folder.rename(folder.with_name(folder.name + ".old"))
    new.rename(folder)


def test_warm_worker_serves_scans_without_a_second_start_and_reloads_changed_models(
    tmp_path: Path, small_recording: Path
) -> None:
    dirs = _model_copies(tmp_path / "models")
    data = tmp_path / "data"
    with live_daemon(tmp_path, "an-warm", small_recording, analysis={"enabled": True, **dirs}) as (proc, client):
        pid = _analysis_pid(client)  # started with the daemon, models loaded before any scan
        # The daemon's (a child of its fork server with daemon.worker_start = "forkserver", the default).
        assert pid in [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        first = _scan(client, data, "one")
        second = _scan(client, data, "two")
        _swap_in_copy(Path(dirs["tumour_dir"]))  # re-exported in place: the next scan re-loads
        third = _scan(client, data, "three")
        assert client.request("status")["workers"]["analysis"] == pid
    for report, scans, loads, loaded in ((first, 1, 1, False), (second, 2, 1, False), (third, 3, 2, True)):
        a = report["analysis"]
        assert a["error"] is None, a
        assert a["worker"].pop("urgent_pieces") >= 0  # pieces fed at normal priority (the niced feeding behind)
        assert a["worker"] == {
            "pid": pid,
            "starts": 1,
            "scans": scans,
            "model_loads": loads,
            "models_loaded_for_this_scan": loaded,
        }
        assert (a["timing_s"]["load_models"] > 0) == loaded
        assert a["ready_after_slide_s"] >= 0  # also when the analysis finished before the slide (0)
        assert report["cpu_seconds"]["analysis"] > 0  # this scan's share of the worker's CPU
    assert first["analysis"]["slide_score"] == second["analysis"]["slide_score"] == third["analysis"]["slide_score"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # gone with the daemon


def test_killed_analysis_worker_is_restarted_and_scans_complete(tmp_path: Path, small_recording: Path) -> None:
    data = tmp_path / "data"
    with live_daemon(
        tmp_path,
        "an-restart",
        None,
        driver={"options": {"recording": str(small_recording), "pace": 2.0}},  # slow enough to act mid-scan
        analysis={"enabled": True, "models": "baseline"},
    ) as (_, client):
        pid = _analysis_pid(client)
        client.request("start_scan", output_name="killed")
        _wait_for(client, lambda st: st["fields_done"] >= 1)
        os.kill(pid, signal.SIGKILL)  # mid-scan
        st = _wait_idle(client)
        assert st["last_finish"] == "completed", st
        killed = json.loads((data / "killed" / "report.json").read_text())
        # The scan itself never fails for its analysis (was test_analysis_scan's killed-worker test).
        assert killed["complete"] and killed["error"] is None and Path(killed["slide"]).is_file()
        assert "analysis worker exited with code -9" in killed["analysis"]["error"], killed["analysis"]
        new_pid = _analysis_pid(client, other_than=pid)  # restarted at once, warm for the next scan
        after = _scan(client, data, "after")
    a = after["analysis"]
    assert a["error"] is None and a["worker"]["pid"] == new_pid and a["worker"]["starts"] == 2
    assert a["worker"]["scans"] == 1 and not a["worker"]["models_loaded_for_this_scan"]


def test_hung_analysis_worker_is_killed_and_restarted_between_scans(tmp_path: Path, small_recording: Path) -> None:
    with live_daemon(
        tmp_path,
        "an-hang",
        small_recording,
        daemon={
            "data_root": str(tmp_path / "data"),
            "runtime_dir": f"/tmp/wsirt-an-hang-{os.getpid()}",
            "heartbeat_timeout_s": 2.0,  # the start (imports, models) has the start timeout instead
        },
        analysis={"enabled": True, "models": "baseline"},
    ) as (_, client):
        pid = _analysis_pid(client)
        os.kill(pid, signal.SIGSTOP)  # silent: no heartbeat
        new_pid = _analysis_pid(client, other_than=pid, timeout_s=30)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert client.request("ping")["pong"] is True and new_pid != pid


def test_models_reload_only_when_their_folders_change(tmp_path: Path) -> None:
    """The worker's model cache on real ORT sessions: same config, same folders -> no load."""
    dirs = _model_copies(tmp_path)
    cfg = AnalysisConfig(enabled=True, **dirs)
    models = _Models()
    assert models.ensure(cfg) and models.error is None and models.loads == 1
    assert not models.ensure(cfg) and models.loads == 1  # a second scan: the loaded models serve it
    _swap_in_copy(tmp_path / "nuclei")
    assert models.ensure(cfg) and models.loads == 2
    assert not models.ensure(AnalysisConfig(enabled=True, **dirs))  # an equal config: same key
    # Another choice of models, or a folder that is gone (its error stays until it changes):
    assert model_key(cfg) != model_key(AnalysisConfig(enabled=True, **{**dirs, "slide_dir": "none"}))
    shutil.rmtree(tmp_path / "tumour")
    assert models.ensure(cfg) and models.error and "tumour" in models.error and models.models is None
    assert not models.ensure(cfg) and models.loads == 3
    shutil.copytree(default_model_dir("tumour"), tmp_path / "tumour")
    assert models.ensure(cfg) and models.error is None and models.loads == 4


def test_feeding_reads_whole_chunk_rows_of_the_mosaic() -> None:
    """A read decodes whole chunks: each piece the worker feeds ends at a chunk row's end (or at the
    rows announced so far), so no chunk is decoded twice for rows already final."""
    from types import SimpleNamespace

    import numpy as np

    from runtime.analysis.pipeline import SlideGeometry
    from runtime.workers.analysis import _Run

    reads: list[tuple[int, int]] = []
    fed = {1: 0}

    def read_rows(level: int, y0: int, y1: int) -> np.ndarray:
        reads.append((y0, y1))
        return np.zeros((y1 - y0, 25, 3), np.uint8)

    run = _Run.__new__(_Run)
    run.store = SimpleNamespace(chunk=64)  # type: ignore[assignment]
    geometry = SlideGeometry(((400, 50), (200, 25)), 0.25)
    run.source = SimpleNamespace(geometry=geometry, read_rows=read_rows)  # type: ignore[assignment]
    run.analyzer = SimpleNamespace(  # type: ignore[assignment]
        levels=(1,), rows_needed=lambda lv: fed[lv], feed=lambda lv, y, rows: fed.__setitem__(lv, y + len(rows))
    )
    run.beat = lambda: None
    run.rows_final(1, 100)  # rows final up to 100: one whole chunk row, then the part of the next one
    run.rows_final(1, 200)  # the rest of that chunk row, then the slide's last rows
    assert reads == [(0, 64), (64, 100), (100, 128), (128, 192), (192, 200)]
