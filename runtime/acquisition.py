"""The acquisition worker: drives stage and camera along the scan plan.

For each field: move, focus (contrast sweep or single shot: runtime/field_focus.py), capture the in-focus
frame into a free shared-memory slot, hand the slot to the stitcher. It
stops after the current field when asked to cancel.
"""

from __future__ import annotations

import queue
import traceback
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

from runtime.autofocus import SingleShotFocus
from runtime.devices import DriverError, ScanArea, SimulatedClock
from runtime.drivers import open_driver
from runtime.field_focus import FieldFocuser, ModelSettings
from runtime.focus import ContrastSweep
from runtime.messages import (
    AcquisitionDone,
    FieldDone,
    FieldRecord,
    HeartbeatSender,
    ScanPrepared,
    TileReady,
    WorkerFailed,
    peak_rss_bytes,
)
from runtime.scan_plan import serpentine_plan
from runtime.shm import AttachedRing, RingSpec

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
    strategy: str = "contrast_sweep"  # or "single_shot" (runtime/field_focus.py)
    single_shot: SingleShotFocus = field(default_factory=SingleShotFocus)
    models: ModelSettings | None = None


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
) -> None:
    """Process entry point (spawned).

    The worker owns the devices, so it is the one that learns the frame shape
    and plans the scan; it reports the plan and waits for the supervisor to
    size and create the shared-memory ring before capturing.
    """
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
        grid = serpentine_plan(area, w * px, h * px, job.overlap)
        events.put(ScanPrepared(grid, (h, w), px))
        spec = _wait_for_ring(to_acquisition, cancel, hb)
        if spec is None:
            events.put(AcquisitionDone(0, True, None, peak_rss_bytes()))
            return
        ring = AttachedRing(spec)
        focuser = FieldFocuser(job.strategy, job.sweep, job.single_shot, job.start_z_um, job.models, camera, stage)
        for plan in grid.fields:
            if cancel.is_set():
                break
            hb.beat()
            stage.move_xy(plan.x_um, plan.y_um)
            result = focuser.focus_field(plan, cancel.is_set)
            frame = result.frame
            slot = _take_slot(free_slots, cancel, hb)
            if slot is None:
                break
            ring.slot(slot)[...] = frame
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
            tiles.put(TileReady(slot, record, plan))
            events.put(FieldDone(record))
            done += 1
        sim = driver.simulated_time_s() if isinstance(driver, SimulatedClock) else None
        events.put(AcquisitionDone(done, cancel.is_set(), sim, peak_rss_bytes()))
    except Exception as err:  # report, then exit non-zero; the supervisor cleans up
        events.put(WorkerFailed("acquisition", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None
    finally:
        tiles.put(END_OF_SCAN)
        if ring is not None:
            ring.close()
        if driver is not None:
            driver.close()
