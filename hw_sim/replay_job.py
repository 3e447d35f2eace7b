"""``python -m hw_sim replay``: scan a recording through the real daemon, over its real sockets.

The daemon runs as a child process with the replay driver; this process is a
client like the scanner UI: it subscribes to events (the progress bar), sends
``start_scan``, waits for ``scan_finished``, then shuts the daemon down. The
report gains what only a synthetic recording knows: the true focus of each
field and the focus error.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from runtime.config import RuntimeConfig, load_config, with_overrides
from runtime.control.client import ControlClient, EventSubscriber
from runtime.daemon.process import start_daemon_process, stop_daemon_process
from runtime.devices.recording import Recording
from runtime.output.journal import JOURNAL_NAME, JournalError, read_journal
from runtime.paths import check_output_folder, write_file_exclusive

HALF_DOF_UM = 0.35  # half the depth of field at 40x / 0.95 NA


def _replay_config(base: RuntimeConfig, recording: Path, out: Path, runtime_dir: Path) -> RuntimeConfig:
    return with_overrides(
        base,
        {
            "daemon": {"data_root": str(out.parent), "runtime_dir": str(runtime_dir)},
            "driver": {"factory": "hw_sim.replay:open_replay_driver", "options": {"recording": str(recording)}},
        },
    )


def add_truth(report: dict[str, Any], rec: Recording) -> dict[str, Any]:
    """Per field: the true focus z and the focus error; a summary over the scan."""
    focus = rec.truth_focus_z_um
    if focus is None:
        return report
    xy = rec.stage_xy_um
    errors = []
    for f in report["fields"]:
        i = int(np.argmin(np.hypot(xy[:, 0] - f["x_um"], xy[:, 1] - f["y_um"])))
        f["recording_field"] = i
        f["true_focus_z_um"] = float(focus[i])
        f["focus_error_um"] = float(f["z_um"] - focus[i])
        errors.append(abs(f["focus_error_um"]))
    if errors:
        e = np.asarray(errors)
        report["focus_truth"] = {
            "mae_um": float(e.mean()),
            "max_abs_error_um": float(e.max()),
            "within_half_dof": float(np.mean(e <= HALF_DOF_UM)),
            "half_dof_um": HALF_DOF_UM,
        }
    return report


def run_replay(
    recording: Path,
    out: Path,
    config_path: Path | None = None,
    progress: bool = True,
    timeout_s: float = 3600,
    resume: bool = False,
) -> dict[str, Any]:
    """Scan ``recording`` into ``out/slide.ome.tif`` + ``out/report.json``; return the report.

    ``out`` must not exist yet or be an empty folder (the daemon writes scans only there); it
    becomes a folder under the daemon's data root, ``out``'s parent. ``resume``: ``out`` holds an
    interrupted scan of this recording (its ``journal.jsonl``): continue it instead.
    """
    rec = Recording.open(recording)  # fail early, with the recording's own error message
    out = out.resolve()
    resume_id = _interrupted_scan_id(out) if resume else None
    if resume_id is None:
        check_output_folder(out, "--out")  # the daemon refuses the same; say so before starting it
    base = load_config(config_path)
    with tempfile.TemporaryDirectory(prefix="wsi-rt-") as runtime_dir:
        cfg = _replay_config(base, recording.resolve(), out, Path(runtime_dir))
        daemon = start_daemon_process(cfg)
        try:
            report = _drive_scan(cfg, out, len(rec.stage_xy_um), progress, timeout_s, daemon.is_alive, resume_id)
        finally:
            stop_daemon_process(daemon, cfg)
    report = add_truth(report, rec)
    # Rewritten like the daemon wrote it: a new partial file, never through a link, renamed in place.
    write_file_exclusive(out, "report.json", json.dumps(report, indent=2).encode("utf-8"))
    _print_summary(out, report)
    return report


def _interrupted_scan_id(out: Path) -> str:
    """The id of the interrupted scan in ``out`` (``--resume``); ValueError naming what is wrong."""
    try:
        state = read_journal(out / JOURNAL_NAME)
    except JournalError as err:
        raise ValueError(f"--resume: {out} holds no resumable scan: {err}") from None
    if state.completed:
        raise ValueError(f"--resume: the scan in {out} is complete already")
    assert state.scan_id is not None
    return state.scan_id


def _drive_scan(
    cfg: RuntimeConfig,
    out: Path,
    n_fields: int,
    progress: bool,
    timeout_s: float,
    alive: Any,
    resume_id: str | None = None,
) -> dict[str, Any]:
    client = ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=15)
    events = EventSubscriber(cfg.endpoint("event"))
    try:
        client.request("ping")  # waits (with retries) until the daemon serves
        time.sleep(0.2)  # let the subscription reach the PUB socket (ZeroMQ slow joiner)
        if resume_id is not None:
            started = client.request("start_scan", resume=resume_id)
        else:
            started = client.request("start_scan", output_name=out.name)
        scan_id = started["scan_id"]
        bar = tqdm(total=n_fields, unit="field", desc="scanning", disable=not progress)
        deadline = time.monotonic() + timeout_s
        last_poll = 0.0
        while time.monotonic() < deadline:
            ev = events.recv(timeout_s=0.5)
            if ev is not None and ev.get("event") == "field_done":
                bar.update(ev["data"]["done"] - bar.n)
            elif ev is not None and ev.get("event") == "state" and ev["data"]["state"] == "writing":
                bar.set_description("writing")
            if ev is not None and ev.get("event") == "scan_finished" and ev["data"]["scan_id"] == scan_id:
                break
            if time.monotonic() - last_poll > 2.0:  # events can be missed; status cannot
                last_poll = time.monotonic()
                st = client.request("status")
                if st["state"] == "idle" and st.get("last_finish"):
                    break
            if not alive():
                raise RuntimeError("the daemon exited during the scan")
        else:
            raise RuntimeError(f"scan did not finish within {timeout_s:.0f} s")
        bar.close()
    finally:
        events.close()
        client.close()
    report_path = out / "report.json"
    if not report_path.exists():
        raise RuntimeError(f"the scan ended without a report in {out}")
    report: dict[str, Any] = json.loads(report_path.read_text())
    if report["finish_reason"] != "completed":
        raise RuntimeError(f"scan {report['finish_reason']}: {report.get('error')}; report: {report_path}")
    return report


def _print_summary(out: Path, report: dict[str, Any]) -> None:
    rss = ", ".join(f"{k} {v:.0f}" for k, v in report["peak_rss_mib"].items())
    print(f"slide:  {report['slide']}")
    print(f"report: {out / 'report.json'}")
    print(
        f"fields {report['fields_done']}, captures {report['captures_total']} "
        f"({report['captures_per_field']:.1f}/field), simulated scan time {report['simulated_scan_time_s']:.1f} s, "
        f"wall {report['wall_time_s']:.1f} s"
    )
    if "focus_truth" in report:
        ft = report["focus_truth"]
        print(f"focus error vs truth: MAE {ft['mae_um']:.2f} µm, {100 * ft['within_half_dof']:.0f}% within ±0.35 µm")
    print(f"peak RSS (MiB): {rss}")
    analysis = report.get("analysis")
    if isinstance(analysis, dict):
        if analysis.get("error"):
            print(f"analysis: failed ({analysis['error']}); the slide is complete")
        else:
            print(
                f"analysis: slide score {analysis.get('slide_score', 0.0):.2f}, "
                f"{analysis.get('lesion_count', 0)} lesion(s), tumour burden "
                f"{analysis.get('tumour_burden_mm2', 0.0):.3f} mm² "
                f"({analysis.get('tumour_burden_pct', 0.0):.1f}% of tissue), "
                f"{analysis.get('nuclei_count', 0)} nuclei; annotations: {out / 'annotations.geojson'}"
            )


DEMO_LESIONS = 3
DEMO_MIMICS = 1
"""Tumour on the demo's slide (hw_sim.lesions), so that its analysis has something to find."""


