"""A SIGKILLed supervisor leaves no worker running, and a SIGKILLed daemon no semaphore behind."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import psutil
import pytest

from runtime.__main__ import main as runtime_main
from runtime.config import RuntimeConfig
from runtime.control.client import ControlClient
from runtime.daemon.process import start_daemon_process, stop_daemon_process
from runtime.ipc import lifetime
from runtime.ipc import ring as shm
from runtime.ipc.messages import HeartbeatSender
from tests.conftest import daemon_config
from tests.processes import Discard, running, survivors

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX semaphores in /dev/shm, prctl")


# -- the lifetime helper ------------------------------------------------------------------------


def _bound_child(out: Queue[Any]) -> None:
    """Parent-death signal only: it never beats."""
    lifetime.bind_to_parent()
    out.put((os.getpid(), lifetime.parent_death_signal()))
    time.sleep(60)


def _beating_child(out: Queue[Any]) -> None:
    """No parent-death signal: only the heartbeat's parent check can end it."""
    hb = HeartbeatSender("beater", Discard(), interval_s=0.05)  # type: ignore[arg-type]
    out.put((os.getpid(), lifetime.parent_death_signal()))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        hb.beat()
        time.sleep(0.01)


def _middle(target: Callable[[Queue[Any]], None], out: Queue[Any]) -> None:
    """The grandchild's parent, to be SIGKILLed (it spawns from its main thread, like the scan job)."""
    mp.get_context("spawn").Process(target=target, args=(out,), name="wsi-grandchild").start()
    time.sleep(60)


@pytest.mark.parametrize(("target", "deathsig"), [(_bound_child, signal.SIGTERM), (_beating_child, 0)])
def test_a_child_exits_when_its_parent_is_sigkilled(target: Callable[[Queue[Any]], None], deathsig: int) -> None:
    ctx = mp.get_context("spawn")
    out: Queue[Any] = ctx.Queue()
    middle = ctx.Process(target=_middle, args=(target, out), name="wsi-middle")
    middle.start()
    child = None
    try:
        child, sig = out.get(timeout=30)
        assert sig == deathsig
        assert running(child)
        assert middle.pid is not None
        os.kill(middle.pid, signal.SIGKILL)
        middle.join(5)
        assert survivors([child], timeout_s=5.0) == [], "the child outlived its parent"
    finally:
        if middle.is_alive():
            middle.kill()
            middle.join(5)
        if child is not None and running(child):
            os.kill(child, signal.SIGKILL)
        out.cancel_join_thread()
        out.close()


def test_orphan_checks_in_process() -> None:
    assert lifetime.bind_to_parent() is None  # pytest is no multiprocessing child: left alone
    assert not lifetime.orphaned(None)
    lifetime.exit_if_orphaned(os.getppid())
    with pytest.raises(SystemExit, match="is gone"):
        lifetime.exit_if_orphaned(os.getppid() + 1)  # the parent recorded is not ours any more


# -- the semaphore registry ---------------------------------------------------------------------
@pytest.fixture()
def semaphore() -> Iterator[str]:
    """A named POSIX semaphore nobody tracks (so that nobody else unlinks it)."""
    import _multiprocessing

    name = f"/mp-wsirt-test-{uuid.uuid4().hex[:12]}"
    sem = _multiprocessing.SemLock(1, 1, 1, name, False)  # kind SEMAPHORE, value, max, name, unlink
    try:
        yield name
    finally:
        lifetime.unlink_semaphore(name)
        del sem


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_record_keeps_only_semaphores_that_exist(tmp_path: Path, semaphore: str) -> None:
    ctx = mp.get_context("spawn")
    q, ev = ctx.Queue(), ctx.Event()
    names = lifetime.semaphore_names(q, ev)
    assert len(names) == 8  # a queue: 2 locks and a semaphore; an event: a condition (4) and a flag
    assert all(lifetime.semaphore_exists(n) for n in names)
    path = lifetime.record_semaphores(tmp_path, ["/mp-wsirt-gone-already", semaphore])
    assert path == lifetime.registry_path(tmp_path, os.getpid())
    lifetime.record_semaphores(tmp_path, names)
    assert sorted(path.read_text().split()) == sorted([*names, semaphore])  # the missing one was dropped
    assert lifetime.remove_stale_semaphores(tmp_path) == []  # this process is alive
    lifetime.forget_semaphores(tmp_path)
    assert not path.exists()
    q.close()


def test_sweep_command_unlinks_the_semaphores_of_dead_pids_only(
    tmp_path: Path, semaphore: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx = mp.get_context("spawn")
    live = ctx.Lock()  # another holder's semaphore, recorded by a live pid: left alone
    live_name = lifetime.semaphore_names(live)[0]
    (tmp_path / f"semaphores-{os.getppid()}").write_text(f"{live_name}\n")
    dead = tmp_path / f"semaphores-{_dead_pid()}"
    dead.write_text(f"{semaphore}\n/mp-wsirt-gone-already\n")
    (tmp_path / "semaphores-junk").write_text(f"{live_name}\n")  # not a pid: ignored
    config = tmp_path / "runtime.toml"
    config.write_text(f'[daemon]\nruntime_dir = "{tmp_path}"\ndata_root = "{tmp_path / "data"}"\n')
    assert runtime_main(["sweep", "--config", str(config)]) == 0
    assert f"removed stale semaphores: {semaphore}" in capsys.readouterr().out
    assert not lifetime.semaphore_exists(semaphore) and not dead.exists()
    assert lifetime.semaphore_exists(live_name)
    assert (tmp_path / f"semaphores-{os.getppid()}").exists() and (tmp_path / "semaphores-junk").exists()


# -- the daemon ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _daemon(cfg: RuntimeConfig) -> Iterator[tuple[Any, ControlClient]]:
    """A daemon child process the test may kill; whatever it leaves is cleaned up afterwards."""
    proc = start_daemon_process(cfg)
    client = ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=15)
    try:
        client.request("ping")
        yield proc, client
    finally:
        client.close()
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
        stop_daemon_process(proc, cfg, timeout_s=30)
        for name in shm.segments_of(proc.pid):
            (shm.SHM_DIR / name).unlink(missing_ok=True)


