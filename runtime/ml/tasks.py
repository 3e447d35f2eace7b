"""The two model tasks on the scan path: defocus estimation and tile classification.

Each wraps a model folder (:mod:`runtime.ml.model_folder`) on an inference backend
(:mod:`runtime.ml.backends`) with the preprocessing both training and inference
share (:mod:`runtime.ml.preprocess`): :class:`AutofocusModel` turns a frame into a
signed defocus estimate (or an abstention: too little content), and
:class:`TileClassifierModel` a tile into background / tissue / artifact plus an
embedding. :func:`load_models` loads both on the best available backend
(:func:`load_configured_models`: as the ``[models]`` config section says).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from runtime.config import ModelsConfig
from runtime.devices.protocols import RGBImage
from runtime.ml.backends import Backend, Preference, select_backend
from runtime.ml.model_folder import ModelFolder, builtin_autofocus_dir, default_model_dir, load_model_folder

CLASSES = ("background", "tissue", "artifact")


def _sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


# A tile's sign is "uncertain" when fewer than this share of its content crops agree with the
# median's sign, or when the median is within SIGN_SPREAD_RATIO crop spreads (MAD) of zero. Calibrated
# on the held-out bench recordings (``python -m bench autofocus --sign``): see the README.
SIGN_AGREEMENT_MIN = 0.8
SIGN_SPREAD_RATIO = 1.0


@dataclass(frozen=True)
class DefocusEstimate:
    defocus_um: float | None  # None: abstained (not enough content)
    content_crops: int
    crops: int
    # The share of content crops whose estimate has the median's sign (1.0: all agree).
    sign_agreement: float = 1.0
    # The content crops' spread around the median (median absolute deviation, µm).
    spread_um: float = 0.0
    # A model with a magnitude head: the signed head's own median (defocus_um then has the
    # magnitude head's size and this one's sign). None: defocus_um is the signed head's median.
    signed_um: float | None = None

    @property
    def sign_uncertain(self) -> bool:
        """The crops do not agree on the sign: one frame cannot tell which side of focus it is."""
        if self.defocus_um is None:
            return False
        signed = self.defocus_um if self.signed_um is None else self.signed_um
        return self.sign_agreement < SIGN_AGREEMENT_MIN or abs(signed) < SIGN_SPREAD_RATIO * self.spread_um


MAGNITUDE_FROM_UM = 1.0
"""Where the magnitude head says at least this far from focus, its size is used."""


def combine_heads(signed: npt.ArrayLike, magnitude: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The defocus a model with a magnitude head reports (element-wise).

    The magnitude head learnt objectives of every kind (either aberration sign, aberration free),
    the signed head only those of the training sign: away from focus, size from the one and sign
    from the other (the loop's two-shot test checks the sign, ``runtime.focus.single_shot``).
    Within ``MAGNITUDE_FROM_UM`` of focus the signed head alone: a magnitude cannot read below 0,
    so in focus it reads ~0.3 µm and the loop would never settle (bench autofocus: 5.4 captures
    per field on the held-out recordings with the magnitude everywhere).
    """
    s = np.asarray(signed, np.float64)
    m = np.abs(np.asarray(magnitude, np.float64))
    out: npt.NDArray[np.float64] = np.where(m >= MAGNITUDE_FROM_UM, np.copysign(m, s), s)
    return out


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
        dc = d[content]
        med = float(np.median(dc))
        agree = float(np.mean(np.sign(dc) == np.sign(med))) if med != 0.0 else 0.5
        spread = float(np.median(np.abs(dc - med)))
        if "abs_defocus_um" not in out:
            return DefocusEstimate(med, n, len(d), agree, spread)
        mag = float(np.median(np.abs(out["abs_defocus_um"].reshape(-1)[content])))
        return DefocusEstimate(float(combine_heads(med, mag)), n, len(d), agree, spread, signed_um=med)


@dataclass(frozen=True)
class TileClass:
    label: str
    probabilities: tuple[float, float, float]  # per class, the strongest over the tile's windows
    embedding: tuple[float, ...]
    # Per window, row by row of the tile's window grid (ClassifierPreprocess.window_grid): the
    # decision's (mean) p(artifact), and whether the decision calls the window an artifact; the
    # scan's end grows the flags over the slide's windows with them (runtime.ml.artifact_context).
    window_p_artifact: tuple[tuple[float, ...], ...] = ()
    window_artifact: tuple[tuple[bool, ...], ...] = ()


DIHEDRAL = 8  # a window's flips (left-right, up-down) and transpose: tissue and artifacts have no orientation


def dihedral(x: npt.NDArray[np.float32], d: int) -> npt.NDArray[np.float32]:
    """The ``d``-th (0..7) flip/transpose of (N, C, S, S) windows; 0 is the identity, 0..1 add the
    left-right flip, 0..3 both flips."""
    if d & 1:
        x = x[..., ::-1]
    if d & 2:
        x = x[..., ::-1, :]
    if d & 4:
        x = np.swapaxes(x, -1, -2)
    return np.ascontiguousarray(x)


