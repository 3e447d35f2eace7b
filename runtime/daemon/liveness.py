"""Is a worker whose heartbeat is late hung, or only slowed down by the machine?

A worker beats from the loop that does its work (runtime/workers/skeleton.py), so a worker stuck in
its loop stops beating and the job kills it after ``daemon.heartbeat_timeout_s``. A loaded machine
delays beats too: on 2 cores at load ~22 a step that takes a second of CPU between two beats takes
~10 s of wall time, and an fsync queued behind other processes' dirty pages can wait seconds (the
stitcher's main thread then waits for its journal thread). One e2e scan in 37 at load ~22 failed
with "stitcher worker sent no heartbeat for 10 s" that way, a scan lost to load. Killing such a
worker saves nothing; only a worker that *makes no progress* is hung.

:class:`LateBeats` tells them apart from outside, on Linux, from ``/proc``: once a beat is half the
limit late it notes the worker's CPU time (all its threads) and whether any of its threads waits
on the disk (state ``D``: a write held back by the page cache, an fsync, a page read); at the limit
it looks again. A worker that used CPU since the last look, or waits on the disk now, is slowed,
not hung: it gets another half limit, and so on, up to :data:`SLOW_FACTOR` limits in all. A worker that did
neither -- stopped (``SIGSTOP``), deadlocked on a lock, blocked on a pipe nobody writes -- is hung
at the limit, as before. Without ``/proc`` every late worker is hung at the limit (as before).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("wsi.job")

SLOW_FACTOR = 6
"""A worker that keeps running or waiting on the disk without beating is killed after this many
heartbeat limits (60 s at the default 10 s): a worker busy in an endless loop is still caught."""


@dataclass(frozen=True)
class Usage:
    """What a process did, as ``/proc`` has it now."""

    cpu_ticks: int  # user + system time of all its threads, in clock ticks
    disk_wait: bool  # one of its threads is in uninterruptible sleep (``D``)


def read_usage(pid: int) -> Usage | None:
    """The process's :class:`Usage`, or None where ``/proc`` cannot say (not Linux, the process gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3 of stat(5)
        ticks = int(fields[11]) + int(fields[12])  # utime, stime: of every thread, exited ones included
        disk_wait = False
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                t = (task / "stat").read_text()
            except OSError:  # the thread ended meanwhile
                continue
            if t[t.rindex(")") + 2 :].startswith("D"):
                disk_wait = True
                break
    except (OSError, ValueError, IndexError):
        return None
    return Usage(ticks, disk_wait)


class LateBeats:
    """The decision for each worker whose heartbeat is late (see the module docstring).

    ``read``: how a process's usage is read (:func:`read_usage`; tests give their own)."""

    def __init__(self, read: Callable[[int], Usage | None] = read_usage) -> None:
        self._read = read
        self._marks: dict[str, tuple[float, Usage | None]] = {}  # per worker: when, and its usage then
        self._slowed: dict[str, float] = {}  # workers let run past the limit: the beat they missed

    def hung(self, name: str, pid: int | None, last_beat: float, now: float, limit: float) -> bool:
        """Is worker ``name`` (process ``pid``, last heartbeat at ``last_beat``, monotonic seconds) hung?
        Call it whenever its beat is more than ``limit / 2`` late; True means kill it."""
        late = now - last_beat
        mark = self._marks.get(name)
        if mark is None or mark[0] < last_beat:  # none since its last beat
            usage = self._read(pid) if pid is not None else None
            self._marks[name] = (now, usage)
            # A first look past the limit (the supervisor itself was held up): decide at the next one.
            return usage is None and late > limit
        if late <= limit:
            return False
        t0, before = mark
        if before is None or late > SLOW_FACTOR * limit:
            return True
        if now - t0 < limit / 2:
            return False  # let run after a look that found progress: the next look is due later
        usage = self._read(pid) if pid is not None else None
        if usage is None or not (usage.cpu_ticks > before.cpu_ticks or usage.disk_wait):
            return True
        self._marks[name] = (now, usage)
        if self._slowed.get(name) != last_beat:
            self._slowed[name] = last_beat
            log.warning(
                "%s worker: no heartbeat for %.0f s, but it is %s (a loaded machine): not hung, waiting up to %.0f s",
                name,
                late,
                "waiting on the disk" if usage.disk_wait else "running",
                SLOW_FACTOR * limit,
            )
        return False

    def slowed(self, name: str, last_beat: float) -> bool:
        """Was worker ``name`` let run past the limit since its beat at ``last_beat``?"""
        return self._slowed.get(name) == last_beat
