"""The driver boundary: what the runtime needs from a camera and a stage.

A real scanner implements these protocols over its vendor SDK; ``hw_sim.replay``
implements them over a recording. Coordinates are stage coordinates in
micrometres; ``x``/``y`` name the centre of the camera's field of view.
Commanded positions are not actual positions: a stage misses by a few µm,
which is why stitching must measure real offsets.

A device that refuses a command or fails raises :class:`DriverError` with a
one-line message. ``runtime.devices.testing.DriverTests`` is a pytest suite
that checks an implementation against these contracts (see README, "Writing a
driver").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

RGBImage = npt.NDArray[np.uint8]
"""A camera frame: shape (height, width, 3), RGB, uint8."""


class DriverError(RuntimeError):
    """A device refused a command or failed (bad position, lost connection, ...)."""


@dataclass(frozen=True)
class StagePosition:
    """A commanded or reported stage position (µm)."""

    x_um: float
    y_um: float
    z_um: float


@dataclass(frozen=True)
class ScanArea:
    """A rectangle on the slide in stage coordinates (µm): top-left corner and size."""

    x_um: float
    y_um: float
    width_um: float
    height_um: float

    def __post_init__(self) -> None:
        if not (self.width_um > 0 and self.height_um > 0):
            raise ValueError(f"scan area must have a positive size, got {self.width_um} x {self.height_um} µm")


@runtime_checkable
class Stage(Protocol):
    """An XYZ stage. Moves block until the stage has settled."""

    def move_xy(self, x_um: float, y_um: float) -> None:
        """Move to (x, y); z stays. DriverError if the stage refuses (outside its travel, ...)."""
        ...

    def move_z(self, z_um: float) -> None:
        """Move to z; x and y stay. DriverError if the stage refuses."""
        ...

    def position(self) -> StagePosition:
        """The last commanded position (what the controller believes), not an encoder read-back."""
        ...


@runtime_checkable
class Camera(Protocol):
    """A colour camera behind the objective."""

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(height, width) of a frame in pixels; fixed while the driver is open."""
        ...

    @property
    def pixel_size_um(self) -> float:
        """Size of one pixel in the sample plane (µm), > 0; fixed while the driver is open."""
        ...

    def snap(self) -> RGBImage:
        """Expose and read one frame at the stage's current position (the stage does not move).

        A C-contiguous ``frame_shape + (3,)`` uint8 array that the caller owns: a later
        snap must not change it (the focus loop keeps its best capture while it takes
        the next). DriverError when no frame can be taken there.
        """
        ...


@runtime_checkable
class FrameGrabber(Protocol):
    """Optional, for a camera: it delivers a frame into a buffer the caller gives.

    A frame grabber writes each frame by DMA into a buffer it was given. The acquisition
    worker hands it a slot of the shared-memory tile ring, so the pixels are written once and
    the stitcher reads them where they landed; a camera without ``snap_into`` is used through
    ``snap()`` and one copy into the slot.
    """

    def snap_into(self, out: RGBImage) -> None:
        """Like :meth:`Camera.snap` (same frame, same clock, same DriverError), written into ``out``.

        ``out``: a writable, C-contiguous ``frame_shape + (3,)`` uint8 array; ValueError
        (nothing written) if it is not. On a DriverError its contents are undefined.
        """
        ...


def check_frame_buffer(out: RGBImage, frame_shape: tuple[int, int]) -> None:
    """ValueError unless ``out`` can take a frame of ``frame_shape`` (:meth:`FrameGrabber.snap_into`)."""
    want = (*frame_shape, 3)
    if out.shape != want or out.dtype != np.uint8 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(
            f"a frame buffer must be a writable C-contiguous uint8 array of shape {want}, got {out.dtype} "
            f"{out.shape} (c_contiguous={out.flags.c_contiguous}, writeable={out.flags.writeable})"
        )


@runtime_checkable
class Driver(Protocol):
    """A camera and a stage that belong together, opened and closed as one."""

    @property
    def camera(self) -> Camera: ...

    @property
    def stage(self) -> Stage: ...

    def default_scan_area(self) -> ScanArea | None:
        """The area to scan when a request names none (a recording's area, or None)."""
        ...

    def close(self) -> None:
        """Release the devices. Called when the scan ends, also after a DriverError; a second
        call does nothing."""
        ...


@runtime_checkable
class SimulatedClock(Protocol):
    """Optional: drivers that model time (the replay driver) report the scan time a real
    scanner would have needed, move + settle + exposure, independent of replay speed."""

    def simulated_time_s(self) -> float:
        """Simulated seconds since the driver was opened: >= 0, never decreasing."""
        ...
