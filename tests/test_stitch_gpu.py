"""``stitch.backend``: the GPU kernels (runtime/stitching/gpu.py) written against an array module agree with the
CPU path when run with numpy; backend selection; and, where CuPy and a CUDA device exist, the cupy path itself."""

from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest

from runtime.config import ConfigError, StitchConfig, config_from_dict
from runtime.stitching.backends import (
    CpuKernels,
    StitchBackendError,
    check_stitch_backend,
    probe,
    select_stitch_backend,
)
from runtime.stitching.blending import RESAMPLING_KERNELS, subpixel_shift, to_uint8
from runtime.stitching.gpu import masked_ncc_xp, shift_xp, to_uint8_xp
from runtime.stitching.registration import RegistrationParams, _masked_ncc, register_pair


def _tile(h: int = 96, w: int = 128, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _scene(seed: int = 5) -> np.ndarray:
    """Smooth random texture as uint8 grey (white noise alone reads as glass to registration)."""
    noise = np.random.default_rng(seed).normal(128, 40, (420, 300)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 2.0), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kernel", RESAMPLING_KERNELS)
@pytest.mark.parametrize("shift", [(0.37, -0.21), (-0.5, 0.49), (0.0, 0.3), (0.0, 0.0)])
def test_shift_xp_with_numpy_matches_subpixel_shift(kernel: str, shift: tuple[float, float]) -> None:
    tile = _tile()
    scale = np.random.default_rng(1).uniform(0.85, 1.25, tile.shape).astype(np.float32)
    for s in (scale, None):
        want = subpixel_shift(tile, *shift, s, kernel)
        got = shift_xp(np, tile, *shift, s, kernel)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert float(np.abs(got - want).max()) <= 1e-3  # float32 sums in another order
        # The rounding: only values within float32 noise of a half-integer may round the other way.
        differ = to_uint8_xp(np, got) != to_uint8(want)
        assert int(differ.sum()) <= 8
        assert np.all(np.abs(want[differ] - np.floor(want[differ]) - 0.5) < 1e-3)


def test_to_uint8_xp_rounds_half_to_even_and_saturates_like_opencv() -> None:
    a = np.array([[-3.0, 0.5, 1.5, 2.5, 254.5, 255.4, 300.0, 127.49]], np.float32)
    assert np.array_equal(to_uint8_xp(np, a), to_uint8(a))


@pytest.mark.parametrize(
    ("lo", "hi"), [((-10, -10), (10, 10)), ((0, -5), (20, 8)), ((-30, -230), (40, 230)), ((5, 5), (5, 5))]
)
def test_masked_ncc_xp_with_numpy_matches_the_registration_surface(lo: tuple[int, int], hi: tuple[int, int]) -> None:
    rng = np.random.default_rng(2)
    wa = rng.normal(0, 10, (45, 256)).astype(np.float32)
    wb = rng.normal(0, 10, (40, 250)).astype(np.float32)
    want = _masked_ncc(wa, wb, lo, hi, 50.0)
    got = masked_ncc_xp(np, wa, wb, lo, hi, 50.0)
    assert got.shape == want.shape
    assert np.array_equal(got == -1.0, want == -1.0)
    assert float(np.abs(got - want).max()) < 1e-5


def test_registration_with_the_xp_surface_gives_the_same_shift() -> None:
    grey = _scene()
    a, b = grey[:220, :260], grey[170:400, 7:267]  # b's origin at (170, 7) in a's frame
    params = RegistrationParams()

    def surface(wa: np.ndarray, wb: np.ndarray, lo: tuple[int, int], hi: tuple[int, int], n: float) -> np.ndarray:
        return np.asarray(masked_ncc_xp(np, wa, wb, lo, hi, n))

    want = register_pair(a, b, (165.0, 3.0), params)
    got = register_pair(a, b, (165.0, 3.0), params, surface=surface)
    assert want.accepted and got.reason == want.reason
    assert abs(want.shift[0] - 170) < 0.05 and abs(want.shift[1] - 7) < 0.05
    assert max(abs(got.shift[0] - want.shift[0]), abs(got.shift[1] - want.shift[1])) <= 0.001


def test_cpu_backend_is_the_cpu_path_and_passes_its_probe() -> None:
    sel = select_stitch_backend("cpu")
    assert sel.kernels.name == "cpu" and sel.refused == {}
    probe(sel.kernels)
    tile = _tile()
    moved, moved8 = sel.kernels.shift(tile, 0.2, -0.4, None, "cubic")
    assert np.array_equal(moved, subpixel_shift(tile, 0.2, -0.4)) and np.array_equal(moved8, to_uint8(moved))


def test_forced_cupy_without_cupy_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(StitchBackendError, match=r"stitch\.backend.*cupy.*cupy not installed") as info:
        select_stitch_backend("cupy", available={"cpu": None, "cupy": "cupy not installed"})
    assert isinstance(info.value, ConfigError)


def test_the_cheap_check_refuses_only_a_forced_backend_that_is_missing() -> None:
    missing = {"cpu": None, "cupy": "cupy not installed"}
    with pytest.raises(StitchBackendError, match=r"^stitch\.backend = 'cupy' was forced .*cupy not installed"):
        check_stitch_backend("cupy", missing)
    for ok in ("cpu", "auto"):  # auto falls back in the stitcher; cpu is always there
        check_stitch_backend(ok, missing)
    check_stitch_backend("cupy", {"cpu": None, "cupy": None})  # found: the stitcher's probe decides


def test_auto_without_cupy_is_cpu_and_says_why() -> None:
    sel = select_stitch_backend("auto", available={"cpu": None, "cupy": "cupy not installed"})
    assert sel.kernels.name == "cpu" and sel.refused == {"cupy": "cupy not installed"}


def test_probe_refuses_kernels_that_disagree_with_the_cpu() -> None:
    class Off(CpuKernels):
        name = "off"

        def shift(self, tile, fy, fx, scale, kernel):  # type: ignore[no-untyped-def]
            moved, moved8 = super().shift(tile, fy, fx, scale, kernel)
            return moved + np.float32(0.01), moved8

    with pytest.raises(RuntimeError, match="resampling differs"):
        probe(Off())


def test_the_config_key_is_validated() -> None:
    assert StitchConfig().backend == "cpu"
    assert config_from_dict({"stitch": {"backend": "auto"}}).stitch.backend == "auto"
    with pytest.raises(ConfigError, match=r"stitch\.backend"):
        config_from_dict({"stitch": {"backend": "opencl"}})


def _cuda_available() -> str | None:
    """None if the cupy path can run here, else why not (the skip reason)."""
    if importlib.util.find_spec("cupy") is None:
        return "needs CuPy and a CUDA device (cupy is not installed here); run on a GPU host"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "needs a CUDA device (cupy found none)"
    except Exception as err:
        return f"needs a usable CUDA device: {type(err).__name__}: {err}"
    return None


@pytest.mark.skipif(_cuda_available() is not None, reason=str(_cuda_available()))
def test_cupy_backend_matches_the_cpu_on_the_device() -> None:
    sel = select_stitch_backend("cupy")
    assert sel.kernels.name == "cupy"
    tile = _tile(512, 640)
    scale = np.random.default_rng(1).uniform(0.85, 1.25, tile.shape).astype(np.float32)
    for kernel in RESAMPLING_KERNELS:
        want = subpixel_shift(tile, 0.37, -0.21, scale, kernel)
        got, got8 = sel.kernels.shift(tile, 0.37, -0.21, scale, kernel)
        assert float(np.abs(got - want).max()) <= 1e-3
        assert int((got8 != to_uint8(want)).sum()) <= 64
    grey = _scene()
    a, b = grey[:220, :260], grey[170:400, 7:267]
    want_m = register_pair(a, b, (165.0, 3.0), RegistrationParams())
    got_m = sel.kernels.register(a, b, (165.0, 3.0), RegistrationParams())
    assert got_m.reason == want_m.reason
    assert max(abs(got_m.shift[0] - want_m.shift[0]), abs(got_m.shift[1] - want_m.shift[1])) <= 0.001
