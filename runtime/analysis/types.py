"""The typed seams of slide analysis: what the models answer and what the pipeline hands on.

Slide analysis (issue 13: tumour heatmap, lesions, nuclei, slide score) has two halves that meet
here and nowhere else:

- **models** (``runtime.analysis.models`` and one module per model): ONNX model folders behind the
  three Protocols below -- a tumour patch classifier whose embedding feeds the slide model, a
  nuclei detector run by sliding window, and an attention-MIL slide model with positional
  encoding of the patch coordinates;
- **the pipeline** (``runtime.analysis.pipeline`` and the output modules): feeds final slide
  pixels (rows of a pyramid level, in slide coordinates: the stitcher has already placed every
  tile) to the models, collects their answers on a grid, and turns them into the heatmap, the
  lesion polygons, the QuPath GeoJSON and the report's summary.

Coordinates: ``(y, x)`` in full-resolution (level 0) slide pixels unless a name says otherwise;
a model states the pixel size it wants (``pixel_size_um``) and the pipeline reads the pyramid
level nearest to it (resampling the rest of the way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

__all__ = ["NucleiModel", "SlideModel", "SlideScore", "TumourModel", "TumourOutput"]


@dataclass(frozen=True)
class TumourOutput:
    """The tumour classifier's answer for N patches."""

    probability: F32
    """(N,) probability that the patch is tumour (carcinoma), in [0, 1]."""
    embedding: F32
    """(N, D) the patch's feature vector, the slide model's input."""


class TumourModel(Protocol):
    """Tumour patch classifier: RGB patches of ``patch_px`` at ``pixel_size_um`` -> probability + embedding."""

    @property
    def patch_px(self) -> int: ...

    @property
    def pixel_size_um(self) -> float: ...

    @property
    def embedding_dim(self) -> int: ...

    def predict(self, patches: U8) -> TumourOutput:
        """``patches`` (N, patch_px, patch_px, 3) uint8 RGB; N may be 0."""
        ...


class NucleiModel(Protocol):
    """Nuclei detector run by sliding window over regions at ``pixel_size_um``."""

    @property
    def pixel_size_um(self) -> float: ...

    @property
    def halo_px(self) -> int:
        """Context the model needs beyond a region's edge: detections closer than this to the
        edge of a region are unreliable, so the pipeline overlaps its windows by this much."""
        ...

    @property
    def step_px(self) -> int:
        """The detector's own tiling: a region of k * step_px + 2 * halo_px px a side costs it
        k x k fixed-size windows and no partly wasted ones (0: any region size is as cheap)."""
        ...

    def detect(self, region: U8) -> F32:
        """``region`` (H, W, 3) uint8 RGB -> (K, 2) nucleus centroids (y, x) in region pixels."""
        ...


@dataclass(frozen=True)
class SlideScore:
    """The slide model's answer."""

    score: float
    """Probability that the slide contains tumour, in [0, 1]."""
    attention: F32
    """(N,) attention weight per patch (sums to 1 over the patches given)."""


class SlideModel(Protocol):
    """Attention-MIL over patch embeddings with positional encoding of their coordinates."""

    def predict(self, embeddings: F32, coords_um: F32) -> SlideScore:
        """``embeddings`` (N, D) from :class:`TumourModel`; ``coords_um`` (N, 2) patch centres (y, x) in µm."""
        ...
