"""Training and held-out data for the slide-analysis models, rendered from synthetic slides with tumour.

Two kinds of samples, both from small synthetic slides (:func:`analysis_slide`: 2 x 2 mm, one to
four tissue pieces, stain strength and hue jittered as in :func:`export.datasets.random_slide`,
0-3 carcinoma lesions of 50 µm to 1.2 mm and 0-3 benign mimics):

- **slide grids** (:func:`render_slide_grid`): the whole slide rendered at 1 µm/px and cut into a
  grid of 64-px patches at a random offset, every patch with tissue kept with its centre (µm),
  its tumour fraction (the area fraction inside the truth lesion outlines, gland lumens
  included, as the truth polygons count them), its mimic fraction and its tissue fraction. The
  tumour classifier trains on these patches (lesion edges, small lesions, mimics and tissue
  edges come in the proportions a slide has them, and are re-balanced at training); the
  slide model's bags are the same grids, embedded by the trained tumour model.
- **nuclei regions** (:func:`render_nuclei_regions`): 128-px regions at 0.5 µm/px with the truth
  centroids of every nucleus the slide draws (benign stroma and epithelium, tumour, lymphoid
  and hyperplastic mimics: :meth:`hw_sim.slide.SyntheticSlide.nuclei`), centred on lesions,
  mimics and random tissue.

**Why render directly at the model's pixel size.** ``SyntheticSlide.transmittance`` is a pure
function of slide coordinates sampled at pixel centres, so a 1 µm/px render costs 1/16 of a
0.25 µm/px render and its area downsample; side by side the two differ only by slight aliasing
of the sub-micron chromatin (checked by eye on a lesion at 1, 0.5 and 0.25 µm/px). The
scanner's path (optics, camera noise, pyramid downsampling) is stood in for by a random
Gaussian blur, white balance, illumination and noise per slide (:func:`expose`).

**Seeds.** Training slides draw seeds from ``TRAIN_SEED_BASE`` (100000+); every seed goes
through :func:`hw_sim.lesions.check_training_seed`. Held-out slides use 900000+ (reserved for
figures), which only the held-out split may ask for.
"""

from __future__ import annotations

import math
import multiprocessing as mp
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np
import numpy.typing as npt

from export.datasets import random_camera, random_slide
from hw_sim.lesions import HELD_OUT_SEEDS, check_training_seed
from hw_sim.slide import SyntheticSlide

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

TUMOUR_PX: Final = 64
TUMOUR_PIXEL_UM: Final = 1.0
NUCLEI_PX: Final = 128
NUCLEI_PIXEL_UM: Final = 0.5
SLIDE_UM: Final = 2000.0
TRAIN_SEED_BASE: Final = 100_000
HELDOUT_SEED_BASE: Final = HELD_OUT_SEEDS.start
SPLITS: Final = ("train", "heldout")
_LABEL_STEP_UM = 4.0  # lesion and tissue membership sampled every 4 µm for the patch fractions
MIN_TISSUE: Final = 0.1  # a grid patch with >= 10% tissue is kept (the pipeline analyses tissue)
LESION_UM: Final = (50.0, 1200.0)  # lesion diameters of the ordinary slides (log-uniform)
SMALL_LESION_UM: Final = (50.0, 100.0)  # "small-lesion" slides: 1-2 lesions at or below ~1.5 patch widths
SMALL_STREAM: Final = 3  # seed stream of the small-lesion training slides (400000+; 0 grids, 1 nuclei)
BENIGN_STREAM: Final = 4  # seed stream of the extra tumour-free training slides (500000+)


