"""``python -m bench stitch-gpu``: the stitcher's per-pixel kernels on the CPU against the GPU (``stitch.backend``).

Per 1024 px RGB tile of the bench's base recording (hw_sim tissue and glass, 4 x 2 fields):

``resample``
    the flat-field gain and the subpixel shift (``stitch.resampling_kernel``: cubic and lanczos3) and
    the rounding to uint8, what the accumulator does to every tile it blends. GPU: the frame
    uploaded, filtered on the device, the float32 tile and its uint8 rounding downloaded (into
    page-locked buffers) -- the transfers included, as the accumulator pays them.
``register``
    ``register_pair`` of one overlap pair (a trailing or bottom strip against the next tile), on
    the CPU and on the cupy backend: the coarse search's NCC surface on the GPU where its padded
    window has at least ``GPU_SURFACE_MIN_PX`` pixels (runtime/stitching/backends.py), the rest of
    registration on the CPU (see ``runtime/stitching/gpu.py``); and with every surface on the GPU.
``ncc surface``
    the masked NCC surface alone on a horizontal pair's high-passed windows (a 10 % overlap widened
    by the search) at 1/4 of the resolution (what the stitcher computes), 1/2 and full: where the
    GPU starts to pay.

Each figure: the fastest of 3 batches, wall ms per call and host CPU ms per call (``process_time``:
every thread of this process), the process pinned to one core and OpenCV on one thread. CPU s/Gpx:
per gigapixel of mosaic (a tile brings ``(1 - overlap)^2`` of its pixels to it). Parity: the largest
difference of the GPU's float tile from the CPU's (DN), how many uint8 values differ, and the
largest difference of a registered shift (px). Without CuPy or a CUDA device the GPU column says
why it was not run.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

DESCRIPTION = "stitch.backend: resampling and registration per tile, CPU vs GPU (CuPy), with parity"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tile", type=int, default=1024, help="camera frame edge (px), default 1024")
    p.add_argument("--fields", type=int, nargs=2, default=(4, 2), metavar=("NX", "NY"), help="default 4 2")
    p.add_argument("--workdir", type=Path, help="the recording is cached here (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _no_sync() -> None:
    return None


def _timed(fn: Callable[[int], object], n: int, sync: Callable[[], None] = _no_sync) -> tuple[float, float]:
    """Fastest of 3 batches of ``n`` calls (after one warm-up): (wall ms, host CPU ms) per call."""
    fn(0)
    sync()
    best = (math.inf, math.inf)
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            fn(i)
        sync()
        wall, cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
        if wall < best[0]:
            best = (wall, cpu)
    return best[0] * 1e3, best[1] * 1e3


def _gain(h: int, w: int) -> Any:
    """A flat-field inverse gain like the estimator's: 12 % radial fall-off to the corners, per channel."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((y - h / 2) / (h / 2)) ** 2 + ((x - w / 2) / (w / 2)) ** 2
    gain = 1.0 - 0.06 * r2
    return np.repeat((1.0 / gain)[..., None], 3, axis=2).astype(np.float32)


