"""A ring of fixed-size tile slots in one shared-memory segment.

Pixels move between worker processes through these slots; queues carry only
slot ids and small metadata (pickling tiles through queues costs copies).

Ownership: the supervisor creates the segment and is the only process that
unlinks it. Workers attach by mapping ``/dev/shm/<name>`` directly instead of
``multiprocessing.shared_memory.SharedMemory(name)``: on Python < 3.13 the
latter registers the segment with the resource tracker, which would unlink it
when *any* attached process exits (CPython gh-82300). Segment names carry the
supervisor's pid (``wsirt_<pid>_<n>``) so that a supervisor that was SIGKILLed
can be cleaned up after by the next start (:func:`remove_stale_segments`), and
by the systemd unit's ExecStopPost.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import numpy.typing as npt

SHM_DIR = Path("/dev/shm")
PREFIX = "wsirt_"
_counter = itertools.count()


@dataclass(frozen=True)
class RingSpec:
    """Everything a worker needs to attach to a ring (picklable, tiny)."""

    name: str
    slots: int
    height: int
    width: int

    @property
    def slot_bytes(self) -> int:
        return self.height * self.width * 3

    @property
    def total_bytes(self) -> int:
        return self.slot_bytes * self.slots


class SlotRing:
    """The supervisor's side: creates, and later unlinks, the segment."""

    def __init__(self, slots: int, height: int, width: int) -> None:
        name = f"{PREFIX}{os.getpid()}_{next(_counter)}"
        self.spec = RingSpec(name, slots, height, width)
        self._shm: shared_memory.SharedMemory | None = shared_memory.SharedMemory(
            name=name, create=True, size=self.spec.total_bytes
        )

    def unlink(self) -> None:
        """Close and remove the segment; safe to call more than once."""
        if self._shm is None:
            return
        shm, self._shm = self._shm, None
        shm.close()
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()

    def __enter__(self) -> SlotRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlink()


class AttachedRing:
    """A worker's view of a ring: numpy arrays over the slots, no ownership."""

    def __init__(self, spec: RingSpec) -> None:
        self.spec = spec
        path = SHM_DIR / spec.name
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, spec.total_bytes)
        finally:
            os.close(fd)
        self._array: npt.NDArray[np.uint8] = np.frombuffer(self._map, dtype=np.uint8).reshape(
            spec.slots, spec.height, spec.width, 3
        )

    def slot(self, index: int) -> npt.NDArray[np.uint8]:
        """A writable (height, width, 3) view of one slot."""
        return self._array[index, ...]

    def close(self) -> None:
        # Views must be dropped before the map can close. A slot view that is still referenced
        # (a capture in a traceback on a worker's failure path) keeps the map open until it is
        # collected or the process exits; the segment itself is the supervisor's to unlink.
        del self._array
        with contextlib.suppress(BufferError):
            self._map.close()


def pid_alive(pid: int) -> bool:
    """Does a process ``pid`` exist (one of another user's counts)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_segments() -> list[str]:
    """Unlink ``wsirt_<pid>_*`` segments whose creating process no longer exists."""
    removed: list[str] = []
    if not SHM_DIR.is_dir():
        return removed
    for path in SHM_DIR.glob(f"{PREFIX}*"):
        try:
            pid = int(path.name[len(PREFIX) :].split("_", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
    return removed


def segments_of(pid: int) -> list[str]:
    """Names of the segments created by ``pid`` that still exist (tests use this to prove no leak)."""
    return sorted(p.name for p in SHM_DIR.glob(f"{PREFIX}{pid}_*"))
