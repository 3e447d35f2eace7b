"""A tile's ring slot goes back to acquisition once the accumulator and the spill are both done with it,
without the stitcher's main thread waiting for the disk (runtime/workers/stitcher.py: SlotRelease)."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.output.journal import ScanJournal, TileSpill
from runtime.workers.stitcher import JournalObserver, SlotRelease

HEADER = {"scan_id": "scan-1", "request": {"output_name": "s"}, "fields": 1, "rows": 1, "cols": 1}


@pytest.mark.parametrize("spill_first", [True, False])
def test_the_slot_goes_back_after_both_users_whichever_is_last(spill_first: bool) -> None:
    free: queue.Queue[int] = queue.Queue()
    release = SlotRelease(free, 5, users=2)  # type: ignore[arg-type]  # a queue.Queue stands in for the SlotQueue
    other = threading.Thread(target=release.done)
    if spill_first:
        other.start()
        other.join()
        assert free.empty()
        release.done()
    else:
        release.done()
        assert free.empty()
        other.start()
        other.join()
    assert free.get_nowait() == 5 and free.empty()


def void(_: object) -> None:
    return None


def _observer(folder: Path) -> JournalObserver:
    journal = ScanJournal.create(folder, HEADER)
    return JournalObserver(journal, folder, geometry=None, store=None)  # type: ignore[arg-type]  # save_tile only


def test_the_main_thread_does_not_wait_for_the_spill(tmp_path: Path) -> None:
    observer = _observer(tmp_path)
    gate = threading.Event()
    observer._later(lambda: void(gate.wait(60)))  # the journal thread is busy (an fsync behind others)
    free: queue.Queue[int] = queue.Queue()
    release = SlotRelease(free, 3, users=2)  # type: ignore[arg-type]
    tile = np.full((64, 64, 3), 7, np.uint8)
    observer.save_tile(0, tile, then=release.done)  # returns at once
    release.done()  # the accumulator is done with the tile: the main thread goes on
    assert free.empty()  # the tile is not on disk yet: its slot is still held
    gate.set()
    assert free.get(timeout=60) == 3
    assert TileSpill(tmp_path).load(0) is not None
    observer.close()


def test_a_failed_spill_keeps_the_slot_and_fails_the_stitcher(tmp_path: Path, monkeypatch: Any) -> None:
    observer = _observer(tmp_path)

    def broken(index: int, tile: np.ndarray) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(observer.spill, "save", broken)
    free: queue.Queue[int] = queue.Queue()
    release = SlotRelease(free, 1, users=2)  # type: ignore[arg-type]
    release.done()  # the accumulator is done with the tile
    # The thread's error comes back to the main thread at its next hand-over or at the flush.
    with pytest.raises(OSError, match="No space left"):
        observer.save_tile(0, np.zeros((8, 8, 3), np.uint8), then=release.done)
        observer.flush()
    assert free.empty()  # never given back: the tile is not durable
    observer.close(flush=False)
