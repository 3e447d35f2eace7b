"""Tile positions from pairwise measurements and the stage prior, solved online.

Unknowns are the tiles' top-left corners in mosaic pixels (y, x). Two kinds
of equations, each weighted by its inverse variance:

* a pair measurement ``p_b - p_a = d_ab`` (from registration, sigma ~0.01 px);
* the stage prior ``p_i = A c_i + t`` with ``c_i`` the commanded top-left,
  sigma = the stage's repeatability (~10 px). ``A`` (2 x 2) and ``t`` are the
  *stage model*: camera rotation against the stage axes and stage scale
  errors make the commanded grid a slightly rotated/stretched picture of where
  fields land. It is fitted to the tiles whose positions registration
  determined, so tiles that cannot be registered (glass) still land where
  the stage most likely put them, in the mosaic's frame.

The solve is a sliding window, not a path-summed tree: every tile that is
not final is an unknown, every measurement between window tiles or from a
window tile to a final one is an equation (final positions are constants), and
the weighted least-squares solution closes every loop through the window
(a tile registered to its left neighbour and to the tile above gets the
weighted mean of both, plus the prior). A tile becomes final when the caller
says so (the accumulator finalises after a bounded lag); its position never
changes after that, which is what lets its pixels be blended and written.

The system is separable in y and x (measurements have independent per-axis
variances) and small (the window is a few tiles), so it is solved densely;
the cost per tile is independent of the slide's size.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
Key = Hashable

__all__ = ["Link", "PositionSolver", "StageModel"]


@dataclass(frozen=True)
class Link:
    """A measured displacement ``p_b - p_a`` (dy, dx) with per-axis 1-sigma precision (px)."""

    a: Key
    b: Key
    shift: tuple[float, float]
    sigma: tuple[float, float]


class StageModel:
    """Commanded position -> mosaic position: ``p = A (c - c0) + t + c0``, fitted to registered tiles.

    ``c0`` is the first tile's commanded position (conditioning). The fit is
    regularised toward a similarity transform (a camera rotation and one
    scale: ``similarity_sigma``) and, more weakly, toward the identity
    (``identity_sigma``), so that the model is defined from the first tile
    on and a single row (which only sees the x axis) still gets a sensible y
    column; enough tiles in both directions override both.
    """

    def __init__(self, sigma_px: float, similarity_sigma: float = 0.002, identity_sigma: float = 0.01) -> None:
        self.sigma_px = float(sigma_px)
        # Normal equations for theta = (a, b, c, d, ty, tx) with A = [[a, b], [c, d]] in (y, x) order.
        self._ata = np.zeros((6, 6))
        self._atb = np.zeros(6)
        self._n = 0
        self._reg = np.zeros((6, 6))
        self._reg_rhs = np.zeros(6)
        for row in (np.array([1.0, 0, 0, -1, 0, 0]), np.array([0, 1.0, 1, 0, 0, 0])):
            self._reg += np.outer(row, row) / similarity_sigma**2
        self._reg += np.diag([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]) / identity_sigma**2
        self._reg_rhs[[0, 3]] = 1.0 / identity_sigma**2
        self._reg += np.diag([0, 0, 0, 0, 1.0, 1.0]) * 1e-8  # t = 0 until a tile says otherwise
        self._theta = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
        self._c0: F64 | None = None

    def add(self, commanded: tuple[float, float], position: tuple[float, float]) -> None:
        """Add one tile whose position registration determined."""
        c = np.asarray(commanded, dtype=np.float64)
        if self._c0 is None:
            self._c0 = c.copy()
        cy, cx = c - self._c0
        w = 1.0 / self.sigma_px**2
        rows = np.array([[cy, cx, 0, 0, 1, 0], [0, 0, cy, cx, 0, 1]], dtype=np.float64)
        rhs = np.asarray(position, dtype=np.float64) - self._c0
        self._ata += w * rows.T @ rows
        self._atb += w * rows.T @ rhs
        self._n += 1
        self._theta = np.linalg.solve(self._ata + self._reg, self._atb + self._reg_rhs)

    @property
    def tiles(self) -> int:
        return self._n

    @property
    def matrix(self) -> F64:
        """A, (y, x) order."""
        a, b, c, d = self._theta[:4]
        return np.array([[a, b], [c, d]])

    @property
    def translation(self) -> F64:
        return self._theta[4:].copy()

    def predict(self, commanded: tuple[float, float]) -> tuple[float, float]:
        c = np.asarray(commanded, dtype=np.float64)
        c0 = c if self._c0 is None else self._c0
        p = self.matrix @ (c - c0) + self.translation + c0
        return float(p[0]), float(p[1])

    def predict_many(self, commanded: F64) -> F64:
        """:meth:`predict` of each row of ``commanded`` ((n, 2), (y, x)) at once: (n, 2)."""
        c = np.asarray(commanded, dtype=np.float64).reshape(-1, 2)
        if self._c0 is None:
            return c.copy()  # no tile yet: the identity, as predict() gives
        a, b, cc, d = (float(v) for v in self._theta[:4])
        ty, tx = float(self._theta[4]), float(self._theta[5])
        dy, dx = c[:, 0] - self._c0[0], c[:, 1] - self._c0[1]
        return np.stack([a * dy + b * dx + ty + self._c0[0], cc * dy + d * dx + tx + self._c0[1]], axis=1)

    def displacement(self, commanded_a: tuple[float, float], commanded_b: tuple[float, float]) -> tuple[float, float]:
        d = self.matrix @ (np.asarray(commanded_b, dtype=np.float64) - np.asarray(commanded_a, dtype=np.float64))
        return float(d[0]), float(d[1])

    @property
    def rotation_deg(self) -> float:
        """The rotation part of A (how far the stage axes are turned in the camera's frame), degrees."""
        a, b, c, d = self._theta[:4]
        return math.degrees(math.atan2(c - b, a + d))

    @property
    def scale(self) -> tuple[float, float]:
        """Scale along the stage's y and x axes (1 = commanded steps are exact)."""
        m = self.matrix
        return float(np.hypot(m[0, 0], m[1, 0])), float(np.hypot(m[0, 1], m[1, 1]))


class PositionSolver:
    """Sliding-window weighted least squares over links and the stage prior.

    A link to a final tile is weighted by the link's variance *plus* that
    tile's: a tile that was finalised on its prior alone (glass, or content
    whose overlaps were too thin) is uncertain by the stage error, and a later
    link to it must not drag a well-registered tile off the registered chain
    -- it informs like a prior, no more. A final tile that was registered
    counts as exact: what is uncertain about it is the mosaic's frame (the
    mean stage error), which every tile tied to it shares, not an error that
    a neighbour could correct.

    It also tracks the connected components of the link graph: a tile is
    *grounded* when its component holds a final tile, i.e. registration ties
    it to pixels already in the mosaic. Only then is finalising it free of
    regret; an ungrounded tile with content is worth holding until a later
    neighbour can tie it in (the accumulator decides, under a memory cap).
    """

    def __init__(self, stage_sigma_px: float) -> None:
        if stage_sigma_px <= 0:
            raise ValueError(f"stage_sigma_px must be positive, got {stage_sigma_px}")
        self.stage_sigma_px = float(stage_sigma_px)
        self.model = StageModel(stage_sigma_px)
        self._parent: dict[Key, Key] = {}  # union-find over accepted links
        self._has_fixed: set[Key] = set()  # component roots that hold a final tile
        self._commanded: dict[Key, tuple[float, float]] = {}
        self._fixed: dict[Key, tuple[float, float]] = {}
        self._var: dict[Key, float] = {}  # of final tiles: 0 if registered, else the stage variance (px^2)
        self._pending: list[Key] = []
        self._estimate: dict[Key, tuple[float, float]] = {}
        self._links: list[Link] = []  # links touching at least one pending tile
        self._linked: set[Key] = set()  # tiles with at least one accepted link
        self._solved = False  # the estimates are solve()'s for the tiles, links and model as they are

    # ------------------------------------------------------------------ input

    def add_tile(self, key: Key, commanded: tuple[float, float]) -> None:
        """A new tile, not final, with its commanded top-left (mosaic px)."""
        if key in self._commanded:
            raise ValueError(f"tile {key!r} was already added")
        self._commanded[key] = (float(commanded[0]), float(commanded[1]))
        self._pending.append(key)
        self._estimate[key] = self.model.predict(commanded)
        self._parent[key] = key
        self._solved = False

    def add_link(self, link: Link) -> None:
        for k in (link.a, link.b):
            if k not in self._commanded:
                raise KeyError(f"link to unknown tile {k!r}")
        if link.a in self._fixed and link.b in self._fixed:
            return  # both final: nothing left to inform
        self._links.append(link)
        self._linked.update((link.a, link.b))
        self._solved = False
        ra, rb = self._root(link.a), self._root(link.b)
        if ra != rb:
            self._parent[ra] = rb
            if ra in self._has_fixed:
                self._has_fixed.discard(ra)
                self._has_fixed.add(rb)

    def _root(self, key: Key) -> Key:
        root = key
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[key] != root:  # path compression
            self._parent[key], key = root, self._parent[key]
        return root

    # ------------------------------------------------------------------ queries

    def commanded(self, key: Key) -> tuple[float, float]:
        return self._commanded[key]

    def position(self, key: Key) -> tuple[float, float]:
        """The current estimate (final once the tile is fixed)."""
        if key in self._fixed:
            return self._fixed[key]
        return self._estimate[key]

    def grounded(self, key: Key) -> bool:
        """Whether accepted links connect the tile to a final tile (or it is final itself)."""
        return self._root(key) in self._has_fixed

    def island(self, key: Key) -> Key:
        """The tile's island: one key per group of tiles that accepted links connect (the same for all
        of them). Two islands' relative position is known only from the stage prior until a link joins
        them."""
        return self._root(key)

    def is_final(self, key: Key) -> bool:
        return key in self._fixed

    def linked(self, key: Key) -> bool:
        """Whether any accepted measurement involves this tile."""
        return key in self._linked

    @property
    def pending(self) -> list[Key]:
        return list(self._pending)

    def predicted_displacement(self, a: Key, b: Key) -> tuple[float, float]:
        """Where b should be relative to a: b's prior minus a's current position.

        Using b's absolute prior (rather than the commanded step alone) halves
        the variance of the guess when a is registered: only b's own stage
        error is unknown, not the difference of two.
        """
        pa = self.position(a)
        qb = self.model.predict(self._commanded[b])
        return qb[0] - pa[0], qb[1] - pa[1]

    # ------------------------------------------------------------------ solving

    def solve(self) -> None:
        """Re-estimate every pending tile from the links and priors. Nothing to do when nothing changed
        since the last solve (the accumulator solves after registering a tile and again before it
        blends: the same system, the same figures)."""
        n = len(self._pending)
        if n == 0 or self._solved:
            return
        index = {k: i for i, k in enumerate(self._pending)}
        w_prior = 1.0 / self.stage_sigma_px**2
        out = np.empty((n, 2))
        for axis in range(2):
            ata = np.eye(n) * w_prior
            atb = np.array([self.model.predict(self._commanded[k])[axis] for k in self._pending]) * w_prior
            for link in self._links:
                ia, ib = index.get(link.a), index.get(link.b)
                d = link.shift[axis]
                s2 = link.sigma[axis] ** 2
                if ia is not None and ib is not None:
                    w = 1.0 / s2
                    ata[ia, ia] += w
                    ata[ib, ib] += w
                    ata[ia, ib] -= w
                    ata[ib, ia] -= w
                    atb[ia] -= w * d
                    atb[ib] += w * d
                elif ia is not None:  # b final: p_a = p_b - d
                    w = 1.0 / (s2 + self._var[link.b])
                    ata[ia, ia] += w
                    atb[ia] += w * (self._fixed[link.b][axis] - d)
                elif ib is not None:  # a final: p_b = p_a + d
                    w = 1.0 / (s2 + self._var[link.a])
                    ata[ib, ib] += w
                    atb[ib] += w * (self._fixed[link.a][axis] + d)
            out[:, axis] = np.linalg.solve(ata, atb)
        for k, i in index.items():
            self._estimate[k] = (float(out[i, 0]), float(out[i, 1]))
        self._solved = True

    def fix(self, keys: Iterable[Key]) -> None:
        """Make these pending tiles final at their current estimate (and variance)."""
        for key in keys:
            if key not in self._estimate or key in self._fixed:
                raise KeyError(f"tile {key!r} is not pending")
            pos = self._estimate.pop(key)
            self._fixed[key] = pos
            self._pending.remove(key)
            self._has_fixed.add(self._root(key))
            self._var[key] = 0.0 if key in self._linked else self.stage_sigma_px**2
            if key in self._linked:
                # Its position comes from registration: evidence for the stage model.
                self.model.add(self._commanded[key], pos)
        self._solved = False  # the fixed tiles' priors and the stage model changed
        # Links between final tiles inform nothing any more: drop them (bounded memory).
        self._links = [lk for lk in self._links if not (lk.a in self._fixed and lk.b in self._fixed)]
