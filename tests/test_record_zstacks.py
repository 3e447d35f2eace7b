"""Z-stack recording on the scanner (``record_zstacks``), and ``start_scan``'s model folder parameter.

Live daemons over the replay driver (the small synthetic recording): the recording written is a
valid recording of the project's format whose frames are what the driver gives at those z, with no
truth; events, cancel, bad parameters, a failing driver, the output folder rules. Then the
``models.autofocus_dir`` parameter of ``start_scan``: where a model folder may come from, and that it
reaches the scan.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hw_sim.replay import open_replay_driver
from runtime import paths
from runtime.config import RuntimeConfig
from runtime.control.client import ControlClient, EventSubscriber, RequestFailed, main
from runtime.control.protocol import (
    MAX_ZSTACK_PLANES,
    ProtocolError,
    RecordZstacksParams,
    RequestError,
    encode_request,
    parse_request,
)
from runtime.daemon.model_request import requested_model_dir
from runtime.devices.recording import Recording, RecordingError, RecordingWriter, Timing
from runtime.devices.scan_plan import FieldPlan, serpentine_plan
from runtime.workers.recorder import recording_meta, spread_fields
from tests.conftest import daemon_config
from tests.test_daemon import _paced, _wait_for, _wait_idle, live_daemon
from tests.test_wire_schema import _events_until

BUILTIN_AUTOFOCUS = Path(__file__).resolve().parent.parent / "runtime" / "ml" / "builtin" / "autofocus"


def _centre_z(recording: Path) -> float:
    """A z inside the recorded stacks (their z differ by field: each is centred on a coarse estimate)."""
    return round(float(np.median(Recording.open(recording).z_um)), 2)


def _events_until_finished(events: EventSubscriber) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    _events_until(events, seen, "scan_finished")
    return seen


# ----------------------------------------------------------------------------- parameters


def test_params_are_bounded_and_name_the_bound() -> None:
    def parse(params: dict[str, Any]) -> RecordZstacksParams:
        req = parse_request(encode_request(1, "record_zstacks", params))
        assert isinstance(req.params, RecordZstacksParams)
        return req.params

    default = parse({})
    assert default.planes == 41 and default.plane_offsets_um()[0] == -10.0 and default.plane_offsets_um()[-1] == 10.0
    p = parse({"z_half_range_um": 1.0, "z_step_um": 0.5, "z_center_um": 3.0, "max_fields": 8})
    assert p.plane_offsets_um() == (-1.0, -0.5, 0.0, 0.5, 1.0) and p.max_fields == 8
    assert parse({"z_half_range_um": 0.0}).planes == 1
    assert parse({"z_half_range_um": 10.0, "z_step_um": 0.1}).planes == MAX_ZSTACK_PLANES  # at the bound
    refused = [
        ({"z_half_range_um": 10.0, "z_step_um": 0.05}, f"401 planes per stack; the limit is {MAX_ZSTACK_PLANES}"),
        ({"z_step_um": 0.0}, "z_step_um: Input should be greater than 0"),
        ({"z_step_um": -1.0}, "z_step_um: Input should be greater than 0"),
        ({"z_half_range_um": 1e9}, "z_half_range_um: Input should be less than or equal to 1000"),
        ({"max_fields": 0}, "max_fields: Input should be greater than or equal to 1"),
        ({"max_fields": 10**9}, "max_fields: Input should be less than or equal to 10000"),
        ({"z_center_um": 1e12}, "z_center_um: Input should be less than or equal to 100000"),
        ({"z_step_um": "0.5"}, "z_step_um: Input should be a valid number"),
        ({"output_name": "../x"}, "output_name: must be a plain folder name"),
        ({"recording": "a\x00b"}, "recording: must not contain NUL"),
        ({"planes": 9}, "planes: unknown parameter"),
    ]
    for params, words in refused:
        with pytest.raises(ProtocolError) as err:
            parse(params)
        assert err.value.code == "invalid_params" and words in err.value.message, (params, err.value.message)


def test_max_fields_spreads_evenly_over_the_plan() -> None:
    fields = tuple(FieldPlan(i, i // 5, i % 5, float(i), 0.0) for i in range(20))
    assert spread_fields(fields, None) == fields and spread_fields(fields, 20) == fields
    assert spread_fields(fields, 50) == fields
    assert [f.index for f in spread_fields(fields, 4)] == [2, 7, 12, 17]
    assert [f.index for f in spread_fields(fields, 1)] == [10]
    picked = [f.index for f in spread_fields(fields, 8)]
    assert len(set(picked)) == 8 and picked == sorted(picked)


def test_recording_metadata_come_from_the_driver(small_recording: Path) -> None:
    drv = open_replay_driver(str(small_recording))
    grid = serpentine_plan(drv.recording.meta.area, 64.0, 64.0, 0.1)
    plain = recording_meta(drv, "hw_sim.replay:open_replay_driver", grid, 2, 3, 0.1)
    assert plain.optics == {} and plain.camera == {"driver": "hw_sim.replay:open_replay_driver"}
    assert plain.timing == Timing() and plain.slide is None and (plain.rows, plain.cols) == (grid.rows, grid.cols)

    class Described:  # a driver that describes its objective, camera and timing (as attributes or methods)
        def __init__(self) -> None:
            self.optics_info = {"na": 0.75, "magnification": 20}
            self.camera, self.stage = drv.camera, drv.stage

        def timing_info(self) -> dict[str, float]:
            return {**Timing().to_dict(), "settle_s": 0.05}

    meta = recording_meta(Described(), "vendor:open", grid, 2, 3, 0.1)  # type: ignore[arg-type]
    assert meta.optics == {"na": 0.75, "magnification": 20} and meta.camera == {"driver": "vendor:open"}
    assert meta.timing.settle_s == 0.05


def test_a_recording_cut_short_is_truncated_to_the_fields_written(tmp_path: Path, small_recording: Path) -> None:
    source = Recording.open(small_recording)
    meta = dataclasses.replace(source.meta, n_fields=5, slide=None)
    writer = RecordingWriter(tmp_path / "cut.zarr", meta)
    for f in range(2):
        writer.write_field(
            f, np.stack([source.plane(f, k) for k in range(meta.n_z)]), source.z_um[f], (f * 1.0, 0.0), (0, f)
        )
    with pytest.raises(RecordingError, match="non-finite"):  # fields 2-4 never written
        Recording.open(tmp_path / "cut.zarr")
    writer.truncate(2)
    rec = Recording.open(tmp_path / "cut.zarr")
    assert rec.meta.n_fields == 2 and rec.grid_rc.tolist() == [[0, 0], [0, 1]]
    np.testing.assert_array_equal(rec.plane(1, 3), source.plane(1, 3))
    for bad in (0, 3):
        with pytest.raises(ValueError, match="cannot truncate"):
            writer.truncate(bad)


# ----------------------------------------------------------------------------- recording on a live daemon


def test_record_zstacks_writes_a_valid_recording(
    daemon: tuple[RuntimeConfig, ControlClient], small_recording: Path
) -> None:
    cfg, client = daemon
    zc = _centre_z(small_recording)
    events = EventSubscriber(cfg.endpoint("event"))
    time.sleep(0.3)  # subscription reaches the PUB socket
    try:
        started = client.request(
            "record_zstacks", output_name="stacks", z_center_um=zc, z_half_range_um=1.0, z_step_um=0.5
        )
        out = cfg.daemon.data_root / "stacks"
        assert started["output_dir"] == str(out) and started["scan_id"].startswith("zstacks-")
        with pytest.raises(RequestFailed) as err:  # one job at a time, whichever kind
            client.request("start_scan", output_name="meanwhile")
        assert err.value.code == "busy"
        assert client.request("status")["job"] == "zstacks"
        seen = _events_until_finished(events)
    finally:
        events.close()
    names = [e["event"] for e in seen]
    assert "scan_started" in names and names.count("field_done") == 9
    assert all(e["data"]["job"] == "zstacks" for e in seen if e["event"] != "state")
    done = [e["data"] for e in seen if e["event"] == "field_done"]
    assert [d["done"] for d in done] == list(range(1, 10)) and all(d["captures"] == 5 for d in done)
    assert all(d["z_um"] == zc for d in done)
    finished = seen[-1]["data"]
    assert finished["reason"] == "completed" and finished["slide"] is None and finished["mosaic"] is None
    assert finished["recording"] == str(out / "recording.zarr")

    st = _wait_idle(client)
    assert (st["last_finish"], st["last_output"], st["job"]) == ("completed", finished["recording"], "zstacks")
    assert sorted(os.listdir(out)) == ["recording.zarr", "report.json"]  # no .partial left
    report = json.loads((out / "report.json").read_text())
    assert report["job"] == "zstacks" and report["finish_reason"] == "completed" and report["error"] is None
    assert report["fields_done"] == 9 and report["planes"] == 5 and report["captures_total"] == 45
    assert report["recording"] == finished["recording"] and report["partial_recording"] is None

    rec = Recording.open(out / "recording.zarr")
    source = Recording.open(small_recording)
    m = rec.meta
    assert (m.n_fields, m.n_z, m.tile_height, m.tile_width) == (9, 5, 256, 256)
    assert m.pixel_size_um == source.meta.pixel_size_um and (m.rows, m.cols) == (3, 3)
    assert m.slide is None and m.camera["driver"] == cfg.driver.factory
    assert rec.truth_actual_xy_um is None and rec.truth_focus_z_um is None
    assert not (out / "recording.zarr" / "truth").exists()
    np.testing.assert_allclose(rec.z_um, np.tile(zc + np.array([-1.0, -0.5, 0.0, 0.5, 1.0]), (9, 1)))
    # The frames are what the driver gives at those positions and z.
    drv = open_replay_driver(str(small_recording))
    for f in range(m.n_fields):
        x, y = rec.stage_xy_um[f]
        drv.stage.move_xy(float(x), float(y))
        for k in range(m.n_z):
            drv.stage.move_z(float(rec.z_um[f, k]))
            np.testing.assert_array_equal(rec.plane(f, k), drv.camera.snap(), err_msg=f"field {f} plane {k}")
    assert sorted(map(tuple, rec.grid_rc.tolist())) == [(r, c) for r in range(3) for c in range(3)]

    # The output folder rules are a scan's: the folder now holds a recording job, so it is refused.
    for name, words in (("stacks", "already holds a scan (report.json)"), ("../up", "output_name")):
        with pytest.raises(RequestFailed) as err:
            client.request("record_zstacks", output_name=name)
        assert err.value.code == "invalid_params" and words in err.value.message
    (cfg.daemon.data_root / "seeded").mkdir()
    (cfg.daemon.data_root / "seeded" / "x").write_text("")
    with pytest.raises(RequestFailed) as err:
        client.request("record_zstacks", output_name="seeded")
    assert "is not empty" in err.value.message
    with pytest.raises(RequestFailed) as err:
        client.request("record_zstacks", recording="/etc", output_name="other")
    assert err.value.code == "invalid_params" and "outside the data root" in err.value.message
    with pytest.raises(RequestFailed) as err:
        client.request("record_zstacks", z_half_range_um=30.0, z_step_um=0.1)
    assert err.value.code == "invalid_params" and f"the limit is {MAX_ZSTACK_PLANES}" in err.value.message
    assert not (cfg.daemon.data_root / "other").exists()  # nothing made for a refused request


def test_max_fields_and_the_command_line(
    daemon: tuple[RuntimeConfig, ControlClient], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, client = daemon
    base = ["ctl", "--endpoint", cfg.endpoint("command"), "--events", cfg.endpoint("event")]
    argv = [*base, "record-zstacks", "--z-range", "0.5", "--z-step", "0.5", "--fields", "4", "--output", "cli"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["output_dir"] == str(cfg.daemon.data_root / "cli")
    assert _wait_idle(client)["last_finish"] == "completed"
    rec = Recording.open(cfg.daemon.data_root / "cli" / "recording.zarr")
    assert (rec.meta.n_fields, rec.meta.n_z) == (4, 3)
    # 4 of the 9 fields, spread over the serpentine plan: plan indices 1, 3, 5, 7.
    assert [tuple(rc) for rc in rec.grid_rc.tolist()] == [(0, 1), (1, 2), (1, 0), (2, 1)]
    np.testing.assert_allclose(rec.z_um[0], [-0.5, 0.0, 0.5])  # centred on the config's focus.start_z_um
    assert main([*base, "record-zstacks", "--z-step", "0", "--output", "bad"]) == 1
    assert "z_step_um" in capsys.readouterr().err


def test_cancel_keeps_the_stacks_recorded_so_far(tmp_path: Path, small_recording: Path) -> None:
    zc = _centre_z(small_recording)
    with live_daemon(tmp_path, "zcancel", None, driver=_paced(small_recording, 8.0)) as (_, client):
        client.request("record_zstacks", output_name="cut", z_center_um=zc, z_half_range_um=2.0, z_step_um=0.25)
        _wait_for(client, lambda st: st["fields_done"] >= 2)
        assert client.request("cancel")["cancelling"] is True
        st = _wait_idle(client)
        assert st["last_finish"] == "cancelled" and st["job"] == "zstacks"
        out = tmp_path / "data" / "cut"
        report = json.loads((out / "report.json").read_text())
        assert report["finish_reason"] == "cancelled" and 2 <= report["fields_done"] < 9
        # The stacks recorded before the cancel are a complete, shorter recording.
        rec = Recording.open(out / "recording.zarr")
        assert rec.meta.n_fields == report["fields_done"] and rec.meta.n_z == 17
        rec.plane(rec.meta.n_fields - 1, 16)
        assert not (out / "recording.zarr.partial").exists()
        # The daemon serves the next job.
        client.request("record_zstacks", output_name="again", z_half_range_um=0.0, max_fields=1)
        assert _wait_idle(client)["last_finish"] == "completed"


def test_a_failing_driver_fails_the_job_with_one_line(daemon: tuple[RuntimeConfig, ControlClient]) -> None:
    cfg, client = daemon
    events = EventSubscriber(cfg.endpoint("event"))
    time.sleep(0.3)
    try:
        # Far from every recorded field: the replay driver refuses the first snap (DriverError).
        region = {"x_um": 50_000.0, "y_um": 50_000.0, "width_um": 100.0, "height_um": 100.0}
        client.request("record_zstacks", output_name="far", region=region, z_half_range_um=0.0)
        seen = _events_until_finished(events)
    finally:
        events.close()
    failed = [e["data"] for e in seen if e["event"] == "scan_failed"]
    assert len(failed) == 1 and failed[0]["job"] == "zstacks"
    error = failed[0]["error"]
    assert "recorder failed" in error and "no recorded field near" in error and "\n" not in error
    assert seen[-1]["data"]["reason"] == "failed" and seen[-1]["data"]["recording"] is None
    st = _wait_idle(client)
    assert st["last_finish"] == "failed" and st["last_error"] == error and st["last_output"] is None
    out = cfg.daemon.data_root / "far"
    report = json.loads((out / "report.json").read_text())
    assert report["error"] == error and report["recording"] is None and report["fields_done"] == 0
    assert report["partial_recording"] == str(out / "recording.zarr.partial")  # kept, never renamed
    assert client.request("ping")["pong"] is True


# ----------------------------------------------------------------------------- start_scan's model folder


def _model_copy(where: Path) -> Path:
    shutil.copytree(BUILTIN_AUTOFOCUS, where)
    for p in (where, *where.iterdir()):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return where


def test_model_folder_rules(tmp_path: Path) -> None:
    data, allowed = tmp_path / "data", tmp_path / "models"
    data.mkdir()
    cfg = daemon_config(data, tmp_path / "run", None, models={"allowed_dirs": [str(allowed)]})
    inside = _model_copy(data / "af")
    elsewhere = _model_copy(allowed / "af2")
    outside = _model_copy(tmp_path / "outside")
    assert requested_model_dir(cfg, "builtin") == "builtin"
    assert requested_model_dir(cfg, "af") == str(inside)
    assert requested_model_dir(cfg, str(inside)) == str(inside)
    assert requested_model_dir(cfg, str(elsewhere)) == str(elsewhere)
    with pytest.raises(paths.UnsafePath, match=r"neither under the data root .* nor in models\.allowed_dirs"):
        requested_model_dir(cfg, str(outside))
    with pytest.raises(paths.UnsafePath, match=re.escape("'../outside' is outside the data root")):
        requested_model_dir(cfg, "../outside")
    (data / "link").symlink_to(outside)
    with pytest.raises(paths.UnsafePath, match="outside the data root"):
        requested_model_dir(cfg, "link")
    (inside / "loop").symlink_to(inside)  # inside the data root, but a model folder holds plain files
    with pytest.raises(paths.UnsafePath, match="loop is a symbolic link"):
        requested_model_dir(cfg, "af")
    (inside / "loop").unlink()
    (inside / "model.json").chmod(0o666)  # anyone could change what the scanner runs
    with pytest.raises(paths.UnsafePath, match=r"model\.json is writable by group or others"):
        requested_model_dir(cfg, "af")
    (inside / "model.json").chmod(0o644)
    (data / "empty").mkdir()
    with pytest.raises(RequestError, match=r"model\.json: missing"):
        requested_model_dir(cfg, "empty")
    (inside / "model.onnx").write_bytes(b"not the exported graph")
    (inside / "model.onnx").chmod(0o644)
    with pytest.raises(RequestError, match=r"sha256 .* does not match"):
        requested_model_dir(cfg, "af")


def test_start_scan_model_folder_reaches_the_scan(daemon: tuple[RuntimeConfig, ControlClient]) -> None:
    cfg, client = daemon
    _model_copy(cfg.daemon.data_root / "models" / "af-v1")
    for folder, words in (
        ("/etc", "neither under the data root"),
        ("models/none", "is not a folder"),
        ("models", "model.json: missing"),
    ):
        with pytest.raises(RequestFailed) as err:
            client.request("start_scan", output_name="m", models={"autofocus_dir": folder})
        assert err.value.code == "invalid_params" and "models.autofocus_dir" in err.value.message, err.value.message
        assert words in err.value.message, err.value.message
    with pytest.raises(RequestFailed) as err:
        client.request("start_scan", models={"classifier_dir": "x"})
    assert err.value.code == "invalid_params" and "models.classifier_dir: unknown parameter" in err.value.message
    assert not (cfg.daemon.data_root / "m").exists()
    client.request(
        "start_scan",
        output_name="own-model",
        focus={"strategy": "single_shot"},
        models={"autofocus_dir": "models/af-v1"},
    )
    assert _wait_idle(client, timeout_s=120)["last_finish"] == "completed"
    report = json.loads((cfg.daemon.data_root / "own-model" / "report.json").read_text())
    assert report["job"] == "scan" and report["inference"]["autofocus_model"].startswith("af-v1 ("), report["inference"]
