"""Single-shot deep-learning autofocus on the scan path, a focus surface, and the tile classifier.

Closed loop per field: capture at the z the focus surface predicts, let the
model estimate the signed defocus from that one frame, and only if the
estimate is outside the tolerance move to ``z - defocus`` and capture again
(at most ``max_moves`` times). Fields without content (glass, near-empty: the
model's content head, or the classifier's "background") get no focus
estimate; they keep the surface's z and are never added to it.

The focus surface is a distance-weighted plane through the nearest accepted
focus points: a slide is tilted and smoothly warped, so nearby points predict
the next field's focus to a fraction of a micrometre, which is what lets most
fields be accepted on their first capture.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from runtime.devices.protocols import RGBImage
from runtime.ml.backends import Backend, Preference, select_backend
from runtime.ml.model_folder import ModelFolder, builtin_autofocus_dir, default_model_dir, load_model_folder

CLASSES = ("background", "tissue", "artifact")


def _sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


@dataclass(frozen=True)
class DefocusEstimate:
    defocus_um: float | None  # None: abstained (not enough content)
    content_crops: int
    crops: int


class AutofocusModel:
    """The autofocus model folder on a backend: tile in, signed defocus (µm) out."""

    def __init__(self, folder: ModelFolder, backend: Backend, min_content_crops: int = 2) -> None:
        if folder.task != "autofocus":
            raise ValueError(f"{folder.path} is a {folder.task!r} model, not autofocus")
        self.folder = folder
        self.backend = backend
        self.pre = folder.autofocus_preprocess()
        self.min_content_crops = min_content_crops

    def describe(self) -> str:
        """Which model this is, for reports: folder name and ONNX sha256 prefix."""
        return f"{self.folder.path.name} ({self.folder.sha256[:12]})"

    def estimate(self, tile: RGBImage) -> DefocusEstimate:
        out = self.backend.run(self.pre.inputs(tile))
        d = out["defocus_um"].reshape(-1)
        content = _sigmoid(out["content_logit"].reshape(-1)) > 0.5
        n = int(content.sum())
        # A quarter of the crops, and at least two: one lucky crop on a speck is not a focus target.
        if n < max(self.min_content_crops, math.ceil(0.25 * len(d))):
            return DefocusEstimate(None, n, len(d))
        return DefocusEstimate(float(np.median(d[content])), n, len(d))


@dataclass(frozen=True)
class TileClass:
    label: str
    probabilities: tuple[float, float, float]
    embedding: tuple[float, ...]


class TileClassifierModel:
    """The classifier model folder on a backend. A tile is cut into windows at the model's pixel
    size; it is an artifact if any window is, else tissue if any window is, else background."""

    def __init__(self, folder: ModelFolder, backend: Backend) -> None:
        if folder.task != "classifier":
            raise ValueError(f"{folder.path} is a {folder.task!r} model, not classifier")
        self.folder = folder
        self.backend = backend
        self.pre = folder.classifier_preprocess()

    def classify_batch(self, tiles: list[RGBImage], pixel_size_um: float) -> list[TileClass]:
        """Classify several tiles in one backend call (the inference worker batches them)."""
        inputs = [self.pre.inputs(t, pixel_size_um) for t in tiles]
        counts = [len(x) for x in inputs]
        out = self.backend.run(np.concatenate(inputs))
        logits, emb = out["logits"], out["embedding"]
        results = []
        start = 0
        for n in counts:
            lg = logits[start : start + n]
            p = np.exp(lg - lg.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            win = p.argmax(axis=1)
            label = "artifact" if (win == 2).any() else "tissue" if (win == 1).any() else "background"
            probs = p.max(axis=0)  # the strongest evidence per class over the windows
            e = emb[start : start + n].mean(axis=0)
            results.append(
                TileClass(label, (float(probs[0]), float(probs[1]), float(probs[2])), tuple(float(v) for v in e))
            )
            start += n
        return results

    def classify(self, tile: RGBImage, pixel_size_um: float) -> TileClass:
        return self.classify_batch([tile], pixel_size_um)[0]


def load_models(
    autofocus_dir: Path | None = None,
    classifier_dir: Path | None = None,
    backend: Preference = "auto",
    cache_dir: Path | None = None,
    frame_shape: tuple[int, int] | None = None,
) -> tuple[AutofocusModel, TileClassifierModel | None, dict[str, str]]:
    """Both models on the best (or the forced) backend; returns what each backend choice refused.
    ``autofocus_dir`` None: the committed model that fits the camera's ``frame_shape``."""
    af_folder = load_model_folder(autofocus_dir or builtin_autofocus_dir(frame_shape), "autofocus")
    sel = select_backend(af_folder, backend, cache_dir)
    refused = {f"autofocus.{k}": v for k, v in sel.refused.items()}
    af = AutofocusModel(af_folder, sel.backend)
    cls: TileClassifierModel | None = None
    cls_dir = classifier_dir or default_model_dir("classifier")
    if cls_dir.exists():
        c_folder = load_model_folder(cls_dir, "classifier")
        csel = select_backend(c_folder, backend, cache_dir)
        refused.update({f"classifier.{k}": v for k, v in csel.refused.items()})
        cls = TileClassifierModel(c_folder, csel.backend)
    return af, cls, refused


