"""``python -m bench stitch --resample``: the subpixel placement kernels, error against truth per cost.

Each kernel moves a frame by a fraction of a pixel (what the stitcher does to every tile before it is
pasted); the result is compared with the truth, the same content sampled at the shifted position:

``simulator``
    ``hw_sim`` frames (its tissue, optics and camera noise) of 384 px; truth: the noiseless frame
    rendered at the shifted stage position.
``photo``
    content the simulator never made: scikit-image's retina photograph and IHC section, each
    averaged over 4 x 4 blocks (a camera integrating over its pixels); truth: the same blocks taken
    1-3 source pixels further, i.e. the scene moved by a quarter, half or three quarters of a pixel
    (fractions above 0.5 are moved by f - 1, as the stitcher does). Input noiseless and with camera-
    like noise (Gaussian, 2 DN).

RMS error in DN over the interior (8 px margin) of all three channels, over a set of fractions; and
the CPU ms per 1024 px RGB tile on one core (OpenCV one thread, fastest of 5 batches): the filter
from uint8 to float32. ``opencv cubic`` is ``cv2.warpAffine(INTER_CUBIC)`` on uint8 (fixed point,
positions quantised to 1/32 px, a = -0.75), for reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]
Shift = Callable[[U8, float, float], npt.NDArray[Any]]

FRACTIONS = [(0.25, -0.5), (-0.25, 0.25), (0.5, 0.5), (0.0, -0.25), (-0.5, 0.0)]


def _kernels() -> dict[str, Shift]:
    import cv2

    from runtime.stitching.blending import RESAMPLING_KERNELS, subpixel_shift

    def opencv_cubic(tile: U8, fy: float, fx: float) -> U8:
        m = np.array([[1.0, 0.0, fx], [0.0, 1.0, fy]], np.float32)
        h, w = tile.shape[:2]
        out = cv2.warpAffine(tile, m, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
        return np.asarray(out, np.uint8)

    def ours(kernel: str) -> Shift:
        return lambda t, fy, fx: subpixel_shift(t, fy, fx, kernel=kernel)

    out = {k: ours(k) for k in RESAMPLING_KERNELS}
    out["opencv cubic"] = opencv_cubic
    return out


def _rms(errors: list[F64]) -> float:
    return math.sqrt(float(np.mean([np.mean(e**2) for e in errors])))


def _simulator_cases(n: int = 384) -> list[tuple[U8, U8, F64, float, float]]:
    """(noiseless input, noisy input, truth) per fraction: frames of hw_sim's slide and optics."""
    from hw_sim.optics import CameraParams, Optics, OpticsParams
    from hw_sim.slide import SlideSpec, SyntheticSlide

    px = 0.25
    slide = SyntheticSlide(SlideSpec(seed=4, width_um=1500.0, height_um=1500.0, pieces=1))
    cam = CameraParams(vignetting=0.0)
    optics = Optics(OpticsParams(max_defocus_um=1.0), px, (n, n), cam)
    m = optics.margin_px
    scale = np.float32(cam.illumination * 255.0)

    def intensity(x_um: float, y_um: float) -> npt.NDArray[np.float32]:
        t = slide.transmittance(x_um - m * px, y_um - m * px, n + 2 * m, n + 2 * m, px)
        return np.asarray(optics.image(t, 0.0), np.float32)

    x0, y0 = 650.0, 700.0
    base = intensity(x0, y0)
    clean = np.clip(np.rint(base * scale), 0, 255).astype(np.uint8)
    noisy = optics.camera_capture(base, np.random.default_rng(0))
    cases = []
    for fy, fx in FRACTIONS:
        # Content moved by +f is the scene sampled at q - f: the frame whose origin is f px earlier.
        truth = np.asarray(intensity(x0 - fx * px, y0 - fy * px) * scale, np.float64)
        cases.append((clean, noisy, truth, fy, fx))
    return cases


def _photo_cases() -> list[tuple[U8, U8, F64, float, float]]:
    from skimage import data

    rng = np.random.default_rng(1)
    cases = []
    f = 4

    def blocks(img: F64, dy: int, dx: int) -> F64:
        """f x f block means of img from (dy, dx) on: the scene seen (dy, dx) / f output px further."""
        h, w = (img.shape[0] - f) // f * f, (img.shape[1] - f) // f * f
        out: F64 = img[dy : dy + h, dx : dx + w].reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3))
        return out

    for name in ("retina", "immunohistochemistry"):
        img = np.asarray(getattr(data, name)(), np.float64)[..., :3]

        src = blocks(img, 0, 0)
        clean = np.clip(np.rint(src), 0, 255).astype(np.uint8)
        noisy = np.clip(np.rint(src + rng.normal(0, 2, src.shape)), 0, 255).astype(np.uint8)
        for ky, kx in ((1, 2), (2, 3), (3, 1), (0, 2)):
            # Blocks k source px further show the scene moved by -k/f px; as a shift in [-0.5, 0.5].
            fy, fx = -ky / f, -kx / f
            fy, fx = (fy + 1 if fy < -0.5 else fy), (fx + 1 if fx < -0.5 else fx)
            # out(q) = src(q - f): moving by fy = -k/f + 1 is blocks(k) one output pixel later.
            truth = blocks(img, ky, kx)
            oy, ox = (1 if fy > -ky / f else 0), (1 if fx > -kx / f else 0)
            truth = np.roll(truth, (oy, ox), axis=(0, 1))
            cases.append((clean, noisy, truth, fy, fx))
    return cases


def _errors(shift: Shift, cases: list[tuple[U8, U8, F64, float, float]], margin: int = 8) -> tuple[float, float]:
    inner = (slice(margin, -margin), slice(margin, -margin))
    clean, noisy = [], []
    for c, n, truth, fy, fx in cases:
        clean.append(np.asarray(shift(c, fy, fx), np.float64)[inner] - truth[inner])
        noisy.append(np.asarray(shift(n, fy, fx), np.float64)[inner] - truth[inner])
    return _rms(clean), _rms(noisy)


def measure() -> list[dict[str, Any]]:
    """One row per kernel: errors against truth (DN RMS) and CPU ms per 1024 px RGB tile."""
    from bench.stitch_floor import cpu_per_call, one_core

    with one_core():
        sim, photo = _simulator_cases(), _photo_cases()
        tile = np.random.default_rng(2).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
        rows = []
        for name, shift in _kernels().items():

            def once(_: int, shift: Shift = shift) -> object:
                return shift(tile, 0.37, -0.21)

            s_clean, s_noisy = _errors(shift, sim)
            p_clean, p_noisy = _errors(shift, photo)
            rows.append(
                {
                    "kernel": name,
                    "ms_per_tile": 1e3 * cpu_per_call(once, 4, 5),
                    "simulator_dn": s_clean,
                    "simulator_noisy_dn": s_noisy,
                    "photo_dn": p_clean,
                    "photo_noisy_dn": p_noisy,
                }
            )
        return rows
