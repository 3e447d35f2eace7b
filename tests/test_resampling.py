"""The cheap paths of the stitcher: flat-field and subpixel shift in one pass, and registration's building blocks
(FIR spline prefilter, quarter-resolution search, inverse-compositional LK) on exactly known shifts."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import scipy.ndimage as ndi

from hw_sim.optics import CameraParams, Optics
from runtime.stitching import registration as reg
from runtime.stitching.blending import subpixel_shift
from runtime.stitching.flatfield import FlatField

Vignetted = tuple[npt.NDArray[np.uint8], FlatField]


def _band_limited(n: int, seed: int, sigma_px: float = 2.0) -> npt.NDArray[np.float64]:
    """A periodic random texture (blurred noise, std 1), so a Fourier shift is the exact truth."""
    rng = np.random.default_rng(seed)
    k = np.fft.fftfreq(n)
    g = np.exp(-2 * (np.pi * sigma_px) ** 2 * (k[:, None] ** 2 + k[None, :] ** 2))
    img = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(0, 1, (n, n))) * g))
    out: npt.NDArray[np.float64] = img / img.std()
    return out


def _fourier_shift(img: npt.NDArray[np.float64], dy: float, dx: float) -> npt.NDArray[np.float64]:
    """img moved by (dy, dx): out(q) = img(q - d)."""
    k0 = np.fft.fftfreq(img.shape[0])[:, None]
    k1 = np.fft.fftfreq(img.shape[1])[None, :]
    return np.real(np.fft.ifft2(np.fft.fft2(img) * np.exp(-2j * np.pi * (k0 * dy + k1 * dx))))


@pytest.fixture(scope="module")
def vignetted() -> Vignetted:
    """A 256 px RGB frame of texture under the simulator's 12 % vignetting, and that vignetting as a flat-field."""
    gain = Optics._vignette(256, 256, CameraParams().vignetting).astype(np.float32)
    tex = 150 + 30 * _band_limited(256, seed=3)
    tile = np.clip(tex[..., None] * gain[..., None] * np.array([1.0, 0.9, 1.05]), 0, 255).astype(np.uint8)
    return tile, FlatField(np.repeat(gain[..., None], 3, axis=2), "glass", ())


@pytest.mark.parametrize(("fy", "fx"), [(0.3, -0.45), (-0.5, 0.2), (0.0, 0.0)])
def test_flatfield_and_shift_in_one_pass(vignetted: Vignetted, fy: float, fx: float) -> None:
    tile, ff = vignetted
    assert ff.inverse is not None
    two_passes = subpixel_shift(ff.correct(tile), fy, fx)
    one_pass = subpixel_shift(tile, fy, fx, ff.inverse)
    assert one_pass.dtype == np.float32 and one_pass.shape == tile.shape
    # The gain is applied after the shift: off by its slope over a fraction of a pixel (measured
    # 0.23 DN here, where the fall-off per pixel is 4x that of a 1024 px frame; 0.06 DN there). Not
    # correcting at all would be ~20 DN off at the corners.
    assert np.abs(one_pass - two_passes).max() < 0.3
    assert np.abs(subpixel_shift(tile, fy, fx) - two_passes).max() > 10


def test_uint8_input_shifts_like_float_input(vignetted: Vignetted) -> None:
    tile, _ = vignetted
    a = subpixel_shift(tile, 0.21, -0.37)
    b = subpixel_shift(tile.astype(np.float32), 0.21, -0.37)
    assert a.dtype == np.float32 and np.abs(a - b).max() < 1e-3
    assert subpixel_shift(tile, 0.0, 0.0).dtype == np.float32
    assert FlatField.identity(8, 8).inverse is None  # no multiply for the identity


def test_fir_prefilter_matches_the_exact_spline_and_interpolates() -> None:
    img = (100 * _band_limited(96, seed=1, sigma_px=1.0)).astype(np.float32)
    coeffs = reg._spline_coeffs(img)
    exact = ndi.spline_filter(img, order=3, output=np.float32, mode="mirror")
    assert np.abs(coeffs - exact).max() < 1e-3 * np.abs(img).max()
    # Sampling the spline at the pixels gives the pixels back (cardinal interpolation).
    back = reg._shift_coeffs(coeffs, 0.0, 0.0)
    assert np.abs(back - img)[2:-2, 2:-2].max() < 1e-3 * np.abs(img).max()


