"""A synthetic H&E slide: procedural tissue, rendered on demand as transmittance.

A real slide is gigapixels; so is this one. Nothing is ever rendered for the
whole slide: every pixel is a pure function of its slide coordinates (µm) and
the seed, so any region can be rendered alone, in any order, and two regions
that share pixels agree on them. That is what lets a scanner simulation render
one field at a time at its *actual* (error-laden) stage position while the
ground truth is rendered independently, tile by tile, from the same function.

How the determinism is kept:
- Random values come from an integer hash of (seed, purpose, lattice index),
  never from a stateful RNG, so a value depends only on where it is.
- Value noise is evaluated at global coordinates on hashed lattices.
- Nuclei live in fixed-size blocks with a fixed number of candidate slots per
  block; each slot's existence and shape are hashed from (seed, block, slot).
  A region renders every nucleus whose support reaches it, whichever block
  the nucleus belongs to.
- Pixel centres are ``x0 + (j + 0.5) * pixel_size``; regions on the same
  pixel lattice therefore compute bit-identical coordinates.

Colour follows Beer-Lambert: optical densities of hematoxylin and eosin times
their Ruifrok-Johnston stain vectors, ``T = 10 ** -OD`` per RGB channel.

Slide coordinates are stage coordinates: x to the right, y down, in µm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from hw_sim.lesions import LesionField, LesionLayers

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

# Ruifrok & Johnston (2001), optical density per RGB channel for unit stain.
RUIFROK_H: tuple[float, float, float] = (0.65, 0.70, 0.29)
RUIFROK_E: tuple[float, float, float] = (0.07, 0.99, 0.11)

_MASK64 = (1 << 64) - 1

# Purposes ("salts") keep the hash streams of different features independent.
_S_LAYOUT, _S_EDGE, _S_HOLE, _S_CELL, _S_WARP, _S_FIBW, _S_FIBF = 1, 2, 3, 4, 5, 6, 7
_S_EOS, _S_CHROM, _S_NUC, _S_FOCUS = 8, 9, 10, 11
_S_ART, _S_ARTN = 12, 13

ARTIFACT_KINDS = ("ink", "bubble", "dust", "fold")

# SlideSpec.content_region -> the part of a content image the slide shows, as fractions of the image's
# width and height (x0, y0, x1, y1); hw_sim.content.region_pixels turns it into a pixel box. Opposite
# halves (OPPOSITE_REGION) share no image pixel.
CONTENT_REGIONS: dict[str, tuple[float, float, float, float]] = {
    "": (0.0, 0.0, 1.0, 1.0),
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
}
OPPOSITE_REGION: dict[str, str] = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}

# Nuclei: blocks of _BLOCK_UM with _SLOTS candidates each (max density ~ 1 nucleus per 33 µm²).
_BLOCK_UM = 10.0
_SLOTS = 3
_NUC_MAX_AXIS_UM = 5.0
_NUC_EDGE = 0.18  # soft edge width, as a fraction of the radius (a sharp but not aliased boundary)


@dataclass(frozen=True)
class SlideSpec:
    """Everything that defines a synthetic slide; the same spec renders the same slide.

    The tissue area is ``[origin_x_um, origin_x_um + width_um) x [origin_y_um, ...)``;
    tissue pieces are laid out inside it, everything outside is glass.
    Focal surface: ``base_z_um`` at the area's centre, tilted by ``tilt_*_um_per_mm``
    and warped smoothly by up to ``warp_um`` with a spatial period of ``warp_period_um``.
    """

    seed: int = 0
    origin_x_um: float = 0.0
    origin_y_um: float = 0.0
    width_um: float = 20000.0
    height_um: float = 15000.0
    pieces: int = 6
    h_strength: float = 1.0
    e_strength: float = 1.0
    h_vector: tuple[float, float, float] = RUIFROK_H
    e_vector: tuple[float, float, float] = RUIFROK_E
    glass_od: float = 0.02
    base_z_um: float = 0.0
    tilt_x_um_per_mm: float = 0.4
    tilt_y_um_per_mm: float = -0.25
    warp_um: float = 1.5
    warp_period_um: float = 6000.0
    artifacts: int = 0  # pen-ink strokes, air bubbles, dust clusters and tissue folds (see _artifact_layout)
    # What the stained tissue looks like: "synthetic" (the procedural H&E below) or an image
    # (hw_sim.content: "ihc", "brick", ..., "file:PATH") at content_px_um µm per image pixel
    # (0: the content's default). hw_sim.content.make_slide builds the right slide.
    content: str = "synthetic"
    content_px_um: float = 0.0
    # Which part of a content image the slide shows (CONTENT_REGIONS: "" the whole image, "left" /
    # "right" / "top" / "bottom" half), tiled by mirroring like the whole image. Two slides of
    # opposite halves show disjoint image pixels: a calibration and a scored recording that never
    # share content (bench calibration). Images only: the procedural H&E differs per seed anyway.
    content_region: str = ""
    # Tumour (hw_sim.lesions): carcinoma lesions with diameters log-uniform in
    # [lesion_min_um, lesion_max_um], and benign crowded regions that are not tumour. 0 and 0: none,
    # and the slide renders bit for bit as it did before lesions existed.
    lesions: int = 0
    mimics: int = 0
    lesion_min_um: float = 50.0
    lesion_max_um: float = 4000.0
    # How far a carcinoma's nuclei may depart from the hyperchromatic look toward the vesicular one
    # of real carcinoma (hw_sim.lesions: larger, paler nuclei with a chromatin rim and a nucleolus,
    # more widely spaced): each lesion draws its own degree in [0, vesicular_max] from its own hash
    # stream. 0: the hyperchromatic look only, and the slide renders bit for bit as before it existed.
    vesicular_max: float = 0.0

    def __post_init__(self) -> None:
        if not (self.width_um > 0 and self.height_um > 0):
            raise ValueError(
                f"slide area must have a positive size, got {self.width_um} x {self.height_um} µm"
            )
        if self.pieces < 1:
            raise ValueError(f"pieces must be >= 1, got {self.pieces}")
        for name in ("h_vector", "e_vector"):
            v = getattr(self, name)
            if len(v) != 3 or not all(x >= 0 for x in v) or sum(v) <= 0:
                raise ValueError(f"{name} must be 3 non-negative optical densities, got {v}")
        if self.warp_period_um <= 0:
            raise ValueError(f"warp_period_um must be positive, got {self.warp_period_um}")
        if self.artifacts < 0:
            raise ValueError(f"artifacts must be >= 0, got {self.artifacts}")
        if self.lesions < 0 or self.mimics < 0:
            raise ValueError(f"lesions and mimics must be >= 0, got {self.lesions} and {self.mimics}")
        if not 0 < self.lesion_min_um <= self.lesion_max_um:
            raise ValueError(
                f"need 0 < lesion_min_um <= lesion_max_um, got {self.lesion_min_um} and {self.lesion_max_um}"
            )
        if not 0.0 <= self.vesicular_max <= 1.0:
            raise ValueError(f"vesicular_max must be in [0, 1], got {self.vesicular_max}")
        if self.content_region not in CONTENT_REGIONS:
            raise ValueError(
                f"content_region must be one of {', '.join(repr(r) for r in CONTENT_REGIONS)}, "
                f"got {self.content_region!r}"
            )
        if self.content_region and self.content == "synthetic":
            raise ValueError(
                f"content_region {self.content_region!r} needs an image content, not the procedural 'synthetic'"
            )
        if (self.lesions or self.mimics) and self.content != "synthetic":
            raise ValueError(
                f"lesions are drawn only on the procedural H&E (content 'synthetic'), not {self.content!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["h_vector"] = list(self.h_vector)
        d["e_vector"] = list(self.e_vector)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlideSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SlideSpec keys: {sorted(unknown)}")
        kw = dict(d)
        for name in ("h_vector", "e_vector"):
            if name in kw:
                kw[name] = tuple(float(x) for x in kw[name])
        return cls(**kw)


# --------------------------------------------------------------------------- hashing and noise


def _key(seed: int, salt: int) -> int:
    return ((seed & _MASK64) * 0x100000001B3 + salt * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64


def _mix(z: U64) -> U64:
    """splitmix64 finaliser: a cheap, well-mixing 64-bit bijection."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash01(key: int, ix: I64, iy: I64) -> F64:
    """Uniform [0, 1) from (key, ix, iy); ix and iy broadcast."""
    with np.errstate(over="ignore"):
        h = _mix(np.asarray(ix).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key))
        h = _mix(h ^ (np.asarray(iy).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _hash_scalar(key: int, i: int, j: int = 0) -> float:
    return float(_hash01(key, np.array([i], np.int64), np.array([j], np.int64))[0])


def _smooth(t: npt.NDArray[Any]) -> npt.NDArray[Any]:
    return np.asarray(t * t * (3.0 - 2.0 * t))


def _smoothstep(e0: float, e1: float, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return _smooth(t)


def _axis_weights(coords: F64, scale: float) -> tuple[I64, F32, int, int]:
    """Lattice cell index and smoothed fraction of each coordinate; also the lattice range."""
    u = coords / scale
    i0 = np.floor(u)
    s = _smooth((u - i0).astype(np.float32))
    idx = i0.astype(np.int64)
    lo = int(idx.min())
    return idx - lo, s, lo, int(idx.max()) - lo + 2


def _noise_grid(key: int, xs: F64, ys: F64, scale: float) -> F32:
    """Value noise in [0, 1] on the grid ys x xs (global µm), separable interpolation.

    Interpolating along x on the few lattice rows first, then along y, keeps the
    cost at a handful of full-size array operations per octave.
    """
    jx, sx, x_lo, nx = _axis_weights(xs, scale)
    jy, sy, y_lo, ny = _axis_weights(ys, scale)
    lat = _hash01(
        key, np.arange(x_lo, x_lo + nx, dtype=np.int64)[None, :], np.arange(y_lo, y_lo + ny)[:, None]
    ).astype(np.float32)
    rows = lat[:, jx] * (1.0 - sx) + lat[:, jx + 1] * sx  # (ny, w)
    grid: F32 = rows[jy] * (1.0 - sy)[:, None] + rows[jy + 1] * sy[:, None]
    return grid


def _noise_pts(key: int, x: F64, y: F64, scale: float) -> F64:
    """Value noise at scattered points (same lattice as :func:`_noise_grid`)."""
    u, v = x / scale, y / scale
    iu, iv = np.floor(u), np.floor(v)
    su, sv = _smooth(u - iu), _smooth(v - iv)
    ix, iy = iu.astype(np.int64), iv.astype(np.int64)
    a = _hash01(key, ix, iy) * (1 - su) + _hash01(key, ix + 1, iy) * su
    b = _hash01(key, ix, iy + 1) * (1 - su) + _hash01(key, ix + 1, iy + 1) * su
    return np.asarray(a * (1 - sv) + b * sv, dtype=np.float64)


def _fbm_grid(key: int, xs: F64, ys: F64, scale: float, octaves: int) -> F32:
    acc = np.zeros((ys.size, xs.size), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        acc += np.float32(amp) * _noise_grid(key + o * 7919, xs, ys, scale / (2**o))
        total += amp
        amp *= 0.5
    return acc / np.float32(total)


def _fbm_pts(key: int, x: F64, y: F64, scale: float, octaves: int) -> F64:
    acc = np.zeros(np.broadcast(x, y).shape, np.float64)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        acc += amp * _noise_pts(key + o * 7919, x, y, scale / (2**o))
        total += amp
        amp *= 0.5
    return acc / total


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Piece:
    """One tissue piece: a rotated ellipse whose boundary is perturbed by noise."""

    cx: float
    cy: float
    a: float
    b: float
    cos: float
    sin: float

    @property
    def reach(self) -> float:
        """Radius beyond which the piece cannot extend (boundary perturbation included)."""
        return 1.35 * max(self.a, self.b)


def _layout(spec: SlideSpec) -> list[_Piece]:
    """Pieces on a jittered grid of cells with one corner cell left empty (when there are >= 3).

    The empty cell and the gaps between ellipses guarantee some glass, as on a
    real slide; ellipses of about a cell each put tissue under most of the area.
    """
    key = _key(spec.seed, _S_LAYOUT)
    aspect = spec.width_um / spec.height_um
    gx = max(1, round(math.sqrt(spec.pieces * aspect)))
    gy = max(1, round(math.sqrt(spec.pieces / aspect)))
    cw, ch = spec.width_um / gx, spec.height_um / gy
    n = gx * gy
    # A corner cell stays empty: corner fields of a scan then see glass, as scans of real slides do.
    corners = sorted({0, gx - 1, (gy - 1) * gx, n - 1})
    empty = corners[int(_hash_scalar(key, 999) * len(corners))] if n >= 3 else -1
    pieces = []
    for i in range(n):
        if i == empty:
            continue
        r, c = divmod(i, gx)
        u = [_hash_scalar(key, i, k) for k in range(5)]
        theta = (u[4] - 0.5) * 1.2
        pieces.append(
            _Piece(
                cx=spec.origin_x_um + (c + 0.5 + 0.3 * (u[0] - 0.5)) * cw,
                cy=spec.origin_y_um + (r + 0.5 + 0.3 * (u[1] - 0.5)) * ch,
                a=cw * (0.48 + 0.17 * u[2]),
                b=ch * (0.48 + 0.17 * u[3]),
                cos=math.cos(theta),
                sin=math.sin(theta),
            )
        )
    return pieces


# --------------------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class Artifact:
    """Something on the slide that is not tissue, or tissue that is damaged.

    ``ink``: a marker-pen stroke (a capsule of half-width ``width``) on the cover glass;
    ``bubble``: an air bubble in the mountant (a dark refractive rim of radius ``radius``);
    ``dust``: a cluster of opaque specks within ``radius``; ``fold``: a band of tissue
    folded over itself (twice the stain) of half-width ``width`` along a segment.
    """

    kind: str
    cx: float
    cy: float
    length: float  # segment length (ink, fold); 0 for round artifacts
    width: float  # half-width (ink, fold) or rim width (bubble)
    radius: float  # bubble / dust cluster radius
    cos: float
    sin: float
    index: int

    @property
    def reach(self) -> float:
        """Radius beyond which the artifact leaves no trace."""
        if self.kind in ("ink", "fold"):
            return self.length / 2 + self.width + 10.0
        return self.radius + 15.0


# Per-channel optical density of unit pen ink (R, G, B): blue, green and black markers.
_INK_COLOURS = ((0.95, 0.55, 0.12), (0.85, 0.22, 0.75), (0.9, 0.85, 0.8))


def _artifact_layout(spec: SlideSpec, pieces: list[_Piece]) -> list[Artifact]:
    """``spec.artifacts`` artifacts, the kinds in turn (so a handful shows every kind), placed by hash."""
    key = _key(spec.seed, _S_ART)
    out = []
    start = int(_hash_scalar(key, 0, 99) * len(ARTIFACT_KINDS))
    for i in range(spec.artifacts):
        kind = ARTIFACT_KINDS[(start + i) % len(ARTIFACT_KINDS)]
        u = [_hash_scalar(key, i, k) for k in range(6)]
        theta = u[2] * math.pi
        cx = spec.origin_x_um + u[0] * spec.width_um
        cy = spec.origin_y_um + u[1] * spec.height_um
        if kind == "fold" and pieces:
            # Folds happen in tissue: near the middle of a piece.
            p = pieces[int(u[5] * len(pieces)) % len(pieces)]
            cx = p.cx + (u[0] - 0.5) * p.a * 0.6
            cy = p.cy + (u[1] - 0.5) * p.b * 0.6
            out.append(Artifact(kind, cx, cy, min(p.a, p.b) * (0.6 + 0.6 * u[3]), 15 + 45 * u[4], 0.0,
                                math.cos(theta), math.sin(theta), i))
        elif kind == "ink":
            out.append(Artifact(kind, cx, cy, 600 + 1400 * u[3], 60 + 140 * u[4], 0.0,
                                math.cos(theta), math.sin(theta), i))
        elif kind == "bubble":
            out.append(Artifact(kind, cx, cy, 0.0, 2.0 + 3.0 * u[4], 40 + 210 * u[3], 1.0, 0.0, i))
        else:  # dust
            out.append(Artifact(kind, cx, cy, 0.0, 0.0, 30 + 90 * u[3], 1.0, 0.0, i))
    return out


def reach_window(xs: F64, ys: F64, cx: float, cy: float, reach: float) -> tuple[tuple[slice, slice], F64, F64] | None:
    """The part of the grid ys x xs within ``reach`` of (cx, cy) on each axis: (the window's
    (rows, cols) slices, its xs, its ys), or None if empty; the work on a feature stays there."""
    c0, c1 = np.searchsorted(xs, [cx - reach, cx + reach])
    r0, r1 = np.searchsorted(ys, [cy - reach, cy + reach])
    if c0 >= c1 or r0 >= r1:
        return None
    return (slice(r0, r1), slice(c0, c1)), xs[c0:c1], ys[r0:r1]


def _segment_distance(a: Artifact, xs: F64, ys: F64) -> F32:
    dx = xs[None, :] - a.cx
    dy = ys[:, None] - a.cy
    along = np.abs(dx * a.cos + dy * a.sin)
    across = dy * a.cos - dx * a.sin
    d = np.sqrt(np.maximum(along - a.length / 2, 0.0) ** 2 + across * across)
    return d.astype(np.float32)


def _dust_specks(a: Artifact, spec_seed: int) -> tuple[F64, F64, F64, F64]:
    """Speck centres, radii and optical densities of one dust cluster."""
    key = _key(spec_seed, _S_ARTN) + a.index * 7919
    n = 6 + int(_hash_scalar(key, 0, 1) * 20)
    i = np.arange(n, dtype=np.int64)
    ang = _hash01(key, i, np.full(n, 1)) * 2 * math.pi
    rad = np.sqrt(_hash01(key, i, np.full(n, 2))) * a.radius
    r = 1.5 + 6.5 * _hash01(key, i, np.full(n, 3)) ** 2
    od = 0.9 + 1.1 * _hash01(key, i, np.full(n, 4))
    return a.cx + rad * np.cos(ang), a.cy + rad * np.sin(ang), r, od


# --------------------------------------------------------------------------- the slide


class SyntheticSlide:
    """Renders any region of the slide described by a :class:`SlideSpec`."""

    def __init__(self, spec: SlideSpec) -> None:
        self.spec = spec
        self._pieces = _layout(spec)
        self._edge_scale = max(20.0, 0.35 * min(min(p.a, p.b) for p in self._pieces))
        h = np.asarray(spec.h_vector, np.float64)
        e = np.asarray(spec.e_vector, np.float64)
        self._h = (h / np.linalg.norm(h)).astype(np.float32)
        self._e = (e / np.linalg.norm(e)).astype(np.float32)
        s = spec.seed
        self._k = {name: _key(s, salt) for name, salt in _SALTS.items()}
        ang = _hash_scalar(self._k["fibw"], 1) * math.pi
        self._fib_dirs = [(math.cos(ang), math.sin(ang)), (math.cos(ang + 1.1), math.sin(ang + 1.1))]
        f = [_hash_scalar(self._k["focus"], i) for i in range(4)]
        self._focus_phase = [2 * math.pi * v for v in f[:3]]
        self._focus_dir = math.pi * f[3]
        self.artifacts = _artifact_layout(spec, self._pieces)
        self.lesions: LesionField | None = None
        if spec.lesions or spec.mimics:
            from hw_sim.lesions import LesionField  # lesions builds on this module's hashing

            self.lesions = LesionField(spec, self._pieces)

    # ---- layers shared by pixels and nucleus centres

    def _piece_mask_grid(self, xs: F64, ys: F64) -> F32:
        mask = np.zeros((ys.size, xs.size), np.float32)
        hit = [
            p
            for p in self._pieces
            if xs[0] - p.reach < p.cx < xs[-1] + p.reach and ys[0] - p.reach < p.cy < ys[-1] + p.reach
        ]
        if not hit:
            return mask
        pert = _fbm_grid(self._k["edge"], xs, ys, self._edge_scale, 2) - np.float32(0.5)
        for p in hit:
            # Restrict the work to the rows/cols the piece can reach.
            c0, c1 = np.searchsorted(xs, [p.cx - p.reach, p.cx + p.reach])
            r0, r1 = np.searchsorted(ys, [p.cy - p.reach, p.cy + p.reach])
            if c0 >= c1 or r0 >= r1:
                continue
            dx = (xs[c0:c1] - p.cx)[None, :]
            dy = (ys[r0:r1] - p.cy)[:, None]
            u = (dx * p.cos + dy * p.sin) / p.a
            v = (dy * p.cos - dx * p.sin) / p.b
            d = np.sqrt(u * u + v * v).astype(np.float32)
            sd = (np.float32(1.0) + np.float32(0.5) * pert[r0:r1, c0:c1] - d) * np.float32(min(p.a, p.b))
            m = _smoothstep(-3.0, 3.0, sd).astype(np.float32)  # ~6 µm soft tissue edge
            np.maximum(mask[r0:r1, c0:c1], m, out=mask[r0:r1, c0:c1])
        return mask

    def _piece_mask_pts(self, x: F64, y: F64) -> F64:
        mask = np.zeros(x.shape, np.float64)
        pert = _fbm_pts(self._k["edge"], x, y, self._edge_scale, 2) - 0.5
        for p in self._pieces:
            dx, dy = x - p.cx, y - p.cy
            u = (dx * p.cos + dy * p.sin) / p.a
            v = (dy * p.cos - dx * p.sin) / p.b
            sd = (1.0 + 0.5 * pert - np.sqrt(u * u + v * v)) * min(p.a, p.b)
            mask = np.maximum(mask, _smoothstep(-3.0, 3.0, sd))
        return mask

    def _holes_grid(self, xs: F64, ys: F64) -> F32:
        return _smoothstep(0.64, 0.72, _fbm_grid(self._k["hole"], xs, ys, 45.0, 2)).astype(np.float32)

    def _holes_pts(self, x: F64, y: F64) -> F64:
        return _smoothstep(0.64, 0.72, _fbm_pts(self._k["hole"], x, y, 45.0, 2))

    # ---- artifacts

    def _artifact_layers(self, xs: F64, ys: F64) -> tuple[F32 | None, F32 | None, F32]:
        """Over the grid ys x xs: a gain on the tissue density (folds double it, bubbles wash it
        out; or None), extra optical density per channel (h, w, 3, or None), and the artifact
        coverage mask in [0, 1]."""
        h, w = ys.size, xs.size
        fold: F32 | None = None
        extra: F32 | None = None
        mask = np.zeros((h, w), np.float32)
        for a in self.artifacts:
            found = reach_window(xs, ys, a.cx, a.cy, a.reach)
            if found is None:
                continue
            win, sx, sy = found
            if a.kind in ("ink", "fold"):
                d = _segment_distance(a, sx, sy)
                m = _smoothstep(a.width + 3.0, a.width - 3.0, d).astype(np.float32)
                if a.kind == "fold":
                    fold = np.ones((h, w), np.float32) if fold is None else fold
                    fold[win] *= np.float32(1.0) + m
                    # Label only where there is tissue to fold.
                    m = m * (self._piece_mask_grid(sx, sy) > 0.5)
                else:
                    extra = np.zeros((h, w, 3), np.float32) if extra is None else extra
                    fbm = _fbm_grid(self._k["art"] + a.index, sx, sy, 25.0, 2)
                    texture = np.float32(0.7) + np.float32(0.6) * fbm
                    colour = _INK_COLOURS[a.index % len(_INK_COLOURS)]
                    strength = np.float32(0.5 + 0.7 * _hash_scalar(self._k["art"], a.index, 17))
                    for c in range(3):
                        extra[win][..., c] += m * texture * strength * np.float32(colour[c])
            elif a.kind == "bubble":
                dx = sx[None, :] - a.cx
                dy = sy[:, None] - a.cy
                d = np.sqrt(dx * dx + dy * dy).astype(np.float32)
                rim = np.float32(0.75) * np.exp(-(((d - a.radius) / a.width) ** 2))
                rim += np.float32(0.15) * np.exp(-(((d - 0.85 * a.radius) / a.width) ** 2))
                m = _smoothstep(a.radius + a.width, a.radius - a.width, d).astype(np.float32)
                extra = np.zeros((h, w, 3), np.float32) if extra is None else extra
                # Inside an air bubble the tissue lacks mountant: hazy, washed-out stain.
                extra[win] += (rim + np.float32(0.08) * m).astype(np.float32)[..., None]
                fold = np.ones((h, w), np.float32) if fold is None else fold
                fold[win] *= np.float32(1.0) - np.float32(0.5) * m
            else:  # dust
                px_, py_, pr, pod = _dust_specks(a, self.spec.seed)
                m = np.zeros((sy.size, sx.size), np.float32)
                speck_od = np.zeros((sy.size, sx.size), np.float32)
                for x, y, r, od in zip(px_, py_, pr, pod, strict=True):
                    d = np.sqrt((sx[None, :] - x) ** 2 + (sy[:, None] - y) ** 2).astype(np.float32)
                    s = _smoothstep(r + 0.6, r - 0.6, d).astype(np.float32)
                    np.maximum(m, s, out=m)
                    np.maximum(speck_od, s * np.float32(od), out=speck_od)
                extra = np.zeros((h, w, 3), np.float32) if extra is None else extra
                for c, tint in enumerate((1.0, 1.05, 1.15)):  # brownish grey
                    extra[win][..., c] += speck_od * np.float32(tint)
            np.maximum(mask[win], m, out=mask[win])
        return fold, extra, mask

    def artifact_fraction(
        self, x0_um: float, y0_um: float, height_px: int, width_px: int, pixel_size_um: float
    ) -> float:
        """Fraction of the region covered by artifacts (coverage > 0.5), sampled every ~1 µm
        (dust specks are a few µm across)."""
        if not self.artifacts:
            return 0.0
        step = max(pixel_size_um, 1.0)
        nx = max(1, round(width_px * pixel_size_um / step))
        ny = max(1, round(height_px * pixel_size_um / step))
        xs = x0_um + (np.arange(nx, dtype=np.float64) + 0.5) * (width_px * pixel_size_um / nx)
        ys = y0_um + (np.arange(ny, dtype=np.float64) + 0.5) * (height_px * pixel_size_um / ny)
        return float((self._artifact_layers(xs, ys)[2] > 0.5).mean())

    # ---- public API

    def transmittance(
        self, x0_um: float, y0_um: float, height_px: int, width_px: int, pixel_size_um: float
    ) -> F32:
        """Transmittance in [0, 1], float32 (height, width, RGB) of the region with top-left at (x0, y0)."""
        if height_px <= 0 or width_px <= 0 or pixel_size_um <= 0:
            raise ValueError(f"bad region {height_px}x{width_px} px at {pixel_size_um} µm/px")
        px = float(pixel_size_um)
        xs = x0_um + (np.arange(width_px, dtype=np.float64) + 0.5) * px
        ys = y0_um + (np.arange(height_px, dtype=np.float64) + 0.5) * px
        density = self._piece_mask_grid(xs, ys)
        fold, extra, _ = self._artifact_layers(xs, ys) if self.artifacts else (None, None, None)
        od_h = np.zeros((height_px, width_px), np.float32)
        od_e = np.zeros((height_px, width_px), np.float32)
        if density.any():
            density *= np.float32(1.0) - self._holes_grid(xs, ys)
            if fold is not None:  # a fold is a second layer of the same tissue: twice the stain
                density *= fold
            les = self.lesions.layers(xs, ys) if self.lesions is not None else None
            if les is not None:
                density *= np.float32(1.0) - les.lumen  # gland lumens are empty
            od_e = self._eosin(xs, ys, density)
            if les is not None:
                od_e = self._lesion_eosin(xs, ys, density, od_e, les)
            nuclei = self._nuclei_canvas(x0_um, y0_um, height_px, width_px, px)
            chrom = _fbm_grid(self._k["chrom"], xs, ys, 0.9, 2)
            od_h = np.float32(0.04) * density + np.minimum(nuclei, np.float32(1.6)) * (
                np.float32(0.45) + np.float32(1.1) * chrom
            )
            if les is not None:  # a myxoid lesion stroma's bluish ground (0 elsewhere: same bytes)
                od_h = od_h + les.stroma * les.stroma_blue * density
            od_h *= np.float32(self.spec.h_strength)
            od_e *= np.float32(self.spec.e_strength)
        out = np.empty((height_px, width_px, 3), np.float32)
        ln10 = np.float32(math.log(10.0))
        for c in range(3):
            od = od_h * self._h[c] + od_e * self._e[c] + np.float32(self.spec.glass_od)
            if extra is not None:
                od = od + extra[..., c]
            np.exp(-ln10 * od, out=out[..., c])
        return out

    def tissue_fraction(
        self, x0_um: float, y0_um: float, height_px: int, width_px: int, pixel_size_um: float
    ) -> float:
        """Fraction of the region covered by tissue (mask > 0.5), sampled every ~2 µm."""
        step = max(pixel_size_um, 2.0)
        nx = max(1, round(width_px * pixel_size_um / step))
        ny = max(1, round(height_px * pixel_size_um / step))
        xs = x0_um + (np.arange(nx, dtype=np.float64) + 0.5) * (width_px * pixel_size_um / nx)
        ys = y0_um + (np.arange(ny, dtype=np.float64) + 0.5) * (height_px * pixel_size_um / ny)
        d = self._piece_mask_grid(xs, ys)
        if d.any():
            d *= np.float32(1.0) - self._holes_grid(xs, ys)
        return float((d > 0.5).mean())

    def focus_z_um(self, x_um: float, y_um: float) -> float:
        """True z (µm) of the in-focus plane at a slide point: tilted, smoothly warped."""
        s = self.spec
        cx = s.origin_x_um + s.width_um / 2
        cy = s.origin_y_um + s.height_um / 2
        dx, dy = x_um - cx, y_um - cy
        k = 2 * math.pi / s.warp_period_um
        p = self._focus_phase
        cd, sd = math.cos(self._focus_dir), math.sin(self._focus_dir)
        warp = 0.6 * math.sin(k * dx + p[0]) * math.cos(0.77 * k * dy + p[1]) + 0.4 * math.sin(
            1.31 * k * (dx * cd + dy * sd) + p[2]
        )
        return s.base_z_um + (s.tilt_x_um_per_mm * dx + s.tilt_y_um_per_mm * dy) / 1000.0 + s.warp_um * warp

    # ---- layers

    def _eosin(self, xs: F64, ys: F64, density: F32) -> F32:
        """Stroma: wavy, broken collagen fibres in two families blended by a slow field.

        Two incommensurate periods per family, a two-scale domain warp and a
        fine multiplicative noise keep the fibres from looking like stripes.
        """
        warp = (_fbm_grid(self._k["warp"], xs, ys, 35.0, 3) - np.float32(0.5)) * np.float32(16.0)
        blend = _smoothstep(0.35, 0.65, _fbm_grid(self._k["fibw"], xs, ys, 90.0, 1))
        fib = np.zeros_like(warp)
        for i, (c, s) in enumerate(self._fib_dirs):
            f = np.ones_like(warp)
            for lam in (3.7, 6.1):
                # Reduce the projection modulo the period per axis: float32 then keeps the phase exact.
                px = np.mod(xs * c, lam).astype(np.float32)
                py = np.mod(ys * s, lam).astype(np.float32)
                phase = (px[None, :] + py[:, None] + warp) * np.float32(2 * math.pi / lam)
                f *= np.float32(0.5) + np.float32(0.5) * np.sin(phase)
            fib += f * (blend if i == 0 else np.float32(1.0) - blend)
        breaks = _smoothstep(0.3, 0.7, _fbm_grid(self._k["fibf"], xs, ys, 4.0, 2))
        cell = _smoothstep(0.35, 0.75, _fbm_grid(self._k["cell"], xs, ys, 120.0, 2))
        var = _fbm_grid(self._k["eos"], xs, ys, 15.0, 2)
        e = (
            np.float32(0.08)
            + np.float32(0.10) * var
            + np.float32(0.45) * np.sqrt(fib) * breaks * (np.float32(1.0) - np.float32(0.4) * cell)
        )
        return np.asarray(e * density, dtype=np.float32)

    def _normal_nuclei(self, x0: float, y0: float, x1: float, y1: float) -> tuple[F64, F64, F64, F64, F32, F64]:
        """The benign tissue's nuclei with centres in (x0, x1) x (y0, y1): cx, cy, a, b, amp, theta.

        Where a lesion or mimic lies, its own nuclei (hw_sim.lesions) replace these.
        """
        bx = np.arange(math.floor(x0 / _BLOCK_UM), math.floor(x1 / _BLOCK_UM) + 1)
        by = np.arange(math.floor(y0 / _BLOCK_UM), math.floor(y1 / _BLOCK_UM) + 1)
        mbx, mby = np.meshgrid(bx, by)
        gbx = np.repeat(mbx.ravel(), _SLOTS)
        gby = np.repeat(mby.ravel(), _SLOTS)
        slot = gbx * _SLOTS + np.tile(np.arange(_SLOTS), gbx.size // _SLOTS)

        k = self._k["nuc"]

        def u(i: int) -> F64:
            return _hash01(k + i, slot, gby)

        cx = (gbx + u(0)) * _BLOCK_UM
        cy = (gby + u(1)) * _BLOCK_UM
        near = (cx > x0) & (cx < x1) & (cy > y0) & (cy < y1)
        cell = _smoothstep(0.35, 0.75, _fbm_pts(self._k["cell"], cx[near], cy[near], 120.0, 2))
        tissue = self._piece_mask_pts(cx[near], cy[near]) * (1.0 - self._holes_pts(cx[near], cy[near]))
        p_exist = np.where(tissue > 0.5, 0.1 + 0.6 * cell, 0.0)
        des = np.zeros(cx[near].shape)
        if self.lesions is not None:
            _, epi, lumen, mimic = self.lesions.membership_pts(cx[near], cy[near])
            # A lesion's desmoplastic stroma holds a few more fibroblasts (none added in mimics).
            des = self.lesions.stroma_pts(cx[near], cy[near]) * (1.0 - mimic)
            p_exist = p_exist * (1.0 - epi) * (1.0 - lumen) * (1.0 - mimic) + np.where(tissue > 0.5, 0.2 * des, 0.0)
        keep = np.flatnonzero(near)[u(2)[near] < p_exist]
        if keep.size == 0:
            e = np.zeros(0, np.float64)
            return e, e, e, e, e.astype(np.float32), e
        at = np.searchsorted(np.flatnonzero(near), keep)
        cell_k, des_k = cell[at], des[at]
        cx, cy = cx[keep], cy[keep]
        us = [u(i)[keep] for i in range(3, 8)]
        # Round nuclei in cellular regions, spindle-shaped ones in stroma; in a lesion's
        # desmoplastic stroma the spindles are plumper and darker (activated fibroblasts).
        round_ = us[0] < cell_k
        a = np.where(round_, 2.4 + 1.2 * us[1], 3.2 + 1.8 * us[1])
        b = np.where(round_, a * (0.75 + 0.25 * us[2]), (1.1 + 0.8 * us[2]) * (1.0 + 0.5 * des_k))
        amp = np.where(round_, 0.75 + 0.35 * us[3], (0.85 + 0.35 * us[3]) * (1.0 + 0.15 * des_k)).astype(np.float32)
        th = us[4] * math.pi
        return cx, cy, a, b, amp, th

    def _lesion_nuclei(self, x0: float, y0: float, x1: float, y1: float) -> dict[str, F64]:
        """The lesions' and mimics' nuclei with centres in [x0, x1) x [y0, y1) and on tissue."""
        assert self.lesions is not None
        n = self.lesions.nuclei(x0, y0, x1, y1)
        if n["cx"].size:
            tissue = self._piece_mask_pts(n["cx"], n["cy"]) * (1.0 - self._holes_pts(n["cx"], n["cy"]))
            on = tissue > 0.5
            n = {name: v[on] for name, v in n.items()}
        return n

    def nuclei(self, x0_um: float, y0_um: float, x1_um: float, y1_um: float) -> tuple[F64, F64, npt.NDArray[np.bool_]]:
        """Centres (x, y in slide µm) of every nucleus in [x0, x1) x [y0, y1), and whether each is a
        tumour nucleus: the nucleus truth that the rendered pixels show."""
        cx, cy, *_ = self._normal_nuclei(x0_um - 1.0, y0_um - 1.0, x1_um + 1.0, y1_um + 1.0)
        sel = (cx >= x0_um) & (cx < x1_um) & (cy >= y0_um) & (cy < y1_um)
        xs, ys, tum = [cx[sel]], [cy[sel]], [np.zeros(int(sel.sum()), bool)]
        if self.lesions is not None:
            n = self._lesion_nuclei(x0_um, y0_um, x1_um, y1_um)
            xs.append(n["cx"])
            ys.append(n["cy"])
            tum.append(n["tumour"] > 0.5)
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(tum)

    def _nuclei_canvas(self, x0: float, y0: float, h: int, w: int, px: float) -> F32:
        """Sum of nucleus profiles (hematoxylin amount) over the region."""
        reach = _NUC_MAX_AXIS_UM * (1 + _NUC_EDGE)
        x1, y1 = x0 + w * px, y0 + h * px
        canvas = np.zeros((h, w), np.float32)
        cx, cy, a, b, amp, th = self._normal_nuclei(x0 - reach, y0 - reach, x1 + reach, y1 + reach)
        if cx.size:
            _draw_nuclei(canvas, x0, y0, px, math.ceil(reach / px) + 1, cx, cy, a, b, amp, th)
        if self.lesions is not None:
            from hw_sim.lesions import tumour_max_axis_um

            lreach = tumour_max_axis_um(self.spec.vesicular_max) * (1 + _NUC_EDGE)
            n = self._lesion_nuclei(x0 - lreach, y0 - lreach, x1 + lreach, y1 + lreach)
            if n["cx"].size:
                ves = n["vesicular"] if self.spec.vesicular_max > 0 else None
                _draw_nuclei(canvas, x0, y0, px, math.ceil(lreach / px) + 1, n["cx"], n["cy"], n["a"], n["b"],
                             n["amp"].astype(np.float32), n["theta"], n["lobe"], n["lobe_phase"],
                             ves, n["nucleolus"] if ves is not None else None)
        return canvas

    def _lesion_eosin(self, xs: F64, ys: F64, density: F32, od_e: F32, les: LesionLayers) -> F32:
        """Eosin inside lesions: homogeneous cytoplasm replaces the collagen pattern in tumour
        epithelium; in the lesion's stroma (``les.stroma``) short haphazard fibres on a homogeneous
        ground replace the long wavy ones; lymphoid aggregates have scant cytoplasm."""
        if les.stroma.any():
            # Thin ridges of a ~5 µm noise: short curved fibres in every direction.
            ridge = _smoothstep(0.70, 0.92, np.float32(1.0) - np.abs(
                np.float32(2.0) * _fbm_grid(self._k["eos"] + 53, xs, ys, 5.0, 2) - np.float32(1.0)))
            var = _fbm_grid(self._k["eos"] + 59, xs, ys, 12.0, 2)
            fibres = les.stroma_fibres * (ridge.astype(np.float32) - np.float32(0.3))
            desmo = les.stroma_ground * (np.float32(0.8) + np.float32(0.3) * var + fibres)
            od_e = od_e * (np.float32(1.0) - les.stroma) + np.maximum(desmo, np.float32(0.0)) * density * les.stroma
        var = _fbm_grid(self._k["eos"] + 31, xs, ys, 8.0, 2)
        cyto = (np.float32(0.17) + np.float32(0.12) * var) * density
        out = od_e * (np.float32(1.0) - les.epi) + cyto * les.epi
        return np.asarray(out * (np.float32(1.0) - np.float32(0.5) * les.mimic_lymphoid), np.float32)


def _draw_nuclei(
    canvas: F32, x0: float, y0: float, px: float, half: int,
    cx: F64, cy: F64, a: F64, b: F64, amp: F32, th: F64,
    lobe: F64 | None = None, lobe_phase: F64 | None = None,
    vesicular: F64 | None = None, nucleolus: F64 | None = None,
) -> None:
    """Add nucleus profiles to ``canvas`` (top-left pixel edge at slide (x0, y0)); ``lobe``: the
    depth of a three-lobed outline (pleomorphic tumour nuclei), none if omitted. ``vesicular``:
    per nucleus in [0, 1], how far the profile goes from solid (0) to vesicular (1: a pale interior,
    a thin dark chromatin rim and a nucleolus); ``nucleolus``: (n, 2) its offset from the centre
    in units of the semi-axes (along a, along b). Omitted: every nucleus solid."""
    h, w = canvas.shape
    cs, sn = np.cos(th), np.sin(th)
    size = 2 * half + 1
    jc = np.floor((cx - x0) / px).astype(np.int64) - half  # patch origin (pixel index)
    ic = np.floor((cy - y0) / px).astype(np.int64) - half
    off = np.arange(size, dtype=np.float64)
    # Pixel centres in the same formula as the grid, so values don't depend on the region.
    gx = x0 + (jc[:, None] + off[None, :] + 0.5) * px - cx[:, None]  # (n, size)
    gy = y0 + (ic[:, None] + off[None, :] + 0.5) * px - cy[:, None]
    dx = gx[:, None, :]
    dy = gy[:, :, None]
    uu = (dx * cs[:, None, None] + dy * sn[:, None, None]) / a[:, None, None]
    vv = (dy * cs[:, None, None] - dx * sn[:, None, None]) / b[:, None, None]
    r = np.sqrt(uu * uu + vv * vv).astype(np.float32)
    if lobe is not None and lobe_phase is not None:
        ang = np.arctan2(vv, uu)
        r = (r / (1.0 + lobe[:, None, None] * np.cos(3.0 * ang + lobe_phase[:, None, None]))).astype(np.float32)
    edge = _smoothstep(1.0 + _NUC_EDGE, 1.0 - _NUC_EDGE, r)
    if vesicular is None or nucleolus is None:
        prof = edge * (np.float32(1.0) + np.float32(0.35) * _smoothstep(0.5, 0.95, r))  # darker nuclear rim
    else:
        # Vesicular: chromatin pushed to the nuclear membrane (a rim that narrows and darkens with
        # v), a pale interior, and a nucleolus of ~0.7 µm radius off the centre.
        v = vesicular.astype(np.float32)[:, None, None]
        lo = np.float32(0.5) + np.float32(0.3) * v  # the rim's inner edge moves out as it narrows
        rim = _smooth(np.clip((r - lo) / (np.float32(0.95) - lo), 0.0, 1.0))
        prof = edge * (np.float32(1.0) - np.float32(0.7) * v + (np.float32(0.35) + np.float32(0.9) * v) * rim)
        du = uu - nucleolus[:, 0, None, None] * 0.45
        dv = vv - nucleolus[:, 1, None, None] * 0.45
        d2 = (du * a[:, None, None]) ** 2 + (dv * b[:, None, None]) ** 2  # µm², nucleus frame
        prof += (np.float32(1.3) * v * np.exp(-d2 / (2 * 0.7**2))).astype(np.float32) * edge
    prof *= amp[:, None, None]
    for n in range(cx.size):
        i0, j0 = int(ic[n]), int(jc[n])
        ri0, rj0 = max(i0, 0), max(j0, 0)
        ri1, rj1 = min(i0 + size, h), min(j0 + size, w)
        if ri0 < ri1 and rj0 < rj1:
            canvas[ri0:ri1, rj0:rj1] += prof[n, ri0 - i0 : ri1 - i0, rj0 - j0 : rj1 - j0]

_SALTS = {
    "edge": _S_EDGE,
    "hole": _S_HOLE,
    "cell": _S_CELL,
    "warp": _S_WARP,
    "fibw": _S_FIBW,
    "fibf": _S_FIBF,
    "eos": _S_EOS,
    "chrom": _S_CHROM,
    "nuc": _S_NUC,
    "focus": _S_FOCUS,
    "art": _S_ARTN,
}