# --------------------------------------------------------------------------- focus surface


@dataclass
class FocusSurface:
    """Focus z(x, y) from accepted points: a Gaussian-weighted plane through the nearest ones."""

    default_z_um: float
    scale_um: float = 1000.0  # weight falls off over about this distance
    neighbours: int = 12
    points: list[tuple[float, float, float]] = field(default_factory=list)

    def add(self, x_um: float, y_um: float, z_um: float) -> None:
        self.points.append((x_um, y_um, z_um))

    def predict(self, x_um: float, y_um: float) -> float:
        if not self.points:
            return self.default_z_um
        p = np.asarray(self.points, np.float64)
        d = np.hypot(p[:, 0] - x_um, p[:, 1] - y_um)
        near = np.argsort(d, kind="stable")[: self.neighbours]
        p, d = p[near], d[near]
        if len(p) < 3:
            return float(p[0, 2])
        w = np.exp(-0.5 * (d / self.scale_um) ** 2) + 1e-6
        a = np.stack([np.ones(len(p)), p[:, 0] - x_um, p[:, 1] - y_um], axis=1)
        sw = np.sqrt(w)[:, None]
        coef = np.linalg.lstsq(a * sw, p[:, 2] * sw[:, 0], rcond=None)[0]
        # Collinear points (one scan row so far) leave the cross-row slope undetermined: lstsq's
        # minimum-norm solution then sets it to zero, which is the right prior for a flat slide.
        z = float(coef[0])
        # A plane extrapolated far beyond its points can run away; stay within the points' range.
        lo, hi = float(p[:, 2].min()), float(p[:, 2].max())
        margin = 2.0
        return float(np.clip(z, lo - margin, hi + margin))


# --------------------------------------------------------------------------- the strategy


F = TypeVar("F")  # a captured frame as the caller holds it: an array, or a ring slot handle


@dataclass(frozen=True)
class SingleShotResult(Generic[F]):
    z_um: float  # where the kept frame was captured
    captures: int
    frame: F
    predicted_defocus_um: float | None  # the first estimate (at the surface's z)
    final_defocus_um: float | None  # the estimate for the kept frame
    focus_estimate_um: float | None  # z - final defocus, when the estimate is trusted
    converged: bool


@dataclass(frozen=True)
class SingleShotFocus:
    """Capture, estimate, move only when outside ``tolerance_um``; at most ``max_moves`` moves."""

    tolerance_um: float = 0.25
    max_moves: int = 3
    max_step_um: float = 12.0

    def focus(
        self,
        estimate: Callable[[F], float | None],
        capture_at: Callable[[float], F],
        release: Callable[[F], None],
        start_z_um: float,
        first: F,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> SingleShotResult[F]:
        """``first``: the frame already captured at ``start_z_um`` (the caller classified it).

        ``capture_at(z)`` moves the stage to z and captures; ``estimate`` is the model's signed
        defocus (None: no content). Frames are handles the caller may have to give back
        (ring slots): every frame but the returned one is passed to ``release``, so at most two
        are held at any time.
        """
        z, frame = start_z_um, first
        captures = 0
        d = estimate(frame)
        first_estimate = d
        for _ in range(self.max_moves):
            if d is None or abs(d) <= self.tolerance_um or should_stop():
                break
            z_new = z - float(np.clip(d, -self.max_step_um, self.max_step_um))
            frame_new = capture_at(z_new)
            captures += 1
            d_new = estimate(frame_new)
            # A correct model shrinks |d| by far more than this at every move. If it does not,
            # the estimate is not to be trusted here (pen ink, a fold, a bubble rim, or a stack
            # edge): stop and keep the best capture rather than walk z away.
            if d_new is None or abs(d_new) > 0.8 * abs(d):
                release(frame_new)
                break
            release(frame)
            z, frame, d = z_new, frame_new, d_new
        converged = d is not None and abs(d) <= self.tolerance_um
        # The residual estimate refines the focus point the surface learns (not the frame we keep).
        focus = z - d if d is not None and abs(d) <= 1.0 else None
        return SingleShotResult(z, captures, frame, first_estimate, d, focus, converged)
