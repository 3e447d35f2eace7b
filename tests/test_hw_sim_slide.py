"""The synthetic slide is a deterministic, pure function of slide coordinates that looks like H&E."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from hw_sim.slide import SlideSpec, SyntheticSlide

SPEC = SlideSpec(seed=3, origin_x_um=1000.0, origin_y_um=750.0, width_um=400.0, height_um=300.0)
PX = 0.25


@pytest.fixture(scope="module")
def slide() -> SyntheticSlide:
    return SyntheticSlide(SPEC)


def test_render_is_deterministic_and_seeded(slide: SyntheticSlide) -> None:
    a = slide.transmittance(1100.0, 850.0, 96, 128, PX)
    b = SyntheticSlide(SPEC).transmittance(1100.0, 850.0, 96, 128, PX)
    assert a.shape == (96, 128, 3) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0
    other = SyntheticSlide(SlideSpec.from_dict({**SPEC.to_dict(), "seed": 4})).transmittance(
        1100.0, 850.0, 96, 128, PX
    )
    assert np.abs(other - a).mean() > 0.02


def test_overlapping_regions_agree_pixel_for_pixel(slide: SyntheticSlide) -> None:
    # Regions on the same pixel lattice, of different sizes, rendered in any order.
    big = slide.transmittance(1080.0, 820.0, 300, 260, PX)
    small = slide.transmittance(1080.0 + 37 * PX, 820.0 + 101 * PX, 90, 70, PX)
    assert np.array_equal(big[101:191, 37:107], small)
    # Off-lattice origins (stage positions are arbitrary floats): equal up to float rounding.
    x0, y0 = 1093.137, 861.771
    a = slide.transmittance(x0, y0, 120, 120, PX)
    b = slide.transmittance(x0 + 40 * PX, y0 + 25 * PX, 120, 120, PX)
    np.testing.assert_allclose(a[25:, 40:], b[:95, :80], atol=2e-5)


def test_looks_like_he(slide: SyntheticSlide) -> None:
    t = slide.transmittance(1000.0, 750.0, 1200, 1600, PX)
    od = -np.log10(np.clip(t, 1e-4, 1.0))
    tissue = od.sum(axis=2) > 0.3
    assert 0.3 < tissue.mean() < 0.95, "both tissue and glass on a slide overview"
    # Glass: bright and neutral.
    glass = t[~tissue & (od.sum(axis=2) < 0.1)]
    assert glass.mean() > 0.9 and np.ptp(glass.mean(axis=0)) < 0.02
    # Nuclei (darkest pixels): hematoxylin absorbs red most, blue least: blue-purple.
    dark = t[od.sum(axis=2) > np.quantile(od.sum(axis=2), 0.98)]
    assert dark[:, 2].mean() > dark[:, 0].mean() + 0.1
    # Stroma (moderate density): eosin absorbs green: pink.
    mid = t[tissue & (od.sum(axis=2) < 0.8)]
    assert mid[:, 1].mean() < mid[:, 0].mean() - 0.1 and mid[:, 1].mean() < mid[:, 2].mean() - 0.05


def test_outside_the_area_is_glass(slide: SyntheticSlide) -> None:
    t = slide.transmittance(5000.0, 5000.0, 64, 64, PX)
    np.testing.assert_allclose(t, 10**-SPEC.glass_od, rtol=1e-5)
    assert slide.tissue_fraction(5000.0, 5000.0, 64, 64, PX) == 0.0


def test_tissue_fraction_agrees_with_rendering(slide: SyntheticSlide) -> None:
    for x0, y0 in [(1100.0, 820.0), (1300.0, 950.0), (1010.0, 760.0)]:
        frac = slide.tissue_fraction(x0, y0, 256, 256, PX)
        od = -np.log10(slide.transmittance(x0, y0, 256, 256, PX)).sum(axis=2)
        assert abs(frac - (od > 0.2).mean()) < 0.2


def test_focal_surface_is_smooth_tilted_and_bounded(slide: SyntheticSlide) -> None:
    xs = np.linspace(-3000, 3000, 61) + 1200
    ys = np.linspace(-3000, 3000, 61) + 900
    z = np.array([[slide.focus_z_um(x, y) for x in xs] for y in ys])
    bound = SPEC.warp_um + 3.0 * (abs(SPEC.tilt_x_um_per_mm) + abs(SPEC.tilt_y_um_per_mm))
    assert np.abs(z - SPEC.base_z_um).max() <= bound + 1e-9
    assert np.ptp(z) > 2.0, "several µm of focus variation over a few mm"
    # Smooth: 100 µm apart (about one field), focus moves by well under a depth of field (~0.7 µm).
    assert np.abs(np.diff(z, axis=1)).max() < 0.3 and np.abs(np.diff(z, axis=0)).max() < 0.3


def test_spec_round_trips_through_json() -> None:
    d = json.loads(json.dumps(SPEC.to_dict()))
    assert SlideSpec.from_dict(d) == SPEC
    with pytest.raises(ValueError, match="unknown"):
        SlideSpec.from_dict({**d, "colour": 1})
    with pytest.raises(ValueError, match="positive size"):
        SlideSpec(width_um=0.0)


def test_render_speed(slide: SyntheticSlide) -> None:
    slide.transmittance(1100.0, 800.0, 512, 512, PX)
    times = []
    for i in range(3):
        t0 = time.perf_counter()
        slide.transmittance(1100.0 + 50 * i, 800.0 + 20 * i, 512, 512, PX)
        times.append(time.perf_counter() - t0)
    # ~30 ms on one idle core; the bound only catches per-pixel Python loops (seconds), not load.
    assert min(times) < 0.3, f"512x512 took {min(times) * 1000:.0f} ms"
