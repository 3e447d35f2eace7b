"""The inference worker process: tiles through shared memory, autofocus first, classification batched."""

from __future__ import annotations

import time

import numpy as np

from runtime.inference_worker import InferenceClient, WorkerSettings
from runtime.shm import AttachedRing, SlotRing
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
        client = InferenceClient(WorkerSettings(backend="ort_cpu", batch_window_s=1.0), ring.spec)
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
