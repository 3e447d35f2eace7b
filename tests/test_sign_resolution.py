"""Sign-robust single-shot focus (issue 11): the two-shot sign test, the learnt convention, the
model's sign confidence, and objectives outside the training draws in the simulator."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from hw_sim.__main__ import main as hw_sim_main
from hw_sim.replay import ReplayDriver
from hw_sim.slide import SlideSpec, SyntheticSlide
from hw_sim.synth import OBJECTIVES, SynthParams, objective_params, synthesize
from runtime.config import FocusConfig, ModelsConfig
from runtime.devices.recording import Recording
from runtime.devices.scan_plan import serpentine_plan
from runtime.focus.field import FieldFocuser
from runtime.focus.single_shot import SignConvention, SingleShotFocus, resolve_sign
from runtime.ipc.messages import FieldRecord
from runtime.ml.tasks import DefocusEstimate


class _Fake:
    """A stage and an estimator: a "frame" is the z it was captured at; the model reads
    ``sign * (z - focus)`` (sign -1: an objective with the opposite aberration)."""

    def __init__(self, focus: float, sign: float = 1.0, unsure: bool = False) -> None:
        self.focus, self.sign, self.unsure = focus, sign, unsure
        self.captures: list[float] = []

    def estimate(self, z: float) -> DefocusEstimate:
        d = self.sign * (z - self.focus)
        return DefocusEstimate(d, 8, 8, 0.5 if self.unsure else 1.0, 0.1)

    def capture_at(self, z: float) -> float:
        self.captures.append(z)
        return z


def _focus(fake: _Fake, z0: float, conv: SignConvention | None = None):  # type: ignore[no-untyped-def]
    return SingleShotFocus().focus(fake.estimate, fake.capture_at, lambda f: None, z0, z0, convention=conv)


def test_resolve_sign_picks_the_side_that_explains_both_magnitudes() -> None:
    # First estimate +2 µm; the loop moved by -2 µm. Right sign: the second reads ~0; wrong: ~4.
    assert resolve_sign(2.0, -2.0, 0.1) == 1
    assert resolve_sign(2.0, -2.0, 3.9) == -1
    # A known +1 µm offset from a |1.5| µm reading: 2.5 (right) or 0.5 (wrong).
    assert resolve_sign(1.5, 1.0, 2.4) == 1
    assert resolve_sign(1.5, 1.0, 0.5) == -1
    assert resolve_sign(2.0, -2.0, 9.5) is None  # neither hypothesis explains it
    # Far beyond the model's range the wrong side reads saturated, and still fits.
    assert resolve_sign(8.0, -8.0, 9.8) == -1


def test_two_shot_loop_resolves_a_flipped_estimator() -> None:
    fake = _Fake(focus=3.0, sign=-1.0)
    r = _focus(fake, 0.0)
    assert r.converged and abs(r.z_um - 3.0) < 1e-6
    assert r.sign_resolution == "second_shot"
    assert r.captures == 2  # the wrong-way move and the move to focus; never the sweep's 10
    right = _focus(_Fake(focus=3.0), 0.0)
    assert right.sign_resolution == "model" and right.captures == 1 and right.converged


def test_the_convention_flips_after_sure_fields_disagree_and_not_on_noise() -> None:
    conv = SignConvention()
    results = [_focus(_Fake(focus=2.0 + 0.1 * i, sign=-1.0), 0.0, conv) for i in range(6)]
    assert [r.sign_resolution for r in results[:3]] == ["second_shot"] * 3
    assert conv.flipped and conv.flips == 1
    assert all(r.sign_resolution == "model" and r.captures == 1 and r.sign_flipped for r in results[3:])
    assert all(abs(r.z_um - (2.0 + 0.1 * i)) < 1e-6 for i, r in enumerate(results))

    # Fields where the model said it was unsure do not vote; occasional disagreements among many
    # agreements never flip it.
    conv = SignConvention()
    for _ in range(5):
        _focus(_Fake(focus=2.0, sign=-1.0, unsure=True), 0.0, conv)
    assert not conv.flipped and conv.score == 0
    for i in range(30):
        _focus(_Fake(focus=2.0, sign=-1.0 if i % 5 == 0 else 1.0), 0.0, conv)
    assert not conv.flipped


def test_a_field_neither_side_explains_is_left_to_the_sweep() -> None:
    class Stuck(_Fake):
        def estimate(self, z: float) -> DefocusEstimate:
            return DefocusEstimate(2.0, 8, 8)  # reads the same everywhere: ink, a fold

    r = _focus(Stuck(focus=0.0), 0.0)
    assert not r.converged and r.captures == 1 and r.z_um == 0.0


def test_sign_confidence_from_the_crops() -> None:
    assert not DefocusEstimate(2.0, 8, 8, 1.0, 0.2).sign_uncertain
    assert DefocusEstimate(2.0, 8, 8, 0.6, 0.2).sign_uncertain  # the crops disagree
    assert DefocusEstimate(0.3, 8, 8, 0.9, 0.5).sign_uncertain  # |estimate| within the spread
    assert not DefocusEstimate(None, 1, 8).sign_uncertain


def test_field_record_carries_the_sign_resolution() -> None:
    r = FieldRecord(0, 0, 0, 0.0, 0.0, 0.0, 1, "single_shot")
    assert asdict(r)["sign_resolution"] is None and asdict(r)["sign_flipped"] is False


def test_objective_presets_change_the_optics_metadata(tmp_path: Path) -> None:
    assert OBJECTIVES["flipped"][0] == -OBJECTIVES["training"][0]
    for name in ("flipped", "apochromat"):
        out = tmp_path / f"{name}.zarr"
        argv = ["synth", "--out", str(out), "--fields", "1", "1", "--tile", "64", "--z-planes", "2"]
        assert hw_sim_main([*argv, "--objective", name]) == 0
        optics = Recording.open(out).meta.optics
        sph, chrom = OBJECTIVES[name]
        assert optics["objective"] == name and optics["spherical_waves"] == pytest.approx(sph)
        assert optics["chromatic_shift_um"] == pytest.approx(list(chrom))
    out = tmp_path / "custom.zarr"
    argv = ["synth", "--out", str(out), "--fields", "1", "1", "--tile", "64", "--z-planes", "2"]
    assert hw_sim_main([*argv, "--spherical-waves", "-0.2", "--chromatic-shift", "-0.3", "0", "0.4"]) == 0
    optics = Recording.open(out).meta.optics
    assert optics["objective"] == "custom" and optics["spherical_waves"] == pytest.approx(-0.2)
    assert optics["chromatic_shift_um"] == pytest.approx([-0.3, 0.0, 0.4])


def test_two_shot_loop_focuses_through_a_flipped_objective(tmp_path: Path) -> None:
    """The committed model reads every defocus with the wrong sign through this objective; the
    loop still ends within ±0.35 µm on tissue fields, well under the sweep's captures."""
    params = SynthParams(
        fields_x=3, fields_y=2, seed=7_100_002, tile=256, z_planes=17, z_step_um=0.5, **objective_params("flipped")
    )  # type: ignore[arg-type]
    rec = Recording.open(synthesize(tmp_path / "flipped.zarr", params))
    drv = ReplayDriver(rec)
    m = rec.meta
    slide = SyntheticSlide(SlideSpec.from_dict(m.slide or {}))
    focuser = FieldFocuser(FocusConfig(strategy="single_shot"), ModelsConfig(backend="ort_cpu"), drv.camera, drv.stage)
    truth_xy, truth_z = rec.truth_actual_xy_um, rec.truth_focus_z_um
    assert truth_xy is not None and truth_z is not None
    errors, captures, how = [], [], []
    for plan in serpentine_plan(m.area, m.field_width_um, m.field_height_um, m.overlap).fields:
        drv.stage.move_xy(plan.x_um, plan.y_um)
        r = focuser.focus_field(plan, lambda: False)
        f = drv.stage.field_index()
        x, y = truth_xy[f]
        fw = m.tile_width * m.pixel_size_um
        captures.append(r.captures)
        how.append(r.sign_resolution)
        if slide.tissue_fraction(x - fw / 2, y - fw / 2, m.tile_height, m.tile_width, m.pixel_size_um) >= 0.05:
            errors.append(abs(r.z_um - float(truth_z[f])))
    assert errors and max(errors) <= 0.35, errors
    assert "second_shot" in how, how
    # Most fields are resolved without the sweep (a field the model misreads may still fall back).
    assert how.count("sweep") <= 1, how
    assert float(np.mean(captures)) <= 4.0, captures


class _BiasedNearFocus(_Fake):
    """A model at its noise floor: near focus it reads 0.27 µm plus a tenth of the defocus (a
    reading that shrinks by less than 20% per move, as real models' do at 0.2-0.4 µm)."""

    def estimate(self, z: float) -> DefocusEstimate:
        return DefocusEstimate(0.27 + 0.1 * (z - self.focus), 8, 8, 1.0, 0.1)


def test_a_move_near_focus_counts_if_it_shrinks_the_estimate_at_all() -> None:
    """0.3 µm off the model reads 0.30; after moving 0.30 it reads 0.27 (not 20% less), then 0.243:
    each frame is better than the last, so the loop keeps them and converges instead of giving up
    on the first (which sent such fields to the 10-capture sweep)."""
    fake = _BiasedNearFocus(focus=0.0)
    r = _focus(fake, 0.3)
    assert r.converged and r.captures == 2 and r.z_um == pytest.approx(-0.27)
