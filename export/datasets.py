"""Training, validation and held-out data rendered with ``hw_sim`` (no recordings needed).

Every sample is a synthetic slide region imaged through the pupil-function
optics at a known defocus and exposed by the noisy camera, with randomised
tissue (slide seed, position), stain strength and hue, illumination, white
balance, vignetting, noise and the objective's aberrations (spherical
aberration, axial colour). The split decides the random streams: slide seeds
of different splits come from disjoint ranges and optics parameters from
independent generators, so nothing in ``heldout`` was seen in ``train``.

Work is split by *optics configuration*: a PSF/OTF costs ~0.25 s at ±10 µm,
so each worker images many fields through one objective at a pool of defocus
values, instead of computing a PSF per sample.
"""

from __future__ import annotations

import math
import multiprocessing as mp
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from export.content_mix import (
    random_content_slide,
    random_objective,
    random_stain_pair,
    random_tissue_slide,
    training_tissue_files,
)
from hw_sim.optics import CameraParams, Optics, OpticsParams
from hw_sim.slide import ARTIFACT_KINDS, RUIFROK_E, RUIFROK_H, SlideSpec, SyntheticSlide
from runtime.ml.preprocess import AutofocusPreprocess, ClassifierPreprocess

PIXEL_SIZE_UM = 0.25  # 40x scanner camera pixel in the sample plane
TILE = 256
SPLITS = ("train", "val", "heldout")
# Extra training sets (drawn from the train streams, other optics configurations) and the
# ``python -m export train-*`` flag that adds each one.
EXTRA_TRAIN_SPLITS = {
    "train_far": "far",
    "train_edge": "edge",
    "train_small": "small",
    "train_optics": "optics",
    "train_hard": "hard",
    "train_content": "content",
    "train_tissue": "tissue",
}
# Slide seeds per split live in disjoint ranges; optics parameters come from per-split generators.
_SEED_BASE = {"train": 1_000_000, "val": 2_000_000, "heldout": 3_000_000}
_SPLIT_SALT = {"train": 11, "val": 22, "heldout": 33}
CLASSES = ("background", "tissue", "artifact")
TISSUE_MIN = 0.05  # a tile with >= 5% tissue is tissue (worth focusing and writing in full)
ARTIFACT_MIN = 0.02  # >= 2% covered by an artifact: flag it


