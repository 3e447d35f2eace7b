"""The worker skeleton: the failure report comes first, then the body's callbacks, then the exit."""

from __future__ import annotations

import multiprocessing as mp
import queue
from multiprocessing.queues import Queue

import pytest

from runtime.ipc.messages import EndOfStream, EventQueue, Heartbeat, WorkerFailed
from runtime.ipc.ring import AttachedRing, RingSpec, SlotRing
from runtime.workers.skeleton import WorkerContext, run_worker


def _events() -> EventQueue:
    return mp.get_context("spawn").Queue()


def _drain(q: EventQueue) -> list[object]:
    out: list[object] = []
    while True:
        try:
            out.append(q.get(timeout=0.5))
        except queue.Empty:
            return out


def test_a_failing_body_is_reported_then_cleaned_up_then_exits_1() -> None:
    events = _events()
    seen: list[str] = []

    def body(worker: WorkerContext) -> None:
        worker.beat()
        # The reason is on the events queue before any failure callback runs.
        worker.on_failure(lambda message: seen.append(f"failure: {message}"))
        worker.on_exit(lambda: seen.append("exit 1"))
        worker.on_exit(lambda: seen.append("exit 2"))
        raise ValueError("bad frame")

    with pytest.raises(SystemExit) as exc:
        run_worker("probe", events, body)
    assert exc.value.code == 1
    assert seen == ["failure: ValueError: bad frame", "exit 1", "exit 2"]
    msgs = _drain(events)
    assert isinstance(msgs[0], Heartbeat) and msgs[0].worker == "probe"
    assert msgs[1:] == [WorkerFailed("probe", "ValueError: bad frame")]
    events.close()


def test_exit_callbacks_run_on_return_and_a_failing_one_does_not_stop_the_others() -> None:
    events = _events()
    seen: list[str] = []

    def close_devices() -> None:
        raise OSError("device gone")

    def body(worker: WorkerContext) -> None:
        worker.on_failure(lambda message: seen.append("failure"))
        worker.on_exit(close_devices)
        worker.on_exit(lambda: seen.append("stream ended"))

    with pytest.raises(OSError, match="device gone"):  # raised once every callback has run
        run_worker("probe", events, body)
    assert seen == ["stream ended"]
    events.close()


def test_the_ring_comes_from_the_queue_and_is_closed_on_exit() -> None:
    ring = SlotRing(2, 8, 8)
    control: Queue[RingSpec | EndOfStream] = mp.get_context("spawn").Queue()
    views: list[AttachedRing] = []
    specs: list[RingSpec | None] = []
    try:
        control.put(ring.spec)

        def body(worker: WorkerContext) -> None:
            spec = worker.wait_for_ring(control, stopping=lambda: False)
            assert spec == ring.spec
            view = worker.attach(spec)
            view.slot(1)[...] = 7
            views.append(view)

        run_worker("probe", None, body)  # no events queue: nobody watches heartbeats
        with pytest.raises(AttributeError):  # closed: the slot array is gone
            views[0].slot(1)
        control.put(EndOfStream("stopped before the ring"))
        run_worker("probe", None, lambda worker: specs.append(worker.wait_for_ring(control, lambda: False)))
        assert specs == [None]
    finally:
        control.close()
        ring.unlink()
