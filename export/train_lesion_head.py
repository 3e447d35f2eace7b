"""``python -m export train-lesion-head``: a pixel-level head that re-outlines small lesions (issue 13).

The tumour patch classifier sees 64 µm patches: a lesion about that size or smaller reads as a blur
whose area mixes its size with its grade (``/work/notes/h13-burden2.md``). This head reads the slide
at 1 µm/px and writes a tumour logit per 4 µm cell, with about 120 µm of context (two pools, then
dilated convolutions), 20k parameters. The runtime runs it only on the window of a lesion already
found (:mod:`runtime.analysis.lesion_head`), so it changes outlines, never detections.

Data: bench-style slides (:func:`bench.analysis.render_slide`, ``held_out=False``) of training-range
seeds only (below the held-out 900000+: refused otherwise), two thirds "small-lesion" slides; windows
around each true lesion, each benign mimic and two random tissue spots, with the truth rasterised at
1 µm (kept as is and per 4 µm cell). Development windows (other training-range seeds, default 300000+)
give the metrics in ``model.json``; held-out slides are scored only by ``python -m bench analysis``.

Rendered windows are cached as ``<cache>/<seed>.pkl`` (``{"format": CACHE_FORMAT, "windows": [...]}``,
each window ``{"img", "t4", "t1"}``: the image, the truth per 4 µm cell and the 1 µm truth mask), so a re-run
with other training settings does not render again. A cache of an older format (format 1: a bare list of
windows with the 4 µm truth only) is refused with a message saying to re-render it.

Content beyond the simulator's look (``--other-content``, ``--colour-jitter``): the first head saw
simulated H&E only and called 72-100% of the 4 µm cells of scikit-image's photographs (IHC, textures)
tumour (``python -m bench lesion-head``). A share of each batch can be crops of
:mod:`export.content_mix` content -- procedural textures in random stain pairs and the packaged
photographs (:data:`export.content_mix.TRAIN_IMAGES`, colour or stain-recoloured) at random scales --
with an all-zero target (none of it is tumour), and the simulated windows' colours can be jittered in
optical density (per-stain-ish scale, per-channel tint, brightness), so that the head keys on
morphology rather than the simulator's exact colours. The held-out content of the benchmarks
(:data:`hw_sim.content.PACKAGED`: ``ihc``, ``brick``, ``gravel``, ``grass``) is never used.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from export.train_tumour import vesicular_suffix
from hw_sim.lesions import HELD_OUT_SEEDS

WINDOW = 224  # the exported input (px at 1 µm); the runtime centres a lesion's window on it
CELL = 4  # output cell (px)
CROP = 96  # training crop (px)
SLIDE_UM = 1500.0
HELD_OUT_FROM = HELD_OUT_SEEDS.start  # 900000
DEV_CONTENT_SEED = 7_100_000  # the development draws of other content (training draws use seed + 1)
CACHE_FORMAT = 2  # 2: windows carry the 1 µm truth ``t1`` (1: ``t4`` only, a bare list; refused)
SMALL_UM2 = 10000.0  # a window with less truth than this is a "small lesion" one (window_metrics' split)


class BlurPool(nn.Module):
    """Anti-aliased 2x downsampling (Zhang 2019, "Making convolutional networks shift-invariant again"):
    the max over 2 x 2 at stride 1, then a [1 2 1] x [1 2 1] / 16 blur (edges reflected) at stride 2. Same
    output size and cell centres as ``MaxPool2d(2)``, no parameters (the blur is a fixed, non-persistent
    buffer, so a state dict of the max-pool head loads into it)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer(
            "kernel", (k[:, None] * k[None, :] / 16).expand(channels, 1, 3, 3).clone(), persistent=False
        )
        self.channels = channels
        self.pool = nn.MaxPool2d(2, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(self.pool(x), (1, 1, 1, 1), mode="reflect")
        return nn.functional.conv2d(x, self.kernel, stride=2, groups=self.channels)


class LesionHead(nn.Module):
    """conv 3->16, pool, conv 16->24, pool (4 µm), dilated 2/4/8, 1x1: per-4 µm tumour logits.
    ``antialias``: the two pools are :class:`BlurPool` (same parameters, output less dependent on the
    input's phase on the 4 µm grid)."""

    def __init__(self, c: int = 24, antialias: bool = False) -> None:
        super().__init__()

        def pool(ch: int) -> nn.Module:
            return BlurPool(ch) if antialias else nn.MaxPool2d(2)

        self.f = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            pool(16),
            nn.Conv2d(16, c, 3, padding=1),
            nn.ReLU(),
            pool(c),
            nn.Conv2d(c, c, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=4, dilation=4),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=8, dilation=8),
            nn.ReLU(),
            nn.Conv2d(c, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.sigmoid(self.f(x)),)  # a tuple: one entry per exported output


