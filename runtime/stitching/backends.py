"""Where the stitcher's per-pixel work runs: on the CPU (OpenCV) or on a CUDA GPU (CuPy).

``stitch.backend`` chooses, the way ``runtime.ml.backends`` chooses an inference backend:

* ``cpu`` (the default): OpenCV on the host, what the stitcher has always run; its results are
  the reference.
* ``cupy``: subpixel resampling (with the flat-field) and the registration's NCC surface on the
  GPU (:mod:`runtime.stitching.gpu`). Forced and unable to run -- CuPy missing, no CUDA device, or
  its probe disagreeing with the CPU -- it is a :class:`StitchBackendError` naming the key, never
  a silent fallback: an operator who asked for the GPU must learn it is not used.
* ``auto``: ``cupy`` if it imports *and* its probe (a small tile resampled with both kernels and an
  NCC surface, against the CPU's results) passes, else ``cpu``; why cupy was refused is kept.

The probe costs one CUDA context (a fraction of a second, once per accumulator) where CuPy is
installed; nothing where it is not.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from runtime.config import ConfigError
from runtime.stitching.blending import RESAMPLING_KERNELS, subpixel_shift, to_uint8
from runtime.stitching.registration import PairMeasurement, RegistrationParams, _masked_ncc, register_pair

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]
Rect = tuple[int, int, int, int]
StitchBackendName = Literal["auto", "cpu", "cupy"]
STITCH_BACKENDS = ("cpu", "cupy")

# What the probe accepts: the float tiles within this many DN (float32 sums in another order differ by ~1e-5).
PROBE_DN = 1e-3
# The least padded window (pixels) whose NCC surface goes to the GPU. Measured on an H100 host (``python -m bench
# stitch-gpu``, one host core): 25 kpx (the stitcher's own surface, at a quarter of the resolution, for 1024 px
# tiles, 10 % overlap, +-80 px search) took 0.60 ms on the CPU and 2.24 ms on the GPU (kernel launches and copies
# for a sub-millisecond job); 101 kpx 3.4 against 2.0 ms; 405 kpx (full resolution) 39 against 2.1 ms. The
# crossover lies between the first two; smaller surfaces stay on the CPU (the same peaks either way).
GPU_SURFACE_MIN_PX = 1 << 16

__all__ = [
    "STITCH_BACKENDS",
    "CpuKernels",
    "StitchBackendError",
    "StitchKernels",
    "StitchSelection",
    "check_stitch_backend",
    "probe",
    "select_stitch_backend",
]


class StitchBackendError(ConfigError):
    """``stitch.backend`` names a backend that cannot run here (the message says why)."""


class StitchKernels(Protocol):
    """The stitcher's per-pixel steps on one backend."""

    name: str

    def shift(
        self, tile: U8, fy: float, fx: float, scale: F32 | None, kernel: str, opaque: Rect | None = None
    ) -> tuple[F32, U8]:
        """``subpixel_shift(tile, fy, fx, scale, kernel)`` and its ``to_uint8``: valid until the next call
        (a backend may reuse their memory for the next tile).

        ``opaque`` (y0, y1, x0, x1): the tile rectangle where the caller reads only the uint8 result (the
        feather's opaque part, :meth:`runtime.stitching.blending.Feather.opaque`). Inside it the float
        result may lack the ``scale`` gain; the uint8 result is whole everywhere, and so is the float one
        outside the rectangle. None: both whole everywhere."""
        ...

    def register(
        self,
        a: npt.NDArray[np.uint8],
        b: npt.NDArray[np.uint8],
        predicted: tuple[float, float],
        p: RegistrationParams,
        near: tuple[float, float] | None = None,
    ) -> PairMeasurement:
        """``register_pair(a, b, predicted, p, near=near)``."""
        ...