@pytest.mark.parametrize("shift", [(0.37, -0.81), (-0.62, 0.15), (0.93, 0.49), (0.0, -0.28)])
@pytest.mark.parametrize("fine", [reg._fine, reg._fine_symmetric])
def test_lk_recovers_known_subpixel_shifts(fine: Any, shift: tuple[float, float]) -> None:
    """Both forms of the subpixel step: inverse-compositional, and symmetric (for low-NCC overlaps)."""
    img = 40 * _band_limited(256, seed=5)
    # ob(p) = oa(p + s): ob is img moved by -s
    oa = img[20:220, 30:130].astype(np.float32)
    ob = _fourier_shift(img, -shift[0], -shift[1])[20:220, 30:130].astype(np.float32)
    s, sigma, ncc = fine(oa, ob, (0.0, 0.0), reg.RegistrationParams(), tol=1e-4, border=3)
    # Measured ~1e-3 px; a sign error or a missing prefilter is 0.05-2 px off.
    assert np.abs(s - np.array(shift)).max() < 0.005, s
    assert ncc > 0.999 and max(sigma) < 0.01


def test_quarter_resolution_search_lands_near_the_true_shift() -> None:
    """Windows whose size is not a multiple of 4: a stretched downsampling grid put the start ~1.5 px off."""
    img = 40 * _band_limited(256, seed=9, sigma_px=3.0)
    r = (6.3, 23.6)  # wb(q) = wa(q + r)
    wa = (128 + img[:, :139]).astype(np.float32)
    wb = (128 + _fourier_shift(img, -r[0], -r[1])[:, :139]).astype(np.float32)
    found = reg._coarse(wa, wb, (-30, -30), (30, 60), reg.RegistrationParams())
    assert abs(found[0] - r[0]) < 0.3 and abs(found[1] - r[1]) < 0.3, found


@pytest.mark.parametrize("overlap", [14, 45])
def test_thin_true_overlap_in_big_windows(overlap: int) -> None:
    """A 1024 px strip whose true overlap is much thinner than predicted: too thin for the quarter-resolution
    refinement (< 10 coarse px), so the full-resolution step starts from the coarse peak, up to 2 px off."""
    rng = np.random.default_rng(overlap)
    img = 128 + 30 * _band_limited(1024, seed=11, sigma_px=2.5)
    dy, dx = 5.3, 171 - overlap + 0.37
    a = (img[:, :171] + rng.normal(0, 2, (1024, 171))).astype(np.float32)
    b = (_fourier_shift(img, -dy, -dx)[:, :400] + rng.normal(0, 2, (1024, 400))).astype(np.float32)
    m = reg.register_pair(a, b, (0.0, 171 - 50.0), reg.RegistrationParams(search_px=60))
    # Measured 0.003-0.008 px.
    assert m.accepted, m
    assert abs(m.shift[0] - dy) < 0.02 and abs(m.shift[1] - dx) < 0.02, m.shift


@pytest.mark.parametrize("name", ["immunohistochemistry", "astronaut", "brick", "grass"])
def test_register_pair_on_real_images_the_simulator_never_made(name: str) -> None:
    """Registration was tuned on hw_sim tissue: real photographs and an IHC section (scikit-image's
    data) with known subpixel shifts and camera noise must register as precisely.
    (be997df's registration: 0.009-0.021 px RMS on these; this one 0.006-0.011.)"""
    data = pytest.importorskip("skimage.data")
    img = np.asarray(getattr(data, name)(), dtype=np.float64)
    if img.ndim == 3:
        img = img @ np.array([0.299, 0.587, 0.114])
    rng = np.random.default_rng(1)
    errors = []
    for _ in range(8):
        sy, sx = rng.uniform(-3, 3, 2)
        moved = np.fft.ifft2(ndi.fourier_shift(np.fft.fft2(img), (-sy, -sx))).real
        y0, x0 = int(rng.integers(8, img.shape[0] - 264)), int(rng.integers(8, img.shape[1] - 200))
        a, b = (
            np.clip(x[y0 : y0 + 256, x0 : x0 + 96] + rng.normal(0, 2, (256, 96)), 0, 255).astype(np.uint8)
            for x in (img, moved)
        )
        m = reg.register_pair(a, b, (round(sy), round(sx)))
        assert m.accepted, m.reason
        errors.append(np.hypot(m.shift[0] - sy, m.shift[1] - sx))
    assert float(np.sqrt(np.mean(np.square(errors)))) < 0.015


