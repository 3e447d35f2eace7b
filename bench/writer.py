"""Writer bench: pyramidal OME-TIFF from a large synthetic mosaic, against libvips on the same pixels.

For each size N (an N x N RGB mosaic) these child processes run, each measured
on its own (wall time, exact peak RSS):

``ingest``
    What the stitcher pays while scanning: synthetic level-0 bands through
    ``MosaicStore.write_band`` (whole-chunk Zarr writes plus the streaming
    pyramid), then ``finish``. Its RSS includes the generator's texture strip
    (one band + 4096 px wide).
``tiff``
    What the daemon's writer does: ``write_ome_tiff`` from the Zarr mosaic
    with its pyramid already built (during a scan the same work is spread
    over the scan; see ``bench e2e`` for that).
``tiff`` + each of ``--formats`` (``dicom``, ``ome-zarr``)
    The same job writing that format too, from the same stream (the daemon's
    ``writer.dicom`` / ``writer.ome_zarr``): its cost is the difference to
    ``tiff``, reported as the ratio of the two (wall and CPU) and both peaks.
``writer``
    The same job as libvips: the whole OME-TIFF pyramid from level 0 alone
    (the parent deletes the lower levels ingest built and syncs),
    ``write_ome_tiff_from_level0``: lower levels computed on the fly, tiles
    compressed by ``--max-workers`` threads. Throughput is level-0 Mpx/s.
``vips``
    ``vips tiffsave IN OUT --tile --tile-width T --tile-height T --pyramid
    --subifd --compression jpeg --Q N --bigtiff`` on level 0 of the same
    mosaic, exported once (not timed) to a tiled TIFF (``--vips-input``:
    uncompressed by default, so libvips pays no decoding while our writer
    decodes the Zarr chunks; ``zstd`` gives it the same codec as the
    mosaic). Skipped with a note when ``vips`` is not installed (Debian:
    ``apt-get install libvips-tools``).

JPEG settings are matched: same quality, and the chroma subsampling libvips
uses at that quality (libvips' tiffsave writes YCbCr 4:2:0 below Q 90 and
full-resolution RGB from Q 90 up; we then write YCbCr 4:4:4); the result
records what each file really holds, their sizes, and the PSNR of a sample of
level-0 tiles of each against the mosaic. Pyramid depth is matched too: by
default levels stop at one tile (``--min-level-size`` = tile), libvips'
``--depth onetile``.

Peak RSS is exact for our children: each reads its own ``VmHWM`` from /proc
after each phase (reset through ``/proc/self/clear_refs``); for every child,
libvips included, the parent also samples RSS every 20 ms with psutil and
reaps it with ``os.wait4`` for the kernel's ``ru_maxrss``. ``baseline`` is
our child's RSS after its imports (interpreter, numpy, zarr, tifffile, ...).
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
EXTRA_FORMATS = ("dicom", "ome-zarr")
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
    return np.asarray(np.clip(img, 0, 255).astype(np.uint8))


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
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    # process_time: user + system CPU of all this process's threads, during the phase only.
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "peak_rss_mib": meter.peak_mib(),
    }


# --------------------------------------------------------------------- child processes


def _child_ingest(a: argparse.Namespace) -> dict[str, Any]:
    from runtime.output.mosaic_store import MosaicStore

    meter = PeakMeter()
    startup_peak, baseline = meter.peak_mib(), meter.rss_mib()
    slide = SyntheticSlide(a.size, a.size, a.tile)
    store = MosaicStore.create(
        a.mosaic,
        a.size,
        a.size,
        chunk=a.tile,
        pixel_size_um=0.25,
        compressor=a.mosaic_compressor,
        min_level_size=a.min_level_size,
    )

    def ingest() -> None:
        for y0 in range(0, a.size, a.tile):
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


def _child_write(a: argparse.Namespace) -> dict[str, Any]:
    """``tiff`` (from the Zarr pyramid) or ``writer`` (from level 0 alone)."""
    from bench.level0_writer import write_ome_tiff_from_level0
    from runtime.output.mosaic_store import MosaicStore
    from runtime.output.ome_tiff import write_ome_tiff

    meter = PeakMeter()
    startup_peak, baseline = meter.peak_mib(), meter.rss_mib()
    store = MosaicStore.open(a.mosaic)
    summary: list[Any] = []
    out = Path(a.out)
    extra = out.with_name(out.name + (".dicom" if a.also == "dicom" else ".ome.zarr")) if a.also else None
    options: dict[str, Any] = {
        "compression": a.compression,
        "jpeg_quality": a.quality,
        "subsampling": (a.subsampling, a.subsampling),
        "max_workers": a.max_workers,
        "buffer_mib": a.buffer_mib,
    }

    def write() -> None:
        if a.role == "tiff":
            dicom, ngff = (extra, None) if a.also == "dicom" else (None, extra)
            summary.append(write_ome_tiff(store, out, tile=a.tile, dicom_out=dicom, ngff_out=ngff, **options))
        else:
            summary.append(write_ome_tiff_from_level0(store, Path(a.out), **options))

    phases = {a.role: _phase(meter, write)}
    return {
        "phases": phases,
        "baseline_rss_mib": baseline,
        "startup_peak_rss_mib": startup_peak,
        "levels": [list(s) for s in summary[0].levels],
        "tiff_bytes": summary[0].bytes,
        "extra_bytes": sum(f.stat().st_size for f in extra.rglob("*") if f.is_file()) if extra else None,
        "peak_resettable": meter.resettable,
    }


def _child_vips_input(a: argparse.Namespace) -> dict[str, Any]:
    """Level 0 of the mosaic as a plain tiled TIFF for libvips (not timed: it is the input)."""
    import tifffile

    from runtime.output.mosaic_store import MosaicStore

    store = MosaicStore.open(a.mosaic)
    h, w = store.shape
    t = store.chunk

    def tiles() -> Any:
        for i in range(-(-h // t)):
            for j in range(-(-w // t)):
                yield np.ascontiguousarray(store.read_chunk(0, i, j))

    codec: dict[str, Any] = {} if a.vips_input == "none" else {"compression": "zstd", "compressionargs": {"level": 1}}
    # metadata=None: no tifffile JSON description, which libvips would copy into its output.
    with tifffile.TiffWriter(a.out, bigtiff=True) as tif:
        tif.write(
            tiles(), shape=(h, w, 3), dtype=np.uint8, tile=(t, t), photometric="rgb",
            metadata=None, maxworkers=2, **codec,
        )  # fmt: skip
    return {"bytes": Path(a.out).stat().st_size}


def _child_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["ingest", "tiff", "writer", "vips-input"])
    p.add_argument("--mosaic", required=True)
    p.add_argument("--out", default="")
    p.add_argument("--size", type=int, required=True)
    for name in ("tile", "quality", "subsampling", "max_workers", "buffer_mib", "min_level_size"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, required=True)
    p.add_argument("--compression", required=True)
    p.add_argument("--mosaic-compressor", required=True)
    p.add_argument("--vips-input", required=True)
    p.add_argument("--also", choices=["", *EXTRA_FORMATS], default="")
    a = p.parse_args(argv)
    if a.role == "ingest":
        result = _child_ingest(a)
    elif a.role == "vips-input":
        result = _child_vips_input(a)
    else:
        result = _child_write(a)
    # The last stdout line is the result; anything else goes to stderr.
    print(json.dumps(result), flush=True)
    return 0


def _measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, float, float, float, float]:
    """Run ``cmd``; (stdout, wall s, psutil-sampled peak RSS MiB, kernel ru_maxrss MiB, CPU s) of that child alone.

    CPU seconds (user + system, all threads) are the figure that other load on
    the machine does not distort; wall time is what a user waits.
    """
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
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
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {' '.join(cmd)} failed with exit code {proc.returncode}")
    # ru_maxrss is KiB on Linux.
    return out, wall, max(samples, default=0) / MIB, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def _run_child(role: str, args: list[str]) -> dict[str, Any]:
    """Run one measured child of ours; add the parent's RSS samples and the kernel's ru_maxrss."""
    out, _, sampled, ru, cpu = _measure([sys.executable, "-m", "bench.writer", role, *args])
    lines = out.strip().splitlines()
    if not lines:
        raise RuntimeError(f"bench child {role} printed no result")
    result: dict[str, Any] = json.loads(lines[-1])
    result["sampled_peak_rss_mib"] = sampled
    # The clear_refs resets may lower ru_maxrss to the last phase's peak; VmHWM per phase is the exact figure.
    result["ru_maxrss_mib"] = ru
    result["cpu_seconds"] = cpu  # the whole child (imports and setup included)
    return result


# --------------------------------------------------------------------- libvips


def drop_page_cache() -> bool:
    """Sync, then drop the page cache (needs root); False where not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
            f.write("1")
        return True
    except OSError:
        return False