def to_input(img: np.ndarray) -> np.ndarray:
    """RGB uint8 (h, w, 3) -> (3, h, w) float32 as ``rgb_window_v1`` scales it (mean 0.5, std 0.25)."""
    return np.ascontiguousarray(((img.astype(np.float32) / 255.0 - 0.5) / 0.25).transpose(2, 0, 1))


def check_training_seed(seed: int) -> None:
    """Training-range seeds only (below the held-out ones): ValueError naming the range otherwise."""
    if not 0 <= seed < HELD_OUT_FROM:
        raise ValueError(f"lesion-head data must come from training-range seeds (0-{HELD_OUT_FROM - 1}), got {seed}")


def slide_windows(seed: int, index: int, vesicular_max: float = 0.0) -> list[dict[str, Any]]:
    """Windows (1 µm px) around the true lesions, mimics and 2 random tissue spots of one rendered
    training-range slide, with the truth as a per-4 µm tumour fraction ``t4`` and as the 1 µm mask ``t1``
    (uint8 0/1, rasterised at 1/4 px precision; ``t4`` is its mean over each 4 µm cell).
    ``vesicular_max``: the carcinoma's look (:func:`bench.analysis.render_slide`): the same slide,
    lesions, truth and windows either way, only the lesions' nuclei drawn otherwise."""
    from bench.analysis import render_slide

    check_training_seed(seed)
    s = render_slide(seed, index, SLIDE_UM, held_out=False, vesicular_max=vesicular_max)
    l1 = s.levels[1]  # 0.5 µm/px level 0 -> 1 µm/px
    h, w = l1.shape[:2]

    def rings(g: Any) -> list[np.ndarray]:
        return [np.asarray(p.exterior.coords) / 2.0 for p in getattr(g, "geoms", [g])]

    tum = [rings(g) for g in s.tumour]
    rng = np.random.default_rng(seed)
    boxes = []
    for g in list(s.tumour) + list(s.mimics):
        x0, y0, x1, y1 = (v / 2.0 for v in g.bounds)
        if max(x1 - x0, y1 - y0) > 400:  # a large lesion: a 200 µm spot inside it (its edge or interior)
            cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
            x0, x1, y0, y1 = cx - 100, cx + 100, cy - 100, cy + 100
        boxes.append((x0 - 64, y0 - 64, x1 + 64, y1 + 64))
    for _ in range(2):
        cx, cy = rng.uniform(150, w - 150), rng.uniform(150, h - 150)
        boxes.append((cx - 100, cy - 100, cx + 100, cy + 100))
    out = []
    for bx0, by0, bx1, by1 in boxes:
        x0, y0, x1, y1 = max(0, int(bx0)), max(0, int(by0)), min(w, int(bx1)), min(h, int(by1))
        y1, x1 = y0 + (y1 - y0) // CELL * CELL, x0 + (x1 - x0) // CELL * CELL
        if y1 - y0 < CROP or x1 - x0 < CROP:
            continue
        m = np.zeros((y1 - y0, x1 - x0), np.uint8)
        for polys in tum:
            for c in polys:
                cv2.fillPoly(m, [np.round((c - [x0, y0]) * 4).astype(np.int32)], 1, shift=2)
        # A 0/1 mask's cell means are k / 16: exact in float32, the same as the float64 mean cast down.
        out.append({"img": l1[y0:y1, x0:x1].copy(), "t4": cell_mean(m), "t1": m})
    return out


