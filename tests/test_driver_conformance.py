"""The driver conformance suite (runtime.devices.testing) run against the replay driver and an
in-memory driver, and shown to catch broken drivers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from runtime.devices.protocols import Driver, DriverError, ScanArea, StagePosition, check_frame_buffer
from runtime.devices.testing import DriverFactory, DriverTests
from tests.conftest import SMALL

# --------------------------------------------------------------------------- the replay driver


class TestReplayDriver(DriverTests):
    """hw_sim.replay over the session's small synthetic recording, opened as the daemon opens it."""

    expect_simulated_clock = True
    scan_overlap = SMALL.overlap
    max_scan_fields = SMALL.fields_x * SMALL.fields_y  # the whole recorded grid

    @pytest.fixture
    def driver_factory(self, small_recording: Path) -> DriverFactory:
        return "hw_sim.replay:open_replay_driver", {"recording": str(small_recording)}

    def unreachable_xy_um(self, driver: Driver) -> tuple[float, float]:
        # A field's width beyond the scanned area's corner: no recorded field is near.
        area = driver.default_scan_area()
        assert area is not None
        return (area.x_um - area.width_um, area.y_um - area.height_um)

    def invalid_driver_options(self, options: dict[str, Any]) -> list[dict[str, Any]]:
        return [*super().invalid_driver_options(options), {"recording": ""}, {**options, "pace": -1.0}]


# --------------------------------------------------------------------------- an in-memory driver


class MemoryStage:
    """A stage with travel limits: 0..50 mm in x and y, ±1 mm in z."""

    def __init__(self) -> None:
        self._pos = StagePosition(1000.0, 2000.0, 0.0)

    def move_xy(self, x_um: float, y_um: float) -> None:
        if not (0 <= x_um <= 50_000 and 0 <= y_um <= 50_000):
            raise DriverError(f"x={x_um} y={y_um} µm is outside the stage's travel (0-50000 µm)")
        self._pos = StagePosition(x_um, y_um, self._pos.z_um)

    def move_z(self, z_um: float) -> None:
        if abs(z_um) > 1000:
            raise DriverError(f"z={z_um} µm is outside the stage's travel (±1000 µm)")
        self._pos = StagePosition(self._pos.x_um, self._pos.y_um, z_um)

    def position(self) -> StagePosition:
        return self._pos


class MemoryCamera:
    """Frames whose grey level follows the stage position."""

    def __init__(self, stage: MemoryStage) -> None:
        self._stage = stage

    @property
    def frame_shape(self) -> tuple[int, int]:
        return (48, 64)

    @property
    def pixel_size_um(self) -> float:
        return 0.5

    def snap(self) -> npt.NDArray[np.uint8]:
        p = self._stage.position()
        frame = np.empty((*self.frame_shape, 3), np.uint8)
        frame[...] = int(p.x_um + p.y_um + 10 * p.z_um) % 256
        return frame


class GrabberCamera(MemoryCamera):
    """A FrameGrabber: writes the frame into the caller's buffer."""

    def snap_into(self, out: npt.NDArray[np.uint8]) -> None:
        check_frame_buffer(out, self.frame_shape)
        out[...] = self.snap()


class MemoryDriver:
    """No default scan area, no simulated clock."""

    def __init__(self, camera: type[MemoryCamera] = MemoryCamera, stage: type[MemoryStage] = MemoryStage) -> None:
        self._stage = stage()
        self._camera = camera(self._stage)
        self.closed = False

    @property
    def camera(self) -> MemoryCamera:
        return self._camera

    @property
    def stage(self) -> MemoryStage:
        return self._stage

    def default_scan_area(self) -> ScanArea | None:
        return None

    def close(self) -> None:
        self.closed = True


class TestMemoryDriver(DriverTests):
    """A driver with no factory: the ``driver`` fixture is the hook."""

    @pytest.fixture
    def driver(self) -> Iterator[Driver]:
        d = MemoryDriver()
        yield d
        d.close()

    def unreachable_xy_um(self, driver: Driver) -> tuple[float, float]:
        return (-10.0, 100.0)

    def unreachable_z_um(self, driver: Driver) -> float:
        return 5000.0


