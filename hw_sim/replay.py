"""The replay driver: the runtime's Camera and Stage over a recording.

The stage remembers the commanded position; the camera returns the recorded
field nearest to it, at the commanded z: the recorded plane (within 0.05 µm),
or a blend of the two planes around it whose sharpness lies between theirs
(an approximation of the optics between planes, see ``ReplayCamera._between``).
Recorded fields were imaged at the stage's *actual* position, so the stage error a real scanner has is in the pixels.

A timing model (trapezoidal XY moves, settle, z moves, exposure) accumulates
the scan time a real scanner would need, while replay itself runs as fast as
the pipeline can.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from runtime.devices.protocols import DriverError, RGBImage, ScanArea, StagePosition, check_frame_buffer
from runtime.devices.recording import Recording, Timing


def trapezoid_move_s(distance_um: float, speed_um_s: float, accel_um_s2: float) -> float:
    """Time of a point-to-point move with bounded speed and acceleration."""
    d = abs(distance_um)
    if d == 0:
        return 0.0
    if d < speed_um_s**2 / accel_um_s2:  # never reaches full speed
        return 2.0 * math.sqrt(d / accel_um_s2)
    return d / speed_um_s + speed_um_s / accel_um_s2


class SimClock:
    """Simulated scanner time. With ``pace > 0`` replay also *waits* pace x the modelled
    time, so a UI or a test sees a scan progress at (a multiple of) scanner speed."""

    def __init__(self, pace: float = 0.0) -> None:
        self.t = 0.0
        self.pace = pace

    def advance(self, seconds: float) -> None:
        self.t += seconds
        if self.pace > 0:
            time.sleep(seconds * self.pace)


class ReplayStage:
    def __init__(self, recording: Recording, clock: SimClock) -> None:
        self._rec = recording
        self._timing: Timing = recording.meta.timing
        self._clock = clock
        self._pos = StagePosition(float(recording.stage_xy_um[0, 0]), float(recording.stage_xy_um[0, 1]), 0.0)
        m = recording.meta
        # A commanded position must be within a quarter field of a recorded one.
        self._tol_um = 0.25 * min(m.field_width_um, m.field_height_um)

    def move_xy(self, x_um: float, y_um: float) -> None:
        t = self._timing
        tx = trapezoid_move_s(x_um - self._pos.x_um, t.stage_speed_um_s, t.stage_accel_um_s2)
        ty = trapezoid_move_s(y_um - self._pos.y_um, t.stage_speed_um_s, t.stage_accel_um_s2)
        if tx or ty:
            self._clock.advance(max(tx, ty) + t.settle_s)
        self._pos = StagePosition(x_um, y_um, self._pos.z_um)

    def move_z(self, z_um: float) -> None:
        t = self._timing
        dz = abs(z_um - self._pos.z_um)
        if dz:
            self._clock.advance(dz / t.z_speed_um_s + t.z_settle_s)
        self._pos = StagePosition(self._pos.x_um, self._pos.y_um, z_um)

    def position(self) -> StagePosition:
        return self._pos

    def field_index(self) -> int:
        """The recorded field at the commanded position (DriverError if none is near)."""
        d = np.hypot(self._rec.stage_xy_um[:, 0] - self._pos.x_um, self._rec.stage_xy_um[:, 1] - self._pos.y_um)
        i = int(np.argmin(d))
        if d[i] > self._tol_um:
            raise DriverError(
                f"no recorded field near x={self._pos.x_um:.1f} y={self._pos.y_um:.1f} µm "
                f"(nearest is {d[i]:.1f} µm away); scan the recording's own grid"
            )
        return i


def blend_spectra(
    a: npt.NDArray[np.complex64], b: npt.NDArray[np.complex64], w: float, shape: tuple[int, int]
) -> npt.NDArray[np.uint8]:
    """The frame a fraction ``w`` of the way from one plane to the next, from their ``rfft2`` spectra
    (``a``, ``b``, per channel over axes 0 and 1), whose sharpness lies between theirs.

    A pixel blend of two differently defocused planes is *less* sharp than either (their fine
    detail is out of phase and partly cancels), so a blend's sharpness dips between planes and a
    focus metric sampled there is scalloped. Here each spatial frequency's *power* is the
    linear blend of the two planes' powers (no cancellation), with the pixel blend's phase. A
    gradient metric such as Brenner is (up to the frame's border) a weighted sum of squared
    amplitudes, so it moves linearly from one plane's value to the other's: it cannot dip. What it
    cannot make is a sharpness *peak* between planes (the replayed curve peaks on a recorded
    plane; a fit through samples on both sides of it still lands between planes)."""
    blend = (1.0 - w) * a + w * b
    amp = np.sqrt((1.0 - w) * (a.real**2 + a.imag**2) + w * (b.real**2 + b.imag**2))
    mag = np.abs(blend)
    # Where the blend cancels completely its phase is undefined: the nearer plane's stands in.
    near = a if w <= 0.5 else b
    defined = mag > 1e-3 * (amp + 1e-6)
    phase = np.where(defined, blend / np.maximum(mag, 1e-12), near / np.maximum(np.abs(near), 1e-12))
    img = np.fft.irfft2(amp * phase, s=shape, axes=(0, 1))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def spectrum(frame: npt.NDArray[np.uint8]) -> npt.NDArray[np.complex64]:
    """A frame's spectrum as :func:`blend_spectra` takes it."""
    return np.fft.rfft2(frame.astype(np.float32), axes=(0, 1)).astype(np.complex64)


SNAP_UM = 0.05
"""A commanded z this close to a recorded plane gets the plane itself."""


class ReplayCamera:
    """The camera: the recorded frame at the stage's commanded position and z.

    A :class:`~runtime.devices.protocols.FrameGrabber`: ``snap_into`` writes the frame into the
    caller's buffer (the acquisition worker's ring slot), as a frame grabber's DMA would. The
    decoded planes of the current field are kept (a sweep revisits them) in buffers that are
    reused from field to field: a fresh 3 MiB array per field costs its page faults again.
    """

    def __init__(self, recording: Recording, stage: ReplayStage, clock: SimClock) -> None:
        self._rec = recording
        self._stage = stage
        self._clock = clock
        self._cache_field = -1
        self._cache: dict[int, npt.NDArray[np.uint8]] = {}
        self._spare: list[npt.NDArray[np.uint8]] = []  # buffers of an earlier field's planes
        self.clamped_snaps = 0
        self._spectra: dict[tuple[int, int], npt.NDArray[np.complex64]] = {}  # the last planes' FFTs

    @property
    def frame_shape(self) -> tuple[int, int]:
        return (self._rec.meta.tile_height, self._rec.meta.tile_width)

    @property
    def pixel_size_um(self) -> float:
        return self._rec.meta.pixel_size_um

    def _plane(self, field: int, k: int) -> npt.NDArray[np.uint8]:
        if field != self._cache_field:  # a sweep revisits the planes of one field
            self._spare += self._cache.values()
            self._cache_field, self._cache = field, {}
        frame = self._cache.get(k)
        if frame is None:
            frame = self._spare.pop() if self._spare else np.empty((*self.frame_shape, 3), np.uint8)
            try:
                self._rec.plane_into(field, k, frame)
            except Exception:
                self._spare.append(frame)
                raise
            self._cache[k] = frame
        return frame

    def snap(self) -> RGBImage:
        out = np.empty((*self.frame_shape, 3), np.uint8)
        self.snap_into(out)
        return out

    def snap_into(self, out: RGBImage) -> None:
        check_frame_buffer(out, self.frame_shape)
        self._clock.advance(self._rec.meta.timing.exposure_s)
        field = self._stage.field_index()
        zs = self._rec.z_um[field]
        z = self._stage.position().z_um
        if z <= zs[0] or z >= zs[-1]:
            # Outside the recorded stack the nearest end plane stands in; counted,
            # because a focus strategy that asks for it learns nothing new.
            self.clamped_snaps += 1
            np.copyto(out, self._plane(field, 0 if z <= zs[0] else len(zs) - 1))
            return
        k = int(np.searchsorted(zs, z)) - 1
        w = float((z - zs[k]) / (zs[k + 1] - zs[k]))
        # Within SNAP_UM of a recorded plane the plane itself (the stage's own repeatability).
        if (z - zs[k]) <= SNAP_UM or (zs[k + 1] - z) <= SNAP_UM:
            np.copyto(out, self._plane(field, k if w <= 0.5 else k + 1))
            return
        np.copyto(out, self._between(field, k, w), casting="unsafe")

    def _spectrum(self, field: int, k: int) -> npt.NDArray[np.complex64]:
        key = (field, k)
        spec = self._spectra.get(key)
        if spec is None:
            spec = spectrum(self._plane(field, k))
            if len(self._spectra) >= 4:  # a focus loop probes around one field's focus
                self._spectra.pop(next(iter(self._spectra)))
            self._spectra[key] = spec
        return spec

    def _between(self, field: int, k: int, w: float) -> npt.NDArray[np.uint8]:
        return blend_spectra(self._spectrum(field, k), self._spectrum(field, k + 1), w, self.frame_shape)


class ReplayDriver:
    """Camera + stage over one recording; also a SimulatedClock."""

    def __init__(self, recording: Recording, pace: float = 0.0) -> None:
        self.recording = recording
        self._clock = SimClock(pace)
        self._stage = ReplayStage(recording, self._clock)
        self._camera = ReplayCamera(recording, self._stage, self._clock)

    @property
    def camera(self) -> ReplayCamera:
        return self._camera

    @property
    def stage(self) -> ReplayStage:
        return self._stage

    def default_scan_area(self) -> ScanArea | None:
        return self.recording.meta.area

    def simulated_time_s(self) -> float:
        return self._clock.t

    def close(self) -> None:
        pass


def open_replay_driver(recording: str | None = None, pace: float = 0.0) -> ReplayDriver:
    """The driver factory named in the default configuration.

    ``driver.options``: ``recording`` (path; start_scan's ``recording`` overrides it) and
    ``pace`` (0: as fast as possible; 1: real scanner speed by the timing model).
    """
    if not recording:
        raise DriverError("the replay driver needs driver.options.recording (or start_scan's 'recording')")
    if pace < 0:
        raise DriverError(f"driver.options.pace must be >= 0, got {pace}")
    return ReplayDriver(Recording.open(Path(recording)), pace=pace)
