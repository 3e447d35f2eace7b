"""End-to-end bench: a replayed scan through the real daemon, from the first tile to the closed OME-TIFF.

A synthetic recording (``--recording``, or synthesised here with
``--fields NX NY --tile T``: one z plane at the true focus, so that the
replay's cost is the runtime's, not the simulator's; the synthesis is timed
separately and is not part of the measurement) is scanned through the daemon
over its real sockets, as ``hw_sim replay`` does, while this process records
when each event arrives and watches the scan's journal and slide grow. Reported:

``last tile -> closed``
    From the last ``field_done`` event (the last tile captured; events reach
    us within the supervisor's 50 ms poll) to the OME-TIFF's last write
    (its mtime: the IFDs are written last, then the file is renamed).
    The writer streams during the scan, so this is the tail: the last bands,
    their lower levels, and the IFDs.
``Mpx/s``
    Mosaic megapixels over ``start_scan`` -> closed.
``steady Mpx/s``
    The rate at which tiles reach the mosaic on disk in the middle of the scan, without
    the start (spawning workers, the first row of tiles that no band can be written before)
    and the tail: mosaic megapixels per tile x (tiles between 20% and 80% of the scan's) /
    the time between the first moments 20% and 80% of the tiles were in mosaic rows on
    disk. A tile counts as *in the mosaic* once the journal's ``written`` record (level 0)
    covers its placed rows; the bench reads the journal as it grows, every 50 ms, so each
    time is late by up to that. The same rate over tiles captured (``field_done``) and
    placed (their final position known: the journal's ``placed``) is in the JSON.
``CPU-s, CPU-s/Gpx``
    Per process, from the scan's report (``cpu_seconds``: user + system of all its
    threads, each worker from its start to its done message; the supervisor over the
    job's life), per mosaic gigapixel. *daemon* is supervisor + stitcher + writer (+
    inference); acquisition is reported apart, split into the camera driver's captures
    (``driver_cpu_seconds``: for the replay driver, reading and decompressing the
    recording, which a camera that writes frames by DMA does not cost) and the rest
    (moves, focus, hand-over: the runtime's). A worker's figure includes its start: with the
    default ``daemon.worker_start = "forkserver"`` that is a fork of the daemon's fork server,
    which imported the workers' modules once when the daemon started (about 0.01 CPU-s per
    worker; the server's own CPU-seconds are in no process's figure here: the JSON's
    ``worker_server`` has them, from the report). With ``"spawn"`` it is a fresh interpreter and
    its imports, a fixed cost per scan that weighs on CPU-s/Gpx of a small scan:
    ``start_cpu_seconds_estimate`` is what importing each worker's modules costs a fresh
    interpreter (measured before the scan), so what a spawned worker pays, not a forked one
    (``worker_start`` in the JSON says which ran).
``--cores N``
    The daemon (supervisor and every worker it spawns) runs on N of this machine's cores
    (``sched_setaffinity`` before it is started, inherited by its children), the last N;
    this process on the others when there are any (else it shares them). The JSON says
    which cores each process was allowed (read back from the kernel during the scan).
``peak RSS``
    Of every process, from the scan's report.
``PSNR``
    Of the slide against ``hw_sim truth`` (the in-focus rendering of the
    scanned area), on ``--samples`` random 512 px windows (rendering the whole
    truth of a gigapixel slide would take longer than the scan): ``raw`` at the
    same pixel coordinates (includes any stitching misplacement); ``aligned``
    after undoing each window's measured shift (phase correlation), which
    isolates optics, noise and compression from placement; and ``jpeg``, the
    slide against the mosaic it was written from (compression alone). Against the
    truth, pixels no placed tile covers are left out: the mosaic's frame is the
    commanded area, and a field the stage put a few µm inward leaves a white strip
    along the area's edge that the scanner never imaged (``uncovered_fraction``:
    the share of the sampled pixels left out so).
    ``--samples 0`` skips it (a mosaic smaller than a window has none to sample).

With ``--plot DIR`` the table is drawn (bench.plots) and so is the timeline, tiles
captured / placed / in the mosaic and the slide's bytes against time (``e2e-timeline.png``).

``--profile DIR`` (py-spy installed apart: ``pip install py-spy``) samples the stitcher, the writer
and the supervisor from the first field to their exit: py-spy's collapsed Python stacks per process
(``DIR/<name>.txt``; ``--profile-native`` adds the C frames, pausing the process per sample) and,
where Linux ``perf`` is installed, its ``cpu-clock`` samples (``DIR/<name>.perf``). The JSON's
``profile`` gives per process the seconds by thread and the top functions (self and total) from
py-spy, and from perf the CPU-seconds by thread, library and native symbol. py-spy also samples a
thread that waits for a core on a loaded machine, so its seconds are wall time while runnable; perf
counts only time on a CPU (its total matches ``cpu_seconds``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import plots
from bench.report import Column, emit

DESCRIPTION = (
    "replayed scan through the daemon: last tile -> closed OME-TIFF, Mpx/s (overall, steady), "
    "CPU-s/Gpx and RSS per process, PSNR vs truth"
)
WINDOW = 512
INSET = 2  # px inside a placed tile's edge that count as covered (bench e2e's PSNR)
POLL_S = 0.05  # how often the journal and the slide are looked at during the scan
STEADY = (0.2, 0.8)  # the fractions of the tiles between which the rate is steady


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
    p.add_argument(
        "--frames",
        choices=["raw", "zstd"],
        default="raw",
        help="synthesis: how the recording stores its frames (raw: the replay driver reads them "
        "without decoding, as a camera's host gets them; zstd: decoded per field, ~3.5 ms per 1024 px frame)",
    )
    p.add_argument("--samples", type=int, default=48, help="random windows for the PSNR against truth (0: none)")
    p.add_argument("--sweep-steps", type=int, default=3, help="contrast-sweep captures per field (minimum 3)")
    p.add_argument(
        "--mosaic-compressor",
        choices=["zstd", "lz4", "none"],
        default=None,
        help="the working mosaic's chunk codec (mosaic.compressor; default: the config's)",
    )
    p.add_argument(
        "--stitch-backend", choices=["cpu", "cupy", "auto"], default=None, help="stitch.backend (default: the config's)"
    )
    p.add_argument(
        "--cores", type=int, metavar="N", help="run the daemon on N cores (the last N; this process on the others)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample the stitcher, writer and supervisor with py-spy (installed apart: pip install py-spy) from the "
        "first field to their exit; collapsed stacks per process in DIR (<name>.txt), their top functions in the JSON",
    )
    p.add_argument(
        "--profile-native", action="store_true", help="--profile with C frames (pauses each process per sample)"
    )


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
    synthesize(path, params, overwrite=True, progress=not a.json, compress=a.frames == "zstd")
    return time.perf_counter() - t0


def _recording_facts(recording: Path) -> tuple[str, int]:
    """(how the recording stores its frames, its z planes): the replay driver's cost per field
    depends on the first; focus is only measured when there is more than one plane."""
    from runtime.devices.recording import Recording

    rec = Recording.open(recording)
    return rec.frames_codec, rec.meta.n_z


def split_cores(n: int, available: set[int]) -> tuple[set[int], set[int]]:
    """(the daemon's cores, this process's): the last ``n`` of ``available`` for the daemon, the
    rest for the bench (all of them, shared, when none are left). ValueError if ``n`` is not
    between 1 and the number of cores available."""
    cores = sorted(available)
    if not 1 <= n <= len(cores):
        raise ValueError(f"--cores {n}: this process may use {len(cores)} cores ({cores})")
    daemon = set(cores[-n:])
    return daemon, (set(cores) - daemon) or set(cores)


@contextmanager
def _pinned(cores: set[int] | None) -> Iterator[None]:
    """Run the block (which starts the daemon) on ``cores``: a process started there inherits them."""
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@dataclass
class Timeline:
    """When tiles were captured, placed and in the mosaic, and the slide's size, during a scan.

    Read from outside the daemon, as a client could: the ``field_done`` events, and the
    scan's journal (``placed``, ``written``) and partial slide as they grow (:meth:`poll`).
    Each time is when this process saw it: at most a poll (``POLL_S``) late during the scan, and
    what the last poll finds is timed at ``scan_finished`` (after the slide closed)."""

    folder: Path
    t0: float
    captured: list[float] = field(default_factory=list)  # seconds since t0, one per field_done
    placed: list[float] = field(default_factory=list)
    in_mosaic: list[float] = field(default_factory=list)
    slide_bytes: list[tuple[float, int]] = field(default_factory=list)
    _offset: int = 0
    _tile_h: int = 0
    _bottoms: list[int] = field(default_factory=list)  # each placed tile's bottom row, not yet in the mosaic

    def poll(self, now: float) -> None:
        t = now - self.t0
        self._read_journal(t)
        from runtime.output.ome_tiff import partial_path

        slide = self.folder / "slide.ome.tif"
        for path in (partial_path(slide), slide):
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if not self.slide_bytes or self.slide_bytes[-1][1] != size:
                self.slide_bytes.append((t, size))
            break

    def _read_journal(self, t: float) -> None:
        from runtime.output.journal import JOURNAL_NAME

        try:
            with open(self.folder / JOURNAL_NAME, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # whole lines only: the stitcher may be writing the next
        self._offset += end
        for line in data[:end].splitlines():
            rec = json.loads(line)
            kind = rec.get("kind")
            if kind == "scan":
                self._tile_h = int(rec["frame_shape"][0])
            elif kind == "placed":
                self.placed.append(t)
                self._bottoms.append(int(rec["iy"]) + self._tile_h)
            elif kind == "written" and rec.get("level", 0) == 0:
                rows = int(rec["rows"])
                done = [b for b in self._bottoms if b <= rows]
                self.in_mosaic += [t] * len(done)
                self._bottoms = [b for b in self._bottoms if b > rows]

    def close(self, closed: float) -> None:
        """The slide was closed at ``closed`` (its mtime): the tiles of the mosaic's last rows, which
        the stitcher finishes without a ``written`` record, were in the mosaic by then."""
        self.in_mosaic += [closed - self.t0] * len(self._bottoms)
        self._bottoms = []


def steady_rate(times: list[float], total: int, mpx_per_tile: float) -> float | None:
    """Mosaic Mpx/s between the first moments :data:`STEADY` fractions of ``total`` tiles were done;
    None when too few tiles or no time between them."""
    lo, hi = (max(1, round(f * total)) for f in STEADY)
    if total < 3 or len(times) < hi or hi <= lo:
        return None
    ts = sorted(times)
    dt = ts[hi - 1] - ts[lo - 1]
    return (hi - lo) * mpx_per_tile / dt if dt > 0 else None


PINNED = {"bench", "supervisor", "acquisition", "stitcher", "writer"}  # whose cores the JSON says (at least)


def _affinity(client: Any, daemon_pid: int | None) -> dict[str, list[int]]:
    """The cores each process of the daemon may run on, as the kernel has them now."""
    pids: dict[str, int] = dict(client.request("status").get("workers") or {})
    if daemon_pid is not None:
        pids = {"supervisor": daemon_pid, **pids}
    out = {"bench": sorted(os.sched_getaffinity(0))}
    for name, pid in pids.items():
        try:
            out[name] = sorted(os.sched_getaffinity(pid))
        except OSError:  # exited meanwhile
            continue
    return out


PROFILED = ("stitcher", "writer", "supervisor")


class Profiler:
    """``py-spy record`` on the daemon's processes (``--profile``): started once their pids are known
    (the first field), each ends when its process does and leaves collapsed stacks (``<name>.txt``:
    ``frame;frame;... samples``, threads as the first frame) in ``folder``. Sampled at ``rate`` Hz
    without stopping the process (``--nonblocking``), or with the C frames (``native``: py-spy then
    pauses the process for each sample); idle threads are not sampled, so a process's samples / rate
    approximates its CPU-seconds."""

    def __init__(self, folder: Path, rate: int = 97, native: bool = False) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(exe).exists():
            raise SystemExit("--profile needs py-spy: pip install py-spy")
        self.exe, self.folder, self.rate, self.native = exe, folder, rate, native
        folder.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, Any] = {}
        self.perf = shutil.which("perf")  # Linux perf, where installed

    def start(self, pids: dict[str, int]) -> None:
        import subprocess

        for name in PROFILED:
            pid = pids.get(name)
            if pid is None or name in self.procs:
                continue
            out = self.folder / f"{name}.txt"
            cmd = [self.exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--threads", "--format", "raw"]
            # --native (C frames: OpenCV, numpy, codecs) must stop the process for each sample
            cmd += ["--native"] if self.native else ["--nonblocking"]
            cmd += ["-o", str(out)]
            self.procs[name] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self.perf is not None:
                # perf's cpu-clock samples only a thread on a CPU: the CPU-seconds by thread and native symbol
                # (py-spy also samples threads that wait their turn for a core on a loaded machine).
                rec = [self.perf, "record", "-e", "cpu-clock", "-F", str(PERF_HZ), "-p", str(pid)]
                rec += ["-o", str(self.folder / f"{name}.perf")]
                self.procs[f"{name}.perf"] = subprocess.Popen(rec, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finish(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait for every recorder; the top functions of each process (:func:`top_functions`)."""
        out: dict[str, Any] = {}
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout_s)
            except Exception:
                proc.terminate()
                proc.wait(10)
            path = self.folder / f"{name}.txt"
            if path.exists():
                out[name] = top_functions(path.read_text(), self.rate)
        for name in PROFILED:
            data = self.folder / f"{name}.perf"
            if self.perf is None or not data.exists() or name not in out:
                continue
            import subprocess

            script = subprocess.run(
                [self.perf, "script", "-i", str(data), "-F", "tid,ip,sym,dso"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            tids = thread_names((self.folder / f"{name}.txt").read_text())
            out[name]["perf"] = perf_summary(script, tids, PERF_HZ)
        return out


PERF_HZ = 499


def thread_names(collapsed: str) -> dict[str, str]:
    """Native thread id -> Python thread name, from py-spy's ``thread (TID): NAME`` first frames."""
    out = {}
    for line in collapsed.splitlines():
        head = line.split(";", 1)[0]
        if head.startswith("thread (") and "): " in head:
            tid, _, name = head[len("thread (") :].partition("): ")
            out[tid] = name.rsplit(" ", 1)[0] if name.rsplit(" ", 1)[-1].isdigit() else name
    return out


def perf_summary(script: str, tids: dict[str, str], hz: int, n: int = 25) -> dict[str, Any]:
    """``perf script -F tid,ip,sym,dso`` lines (one per cpu-clock sample) -> CPU-seconds per thread (named by
    ``tids``; OpenCV's and other native pools unnamed) and per native symbol (with its library)."""
    threads: Counter[str] = Counter()
    syms: Counter[str] = Counter()
    libs: Counter[str] = Counter()
    samples = 0
    for line in script.splitlines():
        parts = line.split(None, 2)  # tid, ip, "symbol (library)"
        if not parts or not parts[0].isdigit():
            continue
        samples += 1
        threads[tids.get(parts[0], "native/other")] += 1
        rest = parts[2] if len(parts) > 2 else "[unknown]"
        sym, _, lib = rest.rpartition(" (")
        lib = Path(lib.rstrip(")")).name
        syms[f"{sym or '[unknown]'} ({lib})"] += 1
        libs[lib] += 1

    return {
        "seconds": round(samples / hz, 2),
        "threads": _top(threads, hz, samples, n),
        "libraries": _top(libs, hz, samples, n),
        "symbols": _top(syms, hz, samples, n),
    }


def _top(counts: Counter[str], rate: float, samples: int, n: int) -> list[list[Any]]:
    """The ``n`` largest of ``counts`` (samples at ``rate`` per second) as [name, seconds, share of ``samples``]."""
    return [[k, round(v / rate, 2), round(v / max(samples, 1), 3)] for k, v in counts.most_common(n)]


def _frame_name(frame: str) -> str:
    """``fn (path/to/module.py:123)`` -> ``fn (module.py)``: one entry per function, not per line."""
    fn, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    return f"{fn} ({Path(file).name})" if file else fn


def top_functions(collapsed: str, rate: int, n: int = 25) -> dict[str, Any]:
    """From py-spy's collapsed stacks: samples (as seconds at ``rate``) per thread, and the ``n`` functions with
    the most samples on top of the stack (self) and anywhere in it (total), each as seconds and share."""
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = stack.split(";")
        samples += k
        threads[frames[0].split("): ", 1)[-1].rstrip("0123456789").rstrip("_") or frames[0]] += k
        names = [_frame_name(f) for f in frames[1:]] or [frames[0]]
        own[names[-1]] += k
        for name in set(names):
            total[name] += k

    return {
        "seconds": round(samples / rate, 2),
        "threads": _top(threads, rate, samples, n),
        "self": _top(own, rate, samples, n),
        "total": _top(total, rate, samples, n),
    }


def _scan(
    recording: Path, out: Path, config: Path, cores: int | None, profiler: Profiler | None = None
) -> dict[str, Any]:
    """Replay ``recording`` through a daemon child; returns the report plus event arrival times."""
    from hw_sim.replay_job import _replay_config, add_truth
    from runtime.config import load_config
    from runtime.control.client import ControlClient, EventSubscriber
    from runtime.daemon.process import start_daemon_process
    from runtime.devices.recording import Recording

    rec = Recording.open(recording)
    daemon_cores, bench_cores = split_cores(cores, os.sched_getaffinity(0)) if cores else (None, None)
    own_cores = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory(prefix="wsi-e2e-") as runtime_dir:
        cfg = _replay_config(load_config(config), recording.resolve(), out, Path(runtime_dir))
        with _pinned(daemon_cores):
            daemon = start_daemon_process(cfg)
        if bench_cores is not None:
            os.sched_setaffinity(0, bench_cores)
        client = ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=15)
        events = EventSubscriber(cfg.endpoint("event"))
        times: dict[str, float] = {}
        affinity: dict[str, list[int]] = {}
        affinity_reads = 0
        try:
            client.request("ping")
            time.sleep(0.2)  # ZeroMQ slow joiner: let the subscription reach the PUB socket
            times["start"] = time.time()
            timeline = Timeline(out, times["start"])
            scan_id = client.request("start_scan", output_name=out.name)["scan_id"]
            deadline = time.monotonic() + 7200
            next_poll = 0.0
            while time.monotonic() < deadline:
                ev = events.recv(timeout_s=POLL_S)
                now = time.time()
                if now >= next_poll:
                    timeline.poll(now)
                    next_poll = now + POLL_S
                if ev is None:
                    if not daemon.is_alive():
                        raise RuntimeError("the daemon exited during the scan")
                    continue
                kind = ev.get("event")
                if not set(affinity) >= PINNED and affinity_reads < 50:
                    # At every event until each worker was seen running: on a short scan with workers forked from
                    # a server the acquisition may be done and gone before the bench hears of its first field.
                    affinity = {**_affinity(client, daemon.pid), **affinity}
                    affinity_reads += 1
                if kind == "field_done":
                    times.setdefault("first_field", now)
                    times["last_field"] = now
                    timeline.captured.append(now - times["start"])
                    if profiler is not None and not profiler.procs:  # every worker is running by now
                        pids: dict[str, int] = dict(client.request("status").get("workers") or {})
                        if daemon.pid is not None:
                            pids["supervisor"] = daemon.pid
                        profiler.start(pids)
                elif kind == "state" and ev["data"].get("state") == "writing":
                    times.setdefault("writing", now)
                elif kind == "scan_finished" and ev["data"].get("scan_id") == scan_id:
                    times["finished"] = now
                    timeline.poll(now)
                    break
            else:
                raise RuntimeError("scan did not finish within 2 h")
        finally:
            os.sched_setaffinity(0, own_cores)
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
    report["_timeline"] = timeline
    # A worker that was gone before the bench could ask (the acquisition of a short scan): the cores the
    # supervisor read when it started it.
    report["_affinity"] = {**(report.get("worker_cores") or {}), **affinity}
    return report


def _psnr(mse: float) -> float:
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def covered(positions: list[dict[str, Any]], tile_hw: tuple[int, int], row0: int, col0: int, size: int) -> np.ndarray:
    """(size, size) bool: which pixels of the window at mosaic (row0, col0) lie inside a placed tile.

    The mosaic's frame is the commanded scan area; a field the stage put a few µm off leaves a
    strip along the area's edge that no tile imaged (the stitcher leaves it white), while
    the truth shows the slide there. Those pixels say nothing about the image and are left out
    (``INSET`` px more, for the blend's and the subpixel shift's edge).
    """
    th, tw = tile_hw
    mask = np.zeros((size, size), bool)
    for p in positions:
        y0, x0 = math.ceil(p["y_px"]) + INSET - row0, math.ceil(p["x_px"]) + INSET - col0
        y1, x1 = math.floor(p["y_px"]) + th - INSET - row0, math.floor(p["x_px"]) + tw - INSET - col0
        if y1 > 0 and x1 > 0 and y0 < size and x0 < size:
            mask[max(y0, 0) : min(y1, size), max(x0, 0) : min(x1, size)] = True
    return mask


def _quality(
    recording: Path,
    slide: Path,
    mosaic: Path | None,
    samples: int,
    seed: int,
    positions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """PSNR of random slide windows against the truth (raw and shift-compensated) and against the mosaic.

    ``positions``: the report's placed tiles (``stitch.positions``); pixels outside every tile
    are not compared with the truth (:func:`covered`).
    """
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
    tile_hw = (rec.meta.tile_height, rec.meta.tile_width)
    n_uncovered = n_inner = 0
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
            if store is not None:
                ref = store.read_chunk(0, i, j)
                jpeg_se += float(((got.astype(np.float64) - ref) ** 2).sum())
                n_jpeg += got.size
            truth = renderer.render(i * t, j * t)
            inner = np.zeros((t, t), bool)
            inner[e : t - e, e : t - e] = True
            if positions is not None:
                cover = covered(positions, tile_hw, i * t, j * t, t)
                n_uncovered += int((inner & ~cover).sum())
                n_inner += int(inner.sum())
                inner &= cover
            if not inner.any():
                continue
            n = int(inner.sum()) * 3
            se = float(((got[inner].astype(np.float64) - truth[inner]) ** 2).sum())
            raw_se += se
            n_px += n
            per_window.append(_psnr(se / n))
            a = cv2.cvtColor(got, cv2.COLOR_RGB2GRAY).astype(np.float32)
            b = cv2.cvtColor(truth, cv2.COLOR_RGB2GRAY).astype(np.float32)
            (dx, dy), response = cv2.phaseCorrelate(b, a, cv2.createHanningWindow((t, t), cv2.CV_32F))
            if response >= 0.3:  # enough structure to measure a shift
                shifts.append(float(np.hypot(dx, dy)))
                shift = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float32)
                moved = cv2.warpAffine(truth, shift, (t, t), flags=cv2.INTER_LINEAR)
                # The warp fills what it shifted in with black: keep that out too.
                m = math.ceil(max(abs(dx), abs(dy))) + 1
                keep = inner.copy()
                if m > e:
                    keep[:m] = keep[t - m :] = False
                    keep[:, :m] = keep[:, t - m :] = False
                aligned_se += float(((got[keep].astype(np.float64) - moved[keep]) ** 2).sum())
                n_aligned += int(keep.sum()) * 3
    return {
        "samples": samples,
        "psnr_raw_db": _psnr(raw_se / n_px) if n_px else None,
        "psnr_raw_median_window_db": float(np.median(per_window)) if per_window else None,
        "psnr_raw_min_window_db": float(np.min(per_window)) if per_window else None,
        "uncovered_fraction": n_uncovered / n_inner if n_inner else None,
        "psnr_aligned_db": _psnr(aligned_se / n_aligned) if n_aligned else None,
        "aligned_windows": len(shifts),
        "shift_px_median": float(np.median(shifts)) if shifts else None,
        "shift_px_max": float(np.max(shifts)) if shifts else None,
        "psnr_jpeg_vs_mosaic_db": _psnr(jpeg_se / n_jpeg) if n_jpeg else None,
    }


COLUMNS = [
    Column("cores", "cores"),
    Column("mpx", "mosaic Mpx", ".0f"),
    Column("fields", "fields"),
    Column("scan_s", "start->closed s", ".1f"),
    Column("tail_s", "last tile->closed s", ".2f"),
    Column("mpx_s", "Mpx/s", ".1f"),
    Column("steady", "steady Mpx/s", ".1f"),
    Column("daemon_gpx", "daemon CPU-s/Gpx", ".1f"),
    Column("acq_gpx", "acq. runtime CPU-s/Gpx", ".1f"),
    Column("driver_gpx", "replay driver CPU-s/Gpx", ".1f"),
    Column("psnr_raw", "PSNR raw dB", ".1f"),
    Column("psnr_aligned", "aligned dB", ".1f"),
    Column("psnr_jpeg", "vs mosaic dB", ".1f"),
]

DAEMON = ("supervisor", "stitcher", "writer", "inference")
"""The daemon's processes in ``daemon CPU-s/Gpx``; acquisition (camera and focus) is apart, and so
is the slide analysis worker when ``[analysis]`` is enabled (a product of its own, not the scan's)."""


WORKER_IMPORTS = {
    "acquisition": ("runtime.workers.acquisition", "hw_sim.replay"),
    "stitcher": ("runtime.workers.stitcher",),
    "writer": ("runtime.workers.writer",),
}
"""What each worker imports before its first tile (its entry point's module; acquisition also the
replay driver's)."""


def start_cpu_seconds() -> dict[str, float]:
    """CPU seconds of a fresh interpreter importing what each worker imports: the fixed start-up
    cost inside every worker's ``cpu_seconds``, paid once per scan whatever its size. Measured in
    separate processes, before the scan, so an estimate (the worker also unpickles its arguments)."""
    import subprocess

    out = {}
    for worker, modules in WORKER_IMPORTS.items():
        code = (
            f"import resource, {', '.join(modules)}\n"
            "r = resource.getrusage(resource.RUSAGE_SELF)\nprint(r.ru_utime + r.ru_stime)"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        out[worker] = round(float(proc.stdout), 3)
    return out


def cpu_figures(report: dict[str, Any], mpx: float) -> dict[str, Any]:
    """CPU seconds per process and per mosaic gigapixel (see the module docstring)."""
    cpu: dict[str, float] = dict(report.get("cpu_seconds") or {})
    driver = report.get("driver_cpu_seconds")
    gpx = mpx / 1000
    if "acquisition" in cpu and driver is not None:
        cpu["acquisition.driver"] = driver
        cpu["acquisition.runtime"] = cpu["acquisition"] - driver
    daemon = sum(v for k, v in cpu.items() if k in DAEMON)
    return {
        "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
        "cpu_seconds_per_gpx": {k: round(v / gpx, 2) for k, v in cpu.items()},
        "daemon_cpu_seconds": round(daemon, 3),
        "daemon_cpu_seconds_per_gpx": round(daemon / gpx, 2),
    }


def _timeline_figures(tl: Timeline, tiles: int, mpx: float) -> dict[str, Any]:
    per_tile = mpx / max(tiles, 1)
    steady = {
        name: steady_rate(times, tiles, per_tile)
        for name, times in (("captured", tl.captured), ("placed", tl.placed), ("in_mosaic", tl.in_mosaic))
    }
    return {
        "steady_mpx_per_s": steady["in_mosaic"],
        "steady_mpx_per_s_by_stage": steady,
        "steady_between": list(STEADY),
        "timeline": {
            "captured_s": [round(t, 3) for t in tl.captured],
            "placed_s": [round(t, 3) for t in tl.placed],
            "in_mosaic_s": [round(t, 3) for t in tl.in_mosaic],
            "slide_bytes": [[round(t, 3), b] for t, b in tl.slide_bytes],
        },
    }


def _draw_timeline(result: dict[str, Any]) -> None:
    tl = result["timeline"]

    def counts(times: list[float]) -> list[tuple[float, float]]:
        return [(0.0, 0.0)] + [(t, float(i + 1)) for i, t in enumerate(sorted(times))]

    cores = f", daemon on {result['cores']} cores" if result["cores"] else ""
    plots.timeline(
        "timeline",
        {
            "captured (field_done)": counts(tl["captured_s"]),
            "placed (final position)": counts(tl["placed_s"]),
            "in the mosaic (rows written)": counts(tl["in_mosaic_s"]),
        },
        ylabel="tiles",
        secondary=("OME-TIFF written (MiB)", [(t, b / 2**20) for t, b in tl["slide_bytes"]]),
        marks={"closed": result["start_to_closed_s"]},
        title=f"e2e: {result['fields']} tiles, {result['megapixels']:.3g} Mpx{cores}",
    )


def run(a: argparse.Namespace) -> int:
    if a.sweep_steps < 3:
        raise SystemExit("--sweep-steps must be >= 3 (the config's minimum)")
    if a.samples < 0:
        raise SystemExit("--samples must be >= 0")
    if a.cores is not None:
        try:
            split_cores(a.cores, os.sched_getaffinity(0))
        except ValueError as err:
            raise SystemExit(str(err)) from None
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
            + (f'compressor = "{a.mosaic_compressor}"\n' if a.mosaic_compressor else "")
            + (f'\n[stitch]\nbackend = "{a.stitch_backend}"\n' if a.stitch_backend else "")
        )
        start_cpu = start_cpu_seconds()
        profiler = Profiler(a.profile, native=a.profile_native) if a.profile else None
        report = _scan(recording, out, config, a.cores, profiler)
        profile = profiler.finish() if profiler is not None else None
        times = report["_times"]
        slide = Path(report["slide"])
        closed = slide.stat().st_mtime
        report["_timeline"].close(closed)
        h, w = report["levels"][0]
        mpx = h * w / 1e6
        positions = report.get("stitch", {}).get("positions")
        quality = _quality(recording, slide, out / "mosaic.zarr", a.samples, a.seed, positions) if a.samples else None
        frames_codec, n_planes = _recording_facts(recording)
        result: dict[str, Any] = {
            "bench": "e2e",
            "recording": str(recording),
            "synth_seconds": synth_s,
            "recording_frames": frames_codec,
            "cores": a.cores,
            "affinity": report["_affinity"],
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
            **cpu_figures(report, mpx),
            "start_cpu_seconds_estimate": start_cpu,
            "worker_start": report.get("worker_start"),
            "worker_server": report.get("worker_server"),
            "peak_rss_mib": report["peak_rss_mib"],
            # A one-plane recording (the default here) returns the same frame at every z: focus is not
            # measured, and the report's focus error vs truth would be meaningless.
            "focus_truth": report.get("focus_truth") if n_planes > 1 else None,
            "simulated_scan_time_s": report.get("simulated_scan_time_s"),
            "quality": quality,
            "stitch_backend": report.get("stitch", {}).get("backend"),
            "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
            **_timeline_figures(report["_timeline"], report["fields_done"], mpx),
        }
        if profile is not None:
            result["profile"] = profile
    finally:
        if not a.keep and own:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not a.keep:
            # Only what this run made: a recording given with --recording is never touched.
            if a.recording is None:
                shutil.rmtree(workdir / "recording.zarr", ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            config.unlink(missing_ok=True)
    per_gpx = result["cpu_seconds_per_gpx"]
    q = quality or {}
    row = {
        "cores": a.cores or "all",
        "mpx": mpx,
        "fields": result["fields"],
        "scan_s": result["start_to_closed_s"],
        "tail_s": result["last_tile_to_closed_s"],
        "mpx_s": result["mpx_per_s"],
        "steady": result["steady_mpx_per_s"],
        "daemon_gpx": result["daemon_cpu_seconds_per_gpx"],
        "acq_gpx": per_gpx.get("acquisition.runtime"),
        "driver_gpx": per_gpx.get("acquisition.driver"),
        "psnr_raw": q.get("psnr_raw_db"),
        "psnr_aligned": q.get("psnr_aligned_db"),
        "psnr_jpeg": q.get("psnr_jpeg_vs_mosaic_db"),
    }
    cpu = result["cpu_seconds"]
    notes = [
        f"mosaic {h} x {w}, {len(result['levels'])} levels, slide {result['slide_bytes'] / 2**20:.0f} MiB; "
        f"{result['captures']} captures; synthesis {synth_s or 0:.0f} s (not measured)",
        "CPU-s (CPU-s/Gpx) per process: "
        + ", ".join(f"{k} {v:.2f} ({per_gpx[k]:.1f})" for k, v in cpu.items() if k != "acquisition"),
        (
            "workers forked from the fork server (its imports, once per daemon, in no figure above); a spawned "
            "worker's imports would cost: "
            if result["worker_start"] == "forkserver"
            else "of which start-up (importing the worker's modules, measured apart): "
        )
        + ", ".join(f"{k} {v:.2f} ({v / (mpx / 1000):.1f})" for k, v in start_cpu.items()),
        "peak RSS MiB per process: " + ", ".join(f"{k} {v:.0f}" for k, v in result["peak_rss_mib"].items()),
        "steady Mpx/s: tiles into the mosaic between "
        + " and ".join(f"{f:.0%}" for f in STEADY)
        + " of the scan's; captured "
        + ", placed ".join(
            "-" if v is None else f"{v:.1f}"
            for v in (result["steady_mpx_per_s_by_stage"]["captured"], result["steady_mpx_per_s_by_stage"]["placed"])
        ),
        "daemon cores: "
        + (
            ", ".join(f"{k} {v}" for k, v in result["affinity"].items())
            if a.cores
            else f"all {len(os.sched_getaffinity(0))}"
        ),
        "last tile -> scan_finished event (report written, workers joined): "
        f"{result['last_tile_to_scan_finished_s']:.2f} s",
    ]
    if quality is not None:
        notes.append(
            f"PSNR over {q['samples']} random {WINDOW} px windows; raw: same coordinates (median window "
            f"{q['psnr_raw_median_window_db']:.1f}, min {q['psnr_raw_min_window_db']:.1f}); aligned: after undoing "
            f"each window's shift ({q['aligned_windows']} windows, median shift {q['shift_px_median'] or 0:.1f} px, "
            f"max {q['shift_px_max'] or 0:.1f} px); vs mosaic: compression alone"
        )
    emit(result, [row], COLUMNS, as_json=a.json, title=f"e2e bench: replayed scan, {os.cpu_count()} CPUs", notes=notes)
    _draw_timeline(result)
    return 0