@pytest.mark.parametrize("shift", [(0.21, -0.37), (0.0, 0.0)])
@pytest.mark.parametrize("kernel", ["cubic", "lanczos3"])
def test_cpu_shift_reuses_its_buffers_and_gives_the_same_pixels(
    vignetted: Vignetted, shift: tuple[float, float], kernel: str
) -> None:
    from runtime.stitching.backends import CpuKernels
    from runtime.stitching.blending import to_uint8

    tile, ff = vignetted
    kernels = CpuKernels()
    first, first8 = kernels.shift(tile, *shift, ff.inverse, kernel)
    want = subpixel_shift(tile, *shift, ff.inverse, kernel)
    assert np.array_equal(first, want) and np.array_equal(first8, to_uint8(want))
    again, again8 = kernels.shift(tile[::-1].copy(), 0.4, 0.1, None, kernel)  # the next tile: the same memory
    assert again is first and again8 is first8
    assert np.array_equal(again, subpixel_shift(tile[::-1].copy(), 0.4, 0.1, None, kernel))
    with pytest.raises(ValueError, match="out must be"):
        subpixel_shift(tile, 0.1, 0.1, out=np.empty((3, 3, 3), np.float32))


@pytest.mark.parametrize("shift", [(0.21, -0.37), (0.0, 0.0)])
@pytest.mark.parametrize(
    "opaque",
    [(12, 40, 9, 50), (0, 64, 0, 64), (0, 64, 20, 64), (30, 30, 0, 64), (-5, 500, 10, 20), (0, 0, 0, 0)],
)
def test_cpu_shift_with_an_opaque_rectangle_gives_the_same_bytes_where_they_are_read(
    vignetted: Vignetted, shift: tuple[float, float], opaque: tuple[int, int, int, int]
) -> None:
    """With ``opaque`` the gain and the rounding are one pass and the float gain is applied only outside the
    rectangle: the uint8 tile is the same bytes everywhere, the float tile the same outside the rectangle
    (empty, clipped and whole rectangles included), and without a gain ``opaque`` changes nothing."""
    from runtime.stitching.backends import CpuKernels
    from runtime.stitching.blending import to_uint8

    tile, ff = vignetted
    assert ff.inverse is not None
    tile, scale = tile[:64, :64].copy(), np.ascontiguousarray(ff.inverse[:64, :64])
    scale[::3] *= np.float32(1.37)  # some products above 255, to saturate
    for kernel in ("cubic", "lanczos3"):
        want = subpixel_shift(tile, *shift, scale, kernel)
        got, got8 = CpuKernels().shift(tile, *shift, scale, kernel, opaque=opaque)
        assert np.array_equal(got8, to_uint8(want))
        outside = np.ones(tile.shape[:2], bool)
        y0, y1, x0, x1 = (max(0, v) for v in opaque)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(got[outside], want[outside])
        plain, plain8 = CpuKernels().shift(tile, *shift, None, kernel, opaque=opaque)
        want = subpixel_shift(tile, *shift, None, kernel)
        assert np.array_equal(plain, want) and np.array_equal(plain8, to_uint8(want))


def test_to_grey_into_a_buffer_is_the_same_grey(vignetted: Vignetted) -> None:
    tile = vignetted[0]
    buf = np.empty(tile.shape[:2], np.uint8)
    assert reg.to_grey(tile, out=buf) is buf
    assert np.array_equal(buf, reg.to_grey(tile))
