"""Classical baselines behind the analysis Protocols: what the trained models must beat.

- :class:`NuclearDensityTumour` (a :class:`~runtime.analysis.types.TumourModel`): the fraction
  of a patch covered by haematoxylin-dense pixels (colour deconvolution with a fixed H&E stain
  matrix), mapped to a probability by a logistic around a threshold. Carcinoma is crowded with
  enlarged, hyperchromatic nuclei, so this is the textbook cheap tumour map -- and it fires on
  every benign crowded region (lymphoid aggregates, hyperplasia) too. Its "embedding" is a few
  colour statistics, so the slide-level baseline can run the same pipeline.
- :class:`MaxProbabilitySlide` (a :class:`~runtime.analysis.types.SlideModel`): the slide score
  is the highest patch probability (attention: that patch), the usual non-learnt aggregate.
  Here the probability comes from the embedding's first component (the patch probability, which
  :class:`NuclearDensityTumour` puts there); with a trained tumour model the pipeline gives this
  baseline the model's probabilities (:func:`max_probability_score`).
- :class:`LoGNuclei` (a :class:`~runtime.analysis.types.NucleiModel`): blob detection on the
  haematoxylin channel: a Laplacian of Gaussian at the nuclear scale, local maxima above a
  threshold at least a nucleus radius apart.

All are numpy/OpenCV (no scikit-image in the runtime), deterministic, and work patch by
patch, so streaming the slide in pieces gives exactly the answer of the whole slide.
"""

from __future__ import annotations

from typing import Final

import cv2
import numpy as np
import numpy.typing as npt

from runtime.analysis.types import F32, U8, SlideScore, TumourOutput

# Ruifrok & Johnston's H&E(+DAB residual) optical densities per RGB channel, normalised rows.
_RAW_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float64)
_STAINS: Final = _RAW_STAINS / np.linalg.norm(_RAW_STAINS, axis=1, keepdims=True)
_UNMIX: Final = np.linalg.inv(_STAINS).astype(np.float32)  # OD (rgb) @ _UNMIX -> (H, E, residual)


# Optical density of each uint8 value: a table look-up costs a fraction of a log per pixel, and the
# tissue tests (every tumour cell, every nuclei window) run it on every pixel of the slide.
_OD_LUT: Final = np.asarray(-np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0), np.float32)


def optical_density(rgb: U8) -> F32:
    """(..., 3) uint8 RGB -> optical density per channel (Beer-Lambert, white = 255)."""
    a = np.ascontiguousarray(rgb, np.uint8)
    if a.size == 0:
        return np.zeros(a.shape, np.float32)
    # cv2.LUT: ~10x numpy's fancy indexing (and the log it replaces); any shape as one column.
    return np.asarray(cv2.LUT(a.reshape(-1, 1), _OD_LUT), np.float32).reshape(a.shape)


TISSUE_OD: Final = 0.25  # total optical density of a stained pixel (glass ~0.05-0.1; the palest stroma ~0.4)
_ONES3: Final = np.ones((1, 3), np.float32)


def total_od(od: F32) -> F32:
    """(..., 3) optical densities -> (...) their sum over the channels (cv2.transform: ~6x numpy's
    strided sum over the last axis)."""
    a = np.ascontiguousarray(od, np.float32)
    if a.size == 0:
        return np.zeros(a.shape[:-1], np.float32)
    return np.asarray(cv2.transform(a.reshape(-1, 1, 3), _ONES3), np.float32).reshape(a.shape[:-1])


def stained(rgb: U8) -> npt.NDArray[np.bool_]:
    """(..., 3) uint8 RGB -> (...) whether each pixel is stained tissue (total OD > :data:`TISSUE_OD`)."""
    return total_od(optical_density(rgb)) > TISSUE_OD


def haematoxylin(rgb: U8) -> F32:
    """(..., 3) uint8 RGB -> (...) haematoxylin optical density (colour deconvolution, fixed matrix)."""
    od = optical_density(rgb)
    return np.asarray(np.maximum(od @ _UNMIX[:, 0], 0.0), np.float32)


def tissue_fraction(rgb: U8) -> float:
    """Fraction of pixels that are stained tissue, not glass: total optical density above 0.25
    (glass with its white balance reads ~0.05-0.1; the palest stroma ~0.4)."""
    if rgb.size == 0:
        return 0.0
    return float(stained(rgb).mean())