def slide_seed(split: str, index: int, stream: int = 0) -> int:
    """The slide seed of slide ``index`` of a split (``stream`` separates data kinds)."""
    if split == "train":
        return check_training_seed(TRAIN_SEED_BASE + stream * 100_000 + index)
    if split == "heldout":
        seed = HELDOUT_SEED_BASE + stream * 10_000 + index
        if seed not in HELD_OUT_SEEDS:
            raise ValueError(f"held-out slide index {index} is past the held-out seed range")
        return seed
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def analysis_slide(
    seed: int,
    tumour: bool,
    rng: np.random.Generator,
    size_um: float = SLIDE_UM,
    small: bool = False,
    vesicular_max: float = 0.0,
) -> SyntheticSlide:
    """A 2 x 2 mm slide (``size_um``): 1-4 pieces; ``tumour``: 1-3 lesions of ``LESION_UM`` (else
    none); 0-3 mimics either way. ``small``: 1-2 lesions of ``SMALL_LESION_UM`` only (a slide whose
    only evidence is at or below the patch size: the hard case of the slide-level call).
    ``vesicular_max``: :attr:`hw_sim.slide.SlideSpec.vesicular_max` (0: the hyperchromatic
    carcinoma only; the layout and every other draw are the same either way)."""
    spec = random_slide(rng, seed)
    lo, hi = SMALL_LESION_UM if small else LESION_UM
    spec = replace(
        spec,
        width_um=size_um,
        height_um=size_um,
        pieces=int(rng.integers(1, 5)),
        lesions=(int(rng.integers(1, 3)) if small else int(rng.integers(1, 4))) if tumour else 0,
        mimics=int(rng.integers(0, 4)),
        lesion_min_um=lo,
        lesion_max_um=hi,
        vesicular_max=vesicular_max,
    )
    for _ in range(8):  # a layout that cannot place every lesion: fewer of them
        try:
            return SyntheticSlide(spec)
        except ValueError:
            spec = replace(spec, lesions=max(int(tumour), spec.lesions - 1), mimics=max(0, spec.mimics - 1))
    return SyntheticSlide(replace(spec, lesions=int(tumour), mimics=0))


@dataclass(frozen=True)
class Exposure:
    """How the scanner's path changes a slide's look: white balance x illumination, blur, noise."""

    gain: tuple[float, float, float]
    blur_px: float
    noise: float  # standard deviation in 8-bit levels

    @classmethod
    def random(cls, rng: np.random.Generator) -> Exposure:
        cam = random_camera(rng)
        g = np.asarray(cam.channel_gain) * cam.illumination * 255.0
        return cls((float(g[0]), float(g[1]), float(g[2])), float(rng.uniform(0.0, 0.8)), float(rng.uniform(0.5, 3.0)))


