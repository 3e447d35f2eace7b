"""The lesion head on content the simulator never made: the share of 4 µm cells it calls tumour.

The head (``runtime/ml/builtin/lesion_head``) was first trained on simulated H&E only and called 72-100%
of these images' cells tumour; it is now trained with :mod:`export.content_mix` textures and photographs
as negatives too (``model.json``'s ``training_content``). Here it reads 224 px windows of images that ship
with scikit-image -- a real IHC section, a retina photograph and brick, gravel and grass textures, none of
them tumour -- at three guesses of their pixel size (the photos carry none), and the bench prints how much
of each it calls tumour (p >= 0.5). ``held_out`` says whether an image is one no training set of this
project uses (:data:`hw_sim.content.PACKAGED`: the IHC section and the three textures); the retina
photograph is one of the training photographs (``export.content_mix.TRAIN_IMAGES``). On the scan path the
head only sees windows around regions the tumour map already found (0.35 and up), and only cells touching
that region count, so this is the head's own false-tumour rate, not the slide's.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from bench.report import Column, emit
from hw_sim.content import PACKAGED
from runtime.analysis.lesion_head import load_lesion_head

DESCRIPTION = "the lesion head's tumour calls on images the simulator never made (scikit-image's photos)"
SCALES = (0.5, 1.0, 2.0)  # the photos read as 2, 1 and 0.5 µm per pixel (their pixel size is unknown)
FILES = {"immunohistochemistry": "ihc.png", "retina": "retina.jpg", "brick": "brick.png", "gravel": "gravel.png",
         "grass": "grass.png"}  # the images' files in skimage/data


def held_out(name: str) -> bool:
    """Whether the image is benchmark content no training set uses (:data:`hw_sim.content.PACKAGED`)."""
    return FILES[name] in PACKAGED.values()


def unseen_images() -> dict[str, npt.NDArray[np.uint8]]:
    """RGB uint8 images that ship with scikit-image (no download), none of them tumour."""
    from skimage import data

    out: dict[str, npt.NDArray[np.uint8]] = {}
    for name in FILES:
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
    p.add_argument("--model", type=Path, default=None, help="lesion-head model folder (default: the committed one)")


def run(a: argparse.Namespace) -> int:
    head = load_lesion_head(a.model, backend="ort_cpu")
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
                    "held_out": held_out(name),
                    "um_per_px": round(1.0 / scale, 2),
                    "windows": len(w),
                    "tumour_cells_pct": round(100.0 * float(np.mean(p >= 0.5)), 1),
                    "mean_p": round(float(p.mean()), 3),
                }
            )
    columns = [
        Column("image", "image"),
        Column("held_out", "held out"),
        Column("um_per_px", "µm/px (read as)", ".2f"),
        Column("windows", "windows"),
        Column("tumour_cells_pct", "cells called tumour %", ".1f"),
        Column("mean_p", "mean p", ".3f"),
    ]
    title = "lesion head on scikit-image's images (none of them tumour; retina is a training photograph)"
    emit({"lesion_head_unseen": rows}, rows, columns, as_json=a.json, title=title)
    return 0
