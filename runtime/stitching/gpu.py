"""The stitcher's per-pixel kernels on a CUDA GPU with CuPy: subpixel resampling and the NCC surface.

The same algorithms as the CPU path, written once against an array module ``xp`` (numpy or cupy),
so that the tests check them with numpy on machines without a GPU and the device runs them with
cupy:

* :func:`shift_xp`: :func:`runtime.stitching.blending.subpixel_shift` -- the separable Keys cubic or
  Lanczos-3 filter with the same float32 weights (computed on the host for the exact fraction),
  edges replicated, rows then columns, times the flat-field's inverse gain; and :func:`to_uint8_xp`,
  its rounding (half to even, saturated), so that only the two results travel back.
* :func:`masked_ncc_xp`: the registration's masked NCC surface
  (``runtime.stitching.registration._masked_ncc``), its cross term by FFT in float64 instead of
  OpenCV's ``matchTemplate`` in float32 (the surfaces agree to ~1e-6; the peaks the search takes
  from them are the same, so the registered shifts are too).

:class:`CupyKernels` holds the device state (the flat-field's inverse uploaded once, pinned host
buffers for the downloads). Where the tile goes: the camera frame (uint8) is uploaded once per
tile, flat-field and resampling run on the device, and the float32 tile and its uint8 rounding come
back to be feathered into the canvas blocks on the host (the canvas stays in host memory: it is
spilled and written from there). Registration's other steps (high-pass, Lucas-Kanade on the
overlap, a few thousand pixels at a time) stay on the CPU: launched one by one they would cost
more in kernel launches and transfers than they do on a core.

CuPy is imported only by :class:`CupyKernels` (``pip install cupy-cuda12x`` or ``cupy-cuda13x``):
the runtime imports and runs without it.
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.stitching.blending import RESAMPLING_KERNELS, cubic_kernel, lanczos_kernel

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]

__all__ = ["CupyKernels", "masked_ncc_xp", "resampling_weights", "shift_xp", "to_uint8_xp"]


def resampling_weights(fy: float, fx: float, kernel: str) -> tuple[F32, int, F32, int]:
    """(kx, anchor x, ky, anchor y) of :func:`subpixel_shift`'s filter moving content by (fy, fx):
    ``out(x) = sum_i k[i] src(x + i - anchor)``, OpenCV's ``sepFilter2D`` convention."""
    if kernel == "lanczos3":
        kx, ky = lanczos_kernel(-fx), lanczos_kernel(-fy)
        return kx, len(kx) // 2, ky, len(ky) // 2
    if kernel == "cubic":
        (kx, ax), (ky, ay) = cubic_kernel(-fx), cubic_kernel(-fy)
        return kx, ax, ky, ay
    raise ValueError(f"unknown resampling kernel {kernel!r} (one of {', '.join(RESAMPLING_KERNELS)})")


def _filter_axis(xp: ModuleType, a: Any, weights: F32, anchor: int, axis: int) -> Any:
    """``out[.., x, ..] = sum_i w[i] a[.., x + i - anchor, ..]`` along ``axis``, edges replicated (float32)."""
    n = a.shape[axis]
    pad = [(0, 0)] * a.ndim
    pad[axis] = (anchor, len(weights) - 1 - anchor)
    padded = xp.pad(a, pad, mode="edge")
    out = None
    for i, w in enumerate(weights.tolist()):
        index = [slice(None)] * a.ndim
        index[axis] = slice(i, i + n)
        term = padded[tuple(index)] * np.float32(w)
        if out is None:
            out = term
        else:
            out += term
    return out


def shift_xp(xp: ModuleType, tile: Any, fy: float, fx: float, scale: Any | None = None, kernel: str = "cubic") -> Any:
    """:func:`runtime.stitching.blending.subpixel_shift` on ``xp`` arrays (``tile`` uint8 or float32, (h, w[, c]);
    ``scale`` float32 of the same shape or None): the tile moved by (fy, fx), float32."""
    if abs(fy) < 1e-4 and abs(fx) < 1e-4:
        f = tile.astype(xp.float32)
        return f * scale if scale is not None else f
    kx, ax, ky, ay = resampling_weights(fy, fx, kernel)
    rows = _filter_axis(xp, tile.astype(xp.float32), kx, ax, axis=1)
    out = _filter_axis(xp, rows, ky, ay, axis=0)
    if scale is not None:
        out *= scale
    return out


def to_uint8_xp(xp: ModuleType, a: Any) -> Any:
    """:func:`runtime.stitching.blending.to_uint8` on ``xp``: ``rint(clip(a, 0, 255))``, half to even."""
    return xp.rint(xp.clip(a, 0.0, 255.0)).astype(xp.uint8)


def _overlap_rows_xp(xp: ModuleType, lo: int, hi: int, n_self: int, n_other: int, first: bool) -> Any:
    """``registration._overlap_rows`` on ``xp``: per displacement in lo..hi, the rows in the overlap (0/1)."""
    rs = xp.arange(lo, hi + 1)[:, None]
    j = xp.arange(n_self)[None, :]
    inside = (j >= rs) & (j < rs + n_other) if first else (j >= -rs) & (j < n_other - rs)
    return inside.astype(xp.float64)