class NuclearDensityTumour:
    """Tumour probability from the haematoxylin-dense area of a patch (see the module docstring).

    ``threshold``: the dense-area fraction where the probability is 0.5; ``h_od``: the
    haematoxylin optical density that counts as nucleus. Tuned on development seeds (< 900000).
    """

    EMBEDDING: Final = ("probability", "dense_fraction", "mean_h", "mean_e", "std_h")

    def __init__(
        self,
        patch_px: int = 32,
        pixel_size_um: float = 1.0,
        threshold: float = 0.50,
        h_od: float = 0.55,
        slope: float = 25.0,
    ) -> None:
        self._patch_px = patch_px
        self._px = pixel_size_um
        self.threshold = threshold
        self.h_od = h_od
        self.slope = slope

    @property
    def patch_px(self) -> int:
        return self._patch_px

    @property
    def pixel_size_um(self) -> float:
        return self._px

    @property
    def embedding_dim(self) -> int:
        return len(self.EMBEDDING)

    def predict(self, patches: U8) -> TumourOutput:
        n = patches.shape[0]
        if n == 0:
            return TumourOutput(np.zeros(0, np.float32), np.zeros((0, self.embedding_dim), np.float32))
        od = optical_density(patches).reshape(n, -1, 3) @ _UNMIX
        h, e = np.maximum(od[..., 0], 0.0), np.maximum(od[..., 1], 0.0)
        tissue = od.sum(-1) > 0.0  # (kept simple: glass pixels have near-zero H and E anyway)
        dense = ((h > self.h_od) & tissue).mean(1)
        prob = 1.0 / (1.0 + np.exp(-self.slope * (dense - self.threshold)))
        emb = np.stack([prob, dense, h.mean(1), e.mean(1), h.std(1)], axis=1)
        return TumourOutput(prob.astype(np.float32), emb.astype(np.float32))


def max_probability_score(probability: F32) -> SlideScore:
    """The max-tile-probability slide score; attention is one-hot on the maximum."""
    att = np.zeros(len(probability), np.float32)
    if len(probability) == 0:
        return SlideScore(0.0, att)
    k = int(np.argmax(probability))
    att[k] = 1.0
    return SlideScore(float(probability[k]), att)


class MaxProbabilitySlide:
    """Slide score = the highest patch probability, read from embedding column 0 (see the module docstring)."""

    def predict(self, embeddings: F32, coords_um: F32) -> SlideScore:
        return max_probability_score(np.asarray(embeddings[:, 0] if len(embeddings) else [], np.float32))


class LoGNuclei:
    """Nuclei centroids by Laplacian-of-Gaussian blobs on the haematoxylin channel."""

    def __init__(self, pixel_size_um: float = 0.5, radius_um: float = 2.0, threshold: float = 0.08) -> None:
        self._px = pixel_size_um
        self.sigma = radius_um / pixel_size_um / np.sqrt(2.0)
        self.min_distance = max(1, round(0.8 * radius_um / pixel_size_um))
        self.threshold = threshold

    @property
    def pixel_size_um(self) -> float:
        return self._px

    @property
    def halo_px(self) -> int:
        return int(np.ceil(4 * self.sigma)) + self.min_distance

    @property
    def step_px(self) -> int:
        return 0  # filters over the whole region: no windows of its own

    def detect(self, region: U8) -> F32:
        if region.size == 0:
            return np.zeros((0, 2), np.float32)
        h = haematoxylin(region)
        # Laplacian of Gaussian, scale-normalised (bright blobs > 0); OpenCV's separable Gaussian and
        # 3x3 Laplacian: ~5x faster than scipy.ndimage.gaussian_laplace, the same peaks to a pixel.
        blurred = cv2.GaussianBlur(h, (0, 0), self.sigma, borderType=cv2.BORDER_REPLICATE)
        resp = -cv2.Laplacian(blurred, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REPLICATE) * np.float32(self.sigma**2)
        size = 2 * self.min_distance + 1
        local_max = cv2.dilate(resp, np.ones((size, size), np.uint8), borderType=cv2.BORDER_REPLICATE)
        peaks = (resp == local_max) & (resp > self.threshold)
        ys, xs = np.nonzero(peaks)
        return np.stack([ys, xs], axis=1).astype(np.float32)
