"""Opening the configured driver in a worker and planning the region: what every job's capturing
worker does first (acquisition for a scan, the recorder for z-stacks)."""

from __future__ import annotations

from typing import Any

from runtime.config import DriverConfig, ScanConfig
from runtime.devices.loading import open_driver
from runtime.devices.protocols import Driver, DriverError, ScanArea
from runtime.devices.scan_plan import GridPlan, serpentine_plan
from runtime.workers.skeleton import WorkerContext


def open_and_plan(
    worker: WorkerContext, driver: DriverConfig, options: dict[str, Any], area: ScanArea | None, scan: ScanConfig
) -> tuple[Driver, GridPlan]:
    """Open ``driver`` with the request's ``options`` over the config's (closed on every exit path of
    ``worker``) and plan ``area`` (None: the driver's default area) with the config's overlap and
    ``scan.max_fields``; DriverError when there is no area to plan."""
    drv = open_driver(driver.factory, {**driver.options, **options})
    worker.on_exit(drv.close)
    area = area or drv.default_scan_area()
    if area is None:
        raise DriverError("no scan region given and the driver has no default scan area")
    h, w = drv.camera.frame_shape
    px = drv.camera.pixel_size_um
    return drv, serpentine_plan(area, w * px, h * px, scan.overlap, max_fields=scan.max_fields)
