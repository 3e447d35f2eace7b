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
import queue
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.synchronize import Event
from typing import Any

import cv2

from runtime.config import DriverConfig, FocusConfig, ModelsConfig, ScanConfig
from runtime.devices.protocols import Camera, FrameGrabber, RGBImage, ScanArea, SimulatedClock
from runtime.focus.field import Capture, FieldFocuser, FocusModels, WorkerModels
from runtime.ipc.inference_channel import InferenceChannel, InferenceStopped, ReplyQueue, RequestQueue
from runtime.ipc.messages import (
    AcquisitionDone,
    ControlQueue,
    EndOfStream,
    EventQueue,
    FieldDone,
    FieldRecord,
    FocusState,
    ScanPrepared,
    SlotQueue,
    TileQueue,
    TileReady,
    peak_rss_bytes,
)
from runtime.ipc.ring import AttachedRing
from runtime.workers.planning import open_and_plan
from runtime.workers.skeleton import POLL_S, WorkerContext, run_worker


@dataclass(frozen=True)
class AcquisitionJob:
    """What is particular to this scan; the settings come as config sections beside it."""

    area: ScanArea | None  # None: the driver's default area
    driver_options: dict[str, Any] = field(default_factory=dict)  # the request's, over [driver] options
    resume: AcquisitionResume | None = None  # a resumed scan: what the journal says was captured


@dataclass(frozen=True)
class AcquisitionResume:
    """Where a resumed scan starts: the first ``captured`` fields of the plan are in the journal,
    and the focus state they left (runtime/output/journal.py)."""

    captured: int
    last_z_um: float | None = None
    surface: tuple[tuple[float, float, float], ...] = ()
    sign: tuple[int, int, int] = (1, 0, 0)
    fields: int = 0  # the journaled plan's size, checked against this plan


class _Stopped(Exception):
    """Cancelled while waiting for a free slot."""


class MeteredCamera:
    """The driver's camera, adding up the CPU time of its capture calls (``driver_cpu_s``).

    Every capture of the worker goes through it -- the ring's and the contrast sweep's, which
    scores frames of its own -- so that the report can tell the driver's cost (for the replay
    driver, reading and decompressing the recording) from the runtime's own. The process's
    CPU is counted, not the calling thread's: a driver may work on threads of its own.
    """

    def __init__(self, camera: Camera) -> None:
        self.camera = camera
        self.grabber = camera if isinstance(camera, FrameGrabber) else None
        self.driver_cpu_s = 0.0

    @property
    def frame_shape(self) -> tuple[int, int]:
        return self.camera.frame_shape

    @property
    def pixel_size_um(self) -> float:
        return self.camera.pixel_size_um

    def snap(self) -> RGBImage:
        t0 = time.process_time()
        try:
            return self.camera.snap()
        finally:
            self.driver_cpu_s += time.process_time() - t0

    def snap_into(self, out: RGBImage) -> None:
        """Into ``out``: by the camera itself when it is a FrameGrabber (no copy), else copied from
        its frame (the copy is the runtime's cost, not the driver's)."""
        if self.grabber is None:
            out[...] = self.snap()
            return
        t0 = time.process_time()
        try:
            self.grabber.snap_into(out)
        finally:
            self.driver_cpu_s += time.process_time() - t0


class RingFrames:
    """Captures into free slots of the tile ring (runtime.focus.field.Frames): a camera that is a
    :class:`~runtime.devices.protocols.FrameGrabber` writes the frame straight into the slot (a
    real frame grabber's DMA target); any other camera's frame is copied in."""

    def __init__(
        self, camera: MeteredCamera, ring: AttachedRing, free_slots: SlotQueue, cancel: Event, beat: Callable[[], None]
    ) -> None:
        self.camera = camera
        self.ring = ring
        self.free_slots = free_slots
        self.cancel = cancel
        self.beat = beat

    def snap(self) -> Capture:
        slot = _take_slot(self.free_slots, self.cancel, self.beat)
        if slot is None:
            raise _Stopped
        view = self.ring.slot(slot)
        self.camera.snap_into(view)
        return Capture(view, slot)

    def release(self, capture: Capture) -> None:
        if capture.slot is not None:
            self.free_slots.put(capture.slot)


def _take_slot(free_slots: SlotQueue, cancel: Event, beat: Callable[[], None]) -> int | None:
    """Wait for a free slot (the stitcher gives them back); None if cancelled meanwhile."""
    try:  # a free slot is used even after a cancel: the field being focused still completes
        return free_slots.get_nowait()
    except queue.Empty:
        pass
    while not cancel.is_set():
        beat()
        try:
            return free_slots.get(timeout=POLL_S)
        except queue.Empty:
            continue
    return None


