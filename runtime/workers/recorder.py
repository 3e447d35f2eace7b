"""The z-stack recorder worker: a z-stack at each chosen field, written as a recording.

``record_zstacks`` on the daemon runs this worker instead of a scan's four. It opens the driver the
config names and plans the region (:func:`runtime.workers.planning.open_and_plan`:
:func:`runtime.devices.loading.open_driver`, as acquisition does, then
:func:`runtime.devices.scan_plan.serpentine_plan`), keeps every field or ``max_fields`` of them
spread evenly over the plan, and at each: ``move_xy``, then for each plane ``move_z`` and
``snap``. Frames go straight into the recording (:class:`runtime.devices.recording.RecordingWriter`,
the project's format, ``runtime/devices/RECORDING_FORMAT.md``) under a temporary name,
``recording.zarr.partial``, renamed to ``recording.zarr`` when the last field is in. Metadata come
from the driver: pixel size, frame shape, the grid; and, where the driver (or its camera) has them,
``optics_info``, ``camera_info`` and ``timing_info`` (dicts, or methods returning one). No truth is
written: a scanner does not know it.

A cancel stops after the current field; the fields recorded so far are kept as a complete, shorter
recording (:meth:`RecordingWriter.truncate`). A failure (a driver error, a frame of the wrong
shape) leaves the ``.partial`` folder as it is and is reported like any worker's
(:func:`runtime.workers.skeleton.run_worker`). Progress, heartbeats and the end reuse the scan's
messages: ``ScanPrepared`` (the chosen fields as the plan), ``FieldDone`` per stack (``captures`` =
planes, ``z_um`` = the centre), ``AcquisitionDone``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from runtime.config import DriverConfig, ScanConfig
from runtime.devices.protocols import Driver, ScanArea, SimulatedClock
from runtime.devices.recording import RecordingMeta, RecordingWriter, Timing
from runtime.devices.scan_plan import FieldPlan, GridPlan
from runtime.ipc.messages import AcquisitionDone, EventQueue, FieldDone, FieldRecord, ScanPrepared, peak_rss_bytes
from runtime.workers.planning import open_and_plan
from runtime.workers.skeleton import WorkerContext, run_worker

RECORDING_NAME = "recording.zarr"
PARTIAL_SUFFIX = ".partial"
FOCUS_METHOD = "zstack"


@dataclass(frozen=True)
class ZstackRecordJob:
    """What is particular to one ``record_zstacks`` request (settings come as config sections)."""

    output_dir: str  # the job's folder (made by the daemon): recording.zarr goes there
    z_center_um: float
    offsets_um: tuple[float, ...]  # each plane's z relative to the centre, increasing
    area: ScanArea | None = None  # None: the driver's default area
    max_fields: int | None = None  # None: every field of the plan
    driver_options: dict[str, Any] = field(default_factory=dict)  # the request's, over [driver] options

    @property
    def partial_path(self) -> Path:
        return Path(self.output_dir) / (RECORDING_NAME + PARTIAL_SUFFIX)

    @property
    def path(self) -> Path:
        return Path(self.output_dir) / RECORDING_NAME


def spread_fields(fields: tuple[FieldPlan, ...], count: int | None) -> tuple[FieldPlan, ...]:
    """``count`` fields spread evenly over ``fields`` (the middle of each of ``count`` equal runs),
    in plan order; all of them when ``count`` is None or not smaller."""
    n = len(fields)
    if count is None or count >= n:
        return fields
    return tuple(fields[int((i + 0.5) * n / count)] for i in range(count))


def _driver_info(drv: Driver, name: str) -> dict[str, Any] | None:
    """The driver's (or its camera's) ``name``: a dict attribute or a method returning one."""
    for obj in (drv, drv.camera):
        value = getattr(obj, name, None)
        if callable(value):
            value = value()
        if isinstance(value, dict):
            return dict(value)
    return None


def recording_meta(drv: Driver, factory: str, grid: GridPlan, n_fields: int, n_z: int, overlap: float) -> RecordingMeta:
    """The recording's attributes from what the driver tells (never the truth: a scanner has none)."""
    h, w = drv.camera.frame_shape
    px = drv.camera.pixel_size_um
    timing = _driver_info(drv, "timing_info")
    return RecordingMeta(
        pixel_size_um=px,
        tile_height=h,
        tile_width=w,
        n_fields=n_fields,
        n_z=n_z,
        rows=grid.rows,
        cols=grid.cols,
        overlap=overlap,
        area=grid.area,
        field_width_um=w * px,
        field_height_um=h * px,
        optics=_driver_info(drv, "optics_info") or {},
        camera={"driver": factory, **(_driver_info(drv, "camera_info") or {})},
        timing=Timing.from_dict(timing) if timing is not None else Timing(),
        slide=None,
    )


def recorder_main(
    job: ZstackRecordJob,
    driver: DriverConfig,
    scan: ScanConfig,
    events: EventQueue,
    cancel: Event,
) -> None:
    """Process entry point (spawned): record the z-stacks, report each field, end with AcquisitionDone."""

    def body(worker: WorkerContext) -> None:
        drv, grid = open_and_plan(worker, driver, job.driver_options, job.area, scan)
        camera, stage = drv.camera, drv.stage
        chosen = spread_fields(grid.fields, job.max_fields)
        events.put(ScanPrepared(replace(grid, fields=chosen), camera.frame_shape, camera.pixel_size_um))
        meta = recording_meta(drv, driver.factory, grid, len(chosen), len(job.offsets_um), scan.overlap)
        writer = RecordingWriter(job.partial_path, meta)
        done = 0
        for i, plan in enumerate(chosen):
            if cancel.is_set():
                break
            worker.beat()
            stage.move_xy(plan.x_um, plan.y_um)
            zs = [job.z_center_um + dz for dz in job.offsets_um]
            for k, z in enumerate(zs):
                worker.beat()
                stage.move_z(z)
                writer.write_plane(i, k, camera.snap())
            writer.write_positions(i, zs, (plan.x_um, plan.y_um), (plan.row, plan.col))
            record = FieldRecord(
                index=plan.index,
                row=plan.row,
                col=plan.col,
                x_um=plan.x_um,
                y_um=plan.y_um,
                z_um=job.z_center_um,
                captures=len(zs),
                focus_method=FOCUS_METHOD,
            )
            events.put(FieldDone(record))
            done += 1
        if done:  # cut short by a cancel: the fields recorded so far are a recording of their own
            if done < len(chosen):
                writer.truncate(done)
            os.rename(job.partial_path, job.path)  # within the daemon's own folder: complete now
        sim = drv.simulated_time_s() if isinstance(drv, SimulatedClock) else None
        events.put(AcquisitionDone(done, cancel.is_set(), sim, peak_rss_bytes()))

    run_worker("recorder", events, body)
