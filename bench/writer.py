"""Writer bench: pyramid levels + pyramidal OME-TIFF from a large synthetic mosaic.

For each size N (an N x N RGB mosaic) two child processes run, each measured
on its own (wall time, exact peak RSS):

``ingest``
    What the stitcher pays while scanning: synthetic level-0 bands through
    ``MosaicStore.write_band`` (whole-chunk Zarr writes plus the streaming
    pyramid), then ``finish``. Its RSS includes the generator's texture strip
    (one band + 4096 px wide).
``writer``
    What the writer pays, from a level-0-only mosaic (the parent deletes the
    lower levels ingest built, then syncs the page cache):
    ``MosaicStore.rebuild_levels`` (every lower level recomputed from level 0
    on disk, phase ``levels``), then
    ``write_ome_tiff`` (phase ``tiff``). Throughput is level-0 Mpx per second
    of the two phases together.

Peak RSS is exact: each child reads its own ``VmHWM`` from /proc after each
phase, resetting it in between through ``/proc/self/clear_refs`` (so each
phase has its own peak); the parent also samples the child's RSS every 20 ms
with psutil and reaps it with ``os.wait4`` for the kernel's ``ru_maxrss``,
as cross-checks. ``baseline`` is the child's RSS after its imports
(interpreter, numpy, zarr, tifffile, ...), before any work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import Column, emit

DESCRIPTION = "pyramid + OME-TIFF writer: wall time, throughput and peak RSS per mosaic size"
MIB = 2**20
TEXTURE_PERIOD = 4096  # px: the synthetic texture repeats horizontally with this period


# --------------------------------------------------------------------- synthetic slide


def texture_block(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """An H&E-like RGB block: white glass, pink tissue, purple nuclei, sensor noise.

    The content matters for the measurement: JPEG time and size depend on
    detail, so flat or pure-noise images would flatter or punish the writer.
    """
    import cv2

    rng = np.random.default_rng(seed)

    def smooth(scale: int) -> np.ndarray:
        small = rng.random((rows // scale + 2, cols // scale + 2), dtype=np.float32)
        big = cv2.resize(small, (cols + 2 * scale, rows + 2 * scale), interpolation=cv2.INTER_CUBIC)
        return np.asarray(big[scale : scale + rows, scale : scale + cols])

    tissue = np.clip((smooth(256) - 0.35) * 8, 0, 1)[..., None]  # soft-edged tissue islands
    stroma = smooth(24)[..., None]
    nuclei = np.clip((smooth(6) - 0.72) * 6, 0, 1)[..., None] * tissue
    glass = np.array([242, 240, 245], np.float32)
    pink = np.array([232, 150, 196], np.float32) - 40 * stroma
    purple = np.array([90, 50, 140], np.float32)
    img = glass * (1 - tissue) + pink * tissue
    img = img * (1 - nuclei) + purple * nuclei
    img += rng.normal(0, 3.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


class SyntheticSlide:
    """Level-0 bands of a synthetic slide without ever holding the slide.

    One strip (band height x (width + period)) is made once; band i is a
    view into it at a per-band x offset, flipped vertically every other band,
    so neighbouring bands differ without generating new pixels.
    """

    def __init__(self, height: int, width: int, chunk: int, seed: int = 0) -> None:
        self.height, self.width, self.chunk = height, width, chunk
        block = texture_block(chunk, TEXTURE_PERIOD, seed)
        reps = -(-(width + TEXTURE_PERIOD) // TEXTURE_PERIOD)
        self._strip = np.tile(block, (1, reps, 1))

    def band(self, y0: int) -> np.ndarray:
        i = y0 // self.chunk
        n = min(self.chunk, self.height - y0)
        off = (i * 1237) % TEXTURE_PERIOD
        rows = self._strip[:n] if i % 2 == 0 else self._strip[n - 1 :: -1] if n else self._strip[:0]
        return rows[:, off : off + self.width]


# --------------------------------------------------------------------- measuring


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMeter:
    """Exact per-phase peak RSS of this process (Linux VmHWM, reset via clear_refs)."""

    def __init__(self) -> None:
        self.resettable = self.reset()

    @staticmethod
    def reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    @staticmethod
    def peak_mib() -> float:
        kib = _status_kib("VmHWM")
        if kib is None:  # not Linux: lifetime peak (KiB on Linux/BSD, bytes on macOS; good enough)
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib / 1024

    @staticmethod
    def rss_mib() -> float:
        kib = _status_kib("VmRSS")
        return (kib or 0) / 1024


def _phase(meter: PeakMeter, fn: Any) -> dict[str, float]:
    meter.reset()
    t0 = time.perf_counter()
    fn()
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": meter.peak_mib()}


# --------------------------------------------------------------------- child processes


def _child_ingest(a: argparse.Namespace) -> dict[str, Any]:
    from runtime.mosaic import MosaicStore

    meter = PeakMeter()
    startup_peak, baseline = meter.peak_mib(), meter.rss_mib()
    slide = SyntheticSlide(a.size, a.size, a.chunk)
    store = MosaicStore.create(
        a.mosaic,
        a.size,
        a.size,
        chunk=a.chunk,
        pixel_size_um=0.25,
        compressor=a.mosaic_compressor,
        min_level_size=a.min_level_size,
    )

    def ingest() -> None:
        for y0 in range(0, a.size, a.chunk):
            store.write_band(y0, slide.band(y0))
        store.finish()

    phases = {"ingest": _phase(meter, ingest)}
    return {
        "phases": phases,
        "baseline_rss_mib": baseline,
        "startup_peak_rss_mib": startup_peak,
        "levels": store.level_shapes,
        "peak_resettable": meter.resettable,
    }


def _child_writer(a: argparse.Namespace) -> dict[str, Any]:
    from runtime.mosaic import MosaicStore
    from runtime.ome_tiff import write_ome_tiff

    meter = PeakMeter()
    startup_peak, baseline = meter.peak_mib(), meter.rss_mib()
    store = MosaicStore.open(a.mosaic)
    summary: list[Any] = []
    phases = {
        "levels": _phase(meter, lambda: store.rebuild_levels(max_workers=a.max_workers)),
        "tiff": _phase(
            meter,
            lambda: summary.append(
                write_ome_tiff(
                    store,
                    Path(a.out),
                    tile=a.tile,
                    compression=a.compression,
                    jpeg_quality=a.quality,
                    max_workers=a.max_workers,
                    buffer_mib=a.buffer_mib,
                )
            ),
        ),
    }
    return {
        "phases": phases,
        "baseline_rss_mib": baseline,
        "startup_peak_rss_mib": startup_peak,
        "levels": [list(s) for s in summary[0].levels],
        "tiff_bytes": summary[0].bytes,
        "peak_resettable": meter.resettable,
    }


def _child_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["ingest", "writer"])
    p.add_argument("--mosaic", required=True)
    p.add_argument("--out", default="")
    p.add_argument("--size", type=int, required=True)
    for name in ("chunk", "tile", "quality", "max_workers", "buffer_mib", "min_level_size"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, required=True)
    p.add_argument("--compression", required=True)
    p.add_argument("--mosaic-compressor", required=True)
    a = p.parse_args(argv)
    result = _child_ingest(a) if a.role == "ingest" else _child_writer(a)
    # The last stdout line is the result; anything else goes to stderr.
    print(json.dumps(result), flush=True)
    return 0


def _run_child(role: str, args: list[str]) -> dict[str, Any]:
    """Run one measured child; add the parent's RSS samples and the kernel's ru_maxrss."""
    import psutil

    cmd = [sys.executable, "-m", "bench.writer", role, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        try:
            ps = psutil.Process(proc.pid)
            while not stop.is_set():
                samples.append(ps.memory_info().rss)
                stop.wait(0.02)
        except psutil.Error:
            pass  # the child exited between two samples

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    assert proc.stdout is not None
    out = proc.stdout.read()  # until the child closes stdout, i.e. exits
    # Reap it ourselves: wait4 gives this child's own rusage (not all children's).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {' '.join(cmd)} failed with exit code {proc.returncode}")
    lines = out.strip().splitlines()
    if not lines:
        raise RuntimeError(f"bench child {role} printed no result")
    result: dict[str, Any] = json.loads(lines[-1])
    result["sampled_peak_rss_mib"] = max(samples, default=0) / MIB
    # ru_maxrss is KiB on Linux; the clear_refs resets above may lower it to the last phase's peak.
    result["ru_maxrss_mib"] = usage.ru_maxrss / 1024
    return result


# --------------------------------------------------------------------- parent


def add_arguments(p: argparse.ArgumentParser) -> None:
    from runtime.config import MosaicConfig, WriterConfig

    w, m = WriterConfig(), MosaicConfig()
    p.add_argument("--size", type=int, default=16384, help="mosaic edge in px (square), default 16384")
    p.add_argument("--sizes", type=int, nargs="+", help="several sizes, e.g. 8192 16384 (overrides --size)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--workdir", type=Path, help="where mosaics and TIFFs go (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the mosaics and TIFFs")
    p.add_argument("--compression", default=w.compression, choices=["jpeg", "deflate", "zstd", "none"])
    p.add_argument("--quality", type=int, default=w.jpeg_quality)
    p.add_argument("--tile", type=int, default=w.tile)
    p.add_argument("--chunk", type=int, default=m.chunk)
    p.add_argument("--mosaic-compressor", default=m.compressor, choices=["zstd", "lz4", "none"])
    p.add_argument("--max-workers", type=int, default=w.max_workers)
    p.add_argument("--buffer-mib", type=int, default=w.buffer_mib)
    p.add_argument("--min-level-size", type=int, default=w.min_level_size)


def _one_size(size: int, a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    d = workdir / f"size-{size}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    mosaic, out = d / "mosaic.zarr", d / "slide.ome.tif"
    common = [
        f"--mosaic={mosaic}",
        f"--out={out}",
        f"--size={size}",
        f"--chunk={a.chunk}",
        f"--tile={a.tile}",
        f"--quality={a.quality}",
        f"--max-workers={a.max_workers}",
        f"--buffer-mib={a.buffer_mib}",
        f"--min-level-size={a.min_level_size}",
        f"--compression={a.compression}",
        f"--mosaic-compressor={a.mosaic_compressor}",
    ]
    try:
        ingest = _run_child("ingest", common)
        # The writer starts from a level-0-only mosaic: drop the levels ingest built.
        for k in range(1, len(ingest["levels"])):
            shutil.rmtree(mosaic / str(k) / "c", ignore_errors=True)
        # Flush what ingest left dirty in the page cache, so its write-back
        # does not land in the writer's timing (the data stays cached for reads).
        os.sync()
        writer = _run_child("writer", common)
        mosaic_bytes = sum(f.stat().st_size for f in mosaic.rglob("*") if f.is_file())
    finally:
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    mpx = size * size / 1e6
    w_phases = writer["phases"]
    w_seconds = sum(p["seconds"] for p in w_phases.values())
    return {
        "size": size,
        "megapixels": mpx,
        "levels": writer["levels"],
        "mosaic_bytes": mosaic_bytes,
        "tiff_bytes": writer["tiff_bytes"],
        "ingest": {
            "seconds": ingest["phases"]["ingest"]["seconds"],
            "mpx_per_s": mpx / ingest["phases"]["ingest"]["seconds"],
            "peak_rss_mib": max(ingest["phases"]["ingest"]["peak_rss_mib"], ingest["startup_peak_rss_mib"]),
            "baseline_rss_mib": ingest["baseline_rss_mib"],
            "sampled_peak_rss_mib": ingest["sampled_peak_rss_mib"],
            "ru_maxrss_mib": ingest["ru_maxrss_mib"],
        },
        "writer": {
            "seconds": w_seconds,
            "mpx_per_s": mpx / w_seconds,
            "peak_rss_mib": max(
                [p["peak_rss_mib"] for p in w_phases.values()] + [writer["startup_peak_rss_mib"]]
            ),
            "baseline_rss_mib": writer["baseline_rss_mib"],
            "sampled_peak_rss_mib": writer["sampled_peak_rss_mib"],
            "ru_maxrss_mib": writer["ru_maxrss_mib"],
            "phases": w_phases,
        },
        "peak_per_phase_exact": bool(ingest["peak_resettable"] and writer["peak_resettable"]),
    }


COLUMNS = [
    Column("size", "size px"),
    Column("n_levels", "levels"),
    Column("ingest_s", "ingest s", ".2f"),
    Column("ingest_mpx", "ingest Mpx/s", ".0f"),
    Column("ingest_peak", "ingest peak MiB", ".0f"),
    Column("levels_s", "levels s", ".2f"),
    Column("levels_peak", "levels peak MiB", ".0f"),
    Column("tiff_s", "tiff s", ".2f"),
    Column("tiff_peak", "tiff peak MiB", ".0f"),
    Column("writer_s", "writer s", ".2f"),
    Column("writer_mpx", "writer Mpx/s", ".0f"),
    Column("writer_peak", "writer peak MiB", ".0f"),
    Column("baseline", "baseline MiB", ".0f"),
    Column("tiff_mib", "TIFF MiB", ".0f"),
]


def _row(r: dict[str, Any]) -> dict[str, Any]:
    w, i = r["writer"], r["ingest"]
    return {
        "size": r["size"],
        "n_levels": len(r["levels"]),
        "ingest_s": i["seconds"],
        "ingest_mpx": i["mpx_per_s"],
        "ingest_peak": i["peak_rss_mib"],
        "levels_s": w["phases"]["levels"]["seconds"],
        "levels_peak": w["phases"]["levels"]["peak_rss_mib"],
        "tiff_s": w["phases"]["tiff"]["seconds"],
        "tiff_peak": w["phases"]["tiff"]["peak_rss_mib"],
        "writer_s": w["seconds"],
        "writer_mpx": w["mpx_per_s"],
        "writer_peak": w["peak_rss_mib"],
        "baseline": w["baseline_rss_mib"],
        "tiff_mib": r["tiff_bytes"] / MIB,
    }


def run(a: argparse.Namespace) -> int:
    import tifffile
    import zarr

    sizes = a.sizes or [a.size]
    if any(s < 16 for s in sizes):
        raise SystemExit("sizes must be >= 16 px")
    own_workdir = a.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench-writer-")) if own_workdir else Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = []
        for size in sizes:
            if not a.json:
                print(f"size {size} ...", file=sys.stderr, flush=True)
            results.append(_one_size(size, a, workdir))
    finally:
        if own_workdir and not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result: dict[str, Any] = {
        "bench": "writer",
        "config": {
            "compression": a.compression,
            "jpeg_quality": a.quality,
            "tile": a.tile,
            "chunk": a.chunk,
            "mosaic_compressor": a.mosaic_compressor,
            "max_workers": a.max_workers,
            "buffer_mib": a.buffer_mib,
            "min_level_size": a.min_level_size,
        },
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "tifffile": tifffile.__version__,
            "zarr": zarr.__version__,
            "numpy": np.__version__,
        },
        "workdir": str(workdir) if a.keep else None,
        "results": results,
    }
    cfg = result["config"]
    emit(
        result,
        [_row(r) for r in results],
        COLUMNS,
        as_json=a.json,
        title=(
            f"writer bench: {cfg['compression']} q{cfg['jpeg_quality']}, tile {cfg['tile']}, "
            f"{cfg['max_workers']} workers, buffer {cfg['buffer_mib']} MiB, {os.cpu_count()} CPUs"
        ),
        notes=[
            "ingest = write_band (level 0 + streaming pyramid); writer = levels (from level 0) + TIFF",
            "peak = exact VmHWM of the child process; baseline = its RSS after imports.",
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))
