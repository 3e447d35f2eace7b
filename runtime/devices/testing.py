"""A conformance suite for drivers, to subclass in a pytest module.

Like zarr-python's ``zarr.testing.store.StoreTests``: a driver author subclasses
:class:`DriverTests`, says how to open the driver (a fixture), and pytest runs
every check of the contract in :mod:`runtime.devices.protocols` against it::

    import pytest
    from runtime.devices.testing import DriverTests

    class TestMyScanner(DriverTests):
        @pytest.fixture
        def driver_factory(self):
            return "my_scanner.driver:open_driver", {"port": "/dev/ttyUSB0"}

This module needs pytest (``pip install pytest``, or the ``test`` extra); only
tests import it, never the runtime.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial
from numbers import Real
from typing import Any

import numpy as np
import pytest

from runtime.devices.loading import open_driver
from runtime.devices.protocols import (
    Camera,
    Driver,
    DriverError,
    FrameGrabber,
    ScanArea,
    SimulatedClock,
    Stage,
    StagePosition,
)
from runtime.devices.scan_plan import serpentine_plan

__all__ = ["DriverFactory", "DriverTests"]

DriverFactory = tuple[str, dict[str, Any]]
"""``("module:callable", options)``: the driver as a configuration names it (``[driver]``
``factory`` and ``options``)."""


def _is_real(value: object) -> bool:
    """A finite real number (int or float, numpy scalars included), not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


