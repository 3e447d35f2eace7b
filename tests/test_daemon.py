"""The daemon as the scanner UI sees it: real sockets, real worker processes, bad input, failures."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from runtime.config import RuntimeConfig
from runtime.control.client import ControlClient, EventSubscriber, RequestFailed
from runtime.daemon.process import start_daemon_process, stop_daemon_process
from runtime.ipc import ring as shm
from runtime.ml.artifact_context import WINDOW_GROW_THRESHOLD, FieldClass, context_report
from tests.conftest import daemon_config


def _segments_of(proc: Any) -> list[str]:
    """Shared-memory segments the daemon process created that still exist."""
    return shm.segments_of(proc.pid)


@contextlib.contextmanager
def live_daemon(
    tmp_path: Path, tag: str, recording: Path | None, **sections: Any
) -> Iterator[tuple[Any, ControlClient]]:
    """A daemon child process with its own config; on exit it is shut down (unless a test
    already stopped it) and must have exited cleanly, leaving no shared memory behind."""
    runtime_dir = Path("/tmp") / f"wsirt-{tag}-{os.getpid()}"  # ipc paths must stay short
    cfg = daemon_config(tmp_path / "data", runtime_dir, recording, **sections)
    proc = start_daemon_process(cfg)
    client = ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=15)
    try:
        yield proc, client
    finally:
        client.close()
        stop_daemon_process(proc, cfg, timeout_s=60)
    assert proc.exitcode == 0
    assert _segments_of(proc) == []


def _paced(recording: Path, pace: float = 4.0) -> dict[str, Any]:
    """Replay at a multiple of scanner speed, so a test can act mid-scan."""
    return {"options": {"recording": str(recording), "pace": pace}}


def _wait_idle(client: ControlClient, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = client.request("status")
        if st["state"] == "idle" and st["last_finish"]:
            return st
        time.sleep(0.1)
    raise AssertionError(f"daemon not idle after {timeout_s} s: {st}")


def _wait_for(client: ControlClient, cond: Callable[[dict[str, Any]], bool], timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = client.request("status")
        if cond(st):
            return st
        time.sleep(0.05)
    raise AssertionError(f"condition not reached: {st}")


def _assert_capture_costs(report: dict[str, Any]) -> None:
    """Each field's captures by cause (issue 11: fields[].capture_cost) add up to its captures, and
    the scan's ``capture_cost`` is their sum, its total the scan's captures."""
    fields = report["fields"]
    causes = ("first", "moves", "second_shots", "start_probes", "probes", "sweep")
    for f in fields:
        cost = f["capture_cost"]
        assert tuple(cost) == causes and min(cost.values()) >= 0 and sum(cost.values()) == f["captures"], f
    summed = {k: sum(f["capture_cost"][k] for f in fields) for k in causes}
    assert report["capture_cost"] == {**summed, "total": report["captures_total"]}, report["capture_cost"]
    assert report["captures_total"] == sum(f["captures"] for f in fields)


def _raw_request(endpoint: str, payload: bytes) -> dict[str, Any]:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(endpoint)
    try:
        sock.send(payload)
        return json.loads(sock.recv())
    finally:
        sock.close()


def test_malformed_requests_get_errors_and_daemon_keeps_serving(daemon: tuple[RuntimeConfig, ControlClient]) -> None:
    cfg, client = daemon
    ep = cfg.endpoint("command")
    assert _raw_request(ep, b"\xff not json")["error"]["code"] == "malformed"
    assert _raw_request(ep, b"[1, 2]")["error"]["code"] == "malformed"
    reply = _raw_request(ep, json.dumps({"id": 7, "command": "make_coffee"}).encode())
    assert reply["id"] == 7 and reply["error"]["code"] == "unknown_command"
    assert "make_coffee" in reply["error"]["message"]
    reply = _raw_request(ep, json.dumps({"id": 8, "command": "start_scan", "params": {"output_name": "../x"}}).encode())
    assert reply["error"]["code"] == "invalid_params" and "output_name" in reply["error"]["message"]
    with pytest.raises(RequestFailed) as err:
        client.request("start_scan", recording="/etc/passwd")
    assert err.value.code == "invalid_params" and "outside the data root" in str(err.value)
    with pytest.raises(RequestFailed) as err:
        client.request("cancel")
    assert err.value.code == "not_running"
    assert client.request("ping")["pong"] is True


def test_scan_publishes_events_in_sequence(daemon: tuple[RuntimeConfig, ControlClient]) -> None:
    cfg, client = daemon
    events = EventSubscriber(cfg.endpoint("event"))
    time.sleep(0.3)  # subscription reaches the PUB socket
    try:
        client.request("start_scan", output_name="evented")
        with pytest.raises(RequestFailed) as err:
            client.request("start_scan", output_name="second")
        assert err.value.code == "busy"
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ev = events.recv(timeout_s=1.0)
            if ev is None:
                continue
            seen.append(ev)
            if ev["event"] == "scan_finished":
                break
        names = [e["event"] for e in seen]
        assert names[-1] == "scan_finished" and seen[-1]["data"]["reason"] == "completed"
        assert "scan_started" in names and names.count("field_done") == 9
        seqs = [e["seq"] for e in seen]
        assert seqs == sorted(seqs) and events.missed == 0
        assert Path(seen[-1]["data"]["slide"]).is_file()
        report = json.loads(Path(seen[-1]["data"]["report"]).read_text())
        _assert_capture_costs(report)  # the contrast sweep (the default): every capture is the sweep's
        assert report["capture_cost"]["sweep"] == report["captures_total"] > 0
    finally:
        events.close()


def test_cancel_keeps_what_was_captured(tmp_path: Path, small_recording: Path) -> None:
    with live_daemon(tmp_path, "cancel", None, driver=_paced(small_recording)) as (_, client):
        client.request("start_scan", output_name="cut")
        _wait_for(client, lambda st: st["fields_done"] >= 2)
        client.request("cancel")
        st = _wait_idle(client)
        assert st["last_finish"] == "cancelled"
        report = json.loads((tmp_path / "data" / "cut" / "report.json").read_text())
        assert report["finish_reason"] == "cancelled"
        assert 2 <= report["fields_done"] < 9
        assert report["mosaic"] and Path(report["mosaic"]).is_dir()  # kept for export/resume
        assert not (tmp_path / "data" / "cut" / "slide.ome.tif").exists()
        # The writer streamed part of the slide during the scan; the cancel removed it.
        assert not list((tmp_path / "data" / "cut").glob("*.partial"))
        # The daemon serves the next scan.
        client.request("start_scan", output_name="again")
        assert _wait_idle(client)["last_finish"] == "completed"


@pytest.mark.parametrize("victim", ["acquisition", "writer"])
def test_worker_crash_fails_the_scan_not_the_daemon(tmp_path: Path, small_recording: Path, victim: str) -> None:
    # Small chunks and tiles: mosaic bands become final, and stream into the slide, early in the scan.
    small_tiles = {"mosaic": {"chunk": 128}, "writer": {"tile": 128}}
    with live_daemon(
        tmp_path, f"crash-{victim[:3]}", None, driver=_paced(small_recording), **small_tiles
    ) as (proc, client):
        client.request("start_scan", output_name="crash")
        partial = tmp_path / "data" / "crash" / "slide.ome.tif.partial"
        st = _wait_for(
            client,
            lambda st: st["fields_done"] >= 1
            and "stitcher" in st["workers"]
            and (victim == "acquisition" or partial.exists()),  # the writer has streamed part of the slide
        )
        os.kill(st["workers"][victim], signal.SIGKILL)
        st = _wait_idle(client)
        assert st["last_finish"] == "failed" and victim in st["last_error"]
        report = json.loads((tmp_path / "data" / "crash" / "report.json").read_text())
        assert report["finish_reason"] == "failed" and report["fields_done"] >= 1
        # The tiles captured before the crash were flushed into the kept mosaic.
        assert Path(report["mosaic"]).is_dir()
        # No half-written slide is left: the kept mosaic is what an export starts from.
        assert not list((tmp_path / "data" / "crash").glob("*.partial"))
        assert not (tmp_path / "data" / "crash" / "slide.ome.tif").exists()
        assert _segments_of(proc) == []
        assert client.request("ping")["pong"] is True


def test_sigterm_stops_a_scan_cleanly(tmp_path: Path, small_recording: Path) -> None:
    with live_daemon(tmp_path, "term", None, driver=_paced(small_recording)) as (proc, client):
        client.request("start_scan", output_name="term")
        st = _wait_for(client, lambda st: st["fields_done"] >= 1)
        workers = list(st["workers"].values())
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(60)
    for pid in workers:  # no orphaned worker
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    report = json.loads((tmp_path / "data" / "term" / "report.json").read_text())
    assert report["finish_reason"] == "cancelled" and "daemon stopped" in report["error"]
    assert report["fields_done"] >= 1 and Path(report["mosaic"]).is_dir()


def test_corrupt_recording_fails_scan_with_named_error(tmp_path: Path, small_recording: Path) -> None:
    import shutil

    data = tmp_path / "data"
    rec = data / "broken.zarr"
    shutil.copytree(small_recording, rec)
    chunks = [p for p in (rec / "stacks" / "c" / "0").rglob("*") if p.is_file()]
    assert chunks, "recording layout changed: no chunk files for field 0"
    for chunk in chunks:  # every plane of the first field truncated
        chunk.write_bytes(chunk.read_bytes()[:100])
    with live_daemon(tmp_path, "corrupt", None) as (_, client):
        client.request("start_scan", recording="broken.zarr", output_name="bad")
        st = _wait_idle(client)
        assert st["last_finish"] == "failed"
        assert "field" in st["last_error"] and "plane" in st["last_error"], st["last_error"]
        assert client.request("ping")["pong"] is True


def test_per_scan_focus_strategy_override(daemon: tuple[RuntimeConfig, ControlClient]) -> None:
    cfg, client = daemon
    with pytest.raises(RequestFailed) as err:
        client.request("start_scan", output_name="bad-focus", focus={"sweep_steps": 1})
    assert err.value.code == "invalid_params" and "sweep_steps" in str(err.value)
    client.request("start_scan", output_name="single", focus={"strategy": "single_shot"})
    assert _wait_idle(client)["last_finish"] == "completed"
    report = json.loads((cfg.daemon.data_root / "single" / "report.json").read_text())
    methods = {f["focus_method"] for f in report["fields"]}
    assert all(m.startswith("single_shot") for m in methods), methods
    assert report["captures_per_field"] < 5  # the sweep takes 10
    _assert_capture_costs(report)
    assert report["capture_cost"]["first"] == len(report["fields"])  # one first capture per field


def _assert_window_context(fields: list[dict[str, Any]], ctx: dict[str, Any]) -> None:
    """Per window (runtime.ml.tasks.TileClass -> ClassifyReply -> FieldRecord): each field's windows,
    row by row, their strongest the field's p(artifact), flagged where the field is; the window
    rule ran over the scan's windows, and the report's figures are what it gives for the fields."""
    rows, cols = ctx["windows_per_field"]
    assert ctx["unit"] == "window" and ctx["grow_threshold"] == WINDOW_GROW_THRESHOLD
    for f in fields:
        wp, wf = f["window_p_artifact"], f["window_artifact"]
        assert [len(r) for r in wp] == [len(r) for r in wf] == [cols] * rows, f
        assert max(max(r) for r in wp) == f["artifact_probability"]
        assert any(any(r) for r in wf) == f["artifact"]
        flagged = {(i, j) for i in range(rows) for j in range(cols) if wf[i][j]}
        assert flagged <= {tuple(w) for w in f["artifact_windows_in_context"]}
        assert f["artifact_in_context"] == bool(f["artifact_windows_in_context"])
    per, summary = context_report(
        [
            FieldClass(
                f["row"],
                f["col"],
                f["artifact"],
                f["artifact_probability"],
                f["window_p_artifact"],
                f["window_artifact"],
            )
            for f in fields
        ]
    )
    assert summary == {k: v for k, v in ctx.items() if k not in ("regions", "geojson")}  # + the file's
    assert all(
        per[(f["row"], f["col"])]["artifact_windows_in_context"] == f["artifact_windows_in_context"] for f in fields
    )
    assert ctx["windows_flagged_by_model"] == sum(sum(map(sum, f["window_artifact"])) for f in fields)


def test_the_scan_end_artifact_context_runs_over_the_windows_of_each_field(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """An air bubble (radius 187 µm) in a scan of 5 x 5 fields of 512 px at 0.25 µm, i.e. 2 x 2
    classifier windows each: the windows' p(artifact) and flags travel from the inference worker
    to report.json, and the window rule (enclosed windows) runs over the scan's 10 x 10 windows
    (field row, col x window row, col): it adds the windows inside the bubble's rim that the model
    missed."""
    from hw_sim.synth import SynthParams, synthesize

    rec = synthesize(
        tmp_path_factory.mktemp("recordings") / "bubble.zarr",
        SynthParams(fields_x=5, fields_y=5, seed=13, tile=512, z_planes=9, artifacts=1),
    )
    with live_daemon(
        tmp_path,
        "ctxwin",
        None,
        driver={"options": {"recording": str(rec)}},
        focus={"strategy": "single_shot"},
        models={"backend": "ort_cpu", "worker": "process"},
    ) as (_, client):
        client.request("start_scan", output_name="bubble")
        assert _wait_idle(client, 180)["last_finish"] == "completed"
        report = json.loads((tmp_path / "data" / "bubble" / "report.json").read_text())
    fields, ctx = report["fields"], report["artifact_context"]
    assert len(fields) == 25 and ctx["windows_per_field"] == [2, 2]
    _assert_window_context(fields, ctx)
    by = {(f["row"], f["col"]): f for f in fields}
    # The bubble's middle, field (1, 2): the model flags none of its windows (p(artifact) < 0.2,
    # like tissue), its neighbours' windows the rim; context flags all four.
    mid = by[(1, 2)]
    assert not mid["artifact"] and max(map(max, mid["window_p_artifact"])) < 0.2
    assert mid["artifact_in_context"] and len(mid["artifact_windows_in_context"]) == 4
    # A field whose only flagged window borders the bubble's inside gets the inside's windows too.
    one = [f for f in fields if sum(map(sum, f["window_artifact"])) == 1]
    assert any(len(f["artifact_windows_in_context"]) > 1 for f in one), one
    assert ctx["windows_added_by_context"] >= 4 + 2 and ctx["fields_added_by_context"] >= 1
    # The glass and tissue row below the bubble stays clear.
    assert not any(by[(4, c)]["artifact_in_context"] for c in range(5))
    # artifacts.geojson: the windows in context as QuPath annotations on the slide. Field (1, 2)'s
    # centre (its commanded stage position, 0.25 µm per px from the plan's corner) is in a region,
    # the bottom row's are in none, and every window in context is counted once.
    import shapely
    from shapely.geometry import shape

    from runtime.analysis import geojson

    assert ctx["regions"] >= 1 and ctx["geojson"] == str(tmp_path / "data" / "bubble" / "artifacts.geojson")
    assert geojson.check_file(Path(ctx["geojson"])) == ctx["regions"]
    regions = [shape(f["geometry"]) for f in json.loads(Path(ctx["geojson"]).read_text())["features"]]
    x0 = min(f["x_um"] for f in fields) - 64.0
    y0 = min(f["y_um"] for f in fields) - 64.0

    def centre(f: dict[str, Any]) -> Any:
        return shapely.Point((f["x_um"] - x0) / 0.25, (f["y_um"] - y0) / 0.25)

    assert any(r.contains(centre(mid)) for r in regions)
    assert not any(r.contains(centre(by[(4, c)])) for r in regions for c in range(5))
    feats = json.loads(Path(ctx["geojson"]).read_text())["features"]
    windows = sum(len(f["artifact_windows_in_context"] or []) for f in fields)
    assert sum(f["properties"]["measurements"]["Windows"] for f in feats) == windows
    assert sum(f["properties"]["measurements"]["Windows flagged by the classifier"] for f in feats) == (
        ctx["windows_flagged_by_model"]
    )


@pytest.mark.parametrize("worker", ["process", "in_acquisition"])
def test_single_shot_scan_through_the_inference_worker(tmp_path: Path, small_recording: Path, worker: str) -> None:
    with live_daemon(
        tmp_path,
        f"inf-{worker[:4]}",
        None,
        driver=_paced(small_recording, 2.0),
        focus={"strategy": "single_shot"},
        models={"backend": "ort_cpu", "worker": worker},
        scan={"ring_slots": 2},  # the focus loop and the stitcher share the fewest slots allowed
    ) as (_, client):
        client.request("start_scan", output_name="ss")
        st = _wait_for(client, lambda st: st["fields_done"] >= 1)
        # The worker is the scan job's, listed with the others (only in "process" mode).
        assert ("inference" in st["workers"]) == (worker == "process"), st["workers"]
        assert _wait_idle(client)["last_finish"] == "completed"
        report = json.loads((tmp_path / "data" / "ss" / "report.json").read_text())
    fields = report["fields"]
    assert len(fields) == 9 and all(f["focus_method"].startswith("single_shot") for f in fields)
    assert all(f["tile_class"] in ("background", "tissue", "artifact") for f in fields)
    assert any(f["predicted_defocus_um"] is not None for f in fields)
    # The scan-end artifact context over the field grid (runtime.ml.artifact_context): every field
    # classified, the model's flags kept, the report's counts those of the fields.
    assert all(0.0 <= f["artifact_probability"] <= 1.0 for f in fields)
    assert all(f["artifact_in_context"] or not f["artifact"] for f in fields)
    ctx = report["artifact_context"]
    assert ctx["fields_flagged_by_model"] == sum(f["artifact"] for f in fields)
    assert ctx["fields_added_by_context"] == sum(f["artifact_in_context"] for f in fields) - sum(
        f["artifact"] for f in fields
    )
    # 256 px fields at 0.25 µm are one classifier window each.
    assert ctx["windows_per_field"] == [1, 1]
    _assert_window_context(fields, ctx)
    # How each field's sign was decided (issue 11): glass has none, focused fields one of four.
    for f in fields:
        want = {None} if f["tile_class"] == "background" else {"model", "second_shot", "sweep", "fit"}
        assert f["sign_resolution"] in want and f["sign_flipped"] in (True, False), f
        assert f["near_focus"] in (None, "verified", "fit", "failed", "surface"), f
        if f["near_focus"] in (None, "surface"):  # not checked: no near-focus probe
            assert f["capture_cost"]["start_probes"] == f["capture_cost"]["probes"] == 0, f
    _assert_capture_costs(report)
    assert report["near_focus"]["surface"] == sum(f["near_focus"] == "surface" for f in fields)
    # The first tissue fields of a scan are checked by the near-focus sharpness fit (runtime.focus.near_focus).
    assert any(f["near_focus"] in ("verified", "fit") for f in fields), fields
    assert report["captures_per_field"] < 5  # the sweep takes 10
    inf = report["inference"]
    assert inf["worker"] == worker
    if worker == "process":
        assert inf["backend"] == "ort_cpu"
        assert inf["autofocus_model"].startswith("autofocus ("), inf  # the builtin choice for 256 px frames
        # Every tissue field asked for at least one estimate, every field for one classification.
        assert inf["autofocus_requests"] >= sum(f["predicted_defocus_um"] is not None for f in fields)
        assert inf["classify_requests"] == 9
        assert report["peak_rss_mib"]["inference"] > 0
    else:
        assert "inference" not in report["peak_rss_mib"]


def test_inference_worker_crash_fails_the_scan_not_the_daemon(tmp_path: Path, small_recording: Path) -> None:
    with live_daemon(
        tmp_path,
        "infcrash",
        None,
        driver=_paced(small_recording),
        focus={"strategy": "single_shot"},
        models={"backend": "ort_cpu"},
    ) as (proc, client):
        client.request("start_scan", output_name="infcrash")
        st = _wait_for(client, lambda st: st["fields_done"] >= 1 and "stitcher" in st["workers"])
        workers = dict(st["workers"])
        os.kill(workers["inference"], signal.SIGKILL)
        st = _wait_idle(client)
        assert st["last_finish"] == "failed" and "inference" in st["last_error"], st["last_error"]
        report = json.loads((tmp_path / "data" / "infcrash" / "report.json").read_text())
        assert report["finish_reason"] == "failed" and "inference" in report["error"]
        assert 1 <= report["fields_done"] < 9
        assert Path(report["mosaic"]).is_dir()  # what was captured is kept
        assert _segments_of(proc) == []
        for pid in workers.values():  # every worker of the failed scan is gone, not just the dead one
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        assert client.request("ping")["pong"] is True
        # The daemon serves the next scan (the contrast sweep needs no models).
        client.request("start_scan", output_name="after", focus={"strategy": "contrast_sweep"})
        st = _wait_for(client, lambda st: st["fields_done"] >= 1)
        client.request("cancel")
        assert _wait_idle(client)["last_finish"] == "cancelled"
