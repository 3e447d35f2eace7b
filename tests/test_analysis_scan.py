"""Slide analysis on the scan path: a replayed scan with ``[analysis] enabled`` writes the analysis
into the scan folder and report.json, publishes ``analysis_ready``, and an analysis that cannot
run (a bad model folder) leaves the slide complete with the error named in the report."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from runtime.analysis import geojson
from runtime.analysis.pipeline import MosaicSource, analyze_source, baseline_models
from runtime.config import AnalysisConfig
from runtime.control.client import EventSubscriber
from runtime.control.events import event_from_data
from runtime.output.mosaic_store import MosaicStore
from tests.test_daemon import _wait_idle, live_daemon


def _events_until_finished(sub: EventSubscriber, timeout_s: float = 90) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ev = sub.recv(timeout_s=1.0)
        if ev is not None:
            seen.append(ev)
            if ev["event"] == "scan_finished":
                return seen
    raise AssertionError(f"no scan_finished within {timeout_s} s: {[e['event'] for e in seen]}")


def _scan(
    tmp_path: Path, recording: Path, tag: str, analysis: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with live_daemon(
        tmp_path,
        tag,
        recording,
        analysis={"enabled": True, **analysis},
        mosaic={"keep_after_export": True},
    ) as (_, client):
        cfg_event = client.request("status")  # the daemon answers: its PUB socket is bound
        assert cfg_event["state"] == "idle"
        runtime_dir = Path("/tmp") / f"wsirt-{tag}-{os.getpid()}"  # live_daemon's runtime_dir
        with EventSubscriber(f"ipc://{runtime_dir}/events.sock") as sub:
            time.sleep(0.3)  # the subscription reaches the PUB socket
            client.request("start_scan", output_name="s")
            events = _events_until_finished(sub)
        assert _wait_idle(client)["last_finish"] == "completed"
    report = json.loads((tmp_path / "data" / "s" / "report.json").read_text())
    return report, events


def test_scan_with_analysis_writes_it_and_publishes_analysis_ready(tmp_path: Path, small_recording: Path) -> None:
    report, events = _scan(tmp_path, small_recording, "an-on", {"models": "baseline"})
    folder = tmp_path / "data" / "s"
    assert report["complete"] and Path(report["slide"]).is_file()
    a = report["analysis"]
    assert a["error"] is None, a
    for key in ("slide_score", "tumour_burden_mm2", "tumour_burden_pct", "lesion_count", "largest_lesion_diameter_mm"):
        assert isinstance(a[key], int | float), key
    assert a["tissue_mm2"] > 0 and a["nuclei_count"] > 0
    assert a["models"]["tumour"] == "baseline:nuclear_density"
    for name in a["files"].values():
        assert (folder / name).is_file(), name
    assert geojson.check_file(folder / "annotations.geojson") >= 1  # at least the tissue outline
    assert geojson.check_file(folder / "nuclei.geojson") == a["nuclei_count"]
    with tifffile.TiffFile(folder / "heatmap.ome.tif") as tif:
        assert tif.is_ome and len(tif.series[0].levels) >= 2
    # analysis_ready, with the report's figures, before scan_finished.
    names = [e["event"] for e in events]
    assert "analysis_ready" in names and names.index("analysis_ready") < names.index("scan_finished")
    ready = events[names.index("analysis_ready")]["data"]
    event_from_data("analysis_ready", ready)  # matches its model (and so the committed schema)
    assert ready["error"] is None and ready["slide_score"] == a["slide_score"]
    assert ready["nuclei_count"] == a["nuclei_count"]
    assert ready["annotations"] == str(folder / "annotations.geojson")
    # Fed row by row during the scan == the same analysis of the finished mosaic offline.
    with MosaicStore.open(folder / "mosaic.zarr") as store:
        offline = analyze_source(MosaicSource(store), baseline_models(), subdivide=AnalysisConfig().subdivide)
    assert a["slide_model_score"] == pytest.approx(offline.slide_score, abs=1e-6)
    assert a["nuclei_count"] == len(offline.nuclei)
    assert a["patches"] == int(np.sum(offline.analysed))


def test_bad_model_folder_leaves_the_slide_complete_and_names_the_error(tmp_path: Path, small_recording: Path) -> None:
    bad = tmp_path / "no-such-model"
    report, events = _scan(tmp_path, small_recording, "an-bad", {"models": "trained", "tumour_dir": str(bad)})
    assert report["complete"] and report["error"] is None and Path(report["slide"]).is_file()
    err = report["analysis"]["error"]
    assert err and str(bad) in err, err
    assert not (tmp_path / "data" / "s" / "annotations.geojson").exists()
    ready = next(e for e in events if e["event"] == "analysis_ready")["data"]
    assert ready["error"] == err and ready["slide_score"] is None
    assert events[-1]["data"]["reason"] == "completed"


