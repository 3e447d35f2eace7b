"""Optics: defocus blurs, its sign is observable only through the aberrations, the camera is plausible."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from hw_sim.optics import CameraParams, Optics, OpticsParams
from hw_sim.slide import SlideSpec, SyntheticSlide

PX = 0.25
SHAPE = (96, 96)


@pytest.fixture(scope="module")
def optics() -> Optics:
    return Optics(OpticsParams(), PX, SHAPE)


@pytest.fixture(scope="module")
def tissue(optics: Optics) -> np.ndarray:
    slide = SyntheticSlide(
        SlideSpec(seed=1, origin_x_um=0.0, origin_y_um=0.0, width_um=300.0, height_um=300.0)
    )
    m = optics.margin_px
    h, w = SHAPE
    # The first candidate position that is mostly tissue (the layout is deterministic).
    x0, y0 = next(
        (x, y)
        for y in range(20, 260, 20)
        for x in range(20, 260, 20)
        if slide.tissue_fraction(x, y, h, w, PX) > 0.8
    )
    return slide.transmittance(x0 - m * PX, y0 - m * PX, h + 2 * m, w + 2 * m, PX)


def _half_energy_radius(psf: np.ndarray) -> float:
    """Radius (px) of the circle around the centre holding half the PSF's energy."""
    n = psf.shape[0]
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    r = np.hypot(xx, yy).ravel()
    order = np.argsort(r)
    energy = np.cumsum(psf.ravel()[order])
    return float(r[order][np.searchsorted(energy, 0.5 * energy[-1])])


def test_psf_is_normalised_and_centred(optics: Optics) -> None:
    psf = optics.psf(0.0)
    m = optics.margin_px
    assert psf.shape == (2 * m + 1, 2 * m + 1, 3)
    np.testing.assert_allclose(psf.sum(axis=(0, 1)), 1.0, atol=1e-4)
    assert np.unravel_index(psf[..., 1].argmax(), psf.shape[:2]) == (m, m)


def test_blur_grows_with_defocus(optics: Optics) -> None:
    for sign in (1.0, -1.0):
        radii = [_half_energy_radius(optics.psf(sign * z)[..., 1]) for z in (0.0, 1.0, 2.0, 4.0)]
        assert radii == sorted(radii), radii
        assert radii[-1] > 3 * radii[0]


def test_in_focus_mtf_beats_defocused(optics: Optics) -> None:
    def mtf(z: float) -> float:
        psf = optics.psf(z)[..., 1]
        spectrum = np.abs(np.fft.fft2(psf))
        freq = np.fft.fftfreq(psf.shape[0], PX)
        k = int(np.argmin(np.abs(freq - 1.0)))  # 1 cycle/µm, well below the cutoff 2NA/λ ≈ 3.5
        return float(spectrum[0, k])

    assert mtf(0.0) > 0.3
    assert mtf(0.0) > 2 * mtf(1.0) and mtf(0.0) > 2 * mtf(-1.0)


def test_sign_of_defocus_is_observable(optics: Optics, tissue: np.ndarray) -> None:
    obj = optics.prepare(tissue)
    above, below, focus = optics.image(obj, 1.5), optics.image(obj, -1.5), optics.image(obj, 0.0)
    # Same amount of defocus, measurably different images (noise at this level is ~1%).
    asym = np.abs(above - below).mean()
    assert asym > 0.2 * np.abs(above - focus).mean()
    assert asym > 0.01


def test_perfect_lens_is_symmetric(tissue: np.ndarray) -> None:
    # Without spherical aberration and axial colour, +z and -z give the same image: the sign
    # information in the default optics really comes from the modelled aberrations.
    perfect = Optics(OpticsParams(spherical_waves=0.0, chromatic_shift_um=(0.0, 0.0, 0.0)), PX, SHAPE)
    m = perfect.margin_px
    t = np.ascontiguousarray(tissue[: SHAPE[0] + 2 * m, : SHAPE[1] + 2 * m])
    np.testing.assert_allclose(perfect.image(t, 1.5), perfect.image(t, -1.5), atol=1e-4)


def test_uniform_glass_stays_uniform(optics: Optics) -> None:
    glass = np.full((*optics.input_shape, 3), 0.9, np.float32)
    img = optics.image(glass, 3.0)
    assert img.shape == (*SHAPE, 3)
    np.testing.assert_allclose(img, 0.9, atol=1e-4)


def test_defocus_beyond_the_psf_box_is_refused(optics: Optics) -> None:
    with pytest.raises(ValueError, match="max_defocus_um"):
        optics.psf(20.0)


def test_camera_levels_vignetting_and_noise(optics: Optics) -> None:
    cam = CameraParams()
    glass = np.full((*SHAPE, 3), 0.95, np.float32)
    a = optics.camera_capture(glass, np.random.default_rng(0))
    b = optics.camera_capture(glass, np.random.default_rng(0))
    assert a.dtype == np.uint8 and a.shape == (*SHAPE, 3)
    assert np.array_equal(a, b), "noise is reproducible from the rng"
    centre = a[40:56, 40:56].astype(float)
    expect = 0.95 * cam.illumination * 255
    assert abs(centre.mean() - expect) < 1.5
    assert 1.0 < centre.std() < 4.0, "shot noise of ~9000 e- is ~2.4 DN"
    corners = np.concatenate([a[:4, :4], a[-4:, -4:]]).astype(float)
    assert corners.mean() < centre.mean() - 0.8 * cam.vignetting * expect
    dark = optics.camera_capture(np.zeros((*SHAPE, 3), np.float32), np.random.default_rng(1))
    assert dark.max() <= 2


def test_params_round_trip_and_validate() -> None:
    o = replace(OpticsParams(), spherical_waves=0.2)
    assert OpticsParams.from_dict(json.loads(json.dumps(o.to_dict()))) == o
    c = CameraParams(vignetting=0.2)
    assert CameraParams.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="na"):
        OpticsParams(na=1.2)
    with pytest.raises(ValueError, match="unknown"):
        CameraParams.from_dict({"iso": 100})
