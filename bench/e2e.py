"""End-to-end bench: a replayed scan through the real daemon, from the first tile to the closed OME-TIFF.

A synthetic recording (``--recording``, or synthesised here with
``--fields NX NY --tile T``: one z plane at the true focus, so that the
replay's cost is the runtime's, not the simulator's; the synthesis is timed
separately and is not part of the measurement) is scanned through the daemon
over its real sockets, as ``hw_sim replay`` does, while this process records
when each event arrives. Reported:

``last tile -> closed``
    From the last ``field_done`` event (the last tile captured; events reach
    us within the supervisor's 50 ms poll) to the OME-TIFF's last write
    (its mtime: the IFDs are written last, then the file is renamed).
    The writer streams during the scan, so this is the tail: the last bands,
    their lower levels, and the IFDs.
``Mpx/s``
    Mosaic megapixels over ``start_scan`` -> closed.
``peak RSS``
    Of every process, from the scan's report.
``PSNR``
    Of the slide against ``hw_sim truth`` (the in-focus rendering of the
    scanned area), on ``--samples`` random 512 px windows (rendering the whole
    truth of a gigapixel slide would take longer than the scan): ``raw`` at the
    same pixel coordinates (includes any stitching misplacement); ``aligned``
    after undoing each window's measured shift (phase correlation), which
    isolates optics, noise and compression from placement; and ``jpeg``, the
    slide against the mosaic it was written from (compression alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import Column, emit

DESCRIPTION = "replayed scan through the daemon: last tile -> closed OME-TIFF, Mpx/s, RSS per process, PSNR vs truth"
WINDOW = 512


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recording", type=Path, help="an existing synthetic recording (else one is synthesised)")
    p.add_argument("--fields", type=int, nargs=2, default=(36, 36), metavar=("NX", "NY"), help="default 36 36")
    p.add_argument("--tile", type=int, default=1024, help="camera frame edge for the synthesis (px)")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument(
        "--stage-error", type=float, default=2.0, help="synthesis: stage positioning error, 1 sigma (µm); 0 = exact"
    )
    p.add_argument("--workdir", type=Path, help="where the recording (if made) and the scan go (default: temp)")
    p.add_argument("--keep", action="store_true", help="keep the scan output (and a synthesised recording)")
    p.add_argument("--samples", type=int, default=48, help="random windows for the PSNR against truth")
    p.add_argument("--sweep-steps", type=int, default=3, help="contrast-sweep captures per field (minimum 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _synthesise(path: Path, a: argparse.Namespace) -> float:
    from hw_sim.synth import SynthParams, synthesize

    t0 = time.perf_counter()
    # One plane at the true focus (coarse focus error 0): every field is in focus,
    # and the replay's cost per capture is a copy, not the simulator's optics.
    params = SynthParams(
        fields_x=a.fields[0],
        fields_y=a.fields[1],
        seed=a.seed,
        tile=a.tile,
        z_planes=1,
        coarse_focus_error_um=0.0,
        stage_error_um=a.stage_error,
    )
    synthesize(path, params, overwrite=True, progress=not a.json)
    return time.perf_counter() - t0


def _scan(recording: Path, out: Path, config: Path) -> dict[str, Any]:
    """Replay ``recording`` through a daemon child; returns the report plus event arrival times."""
    from hw_sim.replay_job import _replay_config, add_truth
    from runtime.config import load_config
    from runtime.control.client import ControlClient, EventSubscriber
    from runtime.daemon.process import start_daemon_process
    from runtime.devices.recording import Recording

    rec = Recording.open(recording)
    with tempfile.TemporaryDirectory(prefix="wsi-e2e-") as runtime_dir:
        cfg = _replay_config(load_config(config), recording.resolve(), out, Path(runtime_dir))
        daemon = start_daemon_process(cfg)
        client = ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=15)
        events = EventSubscriber(cfg.endpoint("event"))
        times: dict[str, float] = {}
        try:
            client.request("ping")
            time.sleep(0.2)  # ZeroMQ slow joiner: let the subscription reach the PUB socket
            times["start"] = time.time()
            scan_id = client.request("start_scan", output_name=out.name)["scan_id"]
            deadline = time.monotonic() + 7200
            while time.monotonic() < deadline:
                ev = events.recv(timeout_s=0.5)
                if ev is None:
                    if not daemon.is_alive():
                        raise RuntimeError("the daemon exited during the scan")
                    continue
                now = time.time()
                kind = ev.get("event")
                if kind == "field_done":
                    times.setdefault("first_field", now)
                    times["last_field"] = now
                elif kind == "state" and ev["data"].get("state") == "writing":
                    times.setdefault("writing", now)
                elif kind == "scan_finished" and ev["data"].get("scan_id") == scan_id:
                    times["finished"] = now
                    break
            else:
                raise RuntimeError("scan did not finish within 2 h")
        finally:
            events.close()
            try:
                client.request("shutdown")
            except Exception:
                daemon.terminate()
            client.close()
            daemon.join(30)
            if daemon.is_alive():
                daemon.kill()
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    if report["finish_reason"] != "completed":
        raise RuntimeError(f"scan {report['finish_reason']}: {report.get('error')}")
    report = add_truth(report, rec)
    report["_times"] = times
    return report


def _psnr(mse: float) -> float:
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def _quality(recording: Path, slide: Path, mosaic: Path | None, samples: int, seed: int) -> dict[str, Any]:
    """PSNR of random slide windows against the truth (raw and shift-compensated) and against the mosaic."""
    import cv2
    import tifffile

    from hw_sim.truth import TruthRenderer
    from runtime.devices.recording import Recording
    from runtime.output.mosaic_store import MosaicStore

    rec = Recording.open(recording)
    renderer = TruthRenderer(rec.meta, tile=WINDOW)
    store = MosaicStore.open(mosaic) if mosaic is not None and mosaic.exists() else None
    rng = np.random.default_rng(seed)
    raw_se = aligned_se = jpeg_se = 0.0
    n_px = n_aligned = n_jpeg = 0
    per_window: list[float] = []
    shifts: list[float] = []
    e = 16  # margin left out after a shift (the warp's border)
    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        t = page.tilewidth
        if t != WINDOW:
            raise ValueError(f"slide tiles are {t} px; this bench samples {WINDOW} px tiles")
        h, w = page.imagelength, page.imagewidth
        down, across = h // t, w // t  # whole tiles only
        for _ in range(samples):
            i, j = int(rng.integers(0, down)), int(rng.integers(0, across))
            idx = i * (-(-w // t)) + j
            tif.filehandle.seek(page.dataoffsets[idx])
            data = tif.filehandle.read(page.databytecounts[idx])
            decoded, _, _ = page.decode(data, idx, jpegtables=page.jpegtables)
            got = np.asarray(decoded).reshape(t, t, 3)
            truth = renderer.render(i * t, j * t)
            inner = (slice(e, t - e), slice(e, t - e))
            se = float(((got[inner].astype(np.float64) - truth[inner]) ** 2).sum())
            raw_se += se
            n_px += got[inner].size
            per_window.append(_psnr(se / got[inner].size))
            a = cv2.cvtColor(got, cv2.COLOR_RGB2GRAY).astype(np.float32)
            b = cv2.cvtColor(truth, cv2.COLOR_RGB2GRAY).astype(np.float32)
            (dx, dy), response = cv2.phaseCorrelate(b, a, cv2.createHanningWindow((t, t), cv2.CV_32F))
            if response >= 0.3:  # enough structure to measure a shift
                shifts.append(float(np.hypot(dx, dy)))
                shift = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float32)
                moved = cv2.warpAffine(truth, shift, (t, t), flags=cv2.INTER_LINEAR)
                aligned_se += float(((got[inner].astype(np.float64) - moved[inner]) ** 2).sum())
                n_aligned += got[inner].size
            if store is not None:
                ref = store.read_chunk(0, i, j)
                jpeg_se += float(((got.astype(np.float64) - ref) ** 2).sum())
                n_jpeg += got.size
    return {
        "samples": samples,
        "psnr_raw_db": _psnr(raw_se / n_px),
        "psnr_raw_median_window_db": float(np.median(per_window)),
        "psnr_raw_min_window_db": float(np.min(per_window)),
        "psnr_aligned_db": _psnr(aligned_se / n_aligned) if n_aligned else None,
        "aligned_windows": len(shifts),
        "shift_px_median": float(np.median(shifts)) if shifts else None,
        "shift_px_max": float(np.max(shifts)) if shifts else None,
        "psnr_jpeg_vs_mosaic_db": _psnr(jpeg_se / n_jpeg) if n_jpeg else None,
    }


COLUMNS = [
    Column("mpx", "mosaic Mpx", ".0f"),
    Column("fields", "fields"),
    Column("scan_s", "start->closed s", ".1f"),
    Column("tail_s", "last tile->closed s", ".2f"),
    Column("mpx_s", "Mpx/s", ".1f"),
    Column("rss", "peak RSS MiB per process"),
    Column("psnr_raw", "PSNR raw dB", ".1f"),
    Column("psnr_aligned", "aligned dB", ".1f"),
    Column("psnr_jpeg", "vs mosaic dB", ".1f"),
]


def run(a: argparse.Namespace) -> int:
    if a.sweep_steps < 3:
        raise SystemExit("--sweep-steps must be >= 3 (the config's minimum)")
    own = a.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench-e2e-")) if own else Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    synth_s: float | None = None
    recording = a.recording
    out = workdir / f"scan-{int(time.time())}"
    config = workdir / "e2e.toml"
    try:
        if recording is None:
            recording = workdir / "recording.zarr"
            if not a.json:
                print(f"synthesising {a.fields[0]} x {a.fields[1]} fields of {a.tile} px ...", flush=True)
            synth_s = _synthesise(recording, a)
        # The sweep is pointless on a one-plane recording: keep it to the minimum captures.
        # Keep the mosaic so the slide can be compared with what it was written from.
        config.write_text(
            f'[focus]\nstrategy = "contrast_sweep"\nsweep_steps = {a.sweep_steps}\n\n'
            "[mosaic]\nkeep_after_export = true\n"
        )
        report = _scan(recording, out, config)
        times = report["_times"]
        slide = Path(report["slide"])
        closed = slide.stat().st_mtime
        h, w = report["levels"][0]
        mpx = h * w / 1e6
        quality = _quality(recording, slide, out / "mosaic.zarr", a.samples, a.seed)
        result: dict[str, Any] = {
            "bench": "e2e",
            "recording": str(recording),
            "synth_seconds": synth_s,
            "fields": report["fields_done"],
            "captures": report["captures_total"],
            "mosaic_shape": [h, w],
            "megapixels": mpx,
            "levels": report["levels"],
            "slide_bytes": slide.stat().st_size,
            "start_to_first_field_s": times["first_field"] - times["start"],
            "start_to_last_field_s": times["last_field"] - times["start"],
            "start_to_closed_s": closed - times["start"],
            "last_tile_to_closed_s": closed - times["last_field"],
            "last_tile_to_scan_finished_s": times["finished"] - times["last_field"],
            "mpx_per_s": mpx / (closed - times["start"]),
            "peak_rss_mib": report["peak_rss_mib"],
            "focus_truth": report.get("focus_truth"),
            "simulated_scan_time_s": report.get("simulated_scan_time_s"),
            "quality": quality,
            "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
        }
    finally:
        if not a.keep and own:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not a.keep:
            # Only what this run made: a recording given with --recording is never touched.
            if a.recording is None:
                shutil.rmtree(workdir / "recording.zarr", ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            config.unlink(missing_ok=True)
    rss = ", ".join(f"{k} {v:.0f}" for k, v in result["peak_rss_mib"].items())
    row = {
        "mpx": mpx,
        "fields": result["fields"],
        "scan_s": result["start_to_closed_s"],
        "tail_s": result["last_tile_to_closed_s"],
        "mpx_s": result["mpx_per_s"],
        "rss": rss,
        "psnr_raw": quality["psnr_raw_db"],
        "psnr_aligned": quality["psnr_aligned_db"],
        "psnr_jpeg": quality["psnr_jpeg_vs_mosaic_db"],
    }
    q = quality
    notes = [
        f"mosaic {h} x {w}, {len(result['levels'])} levels, slide {result['slide_bytes'] / 2**20:.0f} MiB; "
        f"{result['captures']} captures; synthesis {synth_s or 0:.0f} s (not measured)",
        "last tile -> scan_finished event (report written, workers joined): "
        f"{result['last_tile_to_scan_finished_s']:.2f} s",
        f"PSNR over {q['samples']} random {WINDOW} px windows; raw: same coordinates (median window "
        f"{q['psnr_raw_median_window_db']:.1f}, min {q['psnr_raw_min_window_db']:.1f}); aligned: after undoing each "
        f"window's shift ({q['aligned_windows']} windows, median shift {q['shift_px_median'] or 0:.1f} px, "
        f"max {q['shift_px_max'] or 0:.1f} px); vs mosaic: compression alone",
    ]
    emit(result, [row], COLUMNS, as_json=a.json, title=f"e2e bench: replayed scan, {os.cpu_count()} CPUs", notes=notes)
    return 0
