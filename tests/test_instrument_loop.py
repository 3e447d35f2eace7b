"""The whole loop a scanner runs on an objective nobody trained for, through the daemon.

record_zstacks (the daemon, through its driver) -> python -m export calibrate (labels from the
stacks themselves, no truth) -> start_scan with the calibrated folder (models.autofocus_dir).
The parts are tested on their own in test_record_zstacks.py and test_calibrate.py; this checks
that what the daemon records is what calibration takes, and what calibration writes is what a
scan accepts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime.devices.recording import Recording
from runtime.ml.model_folder import MODELS_DIR, load_model_folder
from tests.test_calibrate import PARAMS
from tests.test_daemon import _assert_capture_costs, _wait_idle, live_daemon


@pytest.fixture(scope="module")
def flipped_instrument(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the instrument sees: a recording the replay driver plays back (opposite-sign objective)."""
    from hw_sim.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("instrument") / "scope.zarr", PARAMS)


def test_record_calibrate_and_scan_with_the_calibrated_model(
    flipped_instrument: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    from export.__main__ import main as export_main

    data = tmp_path / "data"
    centre = round(float(np.median(Recording.open(flipped_instrument).z_um)), 2)
    with live_daemon(tmp_path, "loop", flipped_instrument) as (_, client):
        # 1. The scanner records its own z-stacks (4 fields, +-4 µm in 0.5 µm steps).
        client.request(
            "record_zstacks", output_name="stacks", z_center_um=centre, z_half_range_um=4.0, z_step_um=0.5, max_fields=4
        )
        assert _wait_idle(client, timeout_s=120)["last_finish"] == "completed"
        recorded = data / "stacks" / "recording.zarr"
        rec = Recording.open(recorded)
        assert rec.meta.n_fields == 4 and rec.meta.n_z == 17 and rec.truth_focus_z_um is None

        # 2. Calibration from those stacks alone (the recording has no truth to read).
        out = data / "models" / "af-instrument"
        init = str(MODELS_DIR / "autofocus")
        tiny = ["--epochs", "1", "--crops", "2", "--holdout", "0.25", "--threads", "1"]
        rc = export_main(["calibrate", str(recorded), "--init", init, "--out", str(out), *tiny])
        assert rc == 0
        folder = load_model_folder(out, "autofocus")
        assert folder.meta["training"]["machine"].endswith("threads=1"), folder.meta["training"]
        assert folder.meta["calibration"]["recordings"][0]["path"] == str(recorded)

        # 3. A scan with that folder, named in the request.
        client.request(
            "start_scan",
            output_name="scan",
            focus={"strategy": "single_shot"},
            models={"autofocus_dir": "models/af-instrument"},
        )
        assert _wait_idle(client, timeout_s=180)["last_finish"] == "completed"
    report = json.loads((data / "scan" / "report.json").read_text())
    assert report["inference"]["autofocus_model"].startswith("af-instrument ("), report["inference"]
    assert report["fields_done"] == PARAMS.fields_x * PARAMS.fields_y
    assert {f["sign_resolution"] for f in report["fields"]} <= {"model", "second_shot", "sweep", "fit", None}
    _assert_capture_costs(report)  # where the captures went, per field and per scan