class CpuKernels:
    """OpenCV on the host: :func:`subpixel_shift`, :func:`to_uint8`, :func:`register_pair` as they are.

    :meth:`shift` writes into two buffers of the tile's size that it keeps from tile to tile (16 MiB at
    1024 px RGB): fresh ones per tile were ~3,800 page faults and their zeroing, and the stitcher's
    ``M_MMAP_THRESHOLD`` maps and unmaps every large temporary (measured with perf in ``bench e2e``:
    page faults were a fifth of the stitcher's main thread)."""

    name = "cpu"

    def __init__(self) -> None:
        self._moved: F32 | None = None
        self._moved8: U8 | None = None

    def shift(
        self, tile: U8, fy: float, fx: float, scale: F32 | None, kernel: str, opaque: Rect | None = None
    ) -> tuple[F32, U8]:
        if self._moved is None or self._moved8 is None or self._moved.shape != tile.shape:
            self._moved = np.empty(tile.shape, np.float32)
            self._moved8 = np.empty(tile.shape, np.uint8)
        if scale is None or opaque is None:
            moved = subpixel_shift(tile, fy, fx, scale, kernel, out=self._moved)
            return moved, to_uint8(moved, out=self._moved8)
        # The gain and the rounding in one pass (float32 product, rounded half to even and saturated:
        # the bytes of to_uint8(moved * scale)), and the float gain only outside the opaque rectangle.
        moved = subpixel_shift(tile, fy, fx, None, kernel, out=self._moved)
        cv2.multiply(moved, scale, dst=self._moved8, dtype=cv2.CV_8U)
        h, w = tile.shape[:2]
        y0, y1, x0, x1 = (max(0, min(v, n)) for v, n in zip(opaque, (h, h, w, w), strict=True))
        if y0 >= y1 or x0 >= x1:
            y0 = y1 = x0 = x1 = 0
        for ya, yb, xa, xb in ((0, y0, 0, w), (y1, h, 0, w), (y0, y1, 0, x0), (y0, y1, x1, w)):
            if ya < yb and xa < xb:
                strip = moved[ya:yb, xa:xb]
                np.multiply(strip, scale[ya:yb, xa:xb], out=strip)
        return moved, self._moved8

    def register(
        self,
        a: npt.NDArray[np.uint8],
        b: npt.NDArray[np.uint8],
        predicted: tuple[float, float],
        p: RegistrationParams,
        near: tuple[float, float] | None = None,
    ) -> PairMeasurement:
        return register_pair(a, b, predicted, p, near=near)


class _CupyStitch:
    """:class:`runtime.stitching.gpu.CupyKernels` behind :class:`StitchKernels`."""

    name = "cupy"

    def __init__(self) -> None:
        from runtime.stitching.gpu import CupyKernels  # imports cupy

        self.kernels = CupyKernels()
        self.device = self.kernels.device

    def shift(
        self, tile: U8, fy: float, fx: float, scale: F32 | None, kernel: str, opaque: Rect | None = None
    ) -> tuple[F32, U8]:
        return self.kernels.shift(tile, fy, fx, scale, kernel)  # whole everywhere (``opaque`` is a licence)

    def register(
        self,
        a: npt.NDArray[np.uint8],
        b: npt.NDArray[np.uint8],
        predicted: tuple[float, float],
        p: RegistrationParams,
        near: tuple[float, float] | None = None,
    ) -> PairMeasurement:
        return register_pair(a, b, predicted, p, surface=self._surface, near=near)

    def _surface(self, wa: F32, wb: F32, lo: tuple[int, int], hi: tuple[int, int], min_count: float) -> F64:
        """The NCC surface on the GPU where it is big enough to pay for its launches and copies, else the CPU's
        (the same peaks either way)."""
        padded = (hi[0] - lo[0] + wb.shape[0]) * (hi[1] - lo[1] + wb.shape[1])
        if padded >= GPU_SURFACE_MIN_PX:
            return self.kernels.ncc_surface(wa, wb, lo, hi, min_count)
        return _masked_ncc(wa, wb, lo, hi, min_count)