class DriverTests:
    """The contract of :class:`~runtime.devices.protocols.Driver`, its ``Camera`` and ``Stage``.

    What it checks, in the terms the acquisition worker and the focus strategies use a driver:

    * the driver, its ``camera`` and its ``stage`` pass ``isinstance`` against the
      runtime-checkable protocols (as :func:`runtime.devices.loading.open_driver` requires),
      and the factory, if given, is opened through ``open_driver`` like the daemon does;
    * ``frame_shape`` is two positive ints and ``pixel_size_um`` a finite number > 0, both
      fixed while the driver is open;
    * ``snap()`` returns a C-contiguous ``frame_shape + (3,)`` uint8 array at every scan
      position and z tried, leaves the stage where it was, and hands over a frame the
      caller owns (a later snap does not change it, nor share its memory);
    * a camera that is a :class:`FrameGrabber` writes with ``snap_into(out)`` the frame ``snap()``
      returns at the same position, only into ``out``, and refuses an ``out`` that cannot take a
      frame with ValueError;
    * ``move_xy``/``move_z`` are reflected by ``position()`` (the commanded position),
      each leaving the other axes alone, and repeating a move is accepted;
    * a position the driver cannot serve raises :class:`DriverError` with a message, and
      the driver still works afterwards (move back, snap) and closes;
    * ``close()`` may be called twice; ``default_scan_area()`` is a ``ScanArea`` or None;
    * a :class:`SimulatedClock` reports finite seconds >= 0 that never decrease and grow
      over a move and a snap;
    * invalid factory options are refused with :class:`DriverError`.

    Hooks (override in the subclass; only ``driver_factory`` or ``driver`` is required):

    ``driver_factory`` (fixture)
        ``("module:callable", options)`` as the configuration names the driver. The default
        ``driver`` fixture opens it with ``open_driver``. Return None (the default) to skip
        the factory tests and override ``driver`` instead.
    ``driver`` (fixture)
        An open driver; closed after the test (the suite closes it too: ``close`` must be
        idempotent). Every test gets a fresh one.
    ``scan_positions(driver)``
        Stage (x, y) positions in µm where the camera can take a frame. Default: the
        first ``max_scan_fields`` fields of the serpentine plan the acquisition worker
        would make over ``default_scan_area()`` with ``scan_overlap``; with no default
        area, the stage's position when opened.
    ``z_positions(driver)``
        z values (µm) to move to and snap at. Default: the stage's z when opened plus each
        of ``z_offsets_um``.
    ``unreachable_xy_um(driver)`` / ``unreachable_z_um(driver)``
        A position the driver must refuse: ``move_xy``/``move_z`` there, or the ``snap``
        that follows, raises DriverError. Default None: those tests are skipped.
    ``invalid_driver_options(options)``
        Option sets the factory must refuse with DriverError (through ``open_driver``).
        Default: the valid options plus an unknown key.

    Class attributes: ``position_tolerance_um`` (how far ``position()`` may be from the
    commanded value, e.g. a controller's step size; default 1e-6), ``z_offsets_um``,
    ``max_scan_fields`` (4), ``scan_overlap`` (0.1, use the value the scans use) and
    ``expect_simulated_clock`` (False; True: the driver must implement SimulatedClock).
    """

    position_tolerance_um: float = 1e-6
    z_offsets_um: tuple[float, ...] = (-2.0, -0.5, 0.0, 0.75, 2.0)
    max_scan_fields: int = 4
    scan_overlap: float = 0.1
    expect_simulated_clock: bool = False

    # ------------------------------------------------------------------ hooks

    @pytest.fixture
    def driver_factory(self) -> DriverFactory | None:
        """Hook: ``("module:callable", options)``, or None when ``driver`` is overridden."""
        return None

    @pytest.fixture
    def driver(self, driver_factory: DriverFactory | None) -> Iterator[Driver]:
        """Hook: an open driver, closed after the test. Default: ``open_driver(*driver_factory)``."""
        if driver_factory is None:
            raise NotImplementedError(f"{type(self).__name__}: override the driver_factory or the driver fixture")
        factory, options = driver_factory
        d = open_driver(factory, dict(options))
        try:
            yield d
        finally:
            d.close()

    def scan_positions(self, driver: Driver) -> list[tuple[float, float]]:
        """Hook: (x, y) stage positions (µm) where the camera can take a frame."""
        area = driver.default_scan_area()
        if area is None:
            p = driver.stage.position()
            return [(p.x_um, p.y_um)]
        h, w = driver.camera.frame_shape
        px = driver.camera.pixel_size_um
        plan = serpentine_plan(area, w * px, h * px, self.scan_overlap)
        return [(f.x_um, f.y_um) for f in plan.fields[: self.max_scan_fields]]

    def z_positions(self, driver: Driver) -> list[float]:
        """Hook: z values (µm) to move to and snap at."""
        z0 = driver.stage.position().z_um
        return [z0 + dz for dz in self.z_offsets_um]

    def unreachable_xy_um(self, driver: Driver) -> tuple[float, float] | None:
        """Hook: an (x, y) the driver must refuse with DriverError (at the move or the snap)."""
        return None

    def unreachable_z_um(self, driver: Driver) -> float | None:
        """Hook: a z the driver must refuse with DriverError (at the move or the snap)."""
        return None

    def invalid_driver_options(self, options: dict[str, Any]) -> list[dict[str, Any]]:
        """Hook: option sets the factory must refuse with DriverError."""
        return [{**options, "no_such_option_for_a_driver": 1}]

    # ------------------------------------------------------------------ helpers

    def _assert_position(self, got: StagePosition, x: float, y: float, z: float, after: str) -> None:
        assert isinstance(got, StagePosition), f"position() after {after} returned {type(got).__name__}"
        tol = self.position_tolerance_um
        want = StagePosition(x, y, z)
        for axis in ("x_um", "y_um", "z_um"):
            value, expected = getattr(got, axis), getattr(want, axis)
            assert _is_real(value), f"position().{axis} after {after} is {value!r}, not a finite number"
            assert math.isclose(value, expected, rel_tol=0.0, abs_tol=tol), (
                f"position() after {after} is {got}, expected {want} (tolerance {tol} µm)"
            )

    def _assert_frame(self, frame: object, camera: Camera, where: str) -> None:
        assert isinstance(frame, np.ndarray), f"snap() {where} returned {type(frame).__name__}, not a numpy array"
        want = (*camera.frame_shape, 3)
        assert frame.shape == want, f"snap() {where}: shape {frame.shape}, expected frame_shape + (3,) = {want}"
        assert frame.dtype == np.uint8, f"snap() {where}: dtype {frame.dtype}, expected uint8"
        assert frame.flags.c_contiguous, f"snap() {where}: the frame is not C-contiguous"

    def _refused(self, driver: Driver, what: str, move: Callable[[], object]) -> None:
        """``move()`` then snap must raise DriverError with a message; the driver recovers."""
        (x, y), z = self.scan_positions(driver)[0], self.z_positions(driver)[0]
        with pytest.raises(DriverError) as info:
            move()
            driver.camera.snap()
        assert str(info.value).strip(), f"the DriverError for {what} has no message"
        driver.stage.move_xy(x, y)
        driver.stage.move_z(z)
        self._assert_frame(driver.camera.snap(), driver.camera, f"after the DriverError for {what}")

    # ------------------------------------------------------------------ protocols

    def test_driver_is_a_driver(self, driver: Driver) -> None:
        assert isinstance(driver, Driver), f"{type(driver).__name__} does not implement the Driver protocol"
        assert isinstance(driver.camera, Camera), f"{type(driver.camera).__name__} is not a Camera"
        assert isinstance(driver.stage, Stage), f"{type(driver.stage).__name__} is not a Stage"

    def test_simulated_clock_when_expected(self, driver: Driver) -> None:
        if self.expect_simulated_clock:
            assert isinstance(driver, SimulatedClock), f"{type(driver).__name__} has no simulated_time_s()"

    def test_default_scan_area(self, driver: Driver) -> None:
        area = driver.default_scan_area()
        assert area is None or isinstance(area, ScanArea), f"default_scan_area() returned {area!r}"
        if area is not None:
            values = (area.x_um, area.y_um, area.width_um, area.height_um)
            assert all(_is_real(v) for v in values), f"default_scan_area() {area} is not finite"

    # ------------------------------------------------------------------ camera

    def test_frame_shape(self, driver: Driver) -> None:
        shape = driver.camera.frame_shape
        assert isinstance(shape, tuple) and len(shape) == 2, f"frame_shape {shape!r} is not a (height, width) tuple"
        assert all(type(n) is int and n >= 1 for n in shape), f"frame_shape {shape!r}: expected two ints >= 1"
        assert driver.camera.frame_shape == shape, "frame_shape changed between two reads"

    def test_pixel_size(self, driver: Driver) -> None:
        px = driver.camera.pixel_size_um
        assert _is_real(px) and px > 0, f"pixel_size_um {px!r}: expected a finite number > 0"
        assert driver.camera.pixel_size_um == px, "pixel_size_um changed between two reads"

    def test_snap_returns_a_frame(self, driver: Driver) -> None:
        x, y = self.scan_positions(driver)[0]
        driver.stage.move_xy(x, y)
        self._assert_frame(driver.camera.snap(), driver.camera, f"at ({x}, {y})")

    def test_snap_at_every_scan_position_and_z(self, driver: Driver) -> None:
        shape, px = driver.camera.frame_shape, driver.camera.pixel_size_um
        positions = self.scan_positions(driver)
        assert positions, "scan_positions() is empty"
        for x, y in positions:
            driver.stage.move_xy(x, y)
            self._assert_frame(driver.camera.snap(), driver.camera, f"at ({x}, {y})")
        for z in self.z_positions(driver):
            driver.stage.move_z(z)
            self._assert_frame(driver.camera.snap(), driver.camera, f"at z={z}")
        assert driver.camera.frame_shape == shape, "frame_shape changed after moves"
        assert driver.camera.pixel_size_um == px, "pixel_size_um changed after moves"

    def test_snap_does_not_move_the_stage(self, driver: Driver) -> None:
        x, y = self.scan_positions(driver)[0]
        driver.stage.move_xy(x, y)
        before = driver.stage.position()
        driver.camera.snap()
        assert driver.stage.position() == before, f"snap() moved the stage from {before} to {driver.stage.position()}"

    def test_frames_belong_to_the_caller(self, driver: Driver) -> None:
        positions = self.scan_positions(driver)
        zs = self.z_positions(driver)
        driver.stage.move_xy(*positions[0])
        driver.stage.move_z(zs[0])
        first = driver.camera.snap()
        kept = first.copy()
        driver.stage.move_z(zs[-1])
        second = driver.camera.snap()
        driver.stage.move_xy(*positions[-1])
        third = driver.camera.snap()
        assert not np.shares_memory(first, second) and not np.shares_memory(first, third), (
            "snap() returned memory shared with an earlier frame"
        )
        assert np.array_equal(first, kept), "a later snap() changed an earlier frame"

    def test_snap_into_writes_the_frame_snap_returns(self, driver: Driver) -> None:
        camera = driver.camera
        if not isinstance(camera, FrameGrabber):
            pytest.skip("the camera is not a FrameGrabber (no snap_into)")
        h, w = camera.frame_shape
        positions, zs = self.scan_positions(driver), self.z_positions(driver)
        for (x, y), z in [(positions[0], zs[0]), (positions[-1], zs[len(zs) // 2])]:
            driver.stage.move_xy(x, y)
            driver.stage.move_z(z)
            out = np.full((h, w, 3), 7, np.uint8)
            camera.snap_into(out)
            frame = camera.snap()
            assert np.array_equal(out, frame), f"snap_into() at ({x}, {y}, z={z}) wrote another frame than snap()"
            assert not np.shares_memory(out, frame), "snap() returned the buffer snap_into() wrote"
        bad_buffers: list[tuple[Any, str]] = [
            (np.zeros((h, w + 1, 3), np.uint8), "a wrong shape"),
            (np.zeros((h, w, 3), np.float32), "float32"),
            (np.asfortranarray(np.zeros((h, w, 3), np.uint8)), "a Fortran-ordered array"),
        ]
        for bad, what in bad_buffers:
            with pytest.raises(ValueError):
                camera.snap_into(bad)
                pytest.fail(f"snap_into() accepted {what}")

    # ------------------------------------------------------------------ stage

    def test_initial_position(self, driver: Driver) -> None:
        p = driver.stage.position()
        self._assert_position(p, p.x_um, p.y_um, p.z_um, "opening")

    def test_move_xy_keeps_z(self, driver: Driver) -> None:
        z = driver.stage.position().z_um
        for x, y in self.scan_positions(driver):
            driver.stage.move_xy(x, y)
            self._assert_position(driver.stage.position(), x, y, z, f"move_xy({x}, {y})")

    def test_move_z_keeps_xy(self, driver: Driver) -> None:
        x, y = self.scan_positions(driver)[0]
        driver.stage.move_xy(x, y)
        for z in self.z_positions(driver):
            driver.stage.move_z(z)
            self._assert_position(driver.stage.position(), x, y, z, f"move_z({z})")

    def test_repeated_moves(self, driver: Driver) -> None:
        x, y = self.scan_positions(driver)[0]
        z = self.z_positions(driver)[0]
        for _ in range(2):
            driver.stage.move_xy(x, y)
            driver.stage.move_z(z)
        self._assert_position(driver.stage.position(), x, y, z, "repeating move_xy and move_z")

    # ------------------------------------------------------------------ errors and close

    def test_unreachable_xy_raises_driver_error(self, driver: Driver) -> None:
        bad = self.unreachable_xy_um(driver)
        if bad is None:
            pytest.skip("no unreachable_xy_um() given")
        self._refused(driver, f"x, y = {bad}", partial(driver.stage.move_xy, *bad))

    def test_unreachable_z_raises_driver_error(self, driver: Driver) -> None:
        bad = self.unreachable_z_um(driver)
        if bad is None:
            pytest.skip("no unreachable_z_um() given")
        self._refused(driver, f"z = {bad}", partial(driver.stage.move_z, bad))

    def test_close_after_driver_error(self, driver: Driver) -> None:
        bad = self.unreachable_xy_um(driver)
        if bad is None:
            pytest.skip("no unreachable_xy_um() given")
        with pytest.raises(DriverError):
            driver.stage.move_xy(*bad)
            driver.camera.snap()
        driver.close()

    def test_close_twice(self, driver: Driver) -> None:
        driver.close()
        driver.close()

    # ------------------------------------------------------------------ simulated clock

    def test_simulated_clock(self, driver: Driver) -> None:
        if not isinstance(driver, SimulatedClock):
            pytest.skip("not a SimulatedClock")
        t = driver.simulated_time_s()
        assert _is_real(t) and t >= 0, f"simulated_time_s() is {t!r}, expected a finite number >= 0"
        start = t
        positions, zs = self.scan_positions(driver), self.z_positions(driver)
        steps: list[tuple[str, Callable[[], object]]] = []
        for x, y in [positions[-1], positions[0]]:
            steps.append((f"move_xy({x}, {y})", partial(driver.stage.move_xy, x, y)))
            for z in [zs[0], zs[-1]]:
                steps.append((f"move_z({z})", partial(driver.stage.move_z, z)))
                steps.append(("snap()", driver.camera.snap))
        for what, step in steps:
            step()
            now = driver.simulated_time_s()
            assert _is_real(now) and now >= t, f"simulated_time_s() went from {t} to {now} over {what}"
            t = now
        assert t > start, "simulated_time_s() did not advance over moves and snaps"

    # ------------------------------------------------------------------ factory

    def test_open_driver_by_factory(self, driver_factory: DriverFactory | None) -> None:
        if driver_factory is None:
            pytest.skip("no driver_factory given")
        factory, options = driver_factory
        d = open_driver(factory, dict(options))
        try:
            assert isinstance(d, Driver)
        finally:
            d.close()

    def test_invalid_options_raise_driver_error(self, driver_factory: DriverFactory | None) -> None:
        if driver_factory is None:
            pytest.skip("no driver_factory given")
        factory, options = driver_factory
        for bad in self.invalid_driver_options(dict(options)):
            try:
                d = open_driver(factory, bad)
            except DriverError as err:
                assert str(err).strip(), f"the DriverError for options {bad} has no message"
                continue
            d.close()
            pytest.fail(f"{factory} accepted invalid options {bad}")
