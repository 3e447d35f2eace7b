import multiprocessing as mp
import os

import numpy as np

from runtime.ipc import ring as shm
from runtime.ipc.ring import AttachedRing, RingSpec, SlotRing, remove_stale_segments, segments_of


def _child_writes(spec: RingSpec, slot: int, value: int) -> None:
    ring = AttachedRing(spec)
    ring.slot(slot)[...] = value
    ring.close()


def test_worker_writes_reach_owner_and_segment_survives_worker_exit() -> None:
    with SlotRing(slots=3, height=16, width=8) as ring:
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=_child_writes, args=(ring.spec, 1, 77))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        # The worker exited: the segment must still be there (no resource-tracker unlink).
        assert ring.spec.name in segments_of(os.getpid())
        view = AttachedRing(ring.spec)
        assert np.all(view.slot(1) == 77) and np.all(view.slot(0) == 0)
        view.close()
    assert segments_of(os.getpid()) == []


def test_stale_segments_of_dead_processes_are_removed() -> None:
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=os.getpid)
    p.start()
    p.join()
    dead_pid = p.pid
    path = shm.SHM_DIR / f"{shm.PREFIX}{dead_pid}_0"
    path.write_bytes(b"\0" * 64)
    mine = SlotRing(1, 4, 4)
    try:
        removed = remove_stale_segments()
        assert path.name in removed and not path.exists()
        assert mine.spec.name in segments_of(os.getpid())  # a live owner's segment is kept
    finally:
        mine.unlink()
