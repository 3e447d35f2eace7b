"""Per-field focus on the scan path: where to put z before each field is captured.

Modules:

* ``sweep``: ``ContrastSweep``, the baseline strategy (a z-stack scored by ``sharpness``, the peak
  found by ``parabolic_peak``);
* ``single_shot``: ``SingleShotFocus``, the deep-learning closed loop (defocus estimated from one frame);
* ``near_focus``: the sharpness fit that checks or replaces the model's reading near focus, and
  ``NearFocusTrust``, what a scan learnt about it;
* ``surface``: ``FocusSurface``, focus z(x, y) predicted from the fields already focused;
* ``field``: ``FieldFocuser``, the configured strategy per field with the surface and the tile
  classifier (``FocusModels``: the models as it sees them, ``WorkerModels``: those in the inference
  worker; ``Capture``: a frame and its ring slot, ``LocalFrames``: captures without a ring).

May import: the base modules, ``runtime.devices`` (camera, stage, scan plan), ``runtime.ml`` (the
model tasks) and ``runtime.ipc`` (the inference channel).

Re-exports are eager: ``field``, the module the acquisition worker uses, imports every other
module here. ``runtime.ml`` is imported with it, but no inference backend (ONNX Runtime,
TensorRT) is loaded until a model is.
"""

from runtime.focus.field import Capture, FieldFocuser, FocusModels, LocalFrames, WorkerModels
from runtime.focus.single_shot import SingleShotFocus
from runtime.focus.surface import FocusSurface
from runtime.focus.sweep import ContrastSweep, parabolic_peak, sharpness

__all__ = [
    "Capture",
    "ContrastSweep",
    "FieldFocuser",
    "FocusModels",
    "FocusSurface",
    "LocalFrames",
    "SingleShotFocus",
    "WorkerModels",
    "parabolic_peak",
    "sharpness",
]
