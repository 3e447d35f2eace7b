"""Pairwise registration on simulator pairs: known subpixel shifts, noise, glass, wrong neighbours."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import numpy.typing as npt
import pytest

from hw_sim.optics import CameraParams, Optics, OpticsParams
from hw_sim.slide import SlideSpec, SyntheticSlide
from runtime.stitching.registration import RegistrationParams, register_pair, texture, to_grey

PX = 0.25
TILE = 256
STEP = 0.9 * TILE  # 10 % overlap
U8 = npt.NDArray[np.uint8]


class Scope:
    """Renders camera frames of one slide at any (fractional) stage position."""

    def __init__(self, seed: int = 4) -> None:
        # One tissue piece filling the middle of a 1.5 mm square; far outside it is glass.
        self.slide = SyntheticSlide(SlideSpec(seed=seed, width_um=1500.0, height_um=1500.0, pieces=1))
        self.optics = Optics(OpticsParams(max_defocus_um=1.0), PX, (TILE, TILE), CameraParams())

    def frame(self, x_um: float, y_um: float, noise_seed: int) -> U8:
        """The frame whose top-left pixel corner is at (x_um, y_um)."""
        m = self.optics.margin_px
        t = self.slide.transmittance(x_um - m * PX, y_um - m * PX, TILE + 2 * m, TILE + 2 * m, PX)
        return self.optics.camera_capture(self.optics.image(t, 0.0), np.random.default_rng(noise_seed))


@pytest.fixture(scope="module")
def scope() -> Scope:
    return Scope()


def _pair(scope: Scope, x_um: float, y_um: float, shift_px: tuple[float, float], seed: int) -> tuple[U8, U8]:
    """Grey frames a (at x, y) and b (at a + shift), shift (dy, dx) in pixels."""
    a = scope.frame(x_um, y_um, 2 * seed)
    b = scope.frame(x_um + shift_px[1] * PX, y_um + shift_px[0] * PX, 2 * seed + 1)
    return to_grey(a), to_grey(b)


CASES = [
    # (dy, dx) of b relative to a: a right neighbour and a lower neighbour, with stage errors.
    (0.37, STEP - 6.81),
    (-8.52, STEP + 11.26),
    (STEP + 4.73, -2.49),
    (STEP - 13.08, 9.61),
]


@pytest.mark.parametrize("shift", CASES)
def test_known_subpixel_shifts(scope: Scope, shift: tuple[float, float]) -> None:
    a, b = _pair(scope, 600.0, 650.0, shift, seed=CASES.index(shift))
    nominal = (STEP if shift[0] > STEP / 2 else 0.0, STEP if shift[1] > STEP / 2 else 0.0)
    m = register_pair(a, b, nominal, RegistrationParams(search_px=40))
    assert m.accepted, m
    assert m.reason == "ok" and m.ncc > 0.9
    # Measured 0.001-0.004 px; phase correlation's own peak is ~0.1 px off.
    assert abs(m.shift[0] - shift[0]) < 0.02 and abs(m.shift[1] - shift[1]) < 0.02, (m.shift, shift)
    assert max(m.sigma) < 0.05


def test_a_strip_registers_in_its_own_frame(scope: Scope) -> None:
    shift = (3.3, STEP + 7.7)
    a, b = _pair(scope, 620.0, 640.0, shift, seed=11)
    x0 = TILE - 90
    m = register_pair(a[:, x0:], b, (0.0, STEP - x0), RegistrationParams(search_px=40))
    assert m.accepted
    assert m.shift[1] + x0 == pytest.approx(shift[1], abs=0.02)
    assert m.shift[0] == pytest.approx(shift[0], abs=0.02)


def test_noise_costs_precision_not_correctness(scope: Scope) -> None:
    shift = (-2.6, STEP + 5.4)
    a, b = _pair(scope, 610.0, 660.0, shift, seed=5)
    rng = np.random.default_rng(0)
    # Four times the camera's own noise (~20 DN of texture against 8 DN of noise).
    noisy = [np.clip(x + rng.normal(0, 8.0, x.shape), 0, 255).astype(np.uint8) for x in (a, b)]
    clean = register_pair(a, b, (0.0, STEP), RegistrationParams(search_px=40))
    m = register_pair(noisy[0], noisy[1], (0.0, STEP), RegistrationParams(search_px=40))
    assert m.accepted
    # Measured 0.07 px (clean: 0.003 px).
    assert abs(m.shift[0] - shift[0]) < 0.1 and abs(m.shift[1] - shift[1]) < 0.1
    # The precision estimate follows the noise: it is what weights the pair in the solve.
    assert max(m.sigma) > 1.5 * max(clean.sigma)
    assert m.ncc < clean.ncc


def test_glass_overlap_is_rejected(scope: Scope) -> None:
    a, b = _pair(scope, 5000.0, 5000.0, (1.0, STEP + 3.0), seed=7)  # far outside the tissue
    assert texture(a) < 1.1 and texture(b) < 1.1
    m = register_pair(a, b, (0.0, STEP), RegistrationParams(search_px=40))
    assert not m.accepted and m.reason == "blank"
    # The pair falls back on the prediction: the shift reported is the prior's.
    assert m.shift == (0.0, STEP)


def test_unrelated_tiles_are_rejected(scope: Scope) -> None:
    """Tissue on both sides, but not the same tissue (a wrong neighbour): the match is not believed."""
    a = to_grey(scope.frame(600.0, 650.0, 1))
    b = to_grey(scope.frame(700.0, 500.0, 2))
    m = register_pair(a, b, (0.0, STEP), RegistrationParams(search_px=40))
    assert not m.accepted and m.reason in ("low_ncc", "unstable"), m


def test_a_hopeless_first_fit_is_not_retried(scope: Scope, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong neighbour correlates far below min_ncc: the four retries from the neighbouring pixels
    (each 15-20 times a normal pair's cost) are skipped, and the pair is rejected just the same."""
    import runtime.stitching.registration as reg

    fits: list[float] = []
    lk = reg._lk

    def counted(*args: object, **kw: object) -> object:
        out = lk(*args, **kw)  # type: ignore[arg-type]
        if kw.get("raw"):
            fits.append(out[2] if not isinstance(out, str) else float("nan"))
        return out

    monkeypatch.setattr(reg, "_lk", counted)
    a = to_grey(scope.frame(600.0, 650.0, 1))
    b = to_grey(scope.frame(700.0, 500.0, 2))
    m = register_pair(a, b, (0.0, STEP), RegistrationParams(search_px=40))
    assert not m.accepted and m.reason == "low_ncc" and len(fits) == 1 and fits[0] < 0.35, (m, fits)
    fits.clear()
    retried = register_pair(a, b, (0.0, STEP), RegistrationParams(search_px=40, retry_from_ncc=0.0))
    assert len(fits) == 5 and not retried.accepted and max(fits) < 0.5, fits