def measure(rec: Any) -> dict[str, Any]:
    from bench.stitch_floor import one_core, overlap_pairs
    from runtime.stitching.backends import CpuKernels, StitchKernels, select_stitch_backend
    from runtime.stitching.blending import RESAMPLING_KERNELS
    from runtime.stitching.registration import highpass, register_pair, to_grey

    m = rec.meta
    th, tw = m.tile_height, m.tile_width
    ov = m.overlap
    step_y, step_x = round(th * (1 - ov)), round(tw * (1 - ov))
    per_gpx = 1e9 / (step_y * step_x) / 1e3  # ms per tile -> s per Gpx of mosaic
    out: dict[str, Any] = {"tile": [th, tw], "overlap": ov, "rows": []}
    gpu: StitchKernels | None = None
    try:
        gpu = select_stitch_backend("cupy").kernels
        out["device"] = getattr(gpu, "device", "?")
    except Exception as err:
        out["gpu_not_available"] = str(err)
    cpu = CpuKernels()
    sync: Callable[[], None] = _no_sync
    if gpu is not None:
        import cupy

        sync = cupy.cuda.Device().synchronize
    with one_core():
        n_row = min(4, m.cols)
        tiles = [rec.plane(rec.field_index(r, c), 0) for r in range(min(2, m.rows)) for c in range(n_row)]
        scale = _gain(th, tw)
        rows: list[dict[str, Any]] = out["rows"]
        for kernel in RESAMPLING_KERNELS:
            row: dict[str, Any] = {"step": f"resample {kernel}"}

            def shift(k: StitchKernels, kernel: str = kernel) -> Callable[[int], object]:
                return lambda i: k.shift(tiles[i % len(tiles)], 0.37, -0.21, scale, kernel)

            row["cpu_ms"], row["cpu_cpu_ms"] = _timed(shift(cpu), 8)
            if gpu is not None:
                row["gpu_ms"], row["gpu_cpu_ms"] = _timed(shift(gpu), 16, sync)
                diff, flips = 0.0, 0
                for t in tiles:
                    want, want8 = cpu.shift(t, 0.37, -0.21, scale, kernel)
                    got, got8 = gpu.shift(t, 0.37, -0.21, scale, kernel)
                    diff = max(diff, float(np.abs(got.astype(np.float64) - want).max()))
                    flips += int((got8 != want8).sum())
                row["parity"] = f"max {diff:.1e} DN, {flips} of {len(tiles) * want8.size} uint8 values differ (1 DN)"
                row["max_diff_dn"], row["uint8_differ"] = diff, flips
            rows.append(row)

        greys = [to_grey(t) for t in tiles]
        pairs, params, _ = overlap_pairs(greys, n_row, m)
        row = {"step": "register (1 pair)"}
        row["cpu_ms"], row["cpu_cpu_ms"] = _timed(lambda i: cpu.register(*pairs[i % len(pairs)], params), len(pairs))
        want_m = [cpu.register(a_, b_, p_, params) for a_, b_, p_ in pairs]
        out["pairs"] = {r: [w.reason for w in want_m].count(r) for r in sorted({w.reason for w in want_m})}
        if gpu is not None:
            g = gpu
            row["gpu_ms"], row["gpu_cpu_ms"] = _timed(lambda i: g.register(*pairs[i % len(pairs)], params), len(pairs))
            got_m = [g.register(a_, b_, p_, params) for a_, b_, p_ in pairs]
            off = max(
                max(abs(x.shift[0] - y.shift[0]), abs(x.shift[1] - y.shift[1]))
                for x, y in zip(got_m, want_m, strict=True)
            )
            same = sum(x.reason == y.reason for x, y in zip(got_m, want_m, strict=True))
            row["parity"] = f"shifts within {off:.1e} px, {same} of {len(pairs)} outcomes equal"
            row["max_shift_diff_px"], row["outcomes_equal"] = off, same
        rows.append(row)

        surface = getattr(getattr(gpu, "kernels", None), "ncc_surface", None)
        if surface is not None:
            # What the dispatch by size saves: every surface on the GPU, however small.
            forced = surface
            row = {"step": "register, every surface on GPU"}
            row["gpu_ms"], row["gpu_cpu_ms"] = _timed(
                lambda i: register_pair(*pairs[i % len(pairs)], params, surface=forced), len(pairs), sync
            )
            rows.append(row)
        # The surface alone at 1/4 (what the stitcher computes), 1/2 and full resolution: a horizontal
        # pair's windows, high-passed, +-search at that resolution.
        a_, b_, p_ = pairs[0]
        ox = round(p_[1])
        s_ = math.ceil(params.search_px)
        wa_full = highpass(a_, params.highpass_px)
        wb_full = highpass(np.ascontiguousarray(b_[:, : a_.shape[1] - ox + s_]), params.highpass_px)
        rows += [_surface_row(f, wa_full, wb_full, ox, s_, surface, sync) for f in (4, 2, 1)]
    for row in rows:
        for side in ("cpu", "gpu"):
            if f"{side}_cpu_ms" in row and not row["step"].startswith("ncc"):
                # resample: once per tile; register: two pairs per (interior) tile
                per_tile = 2 if row["step"].startswith("register") else 1
                row[f"{side}_cpu_s_per_gpx"] = row[f"{side}_cpu_ms"] * per_tile * per_gpx
        if "gpu_ms" in row and "cpu_ms" in row:
            row["speedup"] = row["cpu_ms"] / row["gpu_ms"]
            row["host_cpu_ratio"] = row["cpu_cpu_ms"] / max(row["gpu_cpu_ms"], 1e-9)
    return out


