"""Blending without seams: subpixel resampling, feather ramps, compositing, flat-field estimation."""

from __future__ import annotations

import numpy as np
import pytest

from hw_sim.optics import CameraParams, Optics, OpticsParams
from hw_sim.slide import SlideSpec, SyntheticSlide
from runtime.stitching.blending import (
    RESAMPLING_KERNELS,
    composite,
    composite_feathered,
    cubic_kernel,
    feather_alpha,
    feather_ramps,
    lanczos_kernel,
    ramp,
    subpixel_shift,
    to_uint8,
)
from runtime.stitching.flatfield import FlatField, FlatFieldEstimator


def _smooth_image(n: int, seed: int = 0, amplitude: float = 40.0) -> np.ndarray:
    """A band-limited periodic random image (so a Fourier shift is the exact truth)."""
    rng = np.random.default_rng(seed)
    k = np.fft.fftfreq(n)
    g = np.exp(-2 * (np.pi * 2.0) ** 2 * (k[:, None] ** 2 + k[None, :] ** 2))
    img = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(0, 1, (n, n))) * g))
    return (128 + amplitude * img / img.std()).astype(np.float32)


def _fourier_shift(img: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """img moved by (dy, dx): out(q) = img(q - d)."""
    k0 = np.fft.fftfreq(img.shape[0])[:, None]
    k1 = np.fft.fftfreq(img.shape[1])[None, :]
    return np.real(np.fft.ifft2(np.fft.fft2(img) * np.exp(-2j * np.pi * (k0 * dy + k1 * dx))))


def test_lanczos_kernel_sums_to_one_and_interpolates() -> None:
    for t in (-0.5, -0.2, 0.0, 0.3, 0.5):
        w = lanczos_kernel(t)
        assert w.sum() == pytest.approx(1.0, abs=1e-6)
    w0 = lanczos_kernel(0.0)
    assert w0[3] == pytest.approx(1.0) and np.abs(np.delete(w0, 3)).max() < 1e-6


@pytest.mark.parametrize("kernel", RESAMPLING_KERNELS)
@pytest.mark.parametrize(("dy", "dx"), [(0.3, -0.45), (-0.5, 0.2), (0.0, 0.37), (-0.21, -0.5)])
def test_subpixel_shift_moves_content_by_the_fraction(kernel: str, dy: float, dx: float) -> None:
    img = _smooth_image(128)
    tile = np.repeat(img[..., None], 3, axis=2)
    moved = subpixel_shift(tile, dy, dx, kernel=kernel)[..., 1]
    ref = _fourier_shift(img, dy, dx)
    inner = (slice(8, -8), slice(8, -8))
    # Both kernels: ~0.2 DN (at most ~0.8) on 40 DN of texture; the wrong sign (or a cubic kernel
    # anchored a tap off) would be ~10x that.
    err = np.abs(moved[inner] - ref[inner]).max()
    wrong = np.abs(moved[inner] - _fourier_shift(img, -dy, -dx)[inner]).max()
    assert err < 1.0 and wrong > 8 * err
    assert subpixel_shift(tile, 0.0, 0.0, kernel=kernel) is tile


@pytest.mark.parametrize("t", [-0.99, -0.5, -0.2, 0.0, 0.3, 0.5, 0.99])
def test_cubic_kernel_reproduces_quadratics(t: float) -> None:
    """Keys' a = -0.5 is exact for polynomials up to degree 2: sampling a parabola at x + t gives it exactly."""
    w, anchor = cubic_kernel(t)
    assert len(w) == 4 and w.sum() == pytest.approx(1.0, abs=1e-6)
    j = np.arange(4) - anchor  # the taps' offsets
    for poly in (lambda x: 3.0 + 0 * x, lambda x: 2 * x - 1, lambda x: 0.5 * x * x - x):
        assert float(w @ poly(j.astype(np.float64))) == pytest.approx(poly(np.float64(t)), abs=1e-5)


def test_unknown_kernel_is_named() -> None:
    with pytest.raises(ValueError, match="'bilinear'"):
        subpixel_shift(np.zeros((8, 8, 3), np.uint8), 0.2, 0.1, kernel="bilinear")


def test_ramp_and_alpha_edges() -> None:
    r = ramp(10, 0.0, 5.0)
    assert r[0] == pytest.approx(0.1) and r[4] == pytest.approx(0.9) and (r[5:] == 1).all()
    falling = ramp(10, 10.0, 6.0)  # earlier content at the right: 0 at the right edge
    assert falling[-1] == pytest.approx(0.125) and (falling[:6] == 1).all()
    a = feather_alpha(40, 60, top=10.0, left=12.0)
    assert a[0, 30] < 0.06 and a[30, 0] < 0.05 and a[30, 30] == 1.0
    assert (np.diff(a[:10, 30]) > 0).all() and (np.diff(a[20, :14]) >= 0).all()
    b = feather_alpha(40, 60, bottom=30.0, right=50.0)
    assert b[-1, 20] < 0.06 and b[20, -1] < 0.06 and b[10, 10] == 1.0
    assert (feather_alpha(5, 5) == 1).all()


def test_feathered_composite_has_no_seam() -> None:
    """Two tiles of the same scene, the second 6 % brighter (uncorrected gain): the blend has no step."""
    scene = _smooth_image(160, seed=3, amplitude=20.0)  # 1.06x stays below 255
    band = np.full((160, 300, 3), 255, np.uint8)
    covered = np.zeros((160, 300), bool)
    left = np.repeat(scene[:, :160, None], 3, axis=2)
    composite(band[:, :160], covered[:, :160], left, np.ones((160, 160), np.float32))
    # The right tile starts at x = 120 (40 px overlap) and sees the scene 6 % brighter.
    wide = np.concatenate([scene, scene[:, ::-1]], axis=1)[:, :300]
    right = np.repeat(wide[:, 120:280, None], 3, axis=2) * np.float32(1.06)
    alpha = feather_alpha(160, 160, left=40.0)
    composite(band[:, 120:280], covered[:, 120:280], right, alpha)
    got = band[..., 0].astype(np.float64)
    expected_gain = np.ones(300)
    expected_gain[120:160] = 1 + 0.06 * ramp(40, 0.0, 40.0)
    expected_gain[160:280] = 1.06
    truth = wide[:, :280] * expected_gain[:280]
    # The seam is spread over the overlap: at most a rounding away from the ramped gain.
    assert np.abs(got[:, :280] - truth).max() < 1.0
    assert covered[:, :280].all() and not covered[:, 280:].any()
    assert (band[:, 280:] == 255).all()


def test_composite_over_uncovered_pixels_ignores_alpha() -> None:
    band = np.full((4, 4, 3), 255, np.uint8)
    covered = np.zeros((4, 4), bool)
    tile = np.full((4, 4, 3), 100.0, np.float32)
    composite(band, covered, tile, np.zeros((4, 4), np.float32))
    assert (band == 100).all() and covered.all()


@pytest.mark.parametrize("all_covered", [True, False])
def test_composite_is_the_float32_blend_bit_for_bit(all_covered: bool) -> None:
    """``band + a (tile - band)`` computed step by step in float32 (band read as float, the difference
    times alpha, added back, rounded half to even and saturated): the same bytes, on views into larger
    arrays (as the stitcher passes a block's rectangle and a strip of the resampled tile), with tile
    values outside 0..255 and alpha at 0, 1 and between."""
    rng = np.random.default_rng(11 + all_covered)
    block = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    whole = rng.uniform(-20, 275, (64, 128, 3)).astype(np.float32)
    whole[::7] = np.round(whole[::7]) + np.float32(0.5)  # many exact halves
    alpha = rng.uniform(0, 1, (50, 60)).astype(np.float32)
    alpha[::5] = 0.0
    alpha[:, ::9] = 1.0
    covered = np.ones((50, 60), bool) if all_covered else rng.random((50, 60)) < 0.6
    band, tile = block[10:60, 20:80], whole[5:55, 30:90]
    a = alpha if all_covered else np.where(covered, alpha, np.float32(1.0))
    out = band.astype(np.float32)
    out += (tile - out) * a[..., None]
    want = np.rint(np.clip(out, 0, 255)).astype(np.uint8)
    around = block.copy()
    composite(band, covered, tile, alpha)
    assert (band == want).all() and covered.all()
    around[10:60, 20:80] = want
    assert (block == around).all()  # nothing outside the view written


def test_to_uint8_rounds_half_to_even_and_saturates() -> None:
    x = np.array([[-300.0, -0.5, 0.5, 1.5, 2.5, 2.4999998, 127.5, 254.5, 255.5, 1e9]], np.float32)
    tile = np.repeat(x[..., None], 3, axis=2)
    assert (to_uint8(tile) == np.rint(np.clip(tile, 0, 255)).astype(np.uint8)).all()
    assert to_uint8(tile)[0, :, 0].tolist() == [0, 0, 0, 2, 2, 2, 128, 254, 255, 255]


def test_feather_opaque_rectangle_is_where_alpha_is_one() -> None:
    for edges in ({"top": 10.0, "left": 12.0}, {"bottom": 30.0, "right": 50.0}, {"top": 25.0, "bottom": 20.0}, {}):
        f = feather_ramps(40, 60, **edges)
        a = f.alpha()
        assert (a == feather_alpha(40, 60, **edges)).all()
        y0, y1, x0, x1 = f.opaque()
        inside = np.zeros(a.shape, bool)
        inside[y0:y1, x0:x1] = True
        assert ((a == 1.0) == inside).all()  # opaque exactly there, below 1 everywhere else


@pytest.mark.parametrize(
    ("top", "left", "h", "w"), [(0, 0, 96, 96), (20, 50, 40, 46), (0, 70, 96, 26), (80, 0, 16, 30)]
)
def test_composite_feathered_matches_composite(top: int, left: int, h: int, w: int) -> None:
    """Blending only under the strips gives what compositing the whole rectangle gives: the same
    pixels, but for the float32 rounding of band + (tile - band) where alpha is 1."""
    rng = np.random.default_rng(top + left)
    tile = rng.uniform(-10, 265, (96, 96, 3)).astype(np.float32)
    feather = feather_ramps(96, 96, top=12.0, left=20.5, right=80.0)
    band = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    covered = rng.random((h, w)) < 0.7
    covered[: h // 2] = True
    ref_band, ref_covered = band.copy(), covered.copy()
    ys, xs = slice(top, top + h), slice(left, left + w)
    composite(ref_band, ref_covered, tile[ys, xs], feather.alpha(ys, xs))
    composite_feathered(band, covered, tile, to_uint8(tile), feather, top, left)
    assert covered.all() and ref_covered.all()
    diff = np.abs(band.astype(int) - ref_band.astype(int))
    assert diff.max() <= 1
    # A 1 DN difference only where the tile sits within float32 rounding of a half-integer.
    near_half = np.abs(np.abs(tile[ys, xs] - np.floor(tile[ys, xs])) - 0.5) < 1e-4
    assert not (diff.astype(bool) & ~near_half).any()


# --------------------------------------------------------------------- flat-field


@pytest.fixture(scope="module")
def camera_tiles() -> list[np.ndarray]:
    """Simulator frames (12 % vignetting) over tissue and glass."""
    slide = SyntheticSlide(SlideSpec(seed=2, width_um=600.0, height_um=600.0, pieces=2))
    optics = Optics(OpticsParams(max_defocus_um=1.0), 0.25, (128, 128), CameraParams())
    m = optics.margin_px
    tiles = []
    rng = np.random.default_rng(0)
    for k in range(14):
        x, y = rng.uniform(-100, 650, 2)
        t = slide.transmittance(x - m * 0.25, y - m * 0.25, 128 + 2 * m, 128 + 2 * m, 0.25)
        tiles.append(optics.camera_capture(optics.image(t, 0.0), np.random.default_rng(k)))
    return tiles


def test_flatfield_from_glass_recovers_the_vignetting(camera_tiles: list[np.ndarray]) -> None:
    est = FlatFieldEstimator(128, 128)
    for t in camera_tiles:
        est.add(t)
    assert est.ready
    ff = est.estimate()
    assert ff.source == "glass"
    truth = Optics._vignette(128, 128, CameraParams().vignetting)
    # Measured ~0.2 % rms; no correction at all would be 5 % rms, 12 % at the corners.
    assert np.sqrt(np.mean((ff.gain[..., 1] - truth) ** 2)) < 0.005
    assert np.abs(ff.gain - truth[..., None]).max() < 0.02
    corrected = ff.correct(camera_tiles[0])
    assert corrected.dtype == np.float32 and corrected.shape == (128, 128, 3)


def test_flatfield_block_stats_row_by_row_are_the_whole_frames_bit_for_bit(camera_tiles: list[np.ndarray]) -> None:
    """Blocks that tile the frame are measured one row of blocks at a time: the same figures as the
    whole frame at once (the old way, still the way for frames the blocks do not divide)."""
    est = FlatFieldEstimator(128, 128)
    assert (est.by, est.bx) == (16, 16)
    for t in camera_tiles[:6]:
        means, cv = est._block_stats(t)
        whole_means, whole_cv = FlatFieldEstimator._stats(t, (est.bx, est.by))
        assert means.shape == (16, 16, 3) and cv.shape == (16, 16)
        assert np.array_equal(means, whole_means) and np.array_equal(cv, whole_cv)
    # Not divisible (100 / 12): the whole frame's figures, unchanged.
    odd = FlatFieldEstimator(100, 100, blocks=12)
    t = np.ascontiguousarray(camera_tiles[0][:100, :100])
    means, cv = odd._block_stats(t)
    whole_means, whole_cv = FlatFieldEstimator._stats(t, (12, 12))
    assert means.shape == (12, 12, 3) and np.array_equal(means, whole_means) and np.array_equal(cv, whole_cv)


def test_flatfield_surface_is_the_quadratic_and_glass_follows_new_tiles(camera_tiles: list[np.ndarray]) -> None:
    from runtime.stitching.flatfield import _design

    est = FlatFieldEstimator(128, 96)
    py = (np.arange(128) + 0.5) / 128 * 2 - 1
    px = (np.arange(96) + 0.5) / 96 * 2 - 1
    coef = np.array([0.93, 0.011, -0.024, -0.081, -0.067, 0.0031])
    fy, fx = np.meshgrid(py, px, indexing="ij")
    want = _design(fy, fx) @ coef
    got = est._surface(py, px, coef)
    assert got.shape == (128, 96)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)
    assert np.array_equal((got / got.max()).astype(np.float32), (want / want.max()).astype(np.float32))
    # The glass statistics asked twice after one tile are computed once, and again after the next tile.
    est = FlatFieldEstimator(128, 128)
    for t in camera_tiles[:3]:
        est.add(t)
        first = est._glass()
        again = est._glass()
        now = est._glass_now()
        for a, b, c in zip(first, again, now, strict=True):
            assert np.array_equal(a, b) and np.array_equal(a, c)
        first[0][...] = -1  # callers may change what they get: the kept figures stay
        assert np.array_equal(est._glass()[0], now[0])


def test_flatfield_without_glass_falls_back_or_stays_identity() -> None:
    rng = np.random.default_rng(1)
    est = FlatFieldEstimator(64, 64)
    assert est.estimate().source == "none"
    truth = Optics._vignette(64, 64, 0.12)
    for _ in range(24):
        # Textured "tissue" everywhere: no flat bright block at all.
        content = rng.uniform(90, 200, (8, 8, 3)).repeat(8, axis=0).repeat(8, axis=1)
        noise = rng.normal(0, 25, (64, 64, 3))
        est.add(np.clip((content + noise) * truth[..., None], 0, 255).astype(np.uint8))
    ff = est.estimate()
    assert not est.ready and ff.source == "median"
    assert np.sqrt(np.mean((ff.gain[..., 0] - truth) ** 2)) < 0.02
    ident = FlatField.identity(4, 5)
    assert ident.gain.shape == (4, 5, 3) and (ident.gain == 1).all()
