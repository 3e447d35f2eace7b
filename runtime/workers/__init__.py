"""The worker processes: each glues the layers below into one process of a scan.

Modules:

* ``skeleton``: ``run_worker``, what every worker does around its own work (bind to the parent,
  heartbeats, the ring, failure reports, clean-up), with ``WorkerContext`` for the body;
* ``acquisition``: ``acquisition_main`` (``AcquisitionJob``), drives stage and camera along the scan
  plan, focuses each field, puts tiles in the ring;
* ``inference``: ``inference_main``, owns the GPU and answers autofocus and classify requests
  (``Batching``: how classify requests are batched; ``InferenceClient``: a worker of its own and
  the channel to it, outside the daemon);
* ``stitcher``: ``stitcher_main`` (``StitchJob``), takes tiles out of the ring into the Zarr mosaic;
* ``writer``: ``writer_main``, streams the pyramidal OME-TIFF while the mosaic grows;
* ``recorder``: ``recorder_main`` (``ZstackRecordJob``), records a z-stack at each chosen field into
  a recording (``record_zstacks``; instead of the four above);
* ``planning``: ``open_and_plan``, opens the configured driver in a worker and plans the region.

May import: the base modules, ``runtime.devices``, ``runtime.ml``, ``runtime.output``,
``runtime.stitching``, ``runtime.ipc`` and ``runtime.focus``; never ``runtime.control`` or
``runtime.daemon``.

Re-exports are lazy (PEP 562 ``__getattr__`` imports a name's module on its first access; type
checkers and IDEs read the imports under ``TYPE_CHECKING``): each worker is a spawned process
that imports its own module (``runtime.workers.stitcher``), which runs this file first; eager
re-exports would load every worker into every process (acquisition's focus code and the
model stack, ``runtime.ml``, into the stitcher and the writer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.workers.acquisition import AcquisitionJob, acquisition_main
    from runtime.workers.inference import Batching, InferenceClient, inference_main
    from runtime.workers.planning import open_and_plan
    from runtime.workers.recorder import ZstackRecordJob, recorder_main
    from runtime.workers.skeleton import WorkerContext, run_worker
    from runtime.workers.stitcher import StitchJob, stitcher_main
    from runtime.workers.writer import writer_main
else:
    from runtime.lazy import lazy_exports

    _MODULES = {  # module -> the names it gives this package
        "acquisition": ("AcquisitionJob", "acquisition_main"),
        "inference": ("Batching", "InferenceClient", "inference_main"),
        "planning": ("open_and_plan",),
        "recorder": ("ZstackRecordJob", "recorder_main"),
        "skeleton": ("WorkerContext", "run_worker"),
        "stitcher": ("StitchJob", "stitcher_main"),
        "writer": ("writer_main",),
    }

    __getattr__, __dir__ = lazy_exports(__name__, _MODULES, globals())


__all__ = [
    "AcquisitionJob",
    "Batching",
    "InferenceClient",
    "StitchJob",
    "WorkerContext",
    "ZstackRecordJob",
    "acquisition_main",
    "inference_main",
    "open_and_plan",
    "recorder_main",
    "run_worker",
    "stitcher_main",
    "writer_main",
]
