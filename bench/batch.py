"""Fleet-mode bench: ``python -m runtime batch restitch`` over small recordings at 1, 2 ... workers.

``--recordings`` synthetic recordings (``hw_sim synth``'s own code, cached in ``--workdir``)
and one copy of the first whose last field's chunks are cut short (a disk error) are
restitched on a LocalCluster of worker processes from the ``[fleet]`` defaults, once per
``--workers`` count, through the batch's own functions (:mod:`runtime.fleet.batch`). Reported
per worker count:

``slides/h``
    Slides done per hour of batch time: from the first task submitted to the last result
    (the cluster's start is reported apart: a fleet pays it once per batch, not per slide).
``s/slide``
    The mean of each slide's own time on its worker (reading, focus, stitching, writing).
``peak MiB/worker``
    The largest peak RSS (VmHWM) of any worker process over the batch, as each task reports
    its process's high-water mark; ``per worker`` lists them all.
``failed``
    The injected failure must be the only one, and every other slide must be done: the bench
    exits 1 otherwise. Its one-line error is in the notes.

A re-run of the last batch is timed too: every slide done must be skipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import Column, emit

DESCRIPTION = "fleet mode: batch restitch of small recordings at 1 and 2 workers (slides/h, peak MiB per worker)"
CORRUPT = "corrupt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recordings", type=int, default=8, help="good recordings in the batch (default 8)")
    p.add_argument("--fields", type=int, nargs=2, default=(3, 3), metavar=("NX", "NY"), help="default 3 3")
    p.add_argument("--tile", type=int, default=512, help="camera frame edge (px), default 512")
    p.add_argument("--z-planes", type=int, default=9, help="planes per field z-stack, default 9")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run (default 1 2)")
    p.add_argument("--workdir", type=Path, help="recordings are cached here, batches written here (default: temp)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _recordings(workdir: Path, a: argparse.Namespace) -> list[Path]:
    """The good recordings (made once per size and kept in ``workdir``) and the corrupt copy."""
    from hw_sim.synth import SynthParams, synthesize

    recs = []
    for i in range(a.recordings):
        path = workdir / f"rec-{a.fields[0]}x{a.fields[1]}-{a.tile}-z{a.z_planes}-{i:02d}.zarr"
        if not (path / "zarr.json").is_file():
            params = SynthParams(
                fields_x=a.fields[0], fields_y=a.fields[1], seed=7100 + i, tile=a.tile, z_planes=a.z_planes
            )
            synthesize(path, params, overwrite=True, progress=False)
        recs.append(path)
    corrupt = workdir / f"{CORRUPT}.zarr"
    shutil.rmtree(corrupt, ignore_errors=True)
    shutil.copytree(recs[0], corrupt)
    last_field = max((p for p in (corrupt / "stacks" / "c").iterdir()), key=lambda p: int(p.name))
    for chunk in (p for p in last_field.rglob("*") if p.is_file()):
        chunk.write_bytes(chunk.read_bytes()[:16])  # every plane of the last field cut short
    return [*recs, corrupt]


def _warm_up() -> None:
    import runtime.focus.field
    import runtime.output.ome_tiff
    import runtime.stitching.accumulator  # noqa: F401


def _one_batch(inputs: list[Path], out: Path, workers: int, progress: bool, quiet: bool) -> dict[str, Any]:
    from runtime.config import RuntimeConfig
    from runtime.fleet.batch import connect, plan_tasks, run_batch

    cfg = RuntimeConfig()
    tasks = plan_tasks("restitch", inputs, out, cfg)
    t0 = time.perf_counter()
    with connect(cfg.fleet, workers=workers) as client:
        client.wait_for_workers(workers)
        # Each worker process imports the focus, stitching and writer stack once (about a second
        # on this machine): part of the cluster's start, not of the first slide it happens to get.
        client.run(_warm_up)
        start_s = time.perf_counter() - t0
        outcome = run_batch(client, tasks, progress=progress, quiet=quiet)
        rerun = run_batch(client, tasks, quiet=True)
    done = [r for r in outcome.results if r.status == "done"]
    peaks: dict[str, float] = {}
    for r in outcome.results:
        if r.worker is not None and r.worker_peak_rss_mib is not None:
            peaks[r.worker] = max(peaks.get(r.worker, 0.0), r.worker_peak_rss_mib)
    failed = outcome.failed
    return {
        "workers": workers,
        "slides": len(tasks),
        "done": len(done),
        "failed": len(failed),
        "failures": {r.name: r.error for r in failed},
        "batch_s": outcome.seconds,
        "cluster_start_s": start_s,
        "slides_per_hour": len(done) / outcome.seconds * 3600 if outcome.seconds else None,
        "s_per_slide": sum(r.seconds for r in done) / len(done) if done else None,
        "peak_mib_per_worker": max(peaks.values()) if peaks else None,
        "peak_mib_by_worker": sorted(round(v, 1) for v in peaks.values()),
        "rerun_skipped": rerun.count("skipped"),
        "rerun_s": rerun.seconds,
    }


def run(a: argparse.Namespace) -> int:
    if a.recordings < 1 or min(a.workers) < 1:
        raise SystemExit("error: --recordings and --workers must be at least 1")
    tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="bench-batch-")
    workdir = a.workdir or Path(tmp.name)  # type: ignore[union-attr]
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        inputs = _recordings(workdir, a)
        synth_s = time.perf_counter() - t0
        rows = []
        for w in a.workers:
            out = workdir / f"batch-{w}w"
            shutil.rmtree(out, ignore_errors=True)
            rows.append(_one_batch(inputs, out, w, progress=not a.json, quiet=a.json))
    finally:
        if tmp is not None:
            tmp.cleanup()
    base = rows[0]["slides_per_hour"]
    for r in rows:
        r["speedup"] = r["slides_per_hour"] / base if base and r["slides_per_hour"] else None
        r["per_worker"] = " ".join(f"{v:.0f}" for v in r["peak_mib_by_worker"])
    ok = all(r["done"] == a.recordings and list(r["failures"]) == [CORRUPT] for r in rows)
    ok = ok and all(r["rerun_skipped"] == a.recordings for r in rows)
    result = {
        "bench": "batch",
        "job": "restitch",
        "recordings": {"good": a.recordings, "fields": list(a.fields), "tile": a.tile, "z_planes": a.z_planes},
        "host": {"cpus": os.cpu_count()},
        "synthesis_s": synth_s,
        "results": rows,
        "injected_failure_isolated": ok,
    }
    columns = [
        Column("workers", "workers"),
        Column("done", "done"),
        Column("failed", "failed"),
        Column("batch_s", "batch s", ".1f"),
        Column("slides_per_hour", "slides/h", ".0f"),
        Column("speedup", "x 1st", ".2f"),
        Column("s_per_slide", "s/slide", ".2f"),
        Column("cluster_start_s", "cluster start s", ".1f"),
        Column("peak_mib_per_worker", "peak MiB/worker", ".0f"),
        Column("per_worker", "per worker"),
        Column("rerun_s", "re-run s (all skipped)", ".1f"),
    ]
    error = next(iter(rows[0]["failures"].values()), None)
    notes = [
        f"{a.recordings} recordings of {a.fields[0]}x{a.fields[1]} fields, {a.tile} px, {a.z_planes} planes "
        f"(+1 with its last field's chunks cut short), contrast-sweep focus, {os.cpu_count()} CPUs",
        f"injected failure: {CORRUPT}: {error}",
        "every other slide done, every re-run slide skipped" if ok else "FAILED: the failure was not isolated",
    ]
    title = "batch restitch on a LocalCluster (worker processes)"
    emit(result, rows, columns, as_json=a.json, title=title, notes=notes)
    return 0 if ok else 1