def expose(trans: F32, exp: Exposure, rng: np.random.Generator) -> U8:
    """Transmittance (h, w, 3) -> the 8-bit RGB the scanner would store."""
    img: F32 = trans * np.asarray(exp.gain, np.float32)
    if exp.blur_px > 0.05:
        img = np.asarray(cv2.GaussianBlur(img, (0, 0), exp.blur_px), np.float32)
    img = img + rng.normal(0.0, exp.noise, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _block_mean(a: F32, k: int) -> F32:
    h, w = a.shape[0] // k, a.shape[1] // k
    return np.asarray(a[: h * k, : w * k].reshape(h, k, w, k).mean(axis=(1, 3)), np.float32)


def render_slide_grid(
    split: str,
    index: int,
    tumour: bool,
    stream: int = 0,
    size_um: float = SLIDE_UM,
    small: bool = False,
    vesicular_max: float = 0.0,
) -> dict[str, Any]:
    """One slide's grid of 64-px patches at 1 µm/px (see the module docstring; ``small`` and
    ``vesicular_max``: of :func:`analysis_slide`)."""
    seed = slide_seed(split, index, stream)
    rng = np.random.default_rng([seed, 7])
    slide = analysis_slide(seed, tumour, rng, size_um, small, vesicular_max)
    s = slide.spec
    p, px = TUMOUR_PX, TUMOUR_PIXEL_UM
    off_y, off_x = (float(v) for v in rng.uniform(0, p * px, 2))
    ny, nx = int((s.height_um - off_y) // (p * px)), int((s.width_um - off_x) // (p * px))
    x0, y0 = s.origin_x_um + off_x, s.origin_y_um + off_y
    img = expose(slide.transmittance(x0, y0, ny * p, nx * p, px), Exposure.random(rng), rng)
    # Fractions on a 4 µm grid, averaged per patch (16 x 16 samples each).
    k = int(p * px / _LABEL_STEP_UM)
    xs = np.asarray(x0 + (np.arange(nx * k) + 0.5) * _LABEL_STEP_UM, np.float64)
    ys = np.asarray(y0 + (np.arange(ny * k) + 0.5) * _LABEL_STEP_UM, np.float64)
    tissue = slide._piece_mask_grid(xs, ys)
    tissue = ((tissue * (1.0 - slide._holes_grid(xs, ys))) > 0.5).astype(np.float32)
    t = np.zeros_like(tissue)
    mimic = np.zeros_like(tissue)
    if slide.lesions is not None:
        lay = slide.lesions.layers(xs, ys)
        if lay is not None:
            t, mimic = (lay.t > 0.5).astype(np.float32), (lay.mimic > 0.5).astype(np.float32)
    tis_f, t_f, m_f = _block_mean(tissue, k), _block_mean(t, k), _block_mean(mimic, k)
    keep = np.argwhere(tis_f >= MIN_TISSUE)
    patches = img.reshape(ny, p, nx, p, 3).transpose(0, 2, 1, 3, 4)[keep[:, 0], keep[:, 1]]
    centres = np.stack([y0 + (keep[:, 0] + 0.5) * p * px, x0 + (keep[:, 1] + 0.5) * p * px], axis=1)
    n = len(keep)
    return {
        "patches": np.ascontiguousarray(patches),
        "coords_um": centres.astype(np.float32),
        "tumour_fraction": t_f[keep[:, 0], keep[:, 1]],
        "mimic_fraction": m_f[keep[:, 0], keep[:, 1]],
        "tissue_fraction": tis_f[keep[:, 0], keep[:, 1]],
        "slide": np.full(n, index, np.int32),
        "slide_seed": np.asarray([seed], np.int64),
        "slide_tumour": np.asarray([bool(slide.spec.lesions)], bool),
        "slide_mimics": np.asarray([slide.spec.mimics], np.int32),
    }


MAX_NUCLEI: Final = 256  # per 64 x 64 µm region (+ halo): tumour sheets hold ~110, lymphoid ~250
_NUC_HALO_UM = 8.0  # nuclei this far outside the region are kept too: their blobs reach inside


def render_nuclei_regions(split: str, index: int, regions: int, stream: int = 1) -> dict[str, Any]:
    """``regions`` 128-px regions at 0.5 µm/px of one slide, with nucleus centroids (y, x) in
    region pixels (NaN-padded to ``MAX_NUCLEI``; centroids within 8 µm outside the region included)."""
    seed = slide_seed(split, index, stream)
    rng = np.random.default_rng([seed, 8])
    slide = analysis_slide(seed, bool(rng.random() < 0.7), rng)
    exp = Exposure.random(rng)
    exp = replace(exp, blur_px=float(rng.uniform(0.3, 1.2)))  # 0.5 µm/px: the optics' blur is ~1 px
    n, px = NUCLEI_PX, NUCLEI_PIXEL_UM
    size = n * px
    les = slide.lesions.lesions if slide.lesions is not None else []
    imgs: list[U8] = []
    cents: list[F32] = []
    counts: list[int] = []
    kinds: list[int] = []
    while len(imgs) < regions:
        u = rng.random()
        if les and u < 0.55:
            lz = les[int(rng.integers(len(les)))]
            r = lz.radius * math.sqrt(rng.random())
            a = rng.uniform(0, 2 * math.pi)
            cx, cy, kind = lz.cx + r * math.cos(a), lz.cy + r * math.sin(a), 1 if lz.tumour else 2
        else:
            pc = slide._pieces[int(rng.integers(len(slide._pieces)))]
            cx, cy, kind = pc.cx + rng.uniform(-0.8, 0.8) * pc.a, pc.cy + rng.uniform(-0.8, 0.8) * pc.b, 0
        x0, y0 = cx - size / 2, cy - size / 2
        if slide.tissue_fraction(x0, y0, n, n, px) < 0.3:
            continue
        h = _NUC_HALO_UM
        ncx, ncy, _ = slide.nuclei(x0 - h, y0 - h, x0 + size + h, y0 + size + h)
        c = np.full((MAX_NUCLEI, 2), np.nan, np.float32)
        k = min(len(ncx), MAX_NUCLEI)
        c[:k, 0] = (ncy[:k] - y0) / px - 0.5  # pixel index of the centre (pixel i covers [i, i+1))
        c[:k, 1] = (ncx[:k] - x0) / px - 0.5
        imgs.append(expose(slide.transmittance(x0, y0, n, n, px), exp, rng))
        cents.append(c)
        counts.append(k)
        kinds.append(kind)
    return {
        "images": np.stack(imgs),
        "centroids": np.stack(cents),
        "count": np.asarray(counts, np.int32),
        "kind": np.asarray(kinds, np.int8),  # 0 random tissue, 1 tumour lesion, 2 mimic
        "slide_seed": np.full(regions, seed, np.int64),
    }


def seed_ranges(seeds: npt.NDArray[Any]) -> list[list[int]]:
    """Slide seeds as [first, last] runs of consecutive seeds (what a model.json records)."""
    out: list[list[int]] = []
    for v in sorted({int(x) for x in seeds}):
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return out


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _call(job: tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]) -> dict[str, Any]:
    fn, args = job
    return fn(*args)


def _run(jobs: list[tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]], workers: int) -> dict[str, Any]:
    if workers <= 1:
        return _merge([_call(j) for j in jobs])
    with mp.get_context("spawn").Pool(workers) as pool:
        return _merge(pool.map(_call, jobs, chunksize=1))


