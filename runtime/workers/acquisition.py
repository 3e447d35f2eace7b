"""The acquisition worker: drives stage and camera along the scan plan.

For each field: move, focus (contrast sweep or single shot: runtime/focus/field.py), and hand
the ring slot holding the kept frame to the stitcher. It stops after the current field when
asked to cancel.

Frames are captured straight into slots of the tile ring (:class:`RingFrames`), so the
inference worker reads a focus capture by slot id and the kept one goes to the stitcher
without another copy. One ring for both, not a second focus ring: the stitcher hands every
slot back after pasting it and never waits for acquisition, and the focus loop holds at most
two slots at once (the best capture so far and the newest), so with ``scan.ring_slots >= 2``
waiting for a slot always ends; a separate ring would cost a copy per field and a second
segment to own and clean up, and buy nothing while the stitcher keeps up.
"""

from __future__ import annotations

import contextlib
import logging
import queue
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

from runtime.devices.loading import open_driver
from runtime.devices.protocols import Camera, DriverError, ScanArea, SimulatedClock
from runtime.devices.scan_plan import MAX_FIELDS, serpentine_plan
from runtime.errors import log_failure
from runtime.focus.field import Capture, FieldFocuser, FocusModels, ModelSettings, WorkerModels
from runtime.focus.single_shot import SingleShotFocus
from runtime.focus.sweep import ContrastSweep
from runtime.ipc.inference_channel import InferenceChannel, InferenceStopped
from runtime.ipc.lifetime import bind_to_parent
from runtime.ipc.messages import (
    AcquisitionDone,
    FieldDone,
    FieldRecord,
    HeartbeatSender,
    ScanPrepared,
    TileReady,
    WorkerFailed,
    peak_rss_bytes,
)
from runtime.ipc.ring import AttachedRing, RingSpec

log = logging.getLogger("wsi.acquisition")

END_OF_SCAN = None
"""Put on the tile queue after the last tile."""


@dataclass(frozen=True)
class AcquisitionJob:
    driver_factory: str
    driver_options: dict[str, Any]
    area: ScanArea | None  # None: the driver's default area
    overlap: float
    sweep: ContrastSweep
    start_z_um: float
    strategy: str = "contrast_sweep"  # or "single_shot" (runtime/focus/field.py)
    single_shot: SingleShotFocus = field(default_factory=SingleShotFocus)
    models: ModelSettings | None = None
    inference_worker: bool = False  # single_shot: the models are served by the inference worker process
    max_fields: int = MAX_FIELDS  # refuse plans larger than this (config: scan.max_fields)


class _Stopped(Exception):
    """Cancelled while waiting for a free slot."""


class RingFrames:
    """Captures into free slots of the tile ring (runtime.focus.field.Frames)."""

    def __init__(
        self, camera: Camera, ring: AttachedRing, free_slots: Queue[int], cancel: Event, hb: HeartbeatSender
    ) -> None:
        self.camera = camera
        self.ring = ring
        self.free_slots = free_slots
        self.cancel = cancel
        self.hb = hb

    def snap(self) -> Capture:
        slot = _take_slot(self.free_slots, self.cancel, self.hb)
        if slot is None:
            raise _Stopped
        view = self.ring.slot(slot)
        view[...] = self.camera.snap()
        return Capture(view, slot)

    def release(self, capture: Capture) -> None:
        if capture.slot is not None:
            self.free_slots.put(capture.slot)


def _wait_for_ring(to_acquisition: Queue[Any], cancel: Event, hb: HeartbeatSender) -> RingSpec | None:
    while not cancel.is_set():
        hb.beat()
        try:
            msg = to_acquisition.get(timeout=0.2)
        except queue.Empty:
            continue
        return msg if isinstance(msg, RingSpec) else None
    return None


def _take_slot(free_slots: Queue[int], cancel: Event, hb: HeartbeatSender) -> int | None:
    """Wait for a free slot (the stitcher gives them back); None if cancelled meanwhile."""
    try:  # a free slot is used even after a cancel: the field being focused still completes
        return free_slots.get_nowait()
    except queue.Empty:
        pass
    while not cancel.is_set():
        hb.beat()
        try:
            return free_slots.get(timeout=0.2)
        except queue.Empty:
            continue
    return None


