"""Tiles to mosaic: measure where each tile really is, correct it, and blend it into the mosaic.

Modules:

* ``registration``: ``register_pair``, the offset of two neighbouring tiles on their overlap
  (``RegistrationParams`` in, ``PairMeasurement`` out; ``to_grey``, ``texture``);
* ``positions``: ``PositionSolver``, tile positions from the pairwise links (``Link``) and the
  stage prior (``StageModel``), solved online;
* ``flatfield``: ``FlatFieldEstimator``, vignetting estimated from the scan's own tiles (``FlatField``);
* ``blending``: ``composite``, tiles blended at subpixel positions with feathered overlaps
  (``subpixel_shift``, ``lanczos_kernel``, ``feather_alpha``, ``ramp``);
* ``backends``: ``select_stitch_backend``, where resampling and the registration's NCC surface run
  (``stitch.backend``: ``cpu``, or ``cupy`` on a CUDA GPU through ``gpu``, CuPy imported only there);
* ``accumulator``: ``DequeAccumulator``, the serpentine tile stream turned into final mosaic bands,
  written through ``runtime.output``'s ``MosaicStore`` (``MosaicGeometry``).

May import: the base modules, ``runtime.devices`` (the scan plan) and ``runtime.output`` (the mosaic store).

Re-exports are eager: ``accumulator``, the module the stitcher worker and the scan job use,
imports every other module here, so importing the package costs its users nothing more.
"""

from runtime.stitching.accumulator import DequeAccumulator, MosaicGeometry
from runtime.stitching.blending import composite, feather_alpha, lanczos_kernel, ramp, subpixel_shift
from runtime.stitching.flatfield import FlatField, FlatFieldEstimator
from runtime.stitching.positions import Link, PositionSolver, StageModel
from runtime.stitching.registration import PairMeasurement, RegistrationParams, register_pair, texture, to_grey

__all__ = [
    "DequeAccumulator",
    "FlatField",
    "FlatFieldEstimator",
    "Link",
    "MosaicGeometry",
    "PairMeasurement",
    "PositionSolver",
    "RegistrationParams",
    "StageModel",
    "composite",
    "feather_alpha",
    "lanczos_kernel",
    "ramp",
    "register_pair",
    "subpixel_shift",
    "texture",
    "to_grey",
]
