"""Tumour in the synthetic slide: carcinoma lesions and the benign look-alikes that make them hard.

A :class:`~hw_sim.slide.SlideSpec` with ``lesions = N`` carries N tumour lesions, laid out by hash
like everything else on the slide (a pure function of the seed, so any region renders alone);
``mimics = M`` adds M benign crowded regions that are *not* tumour. Where a lesion lies, the
tissue changes the way carcinoma differs from benign tissue:

- nuclei are crowded (a jittered lattice of ~6.5 µm instead of sparse hashed slots), enlarged
  (semi-axes ~3-6 µm instead of 2.4-3.6), pleomorphic (size, eccentricity and an irregular,
  three-lobed outline vary with the lesion's ``grade``) and hyperchromatic (more haematoxylin);
- they sit in epithelial sheets whose architecture is the lesion's ``pattern``: ``solid``
  sheets, ``nests`` (islands of cells) or ``glands`` (rings of cells around empty lumens);
- inside the sheets the wavy collagen of normal stroma gives way to homogeneous cytoplasm;
- between the islands and rings lies *desmoplastic* stroma (:meth:`LesionField.layers`'
  ``stroma``: the lesion's membership minus its epithelium and lumens, with the membership's
  soft edge), which the truth polygon counts as lesion -- about 46% of a nests lesion's truth and
  34-38% of a glands lesion's at every depth from its edge. The normal stroma pattern is lost
  there: the two families of long wavy fibres give way to short haphazard fibres on a homogeneous
  collagen ground, the spindle nuclei are plumper and a little more numerous (activated
  fibroblasts), and the ground may be bluish (myxoid). How much of it shows varies per lesion
  (its own hash stream): a strength from faint to full, a ground paler or denser than the
  slide's stroma, more or fewer fibres, so no single colour marks it. Until stop 26 the ordinary
  stroma showed through unchanged, and the outlines of nests read 3-4 µm inside the truth.

The hard cases are a continuum, not a switch: lesion diameters are log-uniform from
``lesion_min_um`` (~50 µm, a few dozen cells) to ``lesion_max_um`` (several mm, capped by the
tissue piece); ``grade`` from 0.25 (nuclei barely larger than normal) to 1; centres are drawn
over the whole piece, so about a quarter of the lesions reach the tissue edge and are cut by
it; and mimics are ``lymphoid`` aggregates (small, dark, densely packed, uniform nuclei) or
``hyperplasia`` (crowded epithelium of normal-sized, regular nuclei). Three in five hyperplasia
mimics lie in the same kind of altered stroma (sclerosis, as in sclerosing adenosis, drawn by the
same rule over the whole mimic), so an altered stroma alone does not mark tumour.

Lesion outlines are star-shaped: ``r(theta)`` is a mean radius times a few random harmonics and a
periodic fine noise, so the same function renders the pixels and gives the truth polygon
(:meth:`Lesion.outline`) exactly. Lesions and mimics never overlap one another.

**Seeds.** Slide seeds ``HELD_OUT_SEEDS`` (900000-999999) are reserved for figures and
benchmarks: no training set may draw from them (:func:`check_training_seed`). Training and
development use seeds below 900000.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from hw_sim.slide import (
    SlideSpec,
    _fbm_grid,
    _fbm_pts,
    _hash01,
    _hash_scalar,
    _key,
    _Piece,
    _smoothstep,
    reach_window,
)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
B = npt.NDArray[np.bool_]

HELD_OUT_SEEDS: Final = range(900_000, 1_000_000)
"""Slide seeds kept for figures and benchmarks; never train on them."""

TUMOUR_PATTERNS: Final = ("solid", "nests", "glands")
MIMIC_KINDS: Final = ("lymphoid", "hyperplasia")

# Salts of the lesion hash streams (the slide's own use 1-13).
_S_LES, _S_LSHAPE, _S_TNUC, _S_MNUC, _S_PAT, _S_DES, _S_VES = 20, 21, 22, 23, 24, 25, 26

TUMOUR_MAX_AXIS_UM: Final = 6.5
"""Largest hyperchromatic tumour nucleus semi-axis (with its lobed outline); bounds the render reach."""
_VES_SIZE = 0.6  # a fully vesicular lesion's nuclei are this much larger (and spaced this much wider)
_EDGE_UM = 2.0  # soft lesion boundary half-width: the outline is a sharp tissue change, not a blur
_GLAND_UM = 30.0  # noise scale of the glands: lumens of ~20-40 µm
_N_NOISE = 32  # lattice points of the periodic outline noise around the lesion


def tumour_max_axis_um(vesicular_max: float) -> float:
    """Largest tumour nucleus semi-axis on a slide whose lesions are at most ``vesicular_max``
    vesicular (:attr:`hw_sim.slide.SlideSpec.vesicular_max`)."""
    return TUMOUR_MAX_AXIS_UM * (1.0 + _VES_SIZE * vesicular_max)


def check_training_seed(seed: int) -> int:
    """``seed`` if a training set may use it; ValueError naming the held-out range otherwise."""
    if seed in HELD_OUT_SEEDS:
        raise ValueError(
            f"slide seed {seed} is held out for figures and benchmarks "
            f"({HELD_OUT_SEEDS.start}-{HELD_OUT_SEEDS.stop - 1}); train on seeds below {HELD_OUT_SEEDS.start}"
        )
    return seed


@dataclass(frozen=True)
class Lesion:
    """One tumour lesion (``tumour``) or benign mimic, star-shaped around (cx, cy) in slide µm."""

    index: int
    tumour: bool
    pattern: str  # TUMOUR_PATTERNS for tumour, MIMIC_KINDS for mimics
    cx: float
    cy: float
    radius: float  # mean radius, µm
    grade: float  # atypia in [0, 1]: nuclear size, spread and darkness (tumour only)
    harmonics: tuple[tuple[float, float], ...]  # (relative amplitude, phase) of orders 2, 3, ...
    noise: tuple[float, ...]  # periodic outline noise, _N_NOISE values in [-1, 1]
    noise_amp: float
    vesicular: float = 0.0  # nuclear look in [0, 1]: 0 hyperchromatic, 1 vesicular (tumour only)

    @property
    def reach(self) -> float:
        """Radius beyond which the lesion cannot extend."""
        return self.radius * (1.0 + sum(a for a, _ in self.harmonics) + self.noise_amp) + _EDGE_UM

    def boundary(self, theta: F64) -> F64:
        """Outline radius (µm) at polar angles ``theta`` around the centre."""
        r = np.ones_like(theta)
        for k, (amp, phase) in enumerate(self.harmonics, start=2):
            r += amp * np.cos(k * theta + phase)
        u = np.mod(theta, 2 * math.pi) * (_N_NOISE / (2 * math.pi))
        i0 = np.floor(u).astype(np.int64)
        s = u - i0
        s = s * s * (3 - 2 * s)
        lat = np.asarray(self.noise)
        r += self.noise_amp * (lat[i0 % _N_NOISE] * (1 - s) + lat[(i0 + 1) % _N_NOISE] * s)
        return np.asarray(self.radius * r, np.float64)

    def weight(self, dx: F64, dy: F64) -> F64:
        """Membership in [0, 1] at offsets (dx, dy) from the centre (a soft edge of 2 x _EDGE_UM)."""
        d = np.sqrt(dx * dx + dy * dy)
        rb = self.boundary(np.arctan2(dy, dx))
        return np.asarray(_smoothstep(_EDGE_UM, -_EDGE_UM, d - rb), np.float64)

    def outline(self, vertices: int = 0) -> F64:
        """The outline as an (n, 2) array of slide µm (x, y) in increasing theta; ``vertices`` 0:
        about one vertex per 2 µm of perimeter (at least 64)."""
        n = vertices or int(np.clip(2 * math.pi * self.radius / 2.0, 64, 4096))
        theta = np.arange(n, dtype=np.float64) * (2 * math.pi / n)
        r = self.boundary(theta)
        return np.stack([self.cx + r * np.cos(theta), self.cy + r * np.sin(theta)], axis=1)


def lesion_layout(spec: SlideSpec, pieces: list[_Piece]) -> list[Lesion]:
    """``spec.lesions`` tumour lesions then ``spec.mimics`` mimics, placed inside tissue pieces.

    Each is drawn from its own hash stream (index ``i``); a candidate overlapping an earlier one
    is redrawn at another place (up to 64 tries, shrinking after every 16), so lesions stay
    separate objects with one truth polygon each. Raises ValueError if they cannot be placed.
    """
    key = _key(spec.seed, _S_LES)
    shape_key = _key(spec.seed, _S_LSHAPE)
    out: list[Lesion] = []
    total = spec.lesions + spec.mimics
    for i in range(total):
        tumour = i < spec.lesions
        u = [_hash_scalar(key, i, k) for k in range(8)]
        piece = pieces[int(u[0] * len(pieces)) % len(pieces)]
        minor = min(piece.a, piece.b)
        if tumour:
            lo = spec.lesion_min_um
            hi = max(lo, min(spec.lesion_max_um, 1.2 * minor))
            pattern = TUMOUR_PATTERNS[int(u[2] * len(TUMOUR_PATTERNS)) % len(TUMOUR_PATTERNS)]
            grade = 0.25 + 0.75 * u[3]
            vesicular = spec.vesicular_max * _hash_scalar(_key(spec.seed, _S_VES), i, 0)
        else:
            lo = 60.0
            hi = max(lo, min(800.0, 1.2 * minor))
            pattern = MIMIC_KINDS[int(u[2] * len(MIMIC_KINDS)) % len(MIMIC_KINDS)]
            grade = 0.0
            vesicular = 0.0
        diameter = math.exp(math.log(lo) + u[1] * (math.log(hi) - math.log(lo)))
        harmonics = tuple(
            (0.16 * _hash_scalar(shape_key, i, 10 + k) / k, 2 * math.pi * _hash_scalar(shape_key, i, 20 + k))
            for k in range(2, 6)
        )
        noise = tuple(2 * _hash_scalar(shape_key, i, 100 + k) - 1 for k in range(_N_NOISE))
        placed = None
        for attempt in range(64):
            v = [_hash_scalar(key, i, 100 + 2 * attempt + k) for k in range(2)]
            radius = diameter / 2 * 0.7 ** (attempt // 16)
            # Centre anywhere in the piece's ellipse (area-uniform): some lesions reach its edge.
            rho, phi = math.sqrt(v[0]), 2 * math.pi * v[1]
            ex, ey = rho * piece.a * math.cos(phi), rho * piece.b * math.sin(phi)
            cand = Lesion(
                index=i,
                tumour=tumour,
                pattern=pattern,
                cx=piece.cx + ex * piece.cos - ey * piece.sin,
                cy=piece.cy + ex * piece.sin + ey * piece.cos,
                radius=radius,
                grade=grade,
                harmonics=harmonics,
                noise=noise,
                noise_amp=0.05,
                vesicular=vesicular,
            )
            if all(math.hypot(cand.cx - o.cx, cand.cy - o.cy) > cand.reach + o.reach + 20.0 for o in out):
                placed = cand
                break
        if placed is None:
            raise ValueError(
                f"cannot place {total} non-overlapping lesions and mimics on this slide "
                f"(placed {len(out)}); ask for fewer or lower lesion_max_um"
            )
        out.append(placed)
    return out


@dataclass(frozen=True)
class LesionLayers:
    """Per-pixel layers over a grid: tumour membership ``t``, tumour epithelium ``epi`` (<= t),
    gland lumens ``lumen`` (<= t, empty space) and benign mimic membership ``mimic``, all in [0, 1];
    ``mimic_lymphoid``: the part of ``mimic`` that is a lymphoid aggregate. ``stroma``: how much
    desmoplastic (or, in a mimic, sclerotic) stroma replaces the ordinary stroma, in [0, 1]
    (``t - epi - lumen`` times the lesion's strength; 0 outside lesions), and its look per pixel
    (the owning lesion's :class:`StromaLook` values; 0 where ``stroma`` is 0)."""

    t: F32
    epi: F32
    lumen: F32
    mimic: F32
    mimic_lymphoid: F32
    stroma: F32
    stroma_ground: F32
    stroma_fibres: F32
    stroma_blue: F32


@dataclass(frozen=True)
class StromaLook:
    """How a lesion's altered stroma looks (drawn from the lesion's own hash stream).

    ``strength`` 0: none (the ordinary stroma); ``ground``: eosin of the collagen ground per unit
    tissue density (the slide's ordinary stroma averages about 0.2, so some lesions are paler,
    others denser); ``fibres``: relative contrast of the short haphazard fibres; ``blue``: added
    haematoxylin of a myxoid ground (larger where the ground is pale)."""

    strength: float
    ground: float
    fibres: float
    blue: float


class LesionField:
    """The lesions of one slide: their pixel layers, their nuclei and their membership at points."""

    def __init__(self, spec: SlideSpec, pieces: list[_Piece]) -> None:
        self.spec = spec
        self.lesions = lesion_layout(spec, pieces)
        self._pat_key = _key(spec.seed, _S_PAT)
        self._tnuc_key = _key(spec.seed, _S_TNUC)
        self._mnuc_key = _key(spec.seed, _S_MNUC)
        self.stroma_looks = [self._stroma_look(les) for les in self.lesions]

    def _stroma_look(self, les: Lesion) -> StromaLook:
        u = [_hash_scalar(_key(self.spec.seed, _S_DES), les.index, k) for k in range(5)]
        if not les.tumour and (les.pattern != "hyperplasia" or u[4] >= 0.6):
            return StromaLook(0.0, 0.0, 0.0, 0.0)
        ground = 0.12 + 0.18 * u[1]
        return StromaLook(
            strength=0.35 + 0.65 * u[0],
            ground=ground,
            fibres=0.15 + 0.6 * u[2],
            blue=0.06 * u[3] * (0.30 - ground) / 0.18,
        )

    # ---- architecture

    def _pattern(self, les: Lesion, f_coarse: npt.NDArray[np.floating], f_fine: npt.NDArray[np.floating]) -> tuple[
        npt.NDArray[np.floating], npt.NDArray[np.floating]
    ]:
        """(epithelium, lumen) fractions in [0, 1] of a tumour from its two noise fields."""
        if les.pattern == "solid":
            return _smoothstep(0.30, 0.36, f_coarse), np.zeros_like(f_coarse)
        if les.pattern == "nests":
            return _smoothstep(0.45, 0.50, f_coarse), np.zeros_like(f_coarse)
        lumen = _smoothstep(0.64, 0.67, f_fine)  # glands: a ring of cells around each lumen
        return np.clip(_smoothstep(0.42, 0.46, f_fine) - lumen, 0.0, 1.0), lumen

    def _near(self, x0: float, y0: float, x1: float, y1: float) -> list[Lesion]:
        return [
            les
            for les in self.lesions
            if x0 - les.reach < les.cx < x1 + les.reach and y0 - les.reach < les.cy < y1 + les.reach
        ]

    def layers(self, xs: F64, ys: F64) -> LesionLayers | None:
        """The layers over the grid ys x xs (slide µm), or None where no lesion reaches it."""
        near = self._near(float(xs[0]), float(ys[0]), float(xs[-1]), float(ys[-1]))
        if not near:
            return None
        shape = (ys.size, xs.size)
        t, epi, lumen, mimic, lymph, st, ground, fibres, blue = (np.zeros(shape, np.float32) for _ in range(9))
        for les in near:
            found = reach_window(xs, ys, les.cx, les.cy, les.reach)
            if found is None:
                continue
            win, sx, sy = found
            w = les.weight(sx[None, :] - les.cx, sy[:, None] - les.cy).astype(np.float32)
            look = self.stroma_looks[les.index]
            if not les.tumour:
                np.maximum(mimic[win], w, out=mimic[win])
                if les.pattern == "lymphoid":
                    np.maximum(lymph[win], w, out=lymph[win])
                s = w
            else:
                k = self._pat_key + les.index * 7919
                e, lu = self._pattern(les, _fbm_grid(k, sx, sy, 45.0, 2), _fbm_grid(k + 1, sx, sy, _GLAND_UM, 2))
                np.maximum(t[win], w, out=t[win])
                np.maximum(epi[win], (w * e).astype(np.float32), out=epi[win])
                np.maximum(lumen[win], (w * lu).astype(np.float32), out=lumen[win])
                s = np.clip(w * (1.0 - e - lu), 0.0, 1.0).astype(np.float32)  # e + lu <= 1
            if look.strength > 0:
                s = (s * np.float32(look.strength)).astype(np.float32)
                on = s > 0  # lesions never overlap: each pixel has one owner
                np.maximum(st[win], s, out=st[win])
                for arr, v in ((ground, look.ground), (fibres, look.fibres), (blue, look.blue)):
                    arr[win][on] = np.float32(v)
        return LesionLayers(t, epi, lumen, mimic, lymph, st, ground, fibres, blue)

    def membership_pts(self, x: F64, y: F64) -> tuple[F64, F64, F64, F64]:
        """(t, epi, lumen, mimic) at scattered points, as :meth:`layers` at those points."""
        t, epi, lumen, mimic = (np.zeros(x.shape, np.float64) for _ in range(4))
        if x.size == 0:
            return t, epi, lumen, mimic
        for les in self._near(float(x.min()), float(y.min()), float(x.max()), float(y.max())):
            sel = np.flatnonzero((np.abs(x - les.cx) < les.reach) & (np.abs(y - les.cy) < les.reach))
            if sel.size == 0:
                continue
            w = les.weight(x[sel] - les.cx, y[sel] - les.cy)
            if not les.tumour:
                mimic[sel] = np.maximum(mimic[sel], w)
                continue
            k = self._pat_key + les.index * 7919
            e, lu = self._pattern(
                les, _fbm_pts(k, x[sel], y[sel], 45.0, 2), _fbm_pts(k + 1, x[sel], y[sel], _GLAND_UM, 2)
            )
            t[sel] = np.maximum(t[sel], w)
            epi[sel] = np.maximum(epi[sel], w * e)
            lumen[sel] = np.maximum(lumen[sel], w * lu)
        return t, epi, lumen, mimic

    def stroma_pts(self, x: F64, y: F64) -> F64:
        """The ``stroma`` layer of :meth:`layers` at scattered points."""
        out = np.zeros(x.shape, np.float64)
        if x.size == 0:
            return out
        for les in self._near(float(x.min()), float(y.min()), float(x.max()), float(y.max())):
            look = self.stroma_looks[les.index]
            if look.strength <= 0:
                continue
            sel = np.flatnonzero((np.abs(x - les.cx) < les.reach) & (np.abs(y - les.cy) < les.reach))
            if sel.size == 0:
                continue
            w = les.weight(x[sel] - les.cx, y[sel] - les.cy)
            if les.tumour:
                k = self._pat_key + les.index * 7919
                e, lu = self._pattern(
                    les, _fbm_pts(k, x[sel], y[sel], 45.0, 2), _fbm_pts(k + 1, x[sel], y[sel], _GLAND_UM, 2)
                )
                w = np.clip(w * (1.0 - np.asarray(e) - np.asarray(lu)), 0.0, 1.0)
            out[sel] = np.maximum(out[sel], look.strength * w)
        return out

    # ---- nuclei

    def nuclei(self, x0: float, y0: float, x1: float, y1: float) -> dict[str, F64]:
        """Tumour and mimic nuclei whose centres lie in [x0, x1) x [y0, y1) (before the tissue test,
        which the slide applies): arrays ``cx, cy, a, b, amp, theta, lobe, lobe_phase, tumour,
        vesicular`` and ``nucleolus`` (n x 2)."""
        parts: list[dict[str, F64]] = []
        for les in self._near(x0, y0, x1, y1):
            parts.append(self._lesion_nuclei(les, max(x0, les.cx - les.reach), max(y0, les.cy - les.reach),
                                             min(x1, les.cx + les.reach), min(y1, les.cy + les.reach)))
        if not parts:
            return self._empty()
        return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}

    def _lesion_nuclei(self, les: Lesion, x0: float, y0: float, x1: float, y1: float) -> dict[str, F64]:
        # A jittered lattice (one candidate per cell) packs nuclei densely without piling them up,
        # as cells in an epithelial sheet do; its spacing is what sets the crowding.
        if les.tumour:  # vesicular carcinoma cells are larger: the lattice widens with their nuclei
            cell, key = 6.5 * (1.0 + _VES_SIZE * les.vesicular), self._tnuc_key
        elif les.pattern == "lymphoid":
            cell, key = 4.2, self._mnuc_key
        else:
            cell, key = 6.0, self._mnuc_key + 1
        if x1 <= x0 or y1 <= y0:
            return self._empty()
        ix = np.arange(math.floor(x0 / cell), math.floor(x1 / cell) + 1, dtype=np.int64)
        iy = np.arange(math.floor(y0 / cell), math.floor(y1 / cell) + 1, dtype=np.int64)
        gx, gy = (g.ravel() for g in np.meshgrid(ix, iy))

        def u(i: int) -> F64:
            return _hash01(key + i * 104729, gx, gy)

        cx = (gx + 0.15 + 0.7 * u(0)) * cell
        cy = (gy + 0.15 + 0.7 * u(1)) * cell
        inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
        w = np.zeros(cx.shape)
        # Centres within the outline only (not its soft edge): the truth polygon then holds them all.
        w[inside] = les.weight(cx[inside] - les.cx, cy[inside] - les.cy) >= 0.5
        if les.tumour:
            kk = self._pat_key + les.index * 7919
            e, lu = self._pattern(les, _fbm_pts(kk, cx, cy, 45.0, 2), _fbm_pts(kk + 1, cx, cy, _GLAND_UM, 2))
            p = w * np.asarray(e) * 0.95 * (np.asarray(lu) < 0.5)
        else:
            p = w * 0.9
        keep = np.flatnonzero(inside & (u(2) < p))
        us = [u(i)[keep] for i in range(3, 9)]
        g = les.grade
        n = keep.size
        ves = np.zeros(n)
        nucleolus = np.zeros((n, 2))
        if les.tumour:
            # Enlarged and pleomorphic: the mean and the spread of the size grow with the grade.
            grow = 1.0 + _VES_SIZE * les.vesicular
            mean = (3.1 + 1.3 * g) * grow  # benign round nuclei: semi-axes 2.4-3.6 µm
            a = np.minimum(mean * (1.0 + (0.2 + 0.4 * g) * (us[0] - 0.5)), TUMOUR_MAX_AXIS_UM * grow / 1.15)
            b = a * (0.7 + 0.3 * us[1])
            # Hyperchromatic (normal round nuclei are 0.75-1.1); a vesicular nucleus's haematoxylin
            # sits in its rim and nucleolus, its interior pale.
            amp = (0.95 + 0.25 * g + 0.3 * g * us[2]) * (1.0 - 0.25 * les.vesicular)
            lobe = 0.15 * g * us[4]
            if les.vesicular > 0:  # its own stream: the hyperchromatic draws above stay as they were
                vk = _key(self.spec.seed, _S_VES) + les.index * 7919
                ves = les.vesicular * (0.7 + 0.3 * _hash01(vk, gx[keep], gy[keep]))
                ang = 2 * math.pi * _hash01(vk + 1, gx[keep], gy[keep])
                rad = np.sqrt(_hash01(vk + 2, gx[keep], gy[keep]))
                nucleolus = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
        elif les.pattern == "lymphoid":
            a = 1.7 + 0.5 * us[0]
            b = a * (0.85 + 0.15 * us[1])
            amp = 1.05 + 0.2 * us[2]
            lobe = np.zeros(n)
        else:
            a = 2.4 + 0.8 * us[0]
            b = a * (0.7 + 0.25 * us[1])
            amp = 0.8 + 0.3 * us[2]
            lobe = np.zeros(n)
        return {
            "cx": cx[keep],
            "cy": cy[keep],
            "a": np.asarray(a, np.float64),
            "b": np.asarray(b, np.float64),
            "amp": np.asarray(amp, np.float64),
            "theta": us[3] * math.pi,
            "lobe": np.asarray(lobe, np.float64),
            "lobe_phase": us[5] * 2 * math.pi,
            "tumour": np.full(n, 1.0 if les.tumour else 0.0),
            "vesicular": ves,
            "nucleolus": nucleolus,
        }

    @staticmethod
    def _empty() -> dict[str, F64]:
        names = ("cx", "cy", "a", "b", "amp", "theta", "lobe", "lobe_phase", "tumour", "vesicular")
        return {**{n: np.zeros(0, np.float64) for n in names}, "nucleolus": np.zeros((0, 2), np.float64)}