def acquisition_main(
    job: AcquisitionJob,
    driver: DriverConfig,
    scan: ScanConfig,
    focus: FocusConfig,
    models: ModelsConfig,
    to_acquisition: ControlQueue,
    free_slots: SlotQueue,
    tiles: TileQueue,
    events: EventQueue,
    cancel: Event,
    to_inference: RequestQueue | None = None,
    inference_replies: ReplyQueue | None = None,
) -> None:
    """Process entry point (spawned).

    The worker owns the devices, so it is the one that learns the frame shape
    and plans the scan; it reports the plan and waits for the supervisor to
    size and create the shared-memory ring before capturing. With the inference
    worker (``single_shot`` focus, ``models.worker = "process"``) it also waits for that
    worker's models. The tile stream ends (:class:`EndOfStream`) on every exit path.
    """

    def body(worker: WorkerContext) -> None:
        worker.on_exit(lambda: tiles.put(EndOfStream("acquisition ended")))
        # The focus sweep's per-frame OpenCV calls (colour conversion, sharpness) are ~1 ms each:
        # OpenCV's pool split them over the cores and spun while waiting, which is why this worker's
        # own CPU was 8.1 CPU-s/Gpx on 2 cores against 5.6 on 1 (quiet e2e, session 19).
        cv2.setNumThreads(1)
        drv, grid = open_and_plan(worker, driver, job.driver_options, job.area, scan)
        camera, stage = MeteredCamera(drv.camera), drv.stage
        h, w = camera.frame_shape
        px = camera.pixel_size_um
        events.put(ScanPrepared(grid, (h, w), px))
        spec = worker.wait_for_ring(to_acquisition, cancel.is_set)
        if spec is None:
            events.put(AcquisitionDone(0, True, None, peak_rss_bytes()))
            return
        ring = worker.attach(spec)
        field_models: ModelsConfig | FocusModels = models
        if focus.strategy == "single_shot" and models.worker == "process":
            if to_inference is None or inference_replies is None:
                raise ValueError('models.worker is "process" but no inference queues were given')
            # Nothing to deliver once this process ends: do not wait on a dead worker's pipe.
            to_inference.cancel_join_thread()
            channel = InferenceChannel(to_inference, inference_replies, idle=worker.beat, stopping=cancel.is_set)
            # Unbounded here: the scan job bounds the start with models.worker_start_timeout_s.
            # InferenceStopped comes only once cancel is set, and then the field loop ends at once.
            with contextlib.suppress(InferenceStopped):
                channel.wait_ready()
            field_models = WorkerModels(channel, px, models.classify)
        frames = RingFrames(camera, ring, free_slots, cancel, worker.beat)
        focuser = FieldFocuser(focus, field_models, camera, stage, frames)
        start = 0
        if job.resume is not None:
            start = _restore(focuser, job.resume, len(grid.fields))
        done = 0
        for plan in grid.fields[start:]:
            if cancel.is_set():
                break
            worker.beat()
            stage.move_xy(plan.x_um, plan.y_um)
            known = len(focuser.surface.points)
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
                artifact_probability=None if result.class_probabilities is None else result.class_probabilities[2],
                sign_resolution=result.sign_resolution,
                sign_flipped=result.sign_flipped,
                near_focus=result.near_focus,
                capture_cost=None if result.cost is None else asdict(result.cost),
                window_p_artifact=None if result.tile is None else result.tile.window_p_artifact,
                window_artifact=None if result.tile is None else result.tile.window_artifact,
            )
            # The slot belongs to the stitcher now; drop this process's view of it.
            del result
            sc = focuser.sign_convention
            state = FocusState(
                float(focuser._last_z),
                tuple((float(x), float(y), float(z)) for x, y, z in focuser.surface.points[known:]),
                (sc.sign, sc.score, sc.flips),
            )
            tiles.put(TileReady(slot, record, plan, state))
            events.put(FieldDone(record))
            done += 1
        sim = drv.simulated_time_s() if isinstance(drv, SimulatedClock) else None
        events.put(AcquisitionDone(done, cancel.is_set(), sim, peak_rss_bytes(), driver_cpu_s=camera.driver_cpu_s))

    run_worker("acquisition", events, body)


def _restore(focuser: FieldFocuser, resume: AcquisitionResume, fields: int) -> int:
    """Put the journaled focus state back; returns the first plan position to capture."""
    if resume.fields != fields or not 0 <= resume.captured <= fields:
        raise ValueError(
            f"the journal is of a {resume.fields}-field scan, this plan has {fields} fields: "
            "the recording, region or driver changed since the scan was interrupted"
        )
    focuser.surface.points = list(resume.surface)
    if resume.last_z_um is not None:
        focuser._last_z = resume.last_z_um
    sc = focuser.sign_convention
    sc.sign, sc.score, sc.flips = resume.sign
    return resume.captured
