"""``start_scan``'s ``analysis`` parameter: a scan chooses its analysis like the ``[analysis]`` config
section does (on/off, the model folders, baseline or trained, nuclei, the grid, the threshold).

The wire takes each key's type and bounds from ``AnalysisConfig``; the daemon checks each model
folder as a requested model folder (where it may be, who owns it, that it loads as that task's
folder) and validates the scan's whole ``[analysis]`` section like the config file. A refused
request gets ``invalid_params`` naming the field; the daemon goes on serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from runtime.config import AnalysisConfig
from runtime.control.client import ControlClient, RequestFailed
from runtime.control.protocol import ANALYSIS_FOLDERS, ANALYSIS_OVERRIDES, AnalysisOverrides, RequestError
from runtime.daemon.analysis_service import requested_analysis
from runtime.ml.model_folder import default_model_dir
from tests.conftest import daemon_config
from tests.test_daemon import _wait_idle, live_daemon
from tests.test_wire_schema import schema_and_parser_verdicts

ANALYSIS_FILES = ("heatmap.ome.tif", "heatmap.png", "annotations.geojson", "nuclei.geojson", "analysis.json")


def _model_copy(task: str, where: Path) -> Path:
    shutil.copytree(default_model_dir(task), where)
    for p in (where, *where.iterdir()):  # as the daemon's own user would have written it
        p.chmod(0o755 if p.is_dir() else 0o644)
    return where


def test_analysis_overrides_are_the_config_sections_keys() -> None:
    assert set(AnalysisOverrides.model_fields) == {*ANALYSIS_OVERRIDES, *ANALYSIS_FOLDERS}
    assert set(AnalysisOverrides.model_fields) <= set(AnalysisConfig.model_fields)
    overrides = AnalysisOverrides.model_json_schema()["properties"]
    config = AnalysisConfig.model_json_schema()["properties"]
    for name in ANALYSIS_OVERRIDES:  # the same type and bounds as the config file's
        value_branch, null_branch = overrides[name]["anyOf"]
        assert null_branch == {"type": "null"}
        assert value_branch == {k: v for k, v in config[name].items() if k not in ("default", "title", "description")}


@pytest.mark.parametrize(
    ("analysis", "valid"),
    [
        ({"enabled": False}, True),
        ({"models": "baseline", "nuclei": False, "subdivide": 1, "threshold": 0.4}, True),
        ({"tumour_dir": "models/t", "nuclei_dir": "/opt/m/n", "slide_dir": "none"}, True),
        ({"enabled": "no"}, False),
        ({"subdivide": 5}, False),
        ({"threshold": 1.0}, False),
        ({"models": "neural"}, False),
        ({"tumour_dir": ""}, False),
        ({"tumour_dir": "a\x00b"}, False),
        ({"colour": "red"}, False),
        ({"nice": 0}, False),  # how the daemon's worker runs is the operator's
    ],
)
def test_analysis_request_schema_agrees_with_the_parser(analysis: dict[str, Any], valid: bool) -> None:
    doc = {"id": "r1", "command": "start_scan", "params": {"analysis": analysis}}
    assert schema_and_parser_verdicts(doc) == (valid, valid)


def test_requested_analysis_checks_folders_and_needs_the_worker(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tumour = _model_copy("tumour", data / "models" / "tumour")
    on = daemon_config(data, tmp_path / "run", None, analysis={"enabled": True})
    ask = AnalysisOverrides.model_validate
    assert requested_analysis(on, None) == {}
    assert requested_analysis(on, ask({"tumour_dir": "models/tumour", "slide_dir": "none"})) == {
        "tumour_dir": str(tumour),
        "slide_dir": "none",
    }
    with pytest.raises(RequestError, match=r"analysis\.nuclei_dir: .* expected a 'nuclei' model"):
        requested_analysis(on, ask({"nuclei_dir": "models/tumour"}))
    with pytest.raises(RequestError, match=r"analysis\.slide_dir: '/etc' is neither under the data root"):
        requested_analysis(on, ask({"slide_dir": "/etc"}))
    (tumour / "model.json").chmod(0o666)
    with pytest.raises(RequestError, match=r"analysis\.tumour_dir: .* writable by group or others"):
        requested_analysis(on, ask({"tumour_dir": "models/tumour"}))
    off = daemon_config(data, tmp_path / "run", None)  # no analysis worker
    assert requested_analysis(off, ask({"enabled": False})) == {"enabled": False}
    for wish in ({"enabled": True}, {"models": "baseline"}):
        with pytest.raises(RequestError, match=r"analysis: this daemon runs no analysis worker"):
            requested_analysis(off, ask(wish))


def _refused(client: ControlClient, analysis: dict[str, Any]) -> str:
    with pytest.raises(RequestFailed) as err:
        client.request("start_scan", output_name="refused", analysis=analysis)
    assert err.value.code == "invalid_params", err.value
    return err.value.message


def test_start_scan_chooses_the_scans_analysis(tmp_path: Path, small_recording: Path) -> None:
    data = tmp_path / "data"
    _model_copy("tumour", data / "models" / "tumour")
    with live_daemon(tmp_path, "an-ovr", small_recording, analysis={"enabled": True}) as (_, client):
        # Off for this scan: the slide, no analysis.
        client.request("start_scan", output_name="off", analysis={"enabled": False})
        assert _wait_idle(client, timeout_s=120)["last_finish"] == "completed"
        off = json.loads((data / "off" / "report.json").read_text())
        assert off["complete"] and Path(off["slide"]).is_file()
        assert off.get("analysis") is None and "analysis" not in off["cpu_seconds"], off.get("analysis")
        assert not [name for name in ANALYSIS_FILES if (data / "off" / name).exists()]
        # Refused, each naming the field; nothing is made.
        for analysis, words in (
            ({"tumour_dir": "models/none"}, "analysis.tumour_dir: "),
            ({"tumour_dir": "/etc"}, "analysis.tumour_dir: '/etc' is neither under the data root"),
            ({"nuclei_dir": "models/tumour"}, "analysis.nuclei_dir: "),
            ({"subdivide": 0}, "analysis.subdivide: Input should be greater than or equal to 1"),
            ({"enabled": True, "speed": 2}, "analysis.speed: unknown parameter"),
        ):
            message = _refused(client, analysis)
            assert words in message, message
        assert "is not a folder" in _refused(client, {"tumour_dir": "models/none"})
        assert "expected a 'nuclei' model" in _refused(client, {"nuclei_dir": "models/tumour"})
        assert not (data / "refused").exists()
        # Still serving: a valid scan with its own tumour folder and the baseline nuclei off.
        client.request(
            "start_scan", output_name="own", analysis={"tumour_dir": "models/tumour", "nuclei": False, "subdivide": 1}
        )
        assert _wait_idle(client, timeout_s=120)["last_finish"] == "completed"
    own = json.loads((data / "own" / "report.json").read_text())
    a = own["analysis"]
    assert own["complete"] and a["error"] is None, a
    assert a["worker"]["models_loaded_for_this_scan"]  # another tumour folder than the daemon's
    assert a["nuclei_count"] is None and a["grid"]["subdivide"] == 1  # this scan's choices, not the config's
    for name in ANALYSIS_FILES:
        assert (data / "own" / name).is_file(), name
