"""Per-field focus on the scan path: the chosen strategy, the focus surface and the classifier.

The acquisition worker calls :meth:`FieldFocuser.focus_field` once per field
and gets back the frame to keep plus what the report needs (z, captures,
predicted defocus, class). Strategies:

``contrast_sweep`` (baseline, model-free): sweep around the previous field's
z, move to the peak, capture.

``single_shot``: capture at the focus surface's z, classify the frame; a
background (glass) field is kept as it is (1 capture, surface z, no focus
estimate); otherwise the single-shot loop of :mod:`runtime.autofocus`
refines z only when the model's estimate is outside tolerance. Accepted
points feed the surface. When the estimates do not converge (each move must
shrink the estimate), the contrast sweep takes over for that field. Artifact fields are focused like tissue (there may
be tissue under the dust) and flagged in the report.

Inference placement: the models run in this (acquisition) process on the
selected backend. Autofocus sits on the critical path of every capture, so a
same-process call is the lowest latency there is; the separate inference
worker process (``runtime/inference_worker.py``) serves batched classification
for callers that do not need the answer before the next move.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.autofocus import AutofocusModel, FocusSurface, SingleShotFocus, TileClassifierModel, load_models
from runtime.config import ModelsConfig
from runtime.devices import Camera, RGBImage, Stage
from runtime.focus import ContrastSweep
from runtime.scan_plan import FieldPlan


@dataclass(frozen=True)
class ModelSettings:
    """Where the models are and how to run them (picklable: it crosses into the spawned worker)."""

    autofocus_dir: str | None = None  # None: the committed runtime/models/autofocus
    classifier_dir: str | None = None
    backend: str = "auto"
    engine_cache_dir: str | None = None
    classify: bool = True


@dataclass(frozen=True)
class FocusedField:
    z_um: float
    captures: int
    frame: RGBImage
    method: str
    predicted_defocus_um: float | None = None
    tile_class: str | None = None
    class_probabilities: tuple[float, float, float] | None = None
    artifact: bool = False


class FieldFocuser:
    def __init__(
        self,
        strategy: str,
        sweep: ContrastSweep,
        single_shot: SingleShotFocus,
        start_z_um: float,
        models: ModelSettings | None,
        camera: Camera,
        stage: Stage,
    ) -> None:
        if strategy not in ("contrast_sweep", "single_shot"):
            raise ValueError(f"unknown focus strategy {strategy!r}")
        self.strategy = strategy
        self.sweep = sweep
        self.single_shot = single_shot
        self.camera = camera
        self.stage = stage
        self.surface = FocusSurface(start_z_um)
        self._last_z = start_z_um
        self.autofocus: AutofocusModel | None = None
        self.classifier: TileClassifierModel | None = None
        self.backend_notes: dict[str, Any] = {}
        if strategy == "single_shot":
            m = models or ModelSettings()
            self.autofocus, cls, refused = load_models(
                Path(m.autofocus_dir) if m.autofocus_dir else None,
                Path(m.classifier_dir) if m.classifier_dir else None,
                m.backend,  # type: ignore[arg-type]  # validated by the config's Literal
                Path(m.engine_cache_dir) if m.engine_cache_dir else None,
            )
            self.classifier = cls if m.classify else None
            self.backend_notes = {"backend": self.autofocus.backend.name, "refused": refused}

    def focus_field(self, plan: FieldPlan, should_stop: Callable[[], bool]) -> FocusedField:
        if self.strategy == "contrast_sweep":
            result = self.sweep.focus(self.camera, self.stage, self._last_z, should_stop=should_stop)
            self.stage.move_z(result.z_um)
            frame = self.camera.snap()
            # The next field is close by: its focus is near this one's.
            self._last_z = result.z_um
            return FocusedField(result.z_um, result.captures + 1, frame, "contrast_sweep")
        assert self.autofocus is not None
        z0 = self.surface.predict(plan.x_um, plan.y_um)
        self.stage.move_z(z0)
        first = self.camera.snap()
        tc = self.classifier.classify(first, self.camera.pixel_size_um) if self.classifier else None
        if tc is not None and tc.label == "background":
            # Glass: nothing to focus on; keep the surface's z and do not teach the surface.
            return FocusedField(z0, 1, first, "single_shot:background", None, tc.label, tc.probabilities)
        r = self.single_shot.focus(self.autofocus, self.camera, self.stage, z0, should_stop, first_frame=first)
        if r.final_defocus_um is not None and not r.converged and not should_stop():
            # The model sees content but its estimates did not converge (ink, folds, bubbles,
            # or a field unlike its training data): fall back to the contrast sweep around the
            # best capture, so a hard field costs captures, not focus.
            sw = self.sweep.focus(self.camera, self.stage, r.z_um, should_stop=should_stop)
            self.stage.move_z(sw.z_um)
            frame = self.camera.snap()
            return FocusedField(
                sw.z_um,
                r.captures + 1 + sw.captures + 1,
                frame,
                "single_shot:sweep_fallback",
                r.predicted_defocus_um,
                tc.label if tc else None,
                tc.probabilities if tc else None,
                tc is not None and tc.label == "artifact",
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
            tc.label if tc else None,
            tc.probabilities if tc else None,
            artifact,
        )


def model_settings(cfg: ModelsConfig) -> ModelSettings:
    """The ``[models]`` config section as plain values for the spawned worker."""
    return ModelSettings(
        autofocus_dir=None if cfg.autofocus_dir == "builtin" else cfg.autofocus_dir,
        classifier_dir=None if cfg.classifier_dir == "builtin" else cfg.classifier_dir,
        backend=cfg.backend,
        engine_cache_dir=str(cfg.engine_cache_dir),
        classify=cfg.classify,
    )