def masked_ncc_xp(xp: ModuleType, wa: Any, wb: Any, lo: tuple[int, int], hi: tuple[int, int], min_count: float) -> Any:
    """``registration._masked_ncc`` on ``xp``: the overlap-only NCC for every r in [lo, hi] (``wb(p) ~ wa(p + r)``),
    -1 where fewer than ``min_count`` pixels are shared. The cross term is a correlation by FFT (float64) of
    ``wb`` over ``wa`` zero-padded to just the displacements searched, so nothing wraps around."""
    ha, wa_ = wa.shape
    hb, wb_ = wb.shape
    ph, pw = hi[0] - lo[0] + hb, hi[1] - lo[1] + wb_
    a64, b64 = xp.asarray(wa, xp.float64), xp.asarray(wb, xp.float64)
    pad = xp.zeros((ph, pw), xp.float64)
    y0, x0, y1, x1 = max(0, lo[0]), max(0, lo[1]), min(ha, lo[0] + ph), min(wa_, lo[1] + pw)
    if y1 > y0 and x1 > x0:
        pad[y0 - lo[0] : y1 - lo[0], x0 - lo[1] : x1 - lo[1]] = a64[y0:y1, x0:x1]
    # c[i, j] = sum_q pad[q + (i, j)] b[q], cyclic; for i <= ph - hb, j <= pw - wb_ it never wraps.
    spectrum = xp.fft.rfft2(pad) * xp.conj(xp.fft.rfft2(b64, s=(ph, pw)))
    sab = xp.fft.irfft2(spectrum, s=(ph, pw))[: ph - hb + 1, : pw - wb_ + 1]
    ra, ca = _overlap_rows_xp(xp, lo[0], hi[0], ha, hb, True), _overlap_rows_xp(xp, lo[1], hi[1], wa_, wb_, True)
    rb, cb = _overlap_rows_xp(xp, lo[0], hi[0], hb, ha, False), _overlap_rows_xp(xp, lo[1], hi[1], wb_, wa_, False)
    sa = ra @ a64 @ ca.T
    sb = rb @ b64 @ cb.T
    n = xp.outer(ra.sum(axis=1), ca.sum(axis=1))
    safe = xp.maximum(n, 1.0)
    num = sab - sa * sb / safe
    va = ra @ (a64 * a64) @ ca.T - sa * sa / safe
    vb = rb @ (b64 * b64) @ cb.T - sb * sb / safe
    den = xp.sqrt(xp.maximum(va, 0.0) * xp.maximum(vb, 0.0))
    ok = (n >= min_count) & (den > 1e-6 * safe)
    return xp.where(ok, num / xp.where(ok, den, 1.0), -1.0)


class CupyKernels:
    """The kernels above on the current CUDA device, with the host<->device traffic kept to one upload
    of the frame and one download of each result per tile.

    Raises ImportError without CuPy and RuntimeError without a usable CUDA device. The device is put
    in blocking-sync mode where the context is new, so the stitcher sleeps while it waits for a
    transfer instead of spinning a core.
    """

    name = "cupy"

    def __init__(self) -> None:
        import cupy

        rt = cupy.cuda.runtime
        if rt.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
        # Fails where the context exists already (another user in this process): its mode is kept.
        with contextlib.suppress(Exception):
            rt.setDeviceFlags(rt.cudaDeviceScheduleBlockingSync)
        self._cp = cupy
        self.device = str(rt.getDeviceProperties(cupy.cuda.Device().id)["name"].decode())
        self._scale_host: F32 | None = None
        self._scale_dev: Any = None
        self._pinned: dict[tuple[tuple[int, ...], str], npt.NDArray[Any]] = {}

    def _host(self, shape: tuple[int, ...], dtype: type[np.generic], slot: str) -> npt.NDArray[Any]:
        """A page-locked host array (reused per shape and slot): device-to-host copies run at full speed."""
        key = (shape, slot)
        buf = self._pinned.get(key)
        if buf is None:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            mem = self._cp.cuda.alloc_pinned_memory(nbytes)
            buf = np.frombuffer(mem, dtype, int(np.prod(shape))).reshape(shape)
            self._pinned[key] = buf
        return buf

    def shift(self, tile: U8, fy: float, fx: float, scale: F32 | None, kernel: str) -> tuple[F32, U8]:
        """:func:`subpixel_shift` and :func:`to_uint8` of it. The arrays returned are page-locked buffers this
        object reuses: valid until its next call (the accumulator feathers them into the canvas before that)."""
        cp = self._cp
        if scale is not None and scale is not self._scale_host:
            self._scale_host, self._scale_dev = scale, cp.asarray(scale)
        dev = cp.asarray(tile)
        moved = shift_xp(cp, dev, fy, fx, self._scale_dev if scale is not None else None, kernel)
        moved8 = to_uint8_xp(cp, moved)
        out = self._host(moved.shape, np.float32, "f32")
        out8 = self._host(moved8.shape, np.uint8, "u8")
        moved.get(out=out)
        moved8.get(out=out8)
        return out, out8

    def ncc_surface(self, wa: F32, wb: F32, lo: tuple[int, int], hi: tuple[int, int], min_count: float) -> F64:
        """:func:`masked_ncc_xp` on the device for host windows; the surface comes back (it is small)."""
        cp = self._cp
        surface = masked_ncc_xp(cp, cp.asarray(wa), cp.asarray(wb), lo, hi, min_count)
        return np.asarray(surface.get(), np.float64)
