"""How the daemon starts its workers (``daemon.worker_start``, runtime/daemon/process.py).

``forkserver`` (the default): a server process started with the daemon imports the runtime once and
forks each worker. It must stay as safe as ``spawn``: no GPU library and no ONNX Runtime in the
server (a CUDA context or a thread does not survive a fork), the server and its workers die with a
SIGKILLed supervisor, and a scan's workers are its children. ``spawn`` stays available.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import psutil
import pytest

from runtime.config import ConfigError, RuntimeConfig, with_overrides
from runtime.control.client import ControlClient
from runtime.daemon.process import (
    QUIET_OPENCV_POOL,
    WORKER_SERVER_PRELOAD,
    quiet_opencv_pool,
    start_daemon_process,
    start_worker_server,
    stop_daemon_process,
    worker_context,
    worker_server_pid,
)
from runtime.ipc import lifetime
from runtime.ipc import ring as shm
from runtime.ipc.messages import HeartbeatSender
from tests.processes import Discard, running, survivors

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl, /proc")

# What must never be loaded in the fork server (so in no forked worker before it imports it itself).
NOT_IN_THE_SERVER = ("onnxruntime", "torch", "tensorrt", "pycuda", "cupy", "hw_sim")


def _imported_by_first_use() -> list[str]:
    """What a scan's workers would import inside the scan on the first use of these (stop 29: numpy's
    percentile imported numpy.ma on the stitcher's first tile; the writer's first JPEG tile imagecodecs'
    libjpeg module): the fork server preloads them, so a forked worker imports nothing here."""
    import imagecodecs
    import numpy as np

    before = set(sys.modules)
    np.percentile(np.arange(10.0), 98)
    imagecodecs.jpeg8_encode(np.zeros((16, 16, 3), np.uint8), level=85)
    return sorted(set(sys.modules) - before)


def _forked_worker(out: Queue[Any], bind: bool) -> None:
    """A worker forked by the server: what it sees at its start, then heartbeats until orphaned.
    ``bind``: parent-death signal as every worker main sets it; else only the heartbeat's check."""
    parent = lifetime.bind_to_parent() if bind else lifetime.parent_pid()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in NOT_IN_THE_SERVER)
    lazy = _imported_by_first_use()
    out.put(
        {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "parent": parent,
            "server": lifetime._worker_server_pid,
            "deathsig": lifetime.parent_death_signal(),
            "orphaned": lifetime.orphaned(parent),
            "loaded": loaded,
            "preloaded": all(m in sys.modules for m in WORKER_SERVER_PRELOAD),
            "lazy": lazy,
            "threads": len(os.listdir("/proc/self/task")),
            "env": {k: os.environ.get(k) for k in QUIET_OPENCV_POOL},
        }
    )
    hb = HeartbeatSender("forked", Discard(), interval_s=0.05)  # type: ignore[arg-type]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        hb.beat()
        time.sleep(0.01)


def _supervisor(out: Queue[Any], bind: bool, let_go: Any) -> None:
    """Stands in for the supervisor: starts the server from its main thread, then one worker. Once
    ``let_go`` is set it closes its end of the worker's sentinel pipe (what its death would do) and
    lives on."""
    quiet_opencv_pool()  # as run_daemon does before the supervisor starts the server
    server = start_worker_server("forkserver")
    out.put(("server", server))
    proc = worker_context("forkserver").Process(target=_forked_worker, args=(out, bind), name="wsi-forked")
    proc.start()
    let_go.wait(60)
    assert proc._popen is not None
    proc._popen.finalizer()  # type: ignore[attr-defined]  # closes the pipe the worker's sentinel reads
    time.sleep(60)


@contextlib.contextmanager
def _supervisor_with_worker(bind: bool) -> Any:
    ctx = mp.get_context("spawn")
    out: Queue[Any] = ctx.Queue()
    let_go = ctx.Event()
    sup = ctx.Process(target=_supervisor, args=(out, bind, let_go), name="wsi-supervisor-test")
    sup.start()
    pids: list[int] = []
    try:
        tag, server = out.get(timeout=60)
        assert tag == "server" and isinstance(server, int)
        pids.append(server)
        seen = out.get(timeout=60)
        pids.append(seen["pid"])
        yield sup, server, seen, let_go
    finally:
        if sup.is_alive():
            sup.kill()
            sup.join(5)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out.cancel_join_thread()
        out.close()


def test_a_forked_worker_is_the_servers_child_without_gpu_libraries_and_dies_with_the_supervisor() -> None:
    with _supervisor_with_worker(bind=True) as (sup, server, seen, _):
        assert seen["ppid"] == server == seen["parent"] == seen["server"]  # the server, not the supervisor
        assert seen["deathsig"] == signal.SIGTERM and not seen["orphaned"]
        assert seen["preloaded"], "the worker was not forked from the preloaded server"
        assert seen["lazy"] == [], f"imported on first use, inside a scan: {seen['lazy']}"
        assert seen["loaded"] == [], f"the fork server loaded {seen['loaded']}"
        assert seen["threads"] == 1
        assert seen["env"] == QUIET_OPENCV_POOL  # the server's environment, which it had from the supervisor
        assert psutil.Process(server).ppid() == sup.pid
        os.kill(sup.pid, signal.SIGKILL)  # the supervisor alone, as the OOM killer would
        sup.join(5)
        assert survivors([server, seen["pid"]], timeout_s=5.0) == [], "the server or its worker outlived it"


