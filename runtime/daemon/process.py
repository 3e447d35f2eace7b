"""Running the daemon: in this process (systemd's ExecStart) or in a child process (hw_sim, tests)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from multiprocessing.context import ForkServerContext, SpawnContext, SpawnProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.config import RuntimeConfig

if TYPE_CHECKING:
    from runtime.control.client import ControlClient


# OpenCV's thread pool (stitcher, acquisition) spins while it waits for work: the calling thread up to
# 10,000 pause loops, each worker 2,000, on every parallel call (thousands of small filters per scan).
# On a few shared cores that spinning is CPU another process needed. OpenCV reads these once, when it
# is loaded, so they are set here, before any worker is spawned (each inherits the environment).
# An operator's own setting wins. Measured on the stitcher's work alone (the 16 x 12 e2e recording
# through the accumulator in one process, OpenCV's 2 threads, 4 alternated pairs at load 11-14):
# 40.2 instead of 45.3 CPU-s per Gpx, and a shorter wall time in 3 of 4 (notes/h15-cpu.md).
QUIET_OPENCV_POOL = {"OPENCV_THREAD_POOL_ACTIVE_WAIT_WORKER": "0", "OPENCV_THREAD_POOL_ACTIVE_WAIT_MAIN": "0"}


def quiet_opencv_pool() -> None:
    """:data:`QUIET_OPENCV_POOL` into this process's environment (what the workers it spawns inherit),
    except for a variable already set."""
    for name, value in QUIET_OPENCV_POOL.items():
        os.environ.setdefault(name, value)


# numpy's OpenBLAS starts a thread per core at import and, after each BLAS call large enough to split
# (the registration's masked-NCC sums, the flat-field fit), its threads spin before they sleep. The
# stitcher's BLAS calls are small and many: perf on `bench e2e --fields 16 12 --tile 1024 --profile`
# (2 cores) found the OpenBLAS thread spinning 0.44 of the stitcher's 6.5 CPU-s (blas_thread_server)
# and doing 0.02 s of matrix work. One BLAS thread, 6 alternated pairs against 2 (the operator's
# OPENBLAS_NUM_THREADS=2 restores the old pool), --cores 2, load 7-10: daemon 32.7 vs 38.7 CPU-s/Gpx
# (medians; stitcher 27.1 vs 32.9), lower in 6 of 6 pairs; the mosaic's chunks byte for byte the
# same in all 12 runs. Read by OpenBLAS when numpy loads, so set before the fork server starts (it
# imports numpy; every worker inherits it). An operator's own setting wins.
QUIET_BLAS_POOL = {"OPENBLAS_NUM_THREADS": "1"}


def quiet_blas_pool() -> None:
    """:data:`QUIET_BLAS_POOL` into this process's environment (what the workers inherit), except for
    a variable already set."""
    for name, value in QUIET_BLAS_POOL.items():
        os.environ.setdefault(name, value)


# How the daemon starts its worker processes (daemon.worker_start). "spawn": a fresh interpreter per
# worker, which imports numpy, OpenCV, Zarr, pydantic and the runtime again -- about 0.6 CPU-s per
# worker, three or four workers per scan. "forkserver": one server process per daemon, started with
# it (start_worker_server), imports those modules once; each worker is then a fork of it (about
# 0.01 CPU-s). Both are CUDA-safe: the server is a fresh interpreter that never touches a GPU (the
# supervisor does not either), and nothing below creates a CUDA context or a thread that could hold
# a lock at fork time -- ONNX Runtime is left out because importing it starts a thread (it is
# imported by the worker that makes a session), as are driver modules (a vendor SDK may open
# devices or start threads when it loads: the acquisition worker imports its driver itself).
# numpy's and OpenCV's OpenBLAS pools stop before each fork (OpenBLAS's fork handler).
WORKER_START_METHODS = ("forkserver", "spawn")
WORKER_SERVER_PRELOAD = (
    "runtime.ipc.worker_server",  # first: the server dies with the supervisor (runtime/ipc/lifetime.py)
    "runtime.workers.skeleton",
    "runtime.workers.acquisition",
    "runtime.workers.stitcher",
    "runtime.workers.writer",
    "runtime.workers.inference",
    "runtime.workers.recorder",
    "runtime.workers.analysis",
    # What a scan's workers would otherwise import on their first use of it, inside the scan: numpy's
    # percentile imports numpy.ma (the stitcher's first tile, the flat-field's glass test: ~9 ms wall,
    # ~18 ms CPU on its critical path), the writer's first JPEG tile imagecodecs' libjpeg module (~2 ms).
    # Neither starts a thread. (Found by comparing each worker's sys.modules at its start and its end
    # in `bench e2e --fields 16 12 --tile 1024`; the acquisition's only one is its driver, hw_sim.replay,
    # which stays out: drivers are imported by the worker that opens them.)
    "numpy.ma",
    "imagecodecs._jpeg8",
)


def worker_context(method: str) -> SpawnContext | ForkServerContext:
    """The multiprocessing context the daemon's jobs start their workers with (``daemon.worker_start``).
    For ``forkserver`` the preload is set here too, so a server started by a job's first worker (a job
    run without :func:`start_worker_server`: tests) is the same as the daemon's."""
    if method not in WORKER_START_METHODS:
        raise ValueError(f"daemon.worker_start must be one of {WORKER_START_METHODS}, not {method!r}")
    if method == "spawn":
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(WORKER_SERVER_PRELOAD))
    return ctx