def _cleanup(runtime_dir: Path, names: list[str]) -> None:
    lifetime.remove_stale_semaphores(runtime_dir)  # should a test have failed before its sweep
    # The daemons were spawned by this process and share its resource tracker, which still holds
    # the killed daemon's semaphores: unlinked by the sweep, they must not be reported at exit.
    for name in names:
        if not lifetime.semaphore_exists(name):
            resource_tracker.unregister(name, "semaphore")
    shutil.rmtree(runtime_dir, ignore_errors=True)


def _scanning(client: ControlClient, want: set[str], timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = client.request("status")
        if st.get("fields_done", 0) >= 1 and want <= set(st.get("workers", {})) and st["state"] == "scanning":
            return st
        time.sleep(0.05)
    raise AssertionError(f"scan not running with {want}: {st}")


def test_workers_exit_when_the_supervisor_is_sigkilled(tmp_path: Path, small_recording: Path) -> None:
    runtime_dir = Path("/tmp") / f"wsirt-orphans-{os.getpid()}"  # ipc paths must stay short
    cfg = daemon_config(
        tmp_path / "data",
        runtime_dir,
        None,
        driver={"options": {"recording": str(small_recording), "pace": 4.0}},  # slow: act mid-scan
        focus={"strategy": "single_shot"},  # so that there is an inference worker too
        models={"backend": "ort_cpu", "worker": "process"},
    )
    names: list[str] = []
    try:
        with _daemon(cfg) as (proc, client):
            client.request("start_scan", output_name="orphans")
            st = _scanning(client, {"acquisition", "stitcher", "writer", "inference"})
            workers = sorted(st["workers"].values())
            children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            assert set(workers) <= set(children)
            registry = lifetime.registry_path(runtime_dir, proc.pid)
            names = registry.read_text().split()
            os.kill(proc.pid, signal.SIGKILL)  # the supervisor alone
            proc.join(10)
            left = survivors(children, timeout_s=cfg.daemon.heartbeat_timeout_s)
            assert left == [], f"workers outlived the supervisor: {left}"
            assert registry.exists()  # the dead supervisor's semaphores are still recorded...
        # ...and the next daemon's start sweeps them.
        assert names and any(lifetime.semaphore_exists(n) for n in names)
        with _daemon(cfg) as (proc2, client2):
            assert client2.request("ping")["pid"] == proc2.pid
            assert not registry.exists()
            assert not any(lifetime.semaphore_exists(n) for n in names)
        assert proc2.exitcode == 0
        assert not lifetime.registry_path(runtime_dir, proc2.pid).exists()  # a clean exit leaves none
    finally:
        _cleanup(runtime_dir, names)


def test_sweep_removes_the_semaphores_of_a_killed_daemon_and_only_those(
    tmp_path: Path, small_recording: Path, semaphore: str
) -> None:
    runtime_dir = Path("/tmp") / f"wsirt-semkill-{os.getpid()}"
    cfg = daemon_config(
        tmp_path / "data", runtime_dir, None, driver={"options": {"recording": str(small_recording), "pace": 4.0}}
    )
    names: list[str] = []
    try:
        with _daemon(cfg) as (proc, client):
            client.request("start_scan", output_name="killed")
            _scanning(client, {"acquisition", "stitcher", "writer"})
            registry = lifetime.registry_path(runtime_dir, proc.pid)
            names = sorted(registry.read_text().split())
            assert len(names) >= 8 and all(lifetime.semaphore_exists(n) for n in names)
            # Another live program's semaphore, and one recorded by a live daemon: not to be touched.
            live_registry = lifetime.registry_path(runtime_dir, os.getppid())
            live_registry.write_text(f"{semaphore}\n")
            # The whole daemon at once, as systemd or the OOM killer would: stopped, then killed.
            everyone = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
            for pid in everyone:
                os.kill(pid, signal.SIGSTOP)
            for pid in everyone:
                os.kill(pid, signal.SIGKILL)
            proc.join(10)
            assert survivors(everyone, timeout_s=10) == []
        assert all(lifetime.semaphore_exists(n) for n in names)  # left behind...
        assert sorted(lifetime.remove_stale_semaphores(runtime_dir)) == names  # ...swept, all of them
        assert not any(lifetime.semaphore_exists(n) for n in names)
        assert not registry.exists()
        assert lifetime.semaphore_exists(semaphore) and live_registry.exists()  # and nothing else
        assert lifetime.remove_stale_semaphores(runtime_dir) == []
    finally:
        _cleanup(runtime_dir, names)
