"""The tumour model on content the simulator never made: how often does it call it tumour?

:func:`other_content_patches` also makes the training negatives of that kind (textures and
photographs of :mod:`export.content_mix`, drawn with the training seed); the measurement uses
other draws, and the held-out images below that no training set uses.

None of this is tumour, so every positive call is a false positive:

- ``ihc``: scikit-image's real immunohistochemistry image of colon tissue (``skimage.data.ihc``,
  haematoxylin + DAB; held out of every training set of this project), at 0.25, 0.5 and
  1 µm per image pixel (it looks like a ~20x scan: 0.5 is the plausible one);
- ``brick``, ``gravel``, ``grass``: the project's held-out CC0 textures, at 1 µm per pixel;
- ``textures``: :func:`export.content_mix.random_texture` (noise, blobs with chromatin, fibres,
  Voronoi cells in random stain pairs), at random scales;
- ``photos``: :func:`export.content_mix.random_photo` (photographs in colour or recoloured
  through random stain pairs).

Patches are 64 px at the model's pixel size, taken where the image is not blank (mean optical
density >= 0.05), and fed through the exported model folder with the runtime's wrapper.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from runtime.ml.model_folder import write_model_json

U8 = npt.NDArray[np.uint8]
PATCH = 64


def _patches(image: U8, scale: float, limit: int, rng: np.random.Generator, step: int = PATCH // 2) -> U8:
    """64-px patches (every ``step`` px) of ``image`` resampled by ``scale`` (model px per image px),
    the non-blank ones, at most ``limit`` of them."""
    h, w = image.shape[:2]
    size = (max(PATCH, round(w * scale)), max(PATCH, round(h * scale)))
    img = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    cut = np.stack(
        [img[y : y + PATCH, x : x + PATCH] for y in range(0, img.shape[0] - PATCH + 1, step)
         for x in range(0, img.shape[1] - PATCH + 1, step)]
    )
    od = -np.log10(np.maximum(cut.astype(np.float32), 1.0) / 255.0).mean(axis=(1, 2, 3))
    cut = cut[od >= 0.05]
    if len(cut) > limit:
        cut = cut[np.sort(rng.choice(len(cut), limit, replace=False))]
    return np.ascontiguousarray(cut)


def unseen_patches(pixel_size_um: float, seed: int = 0, per_kind: int = 300) -> dict[str, U8]:
    from hw_sim.content import load_content

    rng = np.random.default_rng(seed)
    out: dict[str, U8] = {}
    ihc = load_content("ihc")
    for image_px in (0.25, 0.5, 1.0):
        out[f"ihc@{image_px}um"] = _patches(ihc, image_px / pixel_size_um, per_kind, rng)
    for name in ("brick", "gravel", "grass"):
        out[name] = _patches(load_content(name), 1.0 / pixel_size_um, per_kind, rng)
    out["textures"], out["photos"] = other_content_patches(rng, 15, 15, 20)
    return out


def other_content_patches(rng: np.random.Generator, textures: int, photos: int, per_image: int) -> tuple[U8, U8]:
    """Patches of ``textures`` random textures and ``photos`` photographs (export.content_mix) at
    random scales: content that is not tissue, let alone tumour."""
    from export.content_mix import random_photo, random_texture

    tex = [_patches(random_texture(rng, 384), float(rng.uniform(0.3, 1.0)), per_image, rng) for _ in range(textures)]
    pho = [_patches(random_photo(rng), float(rng.uniform(0.15, 0.6)), per_image, rng) for _ in range(photos)]
    return np.concatenate(tex), np.concatenate(pho)


EVAL_SEED = 7_000_000  # the measurement's draws of textures and photographs (training uses its own seed)


def unseen_false_positives(folder: Path, seed: int = EVAL_SEED) -> dict[str, Any]:
    """Per kind: patches and the fraction called tumour (probability >= 0.5), through ONNX Runtime."""
    from runtime.analysis.tumour import TumourClassifier
    from runtime.ml.backends import OrtBackend
    from runtime.ml.model_folder import load_model_folder

    mf = load_model_folder(folder, "tumour")
    model = TumourClassifier(mf, OrtBackend(mf, cuda=False))
    out: dict[str, Any] = {}
    for kind, patches in unseen_patches(mf.pixel_size_um, seed).items():
        p = model.predict(patches).probability
        out[kind] = {"patches": len(p), "false_positive_rate": float(np.mean(p >= 0.5)) if len(p) else None,
                     "mean_probability": float(p.mean()) if len(p) else None}
    return out


def record_unseen(folder: Path, seed: int = EVAL_SEED) -> dict[str, Any]:
    """Measure :func:`unseen_false_positives` and write it into the folder's ``model.json``
    (``unseen_content``; the ONNX and its sha256 are untouched)."""
    result = unseen_false_positives(folder, seed)
    path = Path(folder) / "model.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta["unseen_content"] = {"what": (__doc__ or "").split("\n\n")[1].strip().replace("\n", " "), **result}
    write_model_json(folder, meta)
    return result