def slide_grids(
    split: str,
    slides: int,
    workers: int = 2,
    tumour_share: float = 0.6,
    size_um: float = SLIDE_UM,
    vesicular_max: float = 0.0,
) -> dict[str, Any]:
    """``slides`` slide grids of a split; the first ``tumour_share`` of them carry lesions."""
    n_t = round(slides * tumour_share)
    jobs = [(render_slide_grid, (split, i, i < n_t, 0, size_um, False, vesicular_max)) for i in range(slides)]
    return _run(jobs, workers)


def small_lesion_grids(
    slides: int, workers: int = 2, size_um: float = SLIDE_UM, vesicular_max: float = 0.0
) -> dict[str, Any]:
    """``slides`` training slide grids (seed stream ``SMALL_STREAM``), each with 1-2 lesions of
    ``SMALL_LESION_UM`` only (0-3 mimics too): the small, often low-grade lesions that the ordinary
    slides hold only now and then, and that decide a slide-level call when they are all there is.
    ``slide`` counts from 0 (:func:`export.train_tumour.load_training_grids` appends them after
    the ordinary slides)."""
    jobs = [(render_slide_grid, ("train", i, True, SMALL_STREAM, size_um, True, vesicular_max)) for i in range(slides)]
    return _run(jobs, workers)


def benign_grids(slides: int, workers: int = 2, size_um: float = SLIDE_UM) -> dict[str, Any]:
    """``slides`` tumour-free training slide grids (seed stream ``BENIGN_STREAM``; 0-3 mimics):
    the slide model's counterweight to the small-lesion slides (all positive), so that it does not
    learn that a slide is tumour unless proven otherwise."""
    return _run([(render_slide_grid, ("train", i, False, BENIGN_STREAM, size_um)) for i in range(slides)], workers)


def nuclei_regions(split: str, slides: int, per_slide: int, workers: int = 2) -> dict[str, Any]:
    return _run([(render_nuclei_regions, (split, i, per_slide)) for i in range(slides)], workers)


def cached(path: Path, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Load ``path`` (.npz) or make the arrays and save them there."""
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    d = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.npz")
    np.savez(tmp, **d)
    tmp.replace(path)
    return d