def probe(kernels: StitchKernels) -> None:
    """Raise RuntimeError unless ``kernels`` reproduce the CPU on a small tile (both resampling kernels, with a
    flat-field gain) and on a small pair of overlapping tiles (the registered shift within 0.001 px)."""
    rng = np.random.default_rng(7)
    tile = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    scale = rng.uniform(0.9, 1.2, tile.shape).astype(np.float32)
    for kernel in RESAMPLING_KERNELS:
        got, got8 = kernels.shift(tile, 0.3, -0.45, scale, kernel)
        want = subpixel_shift(tile, 0.3, -0.45, scale, kernel)
        diff = float(np.abs(np.asarray(got, np.float64) - want).max()) if got.shape == want.shape else np.inf
        if not diff <= PROBE_DN:
            raise RuntimeError(f"probe: {kernel} resampling differs from the CPU by {diff:.3g} DN")
        if int(np.abs(got8.astype(np.int16) - to_uint8(want)).max()) > 1:
            raise RuntimeError(f"probe: {kernel} rounding differs from the CPU by more than 1 DN")
    # Smooth random texture (white noise alone reads as glass): b's origin at (150, 3) in a's frame.
    scene = cv2.GaussianBlur(rng.normal(128, 40, (360, 220)).astype(np.float32), (0, 0), 2.0)
    grey = np.clip(scene, 0, 255).astype(np.uint8)
    a, b = grey[:200, :200], grey[150:350, 3:203]
    params = RegistrationParams()
    got_m, want_m = kernels.register(a, b, (148.0, 0.0), params), register_pair(a, b, (148.0, 0.0), params)
    off = max(abs(got_m.shift[0] - want_m.shift[0]), abs(got_m.shift[1] - want_m.shift[1]))
    if got_m.reason != want_m.reason or not off <= 0.001:
        raise RuntimeError(
            f"probe: registration gave {got_m.reason} {got_m.shift}, the CPU {want_m.reason} {want_m.shift}"
        )


def installed() -> dict[str, str | None]:
    """Per backend: None if importable here, else why not (cheap: no import, no GPU work)."""
    return {"cpu": None, "cupy": None if importlib.util.find_spec("cupy") is not None else "cupy not installed"}


def _forced(name: str, why: str) -> StitchBackendError:
    return StitchBackendError(f"stitch.backend = {name!r} was forced but cannot run here: {why}")


def check_stitch_backend(preference: str, available: dict[str, str | None] | None = None) -> None:
    """Raise :class:`StitchBackendError` where ``stitch.backend`` forces a backend whose module cannot be found here
    (``cupy`` without CuPy installed). For the daemon's start and each scan's config: a module lookup only -- no
    import, no CUDA context in the supervisor; the stitcher's :func:`select_stitch_backend` still runs the full
    probe (a CuPy that imports but finds no device, or disagrees with the CPU, fails the scan there).
    ``available``: :func:`installed`'s answer (tests)."""
    if preference not in STITCH_BACKENDS:
        return  # auto (falls back) or an unknown name (select_stitch_backend and the config refuse it)
    why = (available if available is not None else installed()).get(preference)
    if why is not None:
        raise _forced(preference, why)


@dataclass
class StitchSelection:
    kernels: StitchKernels
    refused: dict[str, str] = field(default_factory=dict)  # backends tried before the chosen one, and why


def select_stitch_backend(preference: str = "cpu", available: dict[str, str | None] | None = None) -> StitchSelection:
    """The backend ``stitch.backend`` asks for: ``cpu``, ``cupy`` (an error if it cannot run), or ``auto`` (cupy if
    it is installed and passes :func:`probe`, else cpu). ``available``: :func:`installed`'s answer (tests)."""
    if preference not in ("auto", *STITCH_BACKENDS):
        raise StitchBackendError(f"stitch.backend: unknown backend {preference!r}; expected auto, cpu or cupy")
    if preference == "cpu":
        return StitchSelection(CpuKernels())
    why = (available if available is not None else installed()).get("cupy")
    if why is None:
        try:
            kernels = _CupyStitch()
            probe(kernels)
            return StitchSelection(kernels)
        except Exception as err:  # any failure to start or to match the CPU refuses cupy, with the reason
            why = f"{type(err).__name__}: {err}"
    if preference == "cupy":
        raise _forced("cupy", why)
    return StitchSelection(CpuKernels(), {"cupy": why})