def vips_executable() -> str | None:
    return shutil.which("vips")


def vips_subsampling(quality: int) -> int:
    """The chroma subsampling libvips' tiffsave uses for JPEG at ``quality``: 2 (4:2:0) below 90, else 1."""
    return 2 if quality < 90 else 1


def _run_vips(src: Path, dst: Path, a: argparse.Namespace) -> dict[str, Any]:
    exe = vips_executable()
    assert exe is not None
    cmd = [exe, "tiffsave", str(src), str(dst), "--tile", "--tile-width", str(a.tile), "--tile-height", str(a.tile)]
    cmd += ["--pyramid", "--subifd", "--bigtiff", "--compression", a.compression]
    if a.compression == "jpeg":
        cmd += ["--Q", str(a.quality)]
    _, wall, sampled, ru, cpu = _measure(cmd)
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "command": " ".join(cmd),
        "version": version,
        "seconds": wall,
        "cpu_seconds": cpu,
        "peak_rss_mib": max(ru, sampled),
        "sampled_peak_rss_mib": sampled,
        "ru_maxrss_mib": ru,
        "tiff_bytes": dst.stat().st_size,
    }


def _tiff_facts(path: Path) -> dict[str, Any]:
    """Levels and JPEG colour layout of a pyramidal TIFF (main IFD + SubIFDs)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        facts: dict[str, Any] = {"levels": [list(lvl.shape[:2]) for lvl in tif.series[0].levels]}
        if page.compression == tifffile.COMPRESSION.JPEG:
            tif.filehandle.seek(page.dataoffsets[0])
            head = tif.filehandle.read(min(page.databytecounts[0], 4096))
            facts["jpeg"] = f"{tifffile.PHOTOMETRIC(page.photometric).name} {_jpeg_sampling(head)}"
    return facts


def _jpeg_sampling(jpeg: bytes) -> str:
    """'4:2:0' / '4:4:4' / ... from the SOF segment's first-component sampling factors."""
    i = 2
    while i + 4 < len(jpeg):
        marker, length = jpeg[i + 1], int.from_bytes(jpeg[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            h, v = jpeg[i + 11] >> 4, jpeg[i + 11] & 15
            return {(1, 1): "4:4:4", (2, 1): "4:2:2", (2, 2): "4:2:0"}.get((h, v), f"{h}x{v}")
        i += 2 + length
    return "?"


def _sample_psnr(mosaic: Path, tiff: Path, n: int = 24, seed: int = 0) -> float:
    """PSNR (dB) of ``n`` random level-0 tiles of ``tiff`` against the mosaic's pixels."""
    import tifffile

    from runtime.output.mosaic_store import MosaicStore

    store = MosaicStore.open(mosaic)
    h, w = store.shape
    t = store.chunk
    rng = np.random.default_rng(seed)
    err, count = 0.0, 0
    with tifffile.TiffFile(tiff) as tif:
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        across = -(-w // page.tilewidth)
        for _ in range(n):
            i, j = int(rng.integers(0, h // t)), int(rng.integers(0, w // t))
            idx = i * across + j
            tif.filehandle.seek(page.dataoffsets[idx])
            data = tif.filehandle.read(page.databytecounts[idx])
            # Not inlined: the first access to page.decode may move the file position.
            decoded, _, _ = page.decode(data, idx, jpegtables=page.jpegtables)
            assert decoded is not None
            got = np.asarray(decoded).reshape(t, t, 3).astype(np.float64)
            ref = store.read_chunk(0, i, j).astype(np.float64)
            err += float(((got - ref) ** 2).sum())
            count += ref.size
    return float(10 * np.log10(255.0**2 / max(err / count, 1e-12)))


# --------------------------------------------------------------------- parent


def add_arguments(p: argparse.ArgumentParser) -> None:
    from runtime.config import MosaicConfig, WriterConfig

    w, m = WriterConfig(), MosaicConfig()
    p.add_argument("--size", type=int, default=16384, help="mosaic edge in px (square), default 16384")
    p.add_argument("--sizes", type=int, nargs="+", help="several sizes, e.g. 16384 65536 (overrides --size)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--workdir", type=Path, help="where mosaics and TIFFs go (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the mosaics and TIFFs")
    p.add_argument("--compression", default=w.compression, choices=["jpeg", "deflate", "zstd", "none"])
    p.add_argument(
        "--quality",
        type=int,
        default=85,
        help="JPEG quality (default 85: below 90 libvips writes YCbCr 4:2:0 like us; from 90 it switches to "
        "RGB JPEG with luma tables on every channel, ~2x larger files, so settings are no longer equal)",
    )
    p.add_argument(
        "--subsampling",
        type=int,
        choices=[1, 2],
        default=None,
        help="our JPEG chroma subsampling (1: 4:4:4, 2: 4:2:0); default: what libvips uses at --quality",
    )
    p.add_argument("--tile", type=int, default=m.chunk, help="tile = mosaic chunk edge (px)")
    p.add_argument("--mosaic-compressor", default=m.compressor, choices=["zstd", "lz4", "none"])
    p.add_argument("--max-workers", type=int, default=w.max_workers)
    p.add_argument("--buffer-mib", type=int, default=w.buffer_mib)
    p.add_argument(
        "--min-level-size", type=int, default=None, help="pyramid floor (px); default: the tile, like libvips"
    )
    p.add_argument("--no-vips", action="store_true", help="skip the libvips comparison")
    p.add_argument(
        "--formats",
        nargs="+",
        choices=["ome-tiff", *EXTRA_FORMATS],
        default=["ome-tiff"],
        help="outputs of the from-pyr writer to measure: ome-tiff alone, and the OME-TIFF with each other "
        "format written from the same stream (e.g. --formats ome-tiff dicom)",
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before each timed child (needs root): inputs are read from disk, "
        "as for a mosaic larger than RAM",
    )
    p.add_argument(
        "--vips-input",
        choices=["none", "zstd"],
        default="none",
        help="libvips' input TIFF: uncompressed (default) or zstd level 1 like the mosaic",
    )


def _one_size(size: int, a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    d = workdir / f"size-{size}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    mosaic, out = d / "mosaic.zarr", d / "slide.ome.tif"
    tiff_out, vips_in, vips_out = d / "from-pyramid.ome.tif", d / "vips-input.tif", d / "vips.tif"
    common = [
        f"--mosaic={mosaic}",
        f"--size={size}",
        f"--tile={a.tile}",
        f"--quality={a.quality}",
        f"--subsampling={a.subsampling}",
        f"--max-workers={a.max_workers}",
        f"--buffer-mib={a.buffer_mib}",
        f"--min-level-size={a.min_level_size}",
        f"--compression={a.compression}",
        f"--mosaic-compressor={a.mosaic_compressor}",
        f"--vips-input={a.vips_input}",
    ]
    load_before = os.getloadavg()[0]

    def progress(msg: str) -> None:
        if not a.json:
            print(f"  {size}: {msg}", file=sys.stderr, flush=True)

    vips: dict[str, Any] | None = None
    try:
        progress("ingest (synthetic bands -> Zarr mosaic + pyramid)")
        ingest = _run_child("ingest", common)
        os.sync()
        progress("tiff (OME-TIFF from the Zarr pyramid: the daemon writer's job)")
        cold = a.cold and drop_page_cache()
        tiff = _run_child("tiff", [*common, f"--out={tiff_out}"])
        tiff_out.unlink()
        extras = {}
        for fmt in (f for f in a.formats if f != "ome-tiff"):
            os.sync()
            progress(f"tiff + {fmt} (the same stream writing {fmt} too)")
            cold = a.cold and drop_page_cache() and cold
            extra_out = d / f"from-pyramid-{fmt}.ome.tif"
            extras[fmt] = _run_child("tiff", [*common, f"--out={extra_out}", f"--also={fmt}"])
            for f in d.glob("from-pyramid-*"):
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        # The next writer starts from a level-0-only mosaic: drop the levels ingest built.
        for k in range(1, len(ingest["levels"])):
            shutil.rmtree(mosaic / str(k) / "c", ignore_errors=True)
        # Flush what earlier children left dirty in the page cache, so its write-back
        # does not land in the next timing (the data stays cached for reads).
        os.sync()
        progress("writer (OME-TIFF pyramid from level 0)")
        cold = a.cold and drop_page_cache() and cold
        writer = _run_child("writer", [*common, f"--out={out}"])
        mosaic_bytes = sum(f.stat().st_size for f in mosaic.rglob("*") if f.is_file())
        ours_facts = _tiff_facts(out)
        ours_psnr = _sample_psnr(mosaic, out) if a.compression == "jpeg" else None
        if not a.no_vips and vips_executable() is not None:
            progress(f"vips input ({a.vips_input} tiled TIFF of level 0, not timed)")
            vin = _run_child("vips-input", [*common, f"--out={vips_in}"])
            os.sync()
            progress("vips tiffsave")
            cold = a.cold and drop_page_cache() and cold
            vips = _run_vips(vips_in, vips_out, a)
            vips["input_bytes"] = vin["bytes"]
            vips.update(_tiff_facts(vips_out))
            vips["psnr_db"] = _sample_psnr(mosaic, vips_out) if a.compression == "jpeg" else None
    finally:
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    mpx = size * size / 1e6

    def summary(child: dict[str, Any], phase: str) -> dict[str, Any]:
        p = child["phases"][phase]
        return {
            "seconds": p["seconds"],
            "mpx_per_s": mpx / p["seconds"],
            "peak_rss_mib": max(p["peak_rss_mib"], child["startup_peak_rss_mib"]),
            "baseline_rss_mib": child["baseline_rss_mib"],
            "sampled_peak_rss_mib": child["sampled_peak_rss_mib"],
            "ru_maxrss_mib": child["ru_maxrss_mib"],
            "cpu_seconds": p["cpu_seconds"],
            "process_cpu_seconds": child["cpu_seconds"],  # with interpreter start and imports
        }

    result: dict[str, Any] = {
        "size": size,
        "megapixels": mpx,
        "levels": writer["levels"],
        "mosaic_bytes": mosaic_bytes,
        "tiff_bytes": writer["tiff_bytes"],
        "ingest": summary(ingest, "ingest"),
        "tiff": {**summary(tiff, "tiff"), "tiff_bytes": tiff["tiff_bytes"]},
        # Each extra format: the from-pyr job writing it too; ratios > 1: what it adds to the OME-TIFF's cost.
        "formats": {
            fmt: {
                **summary(child, "tiff"),
                "bytes": child["extra_bytes"],
                "wall_vs_tiff": child["phases"]["tiff"]["seconds"] / tiff["phases"]["tiff"]["seconds"],
                "cpu_vs_tiff": child["phases"]["tiff"]["cpu_seconds"] / tiff["phases"]["tiff"]["cpu_seconds"],
            }
            for fmt, child in extras.items()
        },
        "writer": {**summary(writer, "writer"), "jpeg": ours_facts.get("jpeg"), "psnr_db": ours_psnr},
        "vips": vips,
        "cold_cache": bool(a.cold and cold),
        # Other processes on the machine slow wall times (not CPU seconds): the 1-minute load around the run.
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "peak_per_phase_exact": bool(ingest["peak_resettable"] and writer["peak_resettable"]),
    }
    if vips is not None:
        vips["mpx_per_s"] = mpx / vips["seconds"]
        # Throughput ratio: > 1 means our writer is faster than libvips on the same pixels.
        result["throughput_vs_vips"] = vips["seconds"] / result["writer"]["seconds"]
        # The same from CPU seconds: what the machine's other load does not change.
        result["cpu_vs_vips"] = vips["cpu_seconds"] / result["writer"]["cpu_seconds"]
        if vips["levels"] != writer["levels"]:
            result["levels_note"] = f"libvips wrote levels {vips['levels']}, we wrote {writer['levels']}"
    return result


COLUMNS = [
    Column("size", "size px"),
    Column("n_levels", "levels"),
    Column("ingest_s", "ingest s", ".1f"),
    Column("ingest_peak", "ingest MiB", ".0f"),
    Column("tiff_s", "from-pyr s", ".2f"),
    Column("tiff_peak", "from-pyr MiB", ".0f"),
    Column("writer_s", "ours s", ".2f"),
    Column("writer_mpx", "ours Mpx/s", ".0f"),
    Column("writer_peak", "ours MiB", ".0f"),
    Column("vips_s", "vips s", ".2f"),
    Column("vips_mpx", "vips Mpx/s", ".0f"),
    Column("vips_peak", "vips MiB", ".0f"),
    Column("ratio", "ours/vips thrpt", ".2f"),
    Column("writer_cpu", "ours CPU s", ".1f"),
    Column("vips_cpu", "vips CPU s", ".1f"),
    Column("cpu_ratio", "ours/vips CPU", ".2f"),
    Column("tiff_mib", "ours TIFF MiB", ".0f"),
    Column("vips_mib", "vips TIFF MiB", ".0f"),
    Column("psnr", "ours dB", ".1f"),
    Column("vips_psnr", "vips dB", ".1f"),
]


def _row(r: dict[str, Any]) -> dict[str, Any]:
    w, i, t, v = r["writer"], r["ingest"], r["tiff"], r["vips"] or {}
    return {
        "size": r["size"],
        "n_levels": len(r["levels"]),
        "ingest_s": i["seconds"],
        "ingest_peak": i["peak_rss_mib"],
        "tiff_s": t["seconds"],
        "tiff_peak": t["peak_rss_mib"],
        "writer_s": w["seconds"],
        "writer_mpx": w["mpx_per_s"],
        "writer_peak": w["peak_rss_mib"],
        "vips_s": v.get("seconds"),
        "vips_mpx": v.get("mpx_per_s"),
        "vips_peak": v.get("peak_rss_mib"),
        "ratio": r.get("throughput_vs_vips"),
        "writer_cpu": w["cpu_seconds"],
        "vips_cpu": v.get("cpu_seconds"),
        "cpu_ratio": r.get("cpu_vs_vips"),
        "tiff_mib": r["tiff_bytes"] / MIB,
        "vips_mib": v["tiff_bytes"] / MIB if v else None,
        "psnr": w.get("psnr_db"),
        "vips_psnr": v.get("psnr_db"),
    }


def _format_columns(formats: Sequence[str]) -> list[Column]:
    cols = []
    for fmt in formats:
        cols += [
            Column(f"{fmt}_s", f"+{fmt} s", ".2f"),
            Column(f"{fmt}_peak", f"+{fmt} MiB", ".0f"),
            Column(f"{fmt}_wall", f"+{fmt}/from-pyr wall", ".2f"),
            Column(f"{fmt}_cpu", f"+{fmt}/from-pyr CPU", ".2f"),
        ]
    return cols


def _format_row(r: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for fmt, f in r["formats"].items():
        row |= {f"{fmt}_s": f["seconds"], f"{fmt}_peak": f["peak_rss_mib"]}
        row |= {f"{fmt}_wall": f["wall_vs_tiff"], f"{fmt}_cpu": f["cpu_vs_tiff"]}
    return row


def run(a: argparse.Namespace) -> int:
    import tifffile
    import zarr

    sizes = a.sizes or [a.size]
    if any(s < 16 for s in sizes):
        raise SystemExit("sizes must be >= 16 px")
    if a.min_level_size is None:
        a.min_level_size = a.tile  # libvips' default depth: down to a level that fits one tile
    if a.subsampling is None:
        a.subsampling = vips_subsampling(a.quality)
    own_workdir = a.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench-writer-")) if own_workdir else Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    vips_note = None
    if a.no_vips:
        vips_note = "libvips comparison skipped (--no-vips)"
    elif vips_executable() is None:
        vips_note = "libvips comparison skipped: `vips` not found (Debian: apt-get install libvips-tools)"
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
            "jpeg_subsampling": a.subsampling,
            "tile": a.tile,
            "mosaic_compressor": a.mosaic_compressor,
            "max_workers": a.max_workers,
            "buffer_mib": a.buffer_mib,
            "min_level_size": a.min_level_size,
            "vips_input": a.vips_input,
            "formats": a.formats,
        },
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "tifffile": tifffile.__version__,
            "zarr": zarr.__version__,
            "numpy": np.__version__,
        },
        "vips_note": vips_note,
        "workdir": str(workdir) if a.keep else None,
        "results": results,
    }
    cfg = result["config"]
    notes = [
        "ours = OME-TIFF pyramid from level 0 alone (libvips' job); from-pyr = from the Zarr pyramid (daemon writer).",
        "ours/vips thrpt = vips s / ours s (> 1: we are faster); ours/vips CPU = vips CPU s / ours CPU s "
        "(user + system, all threads; ours: the phase, without Python's start; libvips: the whole process; "
        "unaffected by other load). MiB = peak RSS of that process alone.",
        "dB = PSNR of 24 sampled level-0 tiles against the mosaic (equal settings -> similar values).",
        "page cache: "
        + ("dropped before each timed child (inputs read from disk)" if a.cold else "warm (inputs just written)"),
    ]
    if vips_note:
        notes.append(vips_note)
    else:
        v = next((r["vips"] for r in results if r["vips"]), None)
        if v is not None:
            notes.append(f"libvips: {v['version']}; its JPEG: {v.get('jpeg')}; ours: {results[0]['writer']['jpeg']}")
            notes.append(f"libvips input: {a.vips_input} tiled TIFF of level 0; ours: the {a.mosaic_compressor} Zarr")
    notes += [r["levels_note"] for r in results if "levels_note" in r]
    loads = ", ".join(f"{r['size']}: {r['load_avg_1min'][0]:.1f} -> {r['load_avg_1min'][1]:.1f}" for r in results)
    notes.append(f"1-min load average before -> after each size (other processes slow wall times): {loads}")
    extra_formats = [f for f in a.formats if f != "ome-tiff"]
    if extra_formats:
        notes.append(
            "+FMT = from-pyr writing FMT too from the same tiles; +FMT/from-pyr = its wall and CPU seconds "
            "over from-pyr's alone (1.0: free)."
        )
    emit(
        result,
        [_row(r) | _format_row(r) for r in results],
        COLUMNS + _format_columns(extra_formats),
        as_json=a.json,
        title=(
            f"writer bench: {cfg['compression']} q{cfg['jpeg_quality']} subsampling {cfg['jpeg_subsampling']}, "
            f"tile {cfg['tile']}, {cfg['max_workers']} workers, buffer {cfg['buffer_mib']} MiB, {os.cpu_count()} CPUs"
        ),
        notes=notes,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))