def test_a_forked_worker_notices_a_dead_supervisor_even_while_the_server_lives() -> None:
    """The heartbeat asks the supervisor's sentinel too, not only whether the server (its parent) is
    still there: here the supervisor's end of the sentinel closes while server and supervisor live."""
    with _supervisor_with_worker(bind=False) as (sup, server, seen, let_go):
        assert seen["deathsig"] == 0 and not seen["orphaned"]
        let_go.set()
        assert survivors([seen["pid"]], timeout_s=10.0) == [], "the worker did not notice"
        assert running(server) and sup.is_alive()


def test_worker_start_is_checked() -> None:
    with pytest.raises(ConfigError, match="worker_start"):
        with_overrides(RuntimeConfig(), {"daemon": {"worker_start": "fork"}})  # fork is not CUDA-safe
    assert RuntimeConfig().daemon.worker_start == "forkserver"
    with pytest.raises(ValueError, match="worker_start"):
        worker_context("fork")
    assert start_worker_server("spawn") is None


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_scans_workers_come_from_the_configured_start(tmp_path: Path, small_recording: Path, method: str) -> None:
    # Late: this module is what the forked test workers above unpickle their target from, and the
    # daemon helpers import hw_sim, which the fork server must not have loaded.
    from tests.conftest import daemon_config
    from tests.test_daemon import _paced, _wait_for, _wait_idle

    runtime_dir = Path("/tmp") / f"wsirt-ws-{method[:4]}-{os.getpid()}"  # ipc paths must stay short
    cfg = daemon_config(tmp_path / "data", runtime_dir, None, driver=_paced(small_recording, 2.0))
    cfg = with_overrides(cfg, {"daemon": {"worker_start": method}})
    proc = start_daemon_process(cfg)
    client = ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=15)
    children: dict[int, psutil.Process] = {}
    try:
        client.request("start_scan", output_name="ws")
        st = _wait_for(client, lambda st: {"acquisition", "stitcher", "writer"} <= set(st.get("workers", {})))
        daemon = psutil.Process(proc.pid)
        children = {c.pid: c for c in daemon.children()}
        parents = {name: psutil.Process(pid).ppid() for name, pid in st["workers"].items()}
        if method == "forkserver":
            servers = [c for c in children.values() if "forkserver" in " ".join(c.cmdline())]
            assert len(servers) == 1, [c.cmdline() for c in children.values()]
            assert set(parents.values()) == {servers[0].pid}, parents
        else:
            assert set(parents.values()) == {proc.pid}, parents
        assert _wait_idle(client)["last_finish"] == "completed"
        report = json.loads((tmp_path / "data" / "ws" / "report.json").read_text())
        assert report["worker_start"] == method
        server = report["worker_server"]  # its own figures, apart from the scan's processes
        if method == "forkserver":
            assert server["pid"] == set(parents.values()).pop() and server["cpu_seconds"] > 0.0
            assert 0.0 < server["peak_rss_mib"] < 256.0
        else:
            assert server is None
        client.request("start_scan", output_name="ws2")  # a second scan reuses the same server
        st2 = _wait_for(client, lambda st: "stitcher" in st.get("workers", {}))
        assert psutil.Process(st2["workers"]["stitcher"]).ppid() == parents["stitcher"]
        assert _wait_idle(client)["last_finish"] == "completed"
    finally:
        client.close()
        stop_daemon_process(proc, cfg, timeout_s=60)
    assert proc.exitcode == 0
    assert shm.segments_of(proc.pid) == []
    assert survivors(list(children), timeout_s=10.0) == [], "the fork server outlived a clean shutdown"


def test_worker_server_pid_is_none_before_a_server_starts() -> None:
    assert worker_server_pid() is None  # pytest itself never starts one


def test_a_killed_fork_server_fails_its_scan_and_the_next_scan_gets_a_new_one(
    tmp_path: Path, small_recording: Path
) -> None:
    from tests.test_daemon import _paced, _wait_for, _wait_idle, live_daemon

    with live_daemon(tmp_path, "wskill", None, driver=_paced(small_recording, 4.0)) as (proc, client):
        client.request("start_scan", output_name="k1")
        st = _wait_for(client, lambda st: st.get("fields_done", 0) >= 1 and "stitcher" in st.get("workers", {}))
        workers = list(st["workers"].values())
        server = psutil.Process(workers[0]).ppid()
        assert server != proc.pid and psutil.Process(server).ppid() == proc.pid
        os.kill(server, signal.SIGKILL)  # its workers get their parent-death signal
        assert survivors(workers, timeout_s=10.0) == [], "workers outlived their server"
        st = _wait_idle(client)
        assert st["last_finish"] == "failed" and st["last_error"] and "\n" not in st["last_error"]
        client.request("start_scan", output_name="k2")  # the next worker start starts a new server
        st = _wait_for(client, lambda st: "stitcher" in st.get("workers", {}))
        new_server = psutil.Process(st["workers"]["stitcher"]).ppid()
        assert new_server not in (server, proc.pid)
        assert _wait_idle(client)["last_finish"] == "completed"