def cell_mean(a: np.ndarray) -> np.ndarray:
    """The mean of a 1 µm map (sides multiples of ``CELL``) over each 4 µm cell, float32."""
    h, w = a.shape[0] // CELL, a.shape[1] // CELL
    return a.reshape(h, CELL, w, CELL).mean(axis=(1, 3), dtype=np.float32)


def shifted_crop(
    img: np.ndarray, t4: np.ndarray, y: int, x: int, crop: int = CROP, t1: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``crop`` px crop of ``img`` at any 1 µm offset ``(y, x)`` and its per-4 µm-cell truth. With the
    1 µm truth ``t1`` it is exact: ``t1``'s mean over each cell of the crop. Without it, each cell of the
    crop overlaps up to 2 x 2 cells of ``t4``, weighted by the overlap's area (exact only where the truth
    is uniform within ``t4``'s cells: an edge inside a cell is blurred; at phase 0 it is ``t4``'s own
    cells either way). The head is
    trained on every phase of its 4 µm grid this way, so its output does not depend on where the
    runtime's window falls (phase-0-only crops left it reading ~0 in every other cell column at some
    phases: /work/notes/old29/h13-oracle.md)."""
    if t1 is not None:
        return img[y : y + crop, x : x + crop], cell_mean(t1[y : y + crop, x : x + crop])
    n = crop // CELL
    qy, ry = divmod(y, CELL)
    qx, rx = divmod(x, CELL)
    t = t4[qy : qy + n + (ry > 0), qx : qx + n + (rx > 0)].astype(np.float32)
    if ry:
        t = ((CELL - ry) * t[:-1] + ry * t[1:]) / CELL
    if rx:
        t = ((CELL - rx) * t[:, :-1] + rx * t[:, 1:]) / CELL
    return img[y : y + crop, x : x + crop], t


def initial_weights(init: Path) -> dict[str, torch.Tensor]:
    """A state dict to start from: a ``.pt`` file, or a lesion-head model folder (its ONNX initializers
    carry the torch parameter names, e.g. the committed ``runtime/ml/builtin/lesion_head``; other
    initializers, such as :class:`BlurPool`'s fixed blur, are left out)."""
    if Path(init).is_dir():
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(Path(init) / "model.onnx")).graph
        return {
            i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
            for i in graph.initializer
            if i.name.startswith("f.") and i.name.endswith((".weight", ".bias"))
        }
    sd: dict[str, torch.Tensor] = torch.load(init, map_location="cpu", weights_only=True)
    return sd


def folder_head(folder: Path) -> LesionHead:
    """The torch head of a lesion-head model folder: its architecture (``training.antialias`` in its
    model.json; absent: the max-pool head) with its ONNX weights."""
    from runtime.ml.model_folder import load_model_folder

    meta = load_model_folder(folder, "lesion_head", check_graph=False).meta
    net = LesionHead(antialias=bool(meta.get("training", {}).get("antialias", False)))
    net.load_state_dict(initial_weights(folder))
    return net


def other_content_images(rng: np.random.Generator, textures: int, photos: int, crop: int = CROP) -> list[np.ndarray]:
    """``textures`` random textures and ``photos`` photographs of :mod:`export.content_mix`, each
    resampled by a random factor (0.35-2.5 head px per content px), none smaller than a crop."""
    from export.content_mix import random_photo, random_texture

    out = []
    for i in range(textures + photos):
        im = random_texture(rng, 512) if i < textures else random_photo(rng)
        f = float(np.exp(rng.uniform(np.log(0.35), np.log(2.5))))
        h, w = im.shape[:2]
        f = max(f, (crop + 1) / min(h, w))
        interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
        r = cv2.resize(im, (round(w * f), round(h * f)), interpolation=interp)
        out.append(np.ascontiguousarray(r[:2048, :2048]))  # a large photo upsampled: one corner is plenty
    return out