def _surface_row(
    f: int, wa_full: Any, wb_full: Any, ox: int, s_: int, surface: Callable[..., Any] | None, sync: Callable[[], None]
) -> dict[str, Any]:
    """The NCC surface of the windows downsampled by ``f`` over +-``s_ / f`` px, on the CPU and the GPU."""
    from runtime.stitching.registration import _downsample, _masked_ncc

    wa, wb = _downsample(wa_full, f), _downsample(wb_full, f)
    sf, of = math.ceil(s_ / f), round(ox / f)
    lo, hi = (-sf, of - sf), (sf, of + sf)
    least = 100.0 / f**2
    n_px = (hi[0] - lo[0] + wb.shape[0]) * (hi[1] - lo[1] + wb.shape[1])
    row: dict[str, Any] = {"step": f"ncc surface 1/{f}: {n_px / 1e3:.0f} kpx padded"}
    row["cpu_ms"], row["cpu_cpu_ms"] = _timed(lambda i: _masked_ncc(wa, wb, lo, hi, least), 4)
    if surface is not None:
        row["gpu_ms"], row["gpu_cpu_ms"] = _timed(lambda i: surface(wa, wb, lo, hi, least), 8, sync)
        d = float(np.abs(surface(wa, wb, lo, hi, least) - _masked_ncc(wa, wb, lo, hi, least)).max())
        row["parity"] = f"surface within {d:.1e}"
    return row


def run(a: argparse.Namespace) -> int:
    from bench.report import Column, emit
    from bench.stitch import SCENARIOS, _recording
    from runtime.devices.recording import Recording

    tmp = None
    if a.workdir is None:
        tmp = tempfile.mkdtemp(prefix="bench-stitch-gpu-")
        workdir = Path(tmp)
    else:
        workdir = a.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        synth = argparse.Namespace(fields=tuple(a.fields), tile=a.tile, stage_error_um=2.5)
        rec = Recording.open(_recording(workdir, SCENARIOS["base"], 1, synth))
        result = measure(rec)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["bench"] = "stitch-gpu"
    columns = [
        Column("step", "step"),
        Column("cpu_ms", "CPU ms", ".2f"),
        Column("gpu_ms", "GPU ms", ".2f"),
        Column("speedup", "x", ".1f"),
        Column("cpu_cpu_s_per_gpx", "CPU: host CPU s/Gpx", ".2f"),
        Column("gpu_cpu_s_per_gpx", "GPU: host CPU s/Gpx", ".2f"),
        Column("parity", "parity"),
    ]
    gpu_line = (
        f"GPU: {result['device']} (CuPy), transfers included"
        if "device" in result
        else f"GPU: not available: {result['gpu_not_available']}"
    )
    notes = [
        "",
        f"{a.tile} px RGB tiles of the base recording, {result['overlap']:.0%} overlap; one host core, OpenCV 1 thread;"
        " ms per call (fastest of 3 batches); host CPU s per Gpx of mosaic (register: 2 pairs per tile).",
        gpu_line,
        f"Pair outcomes (CPU): {result['pairs']}.",
    ]
    emit(result, result["rows"], columns, as_json=a.json, title="Stitching kernels: CPU vs GPU", notes=notes)
    return 0