def acquisition_main(
    job: AcquisitionJob,
    to_acquisition: Queue[Any],
    free_slots: Queue[int],
    tiles: Queue[Any],
    events: Queue[Any],
    cancel: Event,
    to_inference: Queue[Any] | None = None,
    inference_replies: Queue[Any] | None = None,
) -> None:
    """Process entry point (spawned).

    The worker owns the devices, so it is the one that learns the frame shape
    and plans the scan; it reports the plan and waits for the supervisor to
    size and create the shared-memory ring before capturing. With the inference
    worker (``job.inference_worker``) it also waits for that worker's models.
    """
    bind_to_parent()  # die with the supervisor (runtime/ipc/lifetime.py)
    hb = HeartbeatSender("acquisition", events)
    ring: AttachedRing | None = None
    done = 0
    driver = None
    try:
        driver = open_driver(job.driver_factory, job.driver_options)
        camera, stage = driver.camera, driver.stage
        area = job.area or driver.default_scan_area()
        if area is None:
            raise DriverError("no scan region given and the driver has no default scan area")
        h, w = camera.frame_shape
        px = camera.pixel_size_um
        grid = serpentine_plan(area, w * px, h * px, job.overlap, max_fields=job.max_fields)
        events.put(ScanPrepared(grid, (h, w), px))
        spec = _wait_for_ring(to_acquisition, cancel, hb)
        if spec is None:
            events.put(AcquisitionDone(0, True, None, peak_rss_bytes()))
            return
        ring = AttachedRing(spec)
        models: ModelSettings | FocusModels | None = job.models
        if job.strategy == "single_shot" and job.inference_worker:
            if to_inference is None or inference_replies is None:
                raise ValueError("job.inference_worker is set but no inference queues were given")
            # Nothing to deliver once this process ends: do not wait on a dead worker's pipe.
            to_inference.cancel_join_thread()
            channel = InferenceChannel(to_inference, inference_replies, idle=hb.beat, stopping=cancel.is_set)
            # Unbounded here: the scan job bounds the start with models.worker_start_timeout_s.
            # InferenceStopped comes only once cancel is set, and then the field loop ends at once.
            with contextlib.suppress(InferenceStopped):
                channel.wait_ready()
            models = WorkerModels(channel, px, job.models.classify if job.models else True)
        frames = RingFrames(camera, ring, free_slots, cancel, hb)
        focuser = FieldFocuser(job.strategy, job.sweep, job.single_shot, job.start_z_um, models, camera, stage, frames)
        for plan in grid.fields:
            if cancel.is_set():
                break
            hb.beat()
            stage.move_xy(plan.x_um, plan.y_um)
            try:
                result = focuser.focus_field(plan, cancel.is_set)
            except (_Stopped, InferenceStopped):
                # The scan is ending mid-field (a cancel while no slot was free, or a failed
                # inference worker that the scan job has already reported): drop this field.
                break
            slot = result.frame.slot
            assert slot is not None  # RingFrames captures into the ring
            record = FieldRecord(
                index=plan.index,
                row=plan.row,
                col=plan.col,
                x_um=plan.x_um,
                y_um=plan.y_um,
                z_um=result.z_um,
                captures=result.captures,
                focus_method=result.method,
                predicted_defocus_um=result.predicted_defocus_um,
                tile_class=result.tile_class,
                artifact=result.artifact,
            )
            # The slot belongs to the stitcher now; drop this process's view of it.
            del result
            tiles.put(TileReady(slot, record, plan))
            events.put(FieldDone(record))
            done += 1
        sim = driver.simulated_time_s() if isinstance(driver, SimulatedClock) else None
        events.put(AcquisitionDone(done, cancel.is_set(), sim, peak_rss_bytes()))
    except Exception as err:  # report, then exit non-zero; the supervisor cleans up
        events.put(WorkerFailed("acquisition", log_failure(log, "acquisition worker failed", err)))
        raise SystemExit(1) from None
    finally:
        tiles.put(END_OF_SCAN)
        if ring is not None:
            ring.close()
        if driver is not None:
            driver.close()
