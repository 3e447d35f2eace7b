"""A byte-budgeted cache of arrays that spills the least recently used ones to a folder.

The accumulator keeps everything it holds between tiles here -- canvas blocks, tiles that wait,
registration strips -- so that what stays in RAM is set by a budget and not by the width of the
mosaic: when the arrays in RAM pass the budget, the least recently used go to ``folder`` as raw
files (the pixels only: the cache keeps each one's shape and dtype) and come back on their next
:meth:`SpillCache.get`. A serpentine scan suits LRU:
the blocks and strips a scan row leaves behind are the ones the next row (coming back the other
way) needs last.

The files are drafts, never fsynced: a resumed scan rebuilds its state from the scan journal
(runtime/output/journal.py), so the folder is emptied on creation and removed by :meth:`close`.
Put it on a disk, not on a tmpfs (which would keep the spill in memory).
"""

from __future__ import annotations

import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

Key = tuple[Any, ...]


class SpillCache:
    """Arrays by key (tuples of ints and strings), at most ``budget_bytes`` of them in RAM.

    The arrays of the latest :meth:`get`/:meth:`put` call always stay in RAM (a budget below them
    still works, at the cost of a file round trip per use). Arrays taken with :meth:`get` may be
    changed in place by the caller until its next call into the cache: eviction writes what they
    hold then. Take arrays used together in one call (``get(a, b)``), so that fetching the
    second cannot spill the first while the caller holds it.
    """

    def __init__(self, folder: str | Path, budget_bytes: int) -> None:
        self.folder = Path(folder)
        self.budget_bytes = max(0, int(budget_bytes))
        if self.folder.exists():
            shutil.rmtree(self.folder)  # drafts of an interrupted run: the journal replays them
        self.folder.mkdir(parents=True)
        self._ram: OrderedDict[Key, np.ndarray] = OrderedDict()
        self._disk: dict[Key, tuple[tuple[int, ...], np.dtype[Any]]] = {}  # spilled: shape and dtype
        self.held_bytes = 0  # in RAM now
        self.peak_held_bytes = 0
        self.spilled = 0  # arrays written to the folder (counts each eviction)
        self.reloaded = 0  # arrays read back

    def __contains__(self, key: Key) -> bool:
        return key in self._ram or key in self._disk

    def __len__(self) -> int:
        return len(self._ram) + len(self._disk)

    @property
    def in_ram(self) -> int:
        return len(self._ram)

    def put(self, *items: tuple[Key, np.ndarray]) -> None:
        """Hold each ``(key, array)`` (the cache keeps the arrays, not copies)."""
        for key, value in items:
            self.discard(key)
            self._ram[key] = value
            self.held_bytes += value.nbytes
        self._evict(keep=len(items))

    def get(self, *keys: Key) -> list[np.ndarray]:
        """The arrays (read back if spilled); KeyError if the cache has none under a key."""
        out = [self._fetch(key) for key in keys]
        self._evict(keep=len(keys))
        return out

    def holds(self, key: Key, value: np.ndarray) -> bool:
        """Whether ``value`` itself (not a copy read back from the folder) is in RAM under ``key``;
        the cache's order does not change."""
        return self._ram.get(key) is value

    def pop(self, key: Key) -> np.ndarray:
        """The array, removed from the cache (read back if spilled, without spilling others)."""
        value = self._fetch(key)
        del self._ram[key]
        self.held_bytes -= value.nbytes
        return value

    def _fetch(self, key: Key) -> np.ndarray:
        value = self._ram.get(key)
        if value is not None:
            self._ram.move_to_end(key)
            return value
        if key not in self._disk:
            raise KeyError(key)
        path = self._path(key)
        shape, dtype = self._disk.pop(key)
        value = np.fromfile(path, dtype=dtype).reshape(shape)  # no .npy header to write and parse
        path.unlink()
        self.reloaded += 1
        self._ram[key] = value
        self.held_bytes += value.nbytes
        return value

    def discard(self, key: Key) -> None:
        """Forget ``key`` if held (no read back)."""
        value = self._ram.pop(key, None)
        if value is not None:
            self.held_bytes -= value.nbytes
        elif key in self._disk:
            del self._disk[key]
            self._path(key).unlink(missing_ok=True)

    def trim(self, keep_bytes: int = 0) -> None:
        """Spill the least recently used arrays until at most ``keep_bytes`` stay in RAM: room for
        a large passing need (the flat-field fit) without raising the budget for it."""
        self._evict(max(0, keep_bytes), keep=0)

    def keys(self) -> list[Key]:
        return [*self._ram, *self._disk]

    def close(self) -> None:
        """Drop everything, in RAM and on disk (the folder goes)."""
        self._ram.clear()
        self._disk.clear()
        self.held_bytes = 0
        shutil.rmtree(self.folder, ignore_errors=True)

    def _path(self, key: Key) -> Path:
        return self.folder / ("_".join(str(k) for k in key) + ".raw")

    def _evict(self, limit: int | None = None, keep: int = 1) -> None:
        """Spill the least recently used arrays down to ``limit`` bytes, never the ``keep`` most recent."""
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
        limit = self.budget_bytes if limit is None else limit
        while self.held_bytes > limit and len(self._ram) > keep:
            key, value = self._ram.popitem(last=False)
            np.ascontiguousarray(value).tofile(self._path(key))
            self._disk[key] = (value.shape, value.dtype)
            self.held_bytes -= value.nbytes
            self.spilled += 1
