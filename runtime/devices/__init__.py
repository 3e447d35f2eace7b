"""The hardware boundary: what the runtime needs from a camera and a stage, and where to send them.

Modules:

* ``protocols``: the ``Camera``/``Stage``/``Driver`` protocols (and the optional ``FrameGrabber`` and
  ``SimulatedClock``), ``ScanArea``, ``StagePosition``,
  ``DriverError`` and the ``RGBImage`` frame type;
* ``loading``: ``open_driver``, a driver named ``module:callable`` in the configuration;
* ``scan_plan``: ``serpentine_plan``, the fields to visit and their order (``GridPlan``, ``FieldPlan``);
* ``testing``: ``DriverTests``, the pytest conformance suite for drivers. Not re-exported here: it
  imports pytest, so import it as ``from runtime.devices.testing import DriverTests``.

May import: the base modules only (``runtime.config``, ``runtime.errors``, ``runtime.paths``).

Re-exports are eager: these modules need only numpy and the standard library, and nearly every
layer above (ml, ipc, focus, workers, daemon) imports ``protocols`` or ``scan_plan`` anyway.
"""

from runtime.devices.loading import open_driver
from runtime.devices.protocols import (
    Camera,
    Driver,
    DriverError,
    FrameGrabber,
    RGBImage,
    ScanArea,
    SimulatedClock,
    Stage,
    StagePosition,
)
from runtime.devices.scan_plan import FieldPlan, GridPlan, serpentine_plan

__all__ = [
    "Camera",
    "Driver",
    "DriverError",
    "FieldPlan",
    "FrameGrabber",
    "GridPlan",
    "RGBImage",
    "ScanArea",
    "SimulatedClock",
    "Stage",
    "StagePosition",
    "open_driver",
    "serpentine_plan",
]