def _rng(split: str, seed: int, *more: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return np.random.default_rng([seed, _SPLIT_SALT[split], *more])


def random_optics(rng: np.random.Generator, max_defocus_um: float) -> OpticsParams:
    """A 40x/0.95 dry objective with realistic residual aberrations."""
    return OpticsParams(
        spherical_waves=float(rng.uniform(0.04, 0.12)),
        chromatic_shift_um=(float(rng.uniform(0.05, 0.25)), 0.0, float(-rng.uniform(0.1, 0.3))),
        max_defocus_um=max_defocus_um,
    )


def random_camera(rng: np.random.Generator, hard: bool = False) -> CameraParams:
    """``hard``: white balance off by up to ~12% per channel (a lamp ageing, a skipped calibration),
    which tints the glass. The draws are the same either way, so existing data stay reproducible."""
    lo, hi = (0.86, 1.12) if hard else (0.92, 1.06)
    return CameraParams(
        full_well_e=float(rng.uniform(5000, 20000)),
        read_noise_e=float(rng.uniform(2, 8)),
        illumination=float(rng.uniform(0.8, 0.99)),
        vignetting=float(rng.uniform(0.03, 0.2)),
        channel_gain=tuple(float(g) for g in rng.uniform(lo, hi, 3)),  # type: ignore[arg-type]
    )


def _jitter(v: tuple[float, float, float], rng: np.random.Generator, amount: float) -> tuple[float, float, float]:
    a = np.asarray(v) * rng.uniform(1 - amount, 1 + amount, 3)
    return (float(a[0]), float(a[1]), float(a[2]))


Stains = tuple[tuple[float, float, float], tuple[float, float, float]]


def random_slide(
    rng: np.random.Generator,
    seed: int,
    artifacts: int = 0,
    hard: bool = False,
    stains: Stains | None = None,
    strength: tuple[float, float] = (0.55, 1.45),
) -> SlideSpec:
    """Stain strength and hue (stain vectors) vary between labs and batches. ``hard``: faint
    staining as well (under-stained, faded or thin sections: 0.15-1.0 of the usual optical density),
    the case in which a saturation threshold loses pale tissue to the glass. ``stains``: these two
    stain vectors instead of jittered H&E (``export.content_mix``); ``strength``: the range of each
    stain's optical-density scale when not ``hard``."""
    lo, hi = (0.15, 1.0) if hard else strength
    pieces = int(rng.integers(2, 7))
    h_strength, e_strength = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    h, e = stains if stains is not None else (_jitter(RUIFROK_H, rng, 0.2), _jitter(RUIFROK_E, rng, 0.2))
    return SlideSpec(
        seed=seed,
        width_um=4000.0,
        height_um=3000.0,
        pieces=pieces,
        h_strength=h_strength,
        e_strength=e_strength,
        h_vector=h,
        e_vector=e,
        glass_od=float(rng.uniform(0.0, 0.06)),
        artifacts=artifacts,
    )


def random_mixed_slide(rng: np.random.Generator, seed: int, hard: bool = False, artifacts: int = 0) -> SyntheticSlide:
    """A slide of the wider content (``export.content_mix``): the layout of :func:`random_slide` in a
    random real stain pair, its tissue procedural, a texture or a photograph."""
    h, e = random_stain_pair(rng)
    stains = ((float(h[0]), float(h[1]), float(h[2])), (float(e[0]), float(e[1]), float(e[2])))
    spec = random_slide(rng, seed, artifacts, hard, stains=stains, strength=(0.5, 1.5))
    return random_content_slide(rng, spec)[0]


def _tissue_position(slide: SyntheticSlide, rng: np.random.Generator, p_anywhere: float) -> tuple[float, float]:
    s = slide.spec
    if rng.random() < p_anywhere:
        return s.origin_x_um + rng.uniform(0, s.width_um), s.origin_y_um + rng.uniform(0, s.height_um)
    p = slide._pieces[int(rng.integers(len(slide._pieces)))]
    return p.cx + rng.uniform(-0.8, 0.8) * p.a, p.cy + rng.uniform(-0.8, 0.8) * p.b


@dataclass(frozen=True)
class AutofocusJob:
    split: str
    seed: int
    config: int  # optics configuration index within the split
    fields: int
    z_per_field: int
    max_defocus_um: float = 10.0
    tile: int = TILE
    min_abs_defocus_um: float = 0.0  # > 0: the whole pool is far from focus (|z| in [min, max])
    wide: int = 0  # AutofocusPreprocess.wide: 0 renders v1 inputs, > 0 v2 inputs with the wide window
    crops_per_tile: int = 0  # > 0: keep this many of a tile's crops (drawn at random) to bound training cost
    input_tile: int = 0  # > 0: the model sees only the centre input_tile px of each frame (a smaller camera)
    # Wider content (export.content_mix): the objective from any family (either aberration sign,
    # apochromat, strong), camera pixel +-10% around the nominal, each field's content a procedural
    # slide in a random stain, a texture or a photograph, white balance off by up to ~12%.
    content_mix: bool = False
    # Real tissue images (paths, export.content_mix.training_tissue_files): each field's content is
    # one of them in a random stain and density (with content_mix's objectives and cameras).
    real_tissue: tuple[str, ...] = ()


def render_autofocus_config(job: AutofocusJob) -> dict[str, Any]:
    """One objective, ``fields`` slide regions, ``z_per_field`` defocus values each."""
    rng = _rng(job.split, job.seed, job.config)
    pre = AutofocusPreprocess(wide=job.wide)
    # The PSF box must hold the largest defocus plus the chromatic shift.
    px = PIXEL_SIZE_UM
    sign_known = True
    if job.content_mix:
        objective = random_objective(rng, job.max_defocus_um + 0.7)
        optics_params, sign_known = objective.params, objective.sign_known
        px = PIXEL_SIZE_UM * float(rng.uniform(0.9, 1.1))
    else:
        optics_params = random_optics(rng, job.max_defocus_um + 0.5)
    optics = Optics(optics_params, px, (job.tile, job.tile))
    m, t = optics.margin_px, job.tile
    # A pool of defocus values (one OTF each), half spread over the whole range and half
    # near focus, where the closed loop needs its precision.
    n_pool = max(8, job.z_per_field * 4)
    if job.min_abs_defocus_um > 0:
        # The far-from-focus set: the mixed pool has few values beyond ~8 µm, where the blur is
        # widest and the model least sure (sign errors below -8 µm).
        signs = np.where(np.arange(n_pool) % 2 == 0, 1.0, -1.0)
        pool = signs * rng.uniform(job.min_abs_defocus_um, job.max_defocus_um, n_pool)
    else:
        pool = np.concatenate(
            [rng.uniform(-job.max_defocus_um, job.max_defocus_um, n_pool // 2), rng.uniform(-2.0, 2.0, n_pool // 2)]
        )
    fields = []
    for f in range(job.fields):
        seed = _SEED_BASE[job.split] + job.seed * 10_000 + job.config * 500 + f
        if job.real_tissue:
            slide = random_tissue_slide(rng, random_slide(rng, seed), job.real_tissue)
        elif job.content_mix:
            slide = random_mixed_slide(rng, seed)
        else:
            slide = SyntheticSlide(random_slide(rng, seed))
        cx, cy = _tissue_position(slide, rng, p_anywhere=0.15)
        x0, y0 = cx - t * px / 2, cy - t * px / 2
        obj = optics.prepare(slide.transmittance(x0 - m * px, y0 - m * px, t + 2 * m, t + 2 * m, px))
        zs = rng.choice(len(pool), job.z_per_field, replace=False)
        fields.append((slide, x0, y0, obj, zs))
    by_z: dict[int, list[int]] = {}
    for fi, (_, _, _, _, zs) in enumerate(fields):
        for k in zs:
            by_z.setdefault(int(k), []).append(fi)
    xs: list[npt.NDArray[np.float16]] = []
    defocus: list[float] = []
    content: list[float] = []
    field_ids: list[int] = []
    for k, fis in sorted(by_z.items()):  # z-major: each OTF is computed once
        for fi in fis:
            slide, x0, y0, obj, _ = fields[fi]
            optics.camera = random_camera(rng, hard=job.content_mix)
            frame = optics.camera_capture(optics.image(obj, float(pool[k])), rng)
            off = 0
            if 0 < job.input_tile < job.tile:
                off = (job.tile - job.input_tile) // 2
                frame = np.ascontiguousarray(frame[off : off + job.input_tile, off : off + job.input_tile])
            inp, pos = pre.inputs_at(frame)
            keep: list[int] | range = range(len(pos))
            if 0 < job.crops_per_tile < len(pos):
                keep = sorted(int(i) for i in rng.choice(len(pos), job.crops_per_tile, replace=False))
            for i in keep:
                y, x = pos[i][2] + off, pos[i][3] + off
                frac = slide.tissue_fraction(x0 + x * px, y0 + y * px, pre.crop, pre.crop, px)
                xs.append(inp[i].astype(np.float16))
                defocus.append(float(pool[k]))
                content.append(1.0 if frac >= 0.3 else 0.0)
                field_ids.append(job.config * 10_000 + fi)
    return {
        "x": np.stack(xs),
        "defocus_um": np.asarray(defocus, np.float32),
        "content": np.asarray(content, np.float32),
        "field": np.asarray(field_ids, np.int64),
        # 1: the objective follows the training sign convention, so the signed head may learn
        # this sample; 0: only the magnitude head may (flipped or symmetric objectives).
        "sign_known": np.full(len(defocus), 1.0 if sign_known else 0.0, np.float32),
        "optics": {**optics_params.to_dict(), "pixel_size_um": px},
    }


@dataclass(frozen=True)
class ClassifierJob:
    split: str
    seed: int
    config: int
    slides: int
    tiles_per_slide: int
    tile: int = TILE
    hard: bool = False  # faint stain and tinted glass (random_slide / random_camera ``hard``)
    # Wider content (export.content_mix): any objective family, pixel +-10%, each slide's tissue
    # procedural in a random stain, a texture or a photograph (artifacts drawn over it alike).
    content_mix: bool = False
    near_artifact: float = 0.35  # share of tiles centred within reach of an artifact (the rest: tissue / anywhere)
    artifacts: tuple[int, int] = (4, 12)  # artifacts per slide: integers in [lo, hi)
    # "" (any kind) or an ARTIFACT_KINDS name: the tiles near an artifact are near one of this kind
    # (when the slide has one). The default draws exactly what it drew before it existed.
    near_kind: str = ""
    # Real tissue images (paths, export.content_mix.training_tissue_files): each slide's tissue is
    # one of them in a random stain (content_mix's objectives and cameras); () draws as before.
    real_tissue: tuple[str, ...] = ()
    # The range of each stain's optical-density scale on the procedural slides (random_slide's
    # ``strength``; not with ``hard`` or ``content_mix``).
    strength: tuple[float, float] = (0.55, 1.45)


def tile_label(slide: SyntheticSlide, x0: float, y0: float, size_px: int, px: float) -> tuple[int, float, float]:
    """(class index, tissue fraction, artifact fraction) of a tile region."""
    art = slide.artifact_fraction(x0, y0, size_px, size_px, px)
    tis = slide.tissue_fraction(x0, y0, size_px, size_px, px)
    if art >= ARTIFACT_MIN:
        return 2, tis, art
    return (1 if tis >= TISSUE_MIN else 0), tis, art


def artifact_kind(slide: SyntheticSlide, x0: float, y0: float, size_px: int, px: float) -> int:
    """Index in ``hw_sim.slide.ARTIFACT_KINDS`` of the artifact covering most of a region, -1 if none
    covers any (for scoring recall per kind; draws no random numbers)."""
    arts = slide.artifacts
    best, kind = 0.0, -1
    try:
        for a in arts:
            slide.artifacts = [a]
            f = slide.artifact_fraction(x0, y0, size_px, size_px, px)
            if f > best:
                best, kind = f, ARTIFACT_KINDS.index(a.kind)
    finally:
        slide.artifacts = arts
    return kind


def render_classifier_config(job: ClassifierJob) -> dict[str, Any]:
    """Slides with artifacts; tiles near artifacts, near tissue and anywhere; focus within ±1.5 µm."""
    rng = _rng(job.split, job.seed, 1000 + job.config)
    px = PIXEL_SIZE_UM
    if job.content_mix:
        optics_params = random_objective(rng, 2.7).params
        px = PIXEL_SIZE_UM * float(rng.uniform(0.9, 1.1))
    else:
        optics_params = random_optics(rng, 2.0)
    optics = Optics(optics_params, px, (job.tile, job.tile))
    pre = ClassifierPreprocess()
    m, t = optics.margin_px, job.tile
    pool = rng.uniform(-1.5, 1.5, 6)
    xs, labels, tissue, artifact, raw, kinds = [], [], [], [], [], []
    for s in range(job.slides):
        seed = _SEED_BASE[job.split] + 500_000 + job.seed * 10_000 + job.config * 500 + s
        n_art = int(rng.integers(*job.artifacts))
        if job.real_tissue:
            slide = random_tissue_slide(rng, random_slide(rng, seed, artifacts=n_art), job.real_tissue)
        elif job.content_mix:
            slide = random_mixed_slide(rng, seed, hard=job.hard, artifacts=n_art)
        else:
            slide = SyntheticSlide(random_slide(rng, seed, artifacts=n_art, hard=job.hard, strength=job.strength))
        for _ in range(job.tiles_per_slide):
            u = rng.random()
            near = [a for a in slide.artifacts if a.kind == job.near_kind] if job.near_kind else []
            near = near or slide.artifacts
            if u < job.near_artifact and near:
                a = near[int(rng.integers(len(near)))]
                r = min(a.reach, 300.0)
                if job.near_kind == "fold" and a.kind == "fold":
                    # A fold is a band along a segment: centre on the segment, across the band.
                    along = rng.uniform(-0.5, 0.5) * a.length
                    across = rng.uniform(-1.0, 1.0) * (a.width + 30.0)
                    cx, cy = a.cx + along * a.cos - across * a.sin, a.cy + along * a.sin + across * a.cos
                else:
                    cx, cy = a.cx + rng.uniform(-r, r), a.cy + rng.uniform(-r, r)
            else:
                cx, cy = _tissue_position(slide, rng, p_anywhere=0.5)
            x0, y0 = cx - t * px / 2, cy - t * px / 2
            obj = optics.prepare(slide.transmittance(x0 - m * px, y0 - m * px, t + 2 * m, t + 2 * m, px))
            optics.camera = random_camera(rng, hard=job.hard or job.content_mix)
            frame = optics.camera_capture(optics.image(obj, float(pool[int(rng.integers(len(pool)))])), rng)
            label, tis, art = tile_label(slide, x0, y0, t, px)
            xs.append(pre.inputs(frame, px)[0].astype(np.float16))
            raw.append(frame[::2, ::2].copy())  # for the classical baseline (HSV saturation)
            labels.append(label)
            tissue.append(tis)
            artifact.append(art)
            kinds.append(artifact_kind(slide, x0, y0, t, px) if label == 2 else -1)
    return {
        "x": np.stack(xs),
        "label": np.asarray(labels, np.int64),
        "tissue_fraction": np.asarray(tissue, np.float32),
        "artifact_fraction": np.asarray(artifact, np.float32),
        "raw": np.stack(raw),
        "artifact_kind": np.asarray(kinds, np.int64),  # ARTIFACT_KINDS index of label-2 tiles, else -1
        "optics": optics_params.to_dict(),
    }


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in parts[0]:
        if key == "optics":
            out["optics"] = [p["optics"] for p in parts]
        else:
            out[key] = np.concatenate([p[key] for p in parts])
    return out


def _run(fn: Any, jobs: list[Any], workers: int) -> dict[str, Any]:
    if workers <= 1:
        return _merge([fn(j) for j in jobs])
    with mp.get_context("spawn").Pool(workers) as pool:
        return _merge(pool.map(fn, jobs, chunksize=1))


@dataclass(frozen=True)
class AutofocusDataSpec:
    configs: int
    fields: int
    z_per_field: int
    max_defocus_um: float = 10.0
    min_abs_defocus_um: float = 0.0
    config_offset: int = 0  # optics/slide streams of another split's configs start here
    tile: int = TILE
    crops_per_tile: int = 0  # 0: every crop the preprocessing cuts
    input_tile: int = 0  # > 0: inputs cut from the centre input_tile px of each frame
    content_mix: bool = False  # export.content_mix: any objective family, stains, textures, photos
    real_tissue: bool = False  # fields of the real training tissue images (export.content_mix.TRAINING_TISSUE)


# The v2 model's data: 512-px tiles (a whole 40x camera field, so the wide window sees real
# blur, not mirror padding), 8 of the 16 crops per tile kept for training to bound its cost.
V2_WIDE = 512
V2_TILE = 512


@dataclass(frozen=True)
class ClassifierDataSpec:
    configs: int
    slides: int
    tiles_per_slide: int
    hard: bool = False
    config_offset: int = 0
    content_mix: bool = False
    near_artifact: float = 0.35
    artifacts: tuple[int, int] = (4, 12)
    near_kind: str = ""
    real_tissue: bool = False  # slides of the real training tissue images (export.content_mix)
    strength: tuple[float, float] = (0.55, 1.45)  # procedural slides' stain density range (ClassifierJob)


AUTOFOCUS_DATA = {
    "train": AutofocusDataSpec(configs=12, fields=64, z_per_field=6),
    "val": AutofocusDataSpec(configs=2, fields=24, z_per_field=5),
    "heldout": AutofocusDataSpec(configs=3, fields=24, z_per_field=6),
    # Extra training data far from focus (train streams, configs 100+: new objectives and slides).
    "train_far": AutofocusDataSpec(
        configs=10, fields=48, z_per_field=6, max_defocus_um=10.5, min_abs_defocus_um=4.0, config_offset=100
    ),
}
AUTOFOCUS_V2_DATA = {
    "train": AutofocusDataSpec(configs=12, fields=40, z_per_field=6, tile=V2_TILE, crops_per_tile=8),
    "val": AutofocusDataSpec(configs=2, fields=16, z_per_field=5, tile=V2_TILE),
    "heldout": AutofocusDataSpec(configs=3, fields=16, z_per_field=6, tile=V2_TILE),
    "train_far": AutofocusDataSpec(
        configs=10,
        fields=30,
        z_per_field=6,
        max_defocus_um=10.5,
        min_abs_defocus_um=4.0,
        config_offset=100,
        tile=V2_TILE,
        crops_per_tile=8,
    ),
    # Beyond the benchmark's ±10 µm (configs 200+): a regressor shrinks its estimates toward the
    # middle near the edge of its training range (v2 trained to 10.5 µm: bias -0.4 µm at 8-10 µm).
    "train_edge": AutofocusDataSpec(
        configs=6,
        fields=30,
        z_per_field=6,
        max_defocus_um=12.5,
        min_abs_defocus_um=7.0,
        config_offset=200,
        tile=V2_TILE,
        crops_per_tile=8,
    ),
    # Many objectives, few fields each (configs 400+): the v2 model's far-defocus error depends on
    # the objective (bench recording with 0.055 waves of spherical aberration: bias -0.9 µm at
    # +8-10 µm; with 0.095 waves: +0.1), so training needs more than train's 12 aberration draws.
    # Uniform over 2-12.5 µm: near focus the error is already small and objective-independent.
    "train_optics": AutofocusDataSpec(
        configs=64,
        fields=6,
        z_per_field=6,
        max_defocus_um=12.5,
        min_abs_defocus_um=2.0,
        config_offset=400,
        tile=V2_TILE,
        crops_per_tile=6,
    ),
    # 256-px frames (configs 300+): the wide window is then mirror-padded; without these the v2
    # model is noisier near focus on small frames than v1 (MAE 0.19 vs 0.09 µm at |z| < 1 µm).
    "train_small": AutofocusDataSpec(
        configs=6, fields=60, z_per_field=6, config_offset=300, tile=V2_TILE, input_tile=256
    ),
    # Wider content (configs 600+, export.content_mix): 96 objectives of every family, fields of
    # procedural tissue in random stains, textures and photographs at random sampling. The
    # magnitude head learns every sample, the signed head the training-sign objectives only.
    "train_content": AutofocusDataSpec(
        configs=96,
        fields=16,
        z_per_field=6,
        max_defocus_um=12.0,
        config_offset=600,
        tile=V2_TILE,
        crops_per_tile=8,
        content_mix=True,
    ),
    "heldout_content": AutofocusDataSpec(
        configs=8, fields=8, z_per_field=6, max_defocus_um=10.0, config_offset=600, tile=V2_TILE, content_mix=True
    ),
    # Real H&E (configs 900+ of the train stream): every field one of the real training tissue images
    # (export.content_mix.TRAINING_TISSUE: stardist's histo.jpg) in a random stain, density and
    # sampling, through objectives of every family. v3 never saw real tissue and reads real H&E in
    # focus 0.4-1.0 µm off (README, "Models on the scan path"); the other real H&E images stay
    # unseen, for scoring.
    "train_tissue": AutofocusDataSpec(
        configs=48,
        fields=16,
        z_per_field=6,
        max_defocus_um=12.0,
        config_offset=900,
        tile=V2_TILE,
        crops_per_tile=8,
        content_mix=True,
        real_tissue=True,
    ),
}
CLASSIFIER_DATA = {
    "train": ClassifierDataSpec(configs=8, slides=12, tiles_per_slide=30),
    "val": ClassifierDataSpec(configs=2, slides=6, tiles_per_slide=25),
    "heldout": ClassifierDataSpec(configs=3, slides=8, tiles_per_slide=25),
    # Faint stain and tinted glass (configs 100+ of the train / heldout streams: new slides and
    # objectives), where a saturation threshold is known to fail.
    "train_hard": ClassifierDataSpec(configs=6, slides=12, tiles_per_slide=30, hard=True, config_offset=100),
    "heldout_hard": ClassifierDataSpec(configs=3, slides=8, tiles_per_slide=25, hard=True, config_offset=100),
    # Wider content (configs 200+, export.content_mix): tissue in random stains, textures and
    # photographs under any objective, with the same procedural artifacts drawn over it.
    "train_content": ClassifierDataSpec(configs=16, slides=12, tiles_per_slide=30, config_offset=200, content_mix=True),
    "heldout_content": ClassifierDataSpec(configs=3, slides=8, tiles_per_slide=25, config_offset=200, content_mix=True),
    # More artifacts (configs 300+ / 400+ of the train streams): 8-15 per slide, three tiles in four
    # centred within reach of one; on the wider content and on faint stain / tinted glass.
    "train_artifacts": ClassifierDataSpec(
        configs=8,
        slides=6,
        tiles_per_slide=30,
        config_offset=300,
        content_mix=True,
        near_artifact=0.75,
        artifacts=(8, 16),
    ),
    "train_artifacts_hard": ClassifierDataSpec(
        configs=6, slides=6, tiles_per_slide=30, hard=True, config_offset=400, near_artifact=0.75, artifacts=(8, 16)
    ),
    # Folds, the kind the models found least (configs 500+ / 600+ of the train streams): three tiles
    # in five centred across a fold's band (on it or within 30 µm of its edge), so most show an edge;
    # the rest tissue / anywhere, as in train.
    "train_folds": ClassifierDataSpec(
        configs=8,
        slides=6,
        tiles_per_slide=30,
        config_offset=500,
        content_mix=True,
        near_artifact=0.6,
        artifacts=(8, 16),
        near_kind="fold",
    ),
    "train_folds_hard": ClassifierDataSpec(
        configs=6,
        slides=6,
        tiles_per_slide=30,
        hard=True,
        config_offset=600,
        near_artifact=0.6,
        artifacts=(8, 16),
        near_kind="fold",
    ),
    # Air bubbles (configs 700+ / 800+): three tiles in five centred within a bubble's reach, many
    # of them inside it, away from the rim (hazy, washed-out tissue or grey glass: the bubble tiles
    # the models missed).
    "train_bubbles": ClassifierDataSpec(
        configs=4,
        slides=12,
        tiles_per_slide=30,
        config_offset=700,
        content_mix=True,
        near_artifact=0.6,
        artifacts=(8, 16),
        near_kind="bubble",
    ),
    "train_bubbles_hard": ClassifierDataSpec(
        configs=4,
        slides=12,
        tiles_per_slide=30,
        hard=True,
        config_offset=800,
        near_artifact=0.6,
        artifacts=(8, 16),
        near_kind="bubble",
    ),
    # Development data for choosing among fine-tunes (configs 200+ of the val stream, the wider
    # content: disjoint from train_content and heldout_content); no model trains on it.
    "val_content": ClassifierDataSpec(configs=4, slides=6, tiles_per_slide=25, config_offset=200, content_mix=True),
    # Real tissue (configs 900+ of the train / val streams): each slide's tissue a real H&E image
    # whose licence allows training (export.content_mix.TRAINING_TISSUE) in a random stain and
    # density, with the procedural artifacts drawn over it; the simulator's tissue alone has one
    # look, and real skin (dense epidermis, collagen, keratin) read as artifact (README, stop 33).
    "train_tissue": ClassifierDataSpec(
        configs=8, slides=12, tiles_per_slide=30, config_offset=900, content_mix=True, real_tissue=True
    ),
    # Dense staining (configs 1000+): procedural H&E at 1.2-2.6x the usual optical density of each
    # stain, artifacts drawn alike. A fold is its tissue at twice the density; trained on one density
    # range only, the classifier took dense real tissue (skin's epidermis and collagen) for a fold.
    "train_dense": ClassifierDataSpec(
        configs=8, slides=12, tiles_per_slide=30, config_offset=1000, strength=(1.2, 2.6)
    ),
    # The same real tissue with no artifact drawn over it (configs 950+): real tissue of any density
    # is tissue, without windows of darkened real tissue labelled artifact beside it.
    "train_tissue_clean": ClassifierDataSpec(
        configs=8,
        slides=12,
        tiles_per_slide=30,
        config_offset=950,
        content_mix=True,
        real_tissue=True,
        artifacts=(0, 1),
    ),
    "val_tissue": ClassifierDataSpec(
        configs=2, slides=6, tiles_per_slide=25, config_offset=900, content_mix=True, real_tissue=True
    ),
    "val_folds": ClassifierDataSpec(
        configs=4,
        slides=6,
        tiles_per_slide=25,
        config_offset=500,
        content_mix=True,
        near_artifact=0.6,
        artifacts=(8, 16),
        near_kind="fold",
    ),
}


def autofocus_data(split: str, seed: int, workers: int = 2, scale: float = 1.0, wide: int = 0) -> dict[str, Any]:
    """``wide`` = 0: the v1 model's data (``AUTOFOCUS_DATA``); > 0: the v2 model's (``AUTOFOCUS_V2_DATA``)."""
    spec = (AUTOFOCUS_V2_DATA if wide else AUTOFOCUS_DATA)[split]
    fields = max(2, math.ceil(spec.fields * scale))
    rng_split = "train" if split.startswith("train") else split.removesuffix("_content")
    tissue = tuple(str(f) for f in training_tissue_files()) if spec.real_tissue else ()
    jobs = [
        AutofocusJob(
            rng_split,
            seed,
            spec.config_offset + c,
            fields,
            spec.z_per_field,
            spec.max_defocus_um,
            tile=spec.tile,
            min_abs_defocus_um=spec.min_abs_defocus_um,
            wide=wide,
            crops_per_tile=spec.crops_per_tile,
            input_tile=spec.input_tile,
            content_mix=spec.content_mix,
            real_tissue=tissue,
        )
        for c in range(spec.configs)
    ]
    return _run(render_autofocus_config, jobs, workers)


def classifier_data(split: str, seed: int, workers: int = 2, scale: float = 1.0) -> dict[str, Any]:
    spec = CLASSIFIER_DATA[split]
    rng_split = split.split("_")[0]  # train_hard, train_content, ...: the train streams, other configs
    tissue = tuple(str(f) for f in training_tissue_files()) if spec.real_tissue else ()
    jobs = [
        ClassifierJob(
            rng_split,
            seed,
            spec.config_offset + c,
            max(1, math.ceil(spec.slides * scale)),
            spec.tiles_per_slide,
            hard=spec.hard,
            content_mix=spec.content_mix,
            near_artifact=spec.near_artifact,
            artifacts=spec.artifacts,
            near_kind=spec.near_kind,
            real_tissue=tissue,
            strength=spec.strength,
        )
        for c in range(spec.configs)
    ]
    return _run(render_classifier_config, jobs, workers)


def cached(path: Path, make: Any) -> dict[str, Any]:
    """Load ``path`` (.npz) or make the data and save it there; optics metadata kept as JSON."""
    import json

    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            d: dict[str, Any] = {k: z[k] for k in z.files if k != "optics_json"}
            d["optics"] = json.loads(str(z["optics_json"]))
        return d
    d = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v for k, v in d.items() if k != "optics"}
    tmp = path.with_suffix(".partial.npz")
    np.savez(tmp, optics_json=np.asarray(json.dumps(d["optics"])), **arrays)
    tmp.replace(path)
    return d


def with_scale(spec: AutofocusDataSpec, scale: float) -> AutofocusDataSpec:
    return replace(spec, fields=max(2, math.ceil(spec.fields * scale)))