@dataclass(frozen=True)
class ClassifierDecision:
    """How a window's class probabilities become its label (``model.json`` ``decision``; a folder
    without one: a single pass, argmax, as before).

    ``transforms`` > 1 averages the softmax over the first ``transforms`` of the window's 8
    flips/transposes (:func:`dihedral`): a texture that looks like an artifact edge in one
    orientation rarely does in all of them. ``artifact_threshold``: a window is an artifact when
    its mean artifact probability reaches it (else background or tissue, whichever is likelier);
    None: plain argmax. Both are chosen on the simulator's validation split
    (:mod:`export.classifier_decision`), never on the unseen contents the benchmark scores.
    """

    transforms: int = 1
    artifact_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.transforms not in (1, 2, 4, 8):
            raise ValueError(f"classifier decision: transforms must be 1, 2, 4 or 8, got {self.transforms}")
        t = self.artifact_threshold
        if t is not None and not 0.0 < t < 1.0:
            raise ValueError(f"classifier decision: artifact_threshold must be in (0, 1), got {t}")

    @classmethod
    def from_meta(cls, meta: dict[str, object]) -> ClassifierDecision:
        d = meta.get("decision")
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"classifier decision: expected an object, got {d!r}")
        t = d.get("artifact_threshold")
        return cls(int(d.get("transforms", 1)), None if t is None else float(t))

    def window_labels(self, p: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        """Class index per window from its (mean) probabilities, (N, 3)."""
        labels: npt.NDArray[np.int64] = p.argmax(axis=1)
        if self.artifact_threshold is not None:
            labels = np.where(p[:, 2] >= self.artifact_threshold, 2, p[:, :2].argmax(axis=1))
        return labels


class TileClassifierModel:
    """The classifier model folder on a backend. A tile is cut into windows at the model's pixel
    size; it is an artifact if any window is, else tissue if any window is, else background
    (window labels by the folder's :class:`ClassifierDecision`)."""

    def __init__(self, folder: ModelFolder, backend: Backend) -> None:
        if folder.task != "classifier":
            raise ValueError(f"{folder.path} is a {folder.task!r} model, not classifier")
        self.folder = folder
        self.backend = backend
        self.pre = folder.classifier_preprocess()
        try:
            self.decision = ClassifierDecision.from_meta(folder.meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{folder.path / 'model.json'}: {e}") from None

    def window_probabilities(
        self, x: npt.NDArray[np.float32], transforms: int | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """(probabilities (N, 3) averaged over ``transforms`` flips/transposes (default: the
        decision's), embedding (N, E) of the untransformed windows), all in one backend call."""
        k = self.decision.transforms if transforms is None else transforms
        out = self.backend.run(np.concatenate([dihedral(x, d) for d in range(k)]) if k > 1 else x)
        lg = out["logits"]
        p = np.exp(lg - lg.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        probs: npt.NDArray[np.float32] = p.reshape(k, len(x), -1).mean(axis=0).astype(np.float32)
        return probs, out["embedding"][: len(x)]

    def classify_batch(self, tiles: list[RGBImage], pixel_size_um: float) -> list[TileClass]:
        """Classify several tiles in one backend call (the inference worker batches them)."""
        inputs = [self.pre.inputs(t, pixel_size_um) for t in tiles]
        grids = [self.pre.window_grid(t.shape[0], t.shape[1], pixel_size_um) for t in tiles]
        p_all, emb = self.window_probabilities(np.concatenate(inputs))
        win_all = self.decision.window_labels(p_all)
        results = []
        start = 0
        for rows, cols in grids:
            n = rows * cols
            p, win = p_all[start : start + n], win_all[start : start + n]
            label = "artifact" if (win == 2).any() else "tissue" if (win == 1).any() else "background"
            probs = p.max(axis=0)  # the strongest evidence per class over the windows
            e = emb[start : start + n].mean(axis=0)
            pa = p[:, 2].reshape(rows, cols)
            fa = (win == 2).reshape(rows, cols)
            results.append(
                TileClass(
                    label,
                    (float(probs[0]), float(probs[1]), float(probs[2])),
                    tuple(float(v) for v in e),
                    tuple(tuple(float(v) for v in r) for r in pa),
                    tuple(tuple(bool(v) for v in r) for r in fa),
                )
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


def _folder(configured: str) -> Path | None:
    """A model folder from the config: None for ``"builtin"`` (the committed one) or empty."""
    return None if configured in ("", "builtin") else Path(configured)


def load_configured_models(
    cfg: ModelsConfig, frame_shape: tuple[int, int] | None = None
) -> tuple[AutofocusModel, TileClassifierModel | None, dict[str, str]]:
    """:func:`load_models` as the ``[models]`` section says: the one place that reads its folders,
    backend and engine cache, for the inference worker and for models loaded in acquisition."""
    return load_models(
        _folder(cfg.autofocus_dir), _folder(cfg.classifier_dir), cfg.backend, cfg.engine_cache_dir, frame_shape
    )