def jitter_colour(im: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """``im`` (uint8 RGB) with its optical density scaled overall and per channel (up to
    ``strength``), a small per-channel offset and a brightness change: other stain intensities and
    scanners' colour, same morphology."""
    od = -np.log(np.maximum(im.astype(np.float32), 1.0) / 255.0)
    scale = float(rng.uniform(1 - strength, 1 + strength)) * rng.uniform(1 - strength / 2, 1 + strength / 2, 3)
    od = od * scale.astype(np.float32) + rng.uniform(-strength / 4, strength / 4, 3).astype(np.float32)
    out = 255.0 * np.exp(-np.maximum(od, 0.0)) * float(rng.uniform(1 - strength / 4, 1 + strength / 8))
    return np.clip(out, 0, 255).astype(np.uint8)


def other_content_cells(net: nn.Module, images: list[np.ndarray]) -> float:
    """Share of 4 µm cells the head calls tumour (>= 0.5) on whole 224 px windows of ``images``."""
    from bench.lesion_head import windows  # the bench's cut, so the two figures count the same cells

    net.eval()
    calls, cells = 0, 0
    with torch.no_grad():
        for im in images:
            w = windows(im, WINDOW, 1.0)
            if not len(w):
                continue
            p = net(torch.from_numpy(np.stack([to_input(x) for x in w])))[0]
            calls += int((p >= 0.5).sum())
            cells += p.numel()
    return calls / max(cells, 1)


def stroma_ring(t1: np.ndarray, ring_um: int, outer: bool = False) -> np.ndarray:
    """The inner ring of a 1 µm truth mask: its pixels within ``ring_um`` µm of the mask's edge (uint8
    0/1). Around a small lesion's nests this is the desmoplastic stroma the truth polygon includes, which
    the head under-called (/work/notes/old30/h13-head.md). ``outer``: also the pixels outside the mask
    within ``ring_um`` of its edge (a band across the edge, weighting both sides alike)."""
    if ring_um <= 0 or not t1.any():
        return np.zeros_like(t1, dtype=np.uint8)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring_um + 1, 2 * ring_um + 1))
    m = (t1 > 0).astype(np.uint8)
    inner = cv2.erode(m, k, borderType=cv2.BORDER_REPLICATE)  # the window's border is not the lesion's edge
    if outer:
        return cv2.dilate(m, k, borderType=cv2.BORDER_REPLICATE) & (1 - inner)
    return m & (1 - inner)


def crop_target(
    w: dict[str, Any], ring: np.ndarray | None, y: int, x: int, crop: int, truth_1um: bool, ring_weight: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A training window's crop at ``(y, x)``, its per-cell target (:func:`shifted_crop`, from the 1 µm
    truth with ``truth_1um``) and its per-cell loss weight: 1, plus ``ring_weight`` x the cell's share of
    ``ring`` (:func:`stroma_ring`) where the window has one."""
    im, t = shifted_crop(w["img"], w["t4"], y, x, crop, w["t1"] if truth_1um else None)
    if ring is None:
        return im, t, np.ones_like(t)
    return im, t, 1 + ring_weight * cell_mean(ring[y : y + crop, x : x + crop])


def read_cache(f: Path) -> list[dict[str, Any]]:
    """A cached slide's windows; ValueError for a file of another cache format (it says how to re-render)."""
    d = pickle.loads(f.read_bytes())
    if not isinstance(d, dict) or d.get("format") != CACHE_FORMAT:
        got = d.get("format") if isinstance(d, dict) else 1
        raise ValueError(
            f"{f} is lesion-head window cache format {got}, this export needs format {CACHE_FORMAT} "
            "(windows with the 1 µm truth t1): delete the cache's *.pkl or pass another --cache to re-render it"
        )
    wins: list[dict[str, Any]] = d["windows"]
    return wins


def cache_name(seed: int, vesicular_max: float = 0.0) -> str:
    """A slide's window-cache file name: ``<seed>.pkl`` in the default look, ``<seed>-ves<V>.pkl`` in another."""
    return f"{seed}{vesicular_suffix(vesicular_max)}.pkl"


def _cached_windows(job: tuple[int, int, str, float]) -> list[dict[str, Any]]:
    seed, index, cache, vesicular_max = job
    f = Path(cache) / cache_name(seed, vesicular_max)
    if f.exists():
        return read_cache(f)
    wins = slide_windows(seed, index, vesicular_max)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(pickle.dumps({"format": CACHE_FORMAT, "windows": wins}))
    return wins