def _server_ready() -> None:
    """The fork server's first child: it exits at once (:func:`start_worker_server` waits for it)."""


def begin_worker_server(method: str) -> None:
    """Start the fork server without waiting for its imports (``forkserver`` only): the daemon's
    process calls it before it imports the supervisor, so that the two import side by side;
    :func:`start_worker_server` then waits for the server."""
    worker_context(method)
    if method == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def start_worker_server(method: str) -> int | None:
    """Start the fork server (``daemon.worker_start = "forkserver"``) now, from the daemon's main
    thread (its parent-death signal follows that thread), and wait until it has imported what it
    preloads: it forks its first worker only then, and the process that asks for a worker waits
    for that fork. Done before the daemon serves requests, so no request -- the first scan's start
    included -- waits for the imports. Returns the server's pid (None for ``spawn``). A server that
    dies later is started again by the next worker start (which then waits for its imports)."""
    ctx = worker_context(method)
    if method != "forkserver":
        return None
    probe = ctx.Process(target=_server_ready, name="wsi-worker-server-ready", daemon=True)
    probe.start()  # returns once the server has forked it: after its imports
    probe.join()
    return worker_server_pid()


def worker_server_pid() -> int | None:
    """The pid of this process's fork server, if one was started (multiprocessing keeps it)."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    return pid if isinstance(pid, int) else None


def worker_server_usage() -> dict[str, float] | None:
    """The fork server's CPU seconds since it started (its imports, then the forks) and its peak
    RSS in MiB, from /proc (Linux; None elsewhere, or when there is no server)."""
    pid = worker_server_pid()
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3 of stat(5)
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return {"pid": pid, "cpu_seconds": round(cpu, 3), "peak_rss_mib": round(hwm / 1024, 1)}


def run_daemon(cfg: RuntimeConfig, log_level: str = "INFO") -> None:
    """Serve until shutdown (blocking). The entry point of ``python -m runtime daemon``."""
    quiet_opencv_pool()  # before the fork server starts: it and every worker inherit this environment
    quiet_blas_pool()
    with contextlib.suppress(OSError):  # if it fails, the supervisor's start_worker_server tries again and logs why
        begin_worker_server(cfg.daemon.worker_start)  # it imports while this process imports the supervisor
    from runtime.daemon.supervisor import Supervisor

    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    Supervisor(cfg).run()


def start_daemon_process(cfg: RuntimeConfig, log_level: str = "WARNING") -> SpawnProcess:
    """Start the daemon (supervisor and, per scan, its workers) as a child process."""
    proc = mp.get_context("spawn").Process(target=run_daemon, args=(cfg, log_level), name="wsi-supervisor")
    proc.start()
    return proc


def stop_daemon_process(proc: SpawnProcess, cfg: RuntimeConfig, timeout_s: float = 30.0) -> int | None:
    """Ask the daemon to shut down over its socket (it finishes cleanly); escalate to SIGTERM,
    then SIGKILL, if it does not answer or exit in time. Returns its exit code."""
    from runtime.control.client import ControlClient  # late: keeps this module light for systemd's start

    if proc.is_alive():
        try:
            with ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=1) as client:
                client.request("shutdown")
        except Exception:
            proc.terminate()
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    return proc.exitcode


@contextlib.contextmanager
def daemon_running(cfg: RuntimeConfig, retries: int = 15) -> Iterator[tuple[SpawnProcess, ControlClient]]:
    """A daemon child process and a client that has reached it (ping); the daemon is shut down
    afterwards unless it is gone already (a caller may kill it)."""
    from runtime.control.client import ControlClient

    proc = start_daemon_process(cfg)
    client = ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=retries)
    try:
        client.request("ping")
        yield proc, client
    finally:
        client.close()
        if proc.is_alive():
            stop_daemon_process(proc, cfg)


def wait_finished(client: ControlClient, scan_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Poll ``status`` until job ``scan_id`` has finished; returns that status (``last_finish`` ...)."""
    deadline = time.monotonic() + timeout_s
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = client.request("status")
        if st["state"] == "idle" and st["scan_id"] == scan_id and st["last_finish"]:
            return st
        time.sleep(0.05)
    raise TimeoutError(f"job {scan_id} did not finish within {timeout_s:.0f} s: {st}")
