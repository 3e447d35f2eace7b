"""The lesion head on content the simulator never made: the share of 4 µm cells it calls tumour.

The head (``runtime/ml/builtin/lesion_head``) was trained and scored on simulated H&E only. Here it reads
224 px windows of images that ship with scikit-image -- a real IHC section, a retina photograph and
brick, gravel and grass textures, none of them tumour -- at three guesses of their pixel size (the photos
carry none), and the bench prints how much of each it calls tumour (p >= 0.5). On the scan path the head
only sees windows around regions the tumour map already found (0.35 and up), and only cells touching
that region count, so this is the head's own false-tumour rate, not the slide's.
"""

from __future__ import annotations

import argparse
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from bench.report import Column, emit
from runtime.analysis.lesion_head import load_lesion_head

DESCRIPTION = "the lesion head's tumour calls on images the simulator never made (scikit-image's photos)"
SCALES = (0.5, 1.0, 2.0)  # the photos read as 2, 1 and 0.5 µm per pixel (their pixel size is unknown)


def unseen_images() -> dict[str, npt.NDArray[np.uint8]]:
    """RGB uint8 images that ship with scikit-image (no download), none of them tumour."""
    from skimage import data

    out: dict[str, npt.NDArray[np.uint8]] = {}
    for name in ("immunohistochemistry", "retina", "brick", "gravel", "grass"):
        im = np.asarray(getattr(data, name)(), np.uint8)
        out[name] = np.ascontiguousarray(np.repeat(im[..., None], 3, 2) if im.ndim == 2 else im[..., :3])
    return out


def windows(im: npt.NDArray[np.uint8], size: int, scale: float) -> npt.NDArray[np.uint8]:
    """The image resized by ``scale`` and cut into whole ``size`` px windows, (n, size, size, 3)."""
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    r = cv2.resize(im, None, fx=scale, fy=scale, interpolation=interp) if scale != 1 else im
    cut = [
        r[y : y + size, x : x + size]
        for y in range(0, r.shape[0] - size + 1, size)
        for x in range(0, r.shape[1] - size + 1, size)
    ]
    return np.stack(cut) if cut else np.zeros((0, size, size, 3), np.uint8)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def run(a: argparse.Namespace) -> int:
    head = load_lesion_head(backend="ort_cpu")
    rows: list[dict[str, Any]] = []
    for name, im in unseen_images().items():
        for scale in SCALES:
            w = windows(im, head.size, scale)
            if not len(w):
                continue
            p = head.predict(w)
            rows.append(
                {
                    "image": name,
                    "um_per_px": round(1.0 / scale, 2),
                    "windows": len(w),
                    "tumour_cells_pct": round(100.0 * float(np.mean(p >= 0.5)), 1),
                    "mean_p": round(float(p.mean()), 3),
                }
            )
    columns = [
        Column("image", "image"),
        Column("um_per_px", "µm/px (read as)", ".2f"),
        Column("windows", "windows"),
        Column("tumour_cells_pct", "cells called tumour %", ".1f"),
        Column("mean_p", "mean p", ".3f"),
    ]
    title = "lesion head on scikit-image's images (none of them tumour; the head saw simulated H&E only)"
    emit({"lesion_head_unseen": rows}, rows, columns, as_json=a.json, title=title)
    return 0