def windows(
    first_seed: int, n: int, cache: Path, workers: int, looks: tuple[float, ...] = (0.0,)
) -> list[dict[str, Any]]:
    """Windows of slides ``first_seed .. first_seed + n - 1``: two in three "small-lesion" slides
    (bench index 2), the others ordinary tumour slides (index 0); each slide in every one of ``looks``
    (``vesicular_max`` values: the default look is 0), one look after the other."""
    for s in (first_seed, first_seed + n - 1):
        check_training_seed(s)
    jobs = [(first_seed + i, 2 if i % 3 else 0, str(cache), v) for v in looks for i in range(n)]
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_cached_windows, jobs, chunksize=1)
    else:
        parts = [_cached_windows(j) for j in jobs]
    return [w for p in parts for w in p]


def window_metrics(net: nn.Module, wins: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-window area error of the head (cells >= 0.5) against the truth, split by truth size
    (below / from ``SMALL_UM2`` = 10,000 µm²), and the area it gives windows without truth (µm²)."""
    net.eval()
    small: list[float] = []
    large: list[float] = []
    fp = 0.0
    with torch.no_grad():
        for w in wins:
            p = net(torch.from_numpy(to_input(w["img"]))[None])[0][0, 0].numpy()
            area = float((p >= 0.5).sum()) * CELL**2
            truth = float(w["t4"].sum()) * CELL**2
            if truth < 500:
                fp += area if truth == 0 else 0.0
                continue
            (small if truth < SMALL_UM2 else large).append(abs(area - truth) / truth)

    def stats(e: list[float]) -> dict[str, Any]:
        return {"n": len(e), "mean": float(np.mean(e)) if e else None, "median": float(np.median(e)) if e else None}

    return {
        "area_error_truth_lt_10000um2": stats(small),
        "area_error_truth_ge_10000um2": stats(large),
        "area_on_windows_without_truth_um2": fp,
        "windows": len(wins),
    }


def train_lesion_head(
    out: Path,
    *,
    cache: Path,
    train_first: int = 320000,
    train_slides: int = 36,
    dev_first: int = 300000,
    dev_slides: int = 12,
    budget_s: float = 600.0,
    seed: int = 0,
    workers: int = 2,
    init: Path | None = None,
    lr: float = 2e-3,
    other_content: float = 0.0,
    other_textures: int = 150,
    other_photos: int = 150,
    colour_jitter: float = 0.0,
    shift: bool = False,
    crop: int = CROP,
    antialias: bool = False,
    ring_weight: float = 0.0,
    ring_um: int = 12,
    ring_outer: bool = False,
    truth_1um: bool = False,
    vesicular_max: float = 0.0,
    both_looks: bool = False,
) -> dict[str, Any]:
    """Render (or read cached) windows, train for ``budget_s`` CPU-seconds of wall time (batches of
    16 random 96 px crops, rotations and flips), score on the development windows, and export
    ``out`` (a model folder, parity-checked torch vs ONNX Runtime).

    ``init``: a state dict (``.pt``) to start from. ``other_content``: the share of each batch's
    crops drawn from ``other_textures`` textures and ``other_photos`` photographs of
    :mod:`export.content_mix` (target all zero). ``colour_jitter``: the strength of
    :func:`jitter_colour` on the simulated windows' crops (0: none). ``shift``: crops at every 1 µm
    offset (:func:`shifted_crop`), not only on the 4 µm output grid. ``crop``: the training crop's side
    (px, a multiple of 4). ``antialias``: the head's pools are :class:`BlurPool`. ``ring_weight``: the
    loss of a 4 µm cell of a small-lesion window (truth under ``SMALL_UM2``) is weighted
    ``1 + ring_weight x`` its share of :func:`stroma_ring` (``ring_um`` µm inside the truth's edge;
    ``ring_outer``: and outside it). ``truth_1um``: the crops' targets come from the cache's 1 µm truth
    (exact at every phase), not from its 4 µm cells (:func:`shifted_crop`). ``vesicular_max``: the
    slides' carcinoma look (:func:`slide_windows`); ``both_looks`` (with a ``vesicular_max``): every
    training and development slide in the default look and in that one (the default-look head read
    vesicular lesions as half their size: README, "Slide analysis")."""
    from export.content_mix import describe
    from export.onnx_export import export_model

    if set(range(train_first, train_first + train_slides)) & set(range(dev_first, dev_first + dev_slides)):
        raise ValueError("training and development seeds overlap")
    if crop % CELL or crop < CELL:
        raise ValueError(f"crop must be a positive multiple of {CELL} px, got {crop}")
    if ring_weight < 0 or ring_um < 1:
        raise ValueError(f"ring weight must be >= 0 and ring width >= 1 um, got {ring_weight:g}, {ring_um}")
    if not 0.0 <= vesicular_max <= 1.0:
        raise ValueError(f"vesicular_max must be in [0, 1], got {vesicular_max:g}")
    if both_looks and not vesicular_max:
        raise ValueError("both looks need a vesicular_max above 0 (the second look)")
    looks = (0.0, vesicular_max) if both_looks else (vesicular_max,)
    t0 = time.time()
    tr = windows(train_first, train_slides, cache, workers, looks)
    dev = windows(dev_first, dev_slides, cache, workers, looks)
    render_s = time.time() - t0
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = LesionHead(antialias=antialias)
    if init is not None:
        net.load_state_dict(initial_weights(init))
    t2 = time.time()
    other = (
        other_content_images(np.random.default_rng(seed + 1), other_textures, other_photos, crop)
        if other_content
        else []
    )
    dev_other = other_content_images(np.random.default_rng(DEV_CONTENT_SEED), 20, 20) if other_content else []
    content_s = time.time() - t2
    opt = torch.optim.Adam(net.parameters(), lr)
    bce = nn.BCELoss()
    tr = [w for w in tr if min(w["img"].shape[:2]) >= crop]
    rings = [
        stroma_ring(w["t1"], ring_um, ring_outer) if ring_weight and float(w["t1"].sum()) < SMALL_UM2 else None
        for w in tr
    ]
    ring_windows = sum(r is not None and bool(r.any()) for r in rings)
    steps = 0
    t1 = time.time()
    net.train()
    while time.time() - t1 < budget_s:
        xs, ys, ws = [], [], []
        for _ in range(16):
            wt = np.ones((crop // CELL, crop // CELL), np.float32)
            if other and rng.random() < other_content:
                o = other[int(rng.integers(len(other)))]
                y = int(rng.integers(0, o.shape[0] - crop + 1))
                x = int(rng.integers(0, o.shape[1] - crop + 1))
                im, t = o[y : y + crop, x : x + crop], np.zeros((crop // CELL, crop // CELL), np.float32)
            else:
                i = int(rng.integers(len(tr)))
                w = tr[i]
                h, wd = w["img"].shape[:2]
                if shift:  # any 1 µm offset
                    y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, wd - crop + 1))
                else:  # on the 4 µm output grid (shifted_crop returns t4's own cells there)
                    y = int(rng.integers(0, (h - crop) // CELL + 1)) * CELL
                    x = int(rng.integers(0, (wd - crop) // CELL + 1)) * CELL
                im, t, wt = crop_target(w, rings[i], y, x, crop, truth_1um, ring_weight)
                if colour_jitter:
                    im = jitter_colour(im, rng, colour_jitter)
            k = int(rng.integers(4))
            im, t, wt = np.rot90(im, k), np.rot90(t, k), np.rot90(wt, k)
            if rng.random() < 0.5:
                im, t, wt = im[:, ::-1], t[:, ::-1], wt[:, ::-1]
            xs.append(to_input(np.ascontiguousarray(im)))
            ys.append(np.ascontiguousarray(t)[None])
            ws.append(np.ascontiguousarray(wt)[None])
        pred, target = net(torch.from_numpy(np.stack(xs)))[0], torch.from_numpy(np.stack(ys))
        if ring_weight:
            loss = nn.functional.binary_cross_entropy(pred, target, weight=torch.from_numpy(np.stack(ws)))
        else:
            loss = bce(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    train_s = time.time() - t1
    torch.save(net.state_dict(), cache / f"lesion-head-seed{seed}.pt")  # re-export without retraining
    metrics = window_metrics(net, dev)
    metrics["dev_slide_seeds"] = [dev_first, dev_first + dev_slides - 1]
    if dev_other:
        metrics["tumour_cells_on_other_content"] = other_content_cells(net, dev_other)
        metrics["other_content_dev"] = (
            f"20 textures and 20 photographs of export.content_mix drawn with seed {DEV_CONTENT_SEED}"
        )
    samples = np.stack([to_input(_window_sample(w)) for w in dev[:4]])
    spec = {
        "task": "lesion_head",
        "input_shape": [3, WINDOW, WINDOW],
        "outputs": [
            {
                "name": "tumour",
                "shape": ["batch", 1, WINDOW // CELL, WINDOW // CELL],
                "unit": "probability",
                "meaning": "tumour in each 4 µm cell of the 1 µm input window",
            }
        ],
        "preprocess": {"kind": "rgb_window_v1", "size": WINDOW, "mean": 0.5, "std": 0.25, "cell": CELL},
        "pixel_size_um": 1.0,
    }
    training = {
        "train_slide_seeds": [train_first, train_first + train_slides - 1],
        "train_windows": len(tr),
        "steps": steps,
        "batch": 16,
        "crop_px": crop,
        "seed": seed,
        "render_s": round(render_s, 1),
        "train_s": round(train_s, 1),
        "lr": lr,
        "colour_jitter": colour_jitter,
        "shift": shift,
        "antialias": antialias,
        "cache_format": CACHE_FORMAT,
        "targets": "the 1 µm truth's mean over each 4 µm cell of the crop (exact at every phase)"
        if truth_1um
        else "the 4 µm truth's cells, overlap-weighted at phases other than 0 (shifted_crop)",
        "command": f"python -m export train-lesion-head --budget-s {budget_s:g} --train-first {train_first} "
        f"--train-slides {train_slides} --dev-first {dev_first} --dev-slides {dev_slides} --seed {seed} --lr {lr:g}"
        + (f" --init {init}" if init else "")
        + (
            f" --other-content {other_content:g} --other-textures {other_textures} --other-photos {other_photos}"
            if other_content
            else ""
        )
        + (f" --colour-jitter {colour_jitter:g}" if colour_jitter else "")
        + (" --shift" if shift else "")
        + (f" --crop {crop}" if crop != CROP else "")
        + (" --antialias" if antialias else "")
        + (" --truth-1um" if truth_1um else "")
        + (f" --ring-weight {ring_weight:g} --ring-um {ring_um}" if ring_weight else "")
        + (" --ring-outer" if ring_weight and ring_outer else "")
        + (f" --vesicular-max {vesicular_max:g}" if vesicular_max else "")
        + (" --both-looks" if both_looks else ""),
        "carcinoma_looks": {"vesicular_max": list(looks)},
    }
    if ring_weight:
        training["ring"] = (
            f"loss weight 1 + {ring_weight:g} x the cell's share of the truth within {ring_um} um inside its edge"
            + (" and of the band as wide outside it" if ring_outer else "")
            + ", "
            f"in windows with under {SMALL_UM2:g} um2 of truth ({ring_windows} training windows)"
        )
    if init is not None:
        training["init"] = str(init)
    extra: dict[str, Any] = {}
    if other_content:
        training["other_content"] = (
            f"{other_textures} random textures and {other_photos} photographs of export.content_mix (seed {seed + 1}), "
            f"resampled 0.35-2.5x, as all-zero-target crops: {other_content:g} of each batch"
        )
        training["content_s"] = round(content_s, 1)
        # content_mix's own record, less what the head does not use (content kinds, objectives, pixel sizes)
        used = ("module", "photographs", "stain_pairs", "textures", "no_tissue_images", "held_out_for_benchmarks")
        extra["training_content"] = {k: v for k, v in describe().items() if k in used}
    return export_model(net, spec, out, samples, metrics, training, extra=extra)


def _window_sample(w: dict[str, Any]) -> np.ndarray:
    """A development window padded/cropped to the exported ``WINDOW`` (parity samples)."""
    img = np.full((WINDOW, WINDOW, 3), 255, np.uint8)
    h, wd = min(WINDOW, w["img"].shape[0]), min(WINDOW, w["img"].shape[1])
    img[:h, :wd] = w["img"][:h, :wd]
    return img