def test_shift_beyond_the_search_is_not_found(scope: Scope) -> None:
    shift = (0.0, STEP - 30.0)
    a, b = _pair(scope, 600.0, 650.0, shift, seed=9)
    m = register_pair(a, b, (0.0, STEP), RegistrationParams(search_px=10))
    # Searching +-10 px cannot reach -30 px: whatever is found there is not the tissue's match.
    assert not m.accepted or abs(m.shift[1] - shift[1]) < 0.05


def test_thin_overlap_still_registers(scope: Scope) -> None:
    """The stage moved the neighbour away: 12 px of the nominal 26 px overlap remain."""
    shift = (5.0, TILE - 12.0 + 0.3)
    a, b = _pair(scope, 600.0, 650.0, shift, seed=13)
    m = register_pair(a, b, (0.0, STEP), RegistrationParams(search_px=40))
    assert m.accepted, m
    assert abs(m.shift[1] - shift[1]) < 0.05 and abs(m.shift[0] - shift[0]) < 0.05


def test_params_validate() -> None:
    with pytest.raises(ValueError):
        RegistrationParams(highpass_px=4)
    with pytest.raises(ValueError):
        RegistrationParams(min_overlap_px=2)


def test_the_stitcher_process_does_not_import_scipy() -> None:
    """Registration needs only numpy and OpenCV: scipy's fft and ndimage cost ~0.25 s per stitcher start."""
    code = "import sys, runtime.workers.stitcher; print(sorted(m for m in sys.modules if m.startswith('scipy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(("kx", "ky"), [(41, 41), (43, 43), (5, 3), (21, 11), (41, 11)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_triangle_blur_is_the_stack_blur_kernel(kx: int, ky: int, dtype: type) -> None:
    """The two-box blur is the triangle 1, 2, .., r + 1, .., 2, 1 with replicated edges (stack blur's kernel),
    centred also where r + 1 is even, to float32 rounding (cv2.stackBlur itself is ~9 levels off in its last
    columns)."""
    from runtime.stitching.registration import _triangle_blur

    img = (np.random.default_rng(kx * ky).random((70, 90)) * 255).astype(dtype)
    ref = np.pad(img.astype(np.float64), ((ky // 2,) * 2, (kx // 2,) * 2), mode="edge")
    for axis, k in ((0, ky), (1, kx)):
        r = k // 2
        tri = np.convolve(np.ones(r + 1), np.ones(r + 1)) / (r + 1) ** 2
        ref = np.apply_along_axis(lambda v, t=tri: np.convolve(v, t, mode="valid"), axis, ref)
    got = _triangle_blur(img, kx, ky)
    assert got.dtype == np.float32 and got.shape == img.shape
    assert np.abs(got - ref).max() < 1e-3


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the coarse searches and glass tests register_pair runs."""
    import runtime.stitching.registration as reg

    calls = {"_coarse": 0, "texture": 0}
    for name in calls:
        fn = getattr(reg, name)

        def counted(*args: object, _fn: object = fn, _name: str = name, **kw: object) -> object:
            calls[_name] += 1
            return _fn(*args, **kw)  # type: ignore[operator]

        monkeypatch.setattr(reg, name, counted)
    return calls


@pytest.mark.parametrize("shift", CASES)
def test_a_near_start_skips_the_search_and_measures_the_same(
    scope: Scope, shift: tuple[float, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given where b is to a fraction of a pixel (the accumulator's second pair), the subpixel step alone
    measures what the full search does: the same to a few thousandths where the hint rounds to the same
    pixel as the search's estimate (the fit high-passes the overlap at that whole-pixel offset), and as close
    to the truth as the full search (0.02 px) from farther off."""
    a, b = _pair(scope, 600.0, 650.0, shift, seed=CASES.index(shift))
    nominal = (STEP if shift[0] > STEP / 2 else 0.0, STEP if shift[1] > STEP / 2 else 0.0)
    params = RegistrationParams(search_px=40)
    full = register_pair(a, b, nominal, params)
    calls = _counting(monkeypatch)
    for err in ((0.0, 0.0), (0.02, -0.03), (0.4, -0.3), (-0.8, 0.6)):
        near = (full.shift[0] + err[0], full.shift[1] + err[1])
        m = register_pair(a, b, nominal, params, near=near)
        assert calls == {"_coarse": 0, "texture": 0}, (err, calls)
        assert m.accepted and m.reason == "ok" and m.predicted == full.predicted
        same_pixel = all(round(near[k]) == round(full.shift[k]) for k in (0, 1))
        bound = 0.002 if same_pixel else 0.03
        assert abs(m.shift[0] - full.shift[0]) < bound and abs(m.shift[1] - full.shift[1]) < bound, (err, m, full)
        assert abs(m.shift[0] - shift[0]) < 0.02 and abs(m.shift[1] - shift[1]) < 0.02, (err, m, shift)
        assert m.ncc == pytest.approx(full.ncc, abs=2e-3)


def test_a_wrong_near_start_falls_back_on_the_full_search(scope: Scope, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hint several pixels off (a bad first pair, neighbours not tied) does not settle near itself: the pair
    is searched and measured exactly as without it. Glass fails the hint too, and is rejected as glass."""
    shift = CASES[1]
    a, b = _pair(scope, 600.0, 650.0, shift, seed=1)
    params = RegistrationParams(search_px=40)
    full = register_pair(a, b, (0.0, STEP), params)
    calls = _counting(monkeypatch)
    for err in ((5.0, 0.0), (0.0, -7.0), (3.0, 3.0)):
        m = register_pair(a, b, (0.0, STEP), params, near=(full.shift[0] + err[0], full.shift[1] + err[1]))
        assert m == full, (err, m, full)
    assert calls == {"_coarse": 3, "texture": 6}
    # Outside the search range, or not a number: not tried at all.
    for near in ((0.0, STEP + 60.0), (math.nan, STEP)):
        assert register_pair(a, b, (0.0, STEP), params, near=near) == full
    glass_a, glass_b = _pair(scope, 5000.0, 5000.0, (1.0, STEP + 3.0), seed=7)
    m = register_pair(glass_a, glass_b, (0.0, STEP), params, near=(1.0, STEP + 3.0))
    assert not m.accepted and m.reason == "blank"
    with pytest.raises(ValueError):
        RegistrationParams(near_px=0.0)


def test_a_first_pair_within_half_the_search_takes_the_quick_search(
    scope: Scope, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A match within half the search range (one stage move's error) is found by the quarter-resolution
    search of the narrower windows, without the full search, and measured as the full search does (to the
    few thousandths a different start leaves in the subpixel step); one farther off falls back on the full
    search and is measured exactly as by it. (The overlaps here are 45-55 px: the 26 px of these 256 px
    tiles' nominal overlap are too thin for the quarter-resolution step, which then falls back too.)"""
    params = RegistrationParams(search_px=80)
    full_only = RegistrationParams(search_px=80, quick_share=1.0)  # the whole range at once: no quick search
    inside = [(2.3, STEP - 24.6), (STEP - 27.1, -3.4), (-5.2, STEP - 19.8)]
    beyond = [(3.2, STEP - 50.4), (STEP - 47.7, -1.9)]
    for k, shift in enumerate(inside + beyond):
        a, b = _pair(scope, 600.0, 650.0, shift, seed=20 + k)
        nominal = (STEP if shift[0] > STEP / 2 else 0.0, STEP if shift[1] > STEP / 2 else 0.0)
        full = register_pair(a, b, nominal, full_only)
        calls = _counting(monkeypatch)
        m = register_pair(a, b, nominal, params)
        monkeypatch.undo()
        assert full.accepted and m.accepted, (shift, m, full)
        assert abs(m.shift[0] - shift[0]) < 0.02 and abs(m.shift[1] - shift[1]) < 0.02, (shift, m)
        if shift in inside:  # |deviation| <= 27 px: inside the quick search's +-40 px less its 4 px margin
            assert calls == {"_coarse": 0, "texture": 2}, (shift, calls)
            assert abs(m.shift[0] - full.shift[0]) < 0.005 and abs(m.shift[1] - full.shift[1]) < 0.005, (m, full)
        else:  # ~50 px off: beyond it
            assert calls == {"_coarse": 1, "texture": 2}, (shift, calls)
            assert m == full
    with pytest.raises(ValueError):
        RegistrationParams(quick_share=0.0)