class TestMemoryFrameGrabber(TestMemoryDriver):
    """The same driver with a camera that is a FrameGrabber (snap_into)."""

    @pytest.fixture
    def driver(self) -> Iterator[Driver]:
        d = MemoryDriver(camera=GrabberCamera)
        yield d
        d.close()


# --------------------------------------------------------------------------- broken drivers


class FloatFrames(MemoryCamera):
    def snap(self) -> Any:
        return super().snap().astype(np.float32)


class FortranFrames(MemoryCamera):
    def snap(self) -> Any:
        return np.asfortranarray(super().snap())


class OneBuffer(MemoryCamera):
    """Reuses one frame buffer: the focus loop's kept capture would change under it."""

    buf: npt.NDArray[np.uint8] | None = None

    def snap(self) -> npt.NDArray[np.uint8]:
        frame = super().snap()
        if self.buf is None:
            self.buf = frame
        self.buf[...] = frame
        return self.buf


class OffByOneGrabber(MemoryCamera):
    """snap_into() writes a frame that is not the one snap() returns there."""

    def snap_into(self, out: npt.NDArray[np.uint8]) -> None:
        out[...] = self.snap() + 1


class LaxGrabber(MemoryCamera):
    """snap_into() writes whatever fits, and accepts any buffer."""

    def snap_into(self, out: npt.NDArray[np.uint8]) -> None:
        out[...] = self.snap()[: out.shape[0], : out.shape[1]] if out.shape[1] <= 64 else 0


class NumpyShape(MemoryCamera):
    @property
    def frame_shape(self) -> tuple[int, int]:
        return (np.int64(48), np.int64(64))  # type: ignore[return-value]  # the fault under test


class StuckZ(MemoryStage):
    def move_z(self, z_um: float) -> None:
        pass


class ValueErrorStage(MemoryStage):
    def move_xy(self, x_um: float, y_um: float) -> None:
        try:
            super().move_xy(x_um, y_um)
        except DriverError as err:
            raise ValueError(str(err)) from None


class CloseOnce(MemoryDriver):
    def close(self) -> None:
        if self.closed:
            raise DriverError("already closed")
        self.closed = True


CheckFailed = (AssertionError, pytest.fail.Exception)


@pytest.mark.parametrize(
    ("make", "check", "error"),
    [
        pytest.param(lambda: MemoryDriver(camera=FloatFrames), "test_snap_returns_a_frame", CheckFailed, id="float"),
        pytest.param(lambda: MemoryDriver(camera=FortranFrames), "test_snap_returns_a_frame", CheckFailed, id="F"),
        pytest.param(lambda: MemoryDriver(camera=OneBuffer), "test_frames_belong_to_the_caller", CheckFailed, id="buf"),
        pytest.param(lambda: MemoryDriver(camera=NumpyShape), "test_frame_shape", CheckFailed, id="np-shape"),
        pytest.param(
            lambda: MemoryDriver(camera=OffByOneGrabber),
            "test_snap_into_writes_the_frame_snap_returns",
            CheckFailed,
            id="grab-other",
        ),
        pytest.param(
            lambda: MemoryDriver(camera=LaxGrabber),
            "test_snap_into_writes_the_frame_snap_returns",
            CheckFailed,
            id="lax",
        ),
        pytest.param(lambda: MemoryDriver(stage=StuckZ), "test_move_z_keeps_xy", CheckFailed, id="stuck-z"),
        pytest.param(
            lambda: MemoryDriver(stage=ValueErrorStage), "test_unreachable_xy_raises_driver_error", ValueError, id="err"
        ),
        pytest.param(CloseOnce, "test_close_twice", DriverError, id="close"),
    ],
)
def test_the_suite_catches_a_broken_driver(make: Any, check: str, error: Any) -> None:
    with pytest.raises(error):
        getattr(TestMemoryDriver(), check)(make())


def test_the_runtime_does_not_import_the_suite() -> None:
    """Only tests import runtime.devices.testing (and with it pytest); no runtime module does."""
    code = """
import importlib, pkgutil, sys
import hw_sim, runtime
for pkg in (runtime, hw_sim):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if m.name != "runtime.devices.testing":
            importlib.import_module(m.name)
loaded = [m for m in ("pytest", "runtime.devices.testing") if m in sys.modules]
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