def run_demo(out: Path, fields: tuple[int, int] = (4, 3), seed: int = 0, analysis: bool = True) -> dict[str, Any]:
    """The README's main job: synthesise a small slide, scan it, print where the results are.

    ``out`` is the daemon's data root: the recording is ``out/recording.zarr`` and the scan
    goes to its own folder, ``out/scan/`` (the daemon writes a scan only into a new or empty
    folder, never into the recording's). ``analysis``: the scan runs the slide analysis
    (``[analysis] enabled``: heatmap, annotations.geojson, report's ``analysis``), as a scanner
    that hands the pathologist an analysed slide would.
    """
    from hw_sim.synth import SynthParams, synthesize

    out.mkdir(parents=True, exist_ok=True)
    rec = out / "recording.zarr"
    if not (rec / "zarr.json").exists():
        params = SynthParams(
            fields_x=fields[0], fields_y=fields[1], seed=seed, lesions=DEMO_LESIONS, mimics=DEMO_MIMICS
        )
        synthesize(rec, params, overwrite=True, progress=True)
    scan = out / "scan"
    if scan.exists():  # the demo's own folder: a re-run replaces the previous scan
        shutil.rmtree(scan)
    if not analysis:
        return run_replay(rec, scan)
    # A config file outside ``out``: the demo's data root holds the recording and the scan only.
    with tempfile.TemporaryDirectory(prefix="wsi-demo-") as tmp:
        config = Path(tmp) / "demo.toml"
        config.write_text("[analysis]\nenabled = true\n")
        return run_replay(rec, scan, config_path=config)
