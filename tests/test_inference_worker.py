"""The inference worker process: tiles through shared memory, autofocus first, classification batched."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import time
from multiprocessing.queues import Queue
from typing import Any

import numpy as np
import pytest

from runtime.config import ModelsConfig
from runtime.ipc.inference_channel import InferenceChannel, InferenceStopped
from runtime.ipc.messages import EndOfStream, Heartbeat, InferenceDone, InferenceReady
from runtime.ipc.ring import AttachedRing, SlotRing
from runtime.workers.inference import Batching, InferenceClient, inference_main
from tests.test_models import _render


def test_worker_answers_autofocus_first_and_batches_classification() -> None:
    ring = SlotRing(8, 256, 256)
    view = AttachedRing(ring.spec)  # the acquisition side writes frames into slots
    client = None
    try:
        glass = np.full((256, 256, 3), 240, np.uint8)
        for i in range(6):
            view.slot(i)[...] = glass
        view.slot(6)[...] = _render(2.0)
        # A long batch window makes the scheduling visible: classify requests wait for it,
        # an autofocus request sent after them must not.
        client = InferenceClient(ModelsConfig(backend="ort_cpu"), ring.spec, batching=Batching(window_s=1.0))
        assert client.backend == "ort_cpu"
        ids = {client.classify_async(i, 0.25) for i in range(6)}
        t = time.monotonic()
        reply = client.estimate(6)
        latency = time.monotonic() - t
        assert reply.defocus_um is not None and abs(reply.defocus_um - 2.0) < 0.8
        assert latency < 0.9, f"autofocus waited for the classify batch ({latency:.2f} s)"
        got = client.results(wait_for=ids)
        assert set(got) == ids
        assert all(r.label == "background" for r in got.values())
        assert max(r.batch for r in got.values()) == 6  # one backend call for all six
    finally:
        if client is not None:
            client.close()
        view.close()
        ring.unlink()


def test_urgent_classify_skips_the_batch_window_and_takes_the_queue_along() -> None:
    ring = SlotRing(8, 256, 256)
    view = AttachedRing(ring.spec)
    client = None
    try:
        for i in range(6):
            view.slot(i)[...] = np.full((256, 256, 3), 240, np.uint8)
        client = InferenceClient(ModelsConfig(backend="ort_cpu"), ring.spec, batching=Batching(window_s=2.0))
        queued = {client.classify_async(i, 0.25) for i in range(5)}
        t = time.monotonic()
        reply = client.classify(5, 0.25)  # what the focus loop does on a field's first frame
        latency = time.monotonic() - t
        assert reply.label == "background"
        assert latency < 1.5, f"the urgent request waited for the batch window ({latency:.2f} s)"
        # The five queued requests went along in the same backend call instead of waiting.
        assert reply.batch == 6
        got = client.results(wait_for=queued)
        assert set(got) == queued and {r.batch for r in got.values()} == {6}
        # Each window's p(artifact) and flag come back, row by row: a 256 px frame at 0.25 µm is one
        # 64 µm window, at 0.5 µm 2 x 2.
        assert len(reply.window_p_artifact) == len(reply.window_p_artifact[0]) == 1
        wide = client.classify(0, 0.5)
        assert [len(r) for r in wide.window_p_artifact] == [len(r) for r in wide.window_artifact] == [2, 2]
        assert max(map(max, wide.window_p_artifact)) == wide.probabilities[2]
        assert not any(map(any, wide.window_artifact))  # glass
    finally:
        if client is not None:
            client.close()
        view.close()
        ring.unlink()


def test_worker_beats_and_reports_to_the_scan_job_queue() -> None:
    """In the daemon the worker reports on the scan job's events queue like the other workers."""
    ring = SlotRing(2, 256, 256)
    view = AttachedRing(ring.spec)
    ctx = mp.get_context("spawn")
    requests: Queue[Any] = ctx.Queue()
    replies: Queue[Any] = ctx.Queue()
    events: Queue[Any] = ctx.Queue()
    proc = ctx.Process(target=inference_main, args=(ModelsConfig(backend="ort_cpu"), requests, replies, events))
    proc.start()
    try:
        view.slot(0)[...] = _render(1.0)
        channel = InferenceChannel(requests, replies)
        requests.put(ring.spec)  # models load once the ring says the frame size (it picks the builtin model)
        early: list[Any] = []
        while not isinstance(ready := events.get(timeout=60), InferenceReady):
            early.append(ready)
        assert ready.backend == "ort_cpu" and ready.load_s > 0
        assert ready.autofocus_model.startswith("autofocus ("), ready.autofocus_model  # 256 px frames: v1
        assert channel.wait_ready(60).backend == "ort_cpu"
        assert channel.estimate(0).defocus_um is not None
        time.sleep(1.2)  # idle: it keeps beating
        requests.put(EndOfStream("the test is done"))
        proc.join(30)
        assert proc.exitcode == 0
        seen: list[Any] = []
        with contextlib.suppress(queue.Empty):
            while True:
                seen.append(events.get(timeout=1))
        beats = [m for m in early + seen if isinstance(m, Heartbeat)]
        assert len(beats) >= 2 and {b.worker for b in beats} == {"inference"}
        done = [m for m in seen if isinstance(m, InferenceDone)]
        assert len(done) == 1 and done[0].stats["autofocus_requests"] == 1 and done[0].peak_rss > 50 * 2**20
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        for q in (requests, replies, events):
            q.cancel_join_thread()
            q.close()
        view.close()
        ring.unlink()


def test_a_dead_worker_does_not_block_a_stopping_caller() -> None:
    """The acquisition side of a killed worker: once the scan stops, the wait ends after the grace."""
    ctx = mp.get_context("spawn")
    requests: Queue[Any] = ctx.Queue()
    replies: Queue[Any] = ctx.Queue()
    stop_at = time.monotonic() + 0.5
    channel = InferenceChannel(requests, replies, stopping=lambda: time.monotonic() > stop_at, stop_grace_s=0.5)
    t = time.monotonic()
    with pytest.raises(InferenceStopped):
        channel.estimate(0)  # nobody is there to answer
    assert time.monotonic() - t < 3.0
    for q in (requests, replies):
        q.cancel_join_thread()
        q.close()
