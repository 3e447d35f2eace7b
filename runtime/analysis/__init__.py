"""Slide analysis on final slide pixels: tumour heatmap, lesions, nuclei, slide score (issue 13).

The seams between the models and the pipeline are in :mod:`runtime.analysis.types`; the
streaming analyzer and its drivers in :mod:`runtime.analysis.pipeline`; the trained models'
loader in :mod:`runtime.analysis.models`.

Re-exports of the pipeline and the loader are lazy (PEP 562, :mod:`runtime.lazy`): a submodule
such as :mod:`runtime.analysis.geojson` (imported by ``hw_sim``'s truth) must not pull in
OpenCV, the pipeline or ONNX Runtime with the package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.analysis.models import load_analysis_models
    from runtime.analysis.pipeline import (
        AnalysisError,
        GridResult,
        ModelSet,
        SlideAnalyzer,
        analyze_file,
        analyze_source,
        baseline_models,
        load_models,
    )
    from runtime.analysis.types import NucleiModel, SlideModel, SlideScore, TumourModel, TumourOutput
else:
    from runtime.lazy import lazy_exports

    _MODULES = {  # module -> the names it gives this package
        "pipeline": (
            "AnalysisError",
            "GridResult",
            "ModelSet",
            "SlideAnalyzer",
            "analyze_file",
            "analyze_source",
            "baseline_models",
            "load_models",
        ),
        "models": ("load_analysis_models",),
        "types": ("NucleiModel", "SlideModel", "SlideScore", "TumourModel", "TumourOutput"),
    }

    __getattr__, __dir__ = lazy_exports(__name__, _MODULES, globals())

__all__ = [
    "AnalysisError",
    "GridResult",
    "ModelSet",
    "NucleiModel",
    "SlideAnalyzer",
    "SlideModel",
    "SlideScore",
    "TumourModel",
    "TumourOutput",
    "analyze_file",
    "analyze_source",
    "baseline_models",
    "load_analysis_models",
    "load_models",
]
