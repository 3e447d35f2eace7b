"""Slide analysis on final slide pixels: tumour heatmap, lesions, nuclei, slide score (issue 13).

The seams between the models and the pipeline are in :mod:`runtime.analysis.types`.
"""

from runtime.analysis.types import NucleiModel, SlideModel, SlideScore, TumourModel, TumourOutput

__all__ = ["NucleiModel", "SlideModel", "SlideScore", "TumourModel", "TumourOutput"]
