"""Process lifetime: workers die with their supervisor, and what a killed daemon left is swept.

Workers. The scan job spawns its workers from the supervisor's main thread. A
supervisor that is SIGKILLed (watchdog, OOM killer, a person) cannot stop them,
and orphaned workers would keep the camera, the GPU and the ring's pages. Each
worker's main therefore calls :func:`bind_to_parent` first:

* on Linux it asks the kernel for SIGTERM when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``; the signal comes when the *thread* that spawned
  the worker ends, which for the scan job is the supervisor's main thread, i.e.
  the process; a spawner on a short-lived thread would see its worker killed
  when that thread ends), then checks that the parent has not died already
  (before the prctl, when nothing would come);
* everywhere, :class:`runtime.ipc.messages.HeartbeatSender` compares ``getppid()``
  with the parent recorded when it was made, on every beat it sends, and raises
  ``SystemExit`` once the worker has been re-parented.

The expected parent is the pid the spawning process recorded in the
:class:`multiprocessing.Process` object (``multiprocessing.parent_process()``),
not ``getppid()`` read in the child, which is already the adopter's pid if the
parent died before the child got that far. Outside a multiprocessing child (a
worker main run on a thread by a test) none of this applies.

Workers forked by the daemon's fork server (``daemon.worker_start = "forkserver"``,
runtime/daemon/process.py) have the server as their parent, not the supervisor
that asked for them. The server marks itself when it starts (:func:`become_worker_server`,
run by its first preloaded module, :mod:`runtime.ipc.worker_server`): it takes the
parent-death signal from the supervisor, so it dies with it, and its workers take
theirs from the server -- two hops, both the kernel's, so a worker hung in a native
call still goes. :func:`parent_pid` then names the server, and :func:`orphaned`
also asks the supervisor's own sentinel (the pipe multiprocessing keeps open to every
child it started, ``parent_process().is_alive()``), so a worker notices a dead
supervisor on its next heartbeat whatever became of the server.

Semaphores. The scan job's ``multiprocessing`` queues and event are built on
named POSIX semaphores (``/dev/shm/sem.mp-*`` on Linux). They are unlinked when
the objects are collected or by multiprocessing's resource tracker; when the
whole daemon is SIGKILLed (the tracker too) they stay until reboot. The scan job
records their names in ``<runtime_dir>/semaphores-<supervisor pid>``
(:func:`record_semaphores`); the supervisor removes the file on a clean exit, and
:func:`remove_stale_semaphores` -- at daemon start and in ``python -m runtime
sweep`` (the systemd unit's ``ExecStopPost``) -- unlinks the semaphores named by
the files of pids that no longer exist. Only names this daemon recorded are
touched, never another program's ``sem.mp-*``.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Iterable
from multiprocessing.synchronize import SemLock
from pathlib import Path
from typing import Any

from runtime.ipc.ring import SHM_DIR, pid_alive

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
REGISTRY_PREFIX = "semaphores-"


# -- workers die with their parent ------------------------------------------------------------
_worker_server_pid: int | None = None
"""In the daemon's fork server, and inherited by every worker it forks: the server's pid."""


def become_worker_server() -> None:
    """In the daemon's fork server, as it starts: die with the supervisor (which started it, from
    its main thread), and remember this pid, which the workers forked from here inherit."""
    global _worker_server_pid
    _worker_server_pid = os.getpid()
    set_parent_death_signal(signal.SIGTERM)
    # A supervisor that died before the prctl took effect sends nothing; the server then still ends
    # when its "alive" pipe closes (multiprocessing.forkserver), once no worker holds that pipe.


def parent_pid() -> int | None:
    """The pid of this process's parent as the process that started it recorded it: the spawning
    process, or for a worker forked by the daemon's fork server, that server (None outside a
    multiprocessing child)."""
    parent = mp.parent_process()
    if parent is None:
        return None
    server = _worker_server_pid
    if server is not None and server != os.getpid() and os.getppid() == server:
        return server
    # Spawned; or forked by a server that is gone already, then the supervisor's pid, which is not
    # getppid(): the worker counts as orphaned at once.
    return parent.pid


def _spawner_alive() -> bool:
    """Is the process that asked for this one still there (its sentinel pipe still open)?"""
    parent = mp.parent_process()
    return parent is None or parent.is_alive()


def orphaned(parent: int | None) -> bool:
    """Has this process lost ``parent`` (it was re-parented to init or a subreaper), or has the
    process that started it (the supervisor, where a fork server forked it) died?"""
    return parent is not None and (os.getppid() != parent or not _spawner_alive())


def exit_if_orphaned(parent: int | None) -> None:
    """Raise ``SystemExit`` (exit code 1, the reason on stderr) if ``parent`` is gone."""
    if orphaned(parent):
        raise SystemExit(f"{mp.current_process().name} (pid {os.getpid()}): parent {parent} is gone, exiting")


def _prctl() -> Any:
    """libc's ``prctl``; None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (thread) dies. Linux only;
    False where unavailable (the heartbeat's check still applies there)."""
    prctl = _prctl()
    if prctl is None:
        return False
    return int(prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0


def parent_death_signal() -> int | None:
    """The parent-death signal of this process (0: none); None where there is no prctl."""
    prctl = _prctl()
    out = ctypes.c_int(0)
    if prctl is None or prctl(PR_GET_PDEATHSIG, ctypes.addressof(out), 0, 0, 0) != 0:
        return None
    return out.value


def bind_to_parent() -> int | None:
    """First thing in a worker main: die with the process that spawned this one.

    Sets SIGTERM as the parent-death signal (Linux), then exits at once if the parent died
    before that took effect. Returns the parent's pid for later :func:`orphaned` checks (None
    outside a multiprocessing child: a worker main run on a thread is left alone).
    """
    parent = parent_pid()
    if parent is None:
        return None
    set_parent_death_signal(signal.SIGTERM)
    exit_if_orphaned(parent)
    return parent


# -- stale semaphores ---------------------------------------------------------------------------
def semaphore_names(*objs: object) -> list[str]:
    """Names of the named POSIX semaphores inside multiprocessing objects (Queue, Event, Lock...).

    Walks the objects' attributes that are themselves multiprocessing objects (a Queue holds two
    Locks and a BoundedSemaphore; an Event a Condition, whose Lock and Semaphores are inside).
    """
    names: list[str] = []
    seen: set[int] = set()

    def visit(obj: object, depth: int) -> None:
        if id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        if isinstance(obj, SemLock):
            name = getattr(getattr(obj, "_semlock", None), "name", None)
            if name:  # None where the semaphore was unlinked at once (fork context)
                names.append(str(name))
            return
        for value in getattr(obj, "__dict__", {}).values():
            if type(value).__module__.startswith("multiprocessing"):
                visit(value, depth + 1)

    for obj in objs:
        visit(obj, 0)
    return sorted(set(names))


def semaphore_path(name: str) -> Path:
    """Where Linux keeps the named semaphore ``name`` (``/mp-abc`` -> ``/dev/shm/sem.mp-abc``)."""
    return SHM_DIR / f"sem.{name.lstrip('/')}"


def semaphore_exists(name: str) -> bool:
    """Does the named semaphore exist? (Linux; elsewhere assumed to, the sweep finds out.)"""
    return semaphore_path(name).exists() if SHM_DIR.is_dir() else True


def unlink_semaphore(name: str) -> bool:
    """Remove the named semaphore; False if it did not exist."""
    try:
        from _multiprocessing import sem_unlink  # POSIX only
    except ImportError:
        return False
    try:
        sem_unlink(name)
    except FileNotFoundError:
        return False
    return True


def registry_path(runtime_dir: Path, pid: int | None = None) -> Path:
    return Path(runtime_dir) / f"{REGISTRY_PREFIX}{os.getpid() if pid is None else pid}"


def _read_registry(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def record_semaphores(runtime_dir: Path, names: Iterable[str]) -> Path:
    """Add ``names`` to this process's registry (written atomically). Names recorded before whose
    semaphores are gone (an earlier scan's, unlinked when its job was collected) are dropped, so
    the file holds what a SIGKILL now would leave behind."""
    path = registry_path(runtime_dir)
    kept: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        kept = [n for n in _read_registry(path) if semaphore_exists(n)]
    all_names = sorted(set(kept) | set(names))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{n}\n" for n in all_names))
    tmp.replace(path)
    return path


def forget_semaphores(runtime_dir: Path) -> None:
    """On a clean exit: this process's registry goes (its semaphores go with the process)."""
    registry_path(runtime_dir).unlink(missing_ok=True)


def remove_stale_semaphores(runtime_dir: Path) -> list[str]:
    """Unlink the semaphores named in the registries of dead pids under ``runtime_dir``, and
    those registries. Returns the names of the semaphores that existed and were removed."""
    removed: list[str] = []
    runtime_dir = Path(runtime_dir)
    if not runtime_dir.is_dir():
        return removed
    for path in sorted(runtime_dir.glob(f"{REGISTRY_PREFIX}*")):
        try:
            pid = int(path.name[len(REGISTRY_PREFIX) :])
        except ValueError:
            continue
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            names = _read_registry(path)
        except FileNotFoundError:  # another sweep got there first
            continue
        removed.extend(n for n in names if unlink_semaphore(n))
        path.unlink(missing_ok=True)
    return removed
