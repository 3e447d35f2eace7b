"""Artifact context over a grid of classified cells: what one 64 µm window cannot see, its neighbours can.

The tile classifier labels each 64 µm window on its own (:class:`runtime.ml.tasks.TileClassifierModel`).
Inside an air bubble (radius up to 250 µm) a window sees no rim, only a faint haze over washed-out
tissue, and a window inside a fold band sees little more than darker tissue: the model gives
such windows an artifact probability above most tissue's but below its threshold, while their
neighbours see the rim or the band's edge and are flagged.

:class:`ArtifactContext` adds to the cells the model flags (the *seeds*):

1. **hysteresis** (as edges are traced in Canny's detector): every cell joined to a seed through
   neighbours (8-connected) whose artifact probability reaches ``grow_threshold``;
2. **enclosed cells** (``fill_holes``): every cell the flagged cells enclose, i.e. that cannot
   reach the grid's outside through unflagged cells (4-connected; a cell missing from the grid
   counts as unflagged), whatever its probability: the inside of a bubble whose rim was found.

A cell far from every seed is never raised, so content that merely looks unusual (the unseen
contents of ``bench classifier --contents``) gains artifact calls only where the model already
flags one. The grid is any set of cells keyed by (row, col): the windows of slide-layout renders
(``bench classifier --layout``) or the fields of a scan (``report.json``; a field's probability is
the strongest of its windows', and the model flagged it if it flagged any window).
:data:`GROW_THRESHOLD` was chosen on the simulator's validation slides for the committed
classifier (``bench classifier --layout``), never on the held-out or unseen sets the bench scores.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

Cell = tuple[int, int]

NEIGHBOURS_8: tuple[Cell, ...] = tuple((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0))
NEIGHBOURS_4: tuple[Cell, ...] = ((-1, 0), (1, 0), (0, -1), (0, 1))

GROW_THRESHOLD: float | None = None
"""A scan's fields: enclosed cells only, no hysteresis. Chosen for the committed classifier (ONNX sha256
6302b6ff...) on the validation blocks of ``bench classifier --layout`` at field level: the most
permissive rule within +1 point of the model's own share of validation tissue fields called artifact
(hysteresis at 0.5 already added 1.3 points there; on 64 µm windows grow 0.5 passed)."""


@dataclass(frozen=True)
class ArtifactContext:
    """Hysteresis and enclosed cells over a grid (see the module docstring)."""

    grow_threshold: float | None = GROW_THRESHOLD  # None: no hysteresis (enclosed cells only)
    fill_holes: bool = True

    def __post_init__(self) -> None:
        g = self.grow_threshold
        if g is not None and not 0.0 < g < 1.0:
            raise ValueError(f"artifact context: grow_threshold must be in (0, 1) or None, got {g}")

    def flags(self, p_artifact: Mapping[Cell, float | None], seeds: Iterable[Cell]) -> set[Cell]:
        """The cells that are artifacts: ``seeds`` (the cells the model flags; each must be in
        ``p_artifact``), the cells joined to one through cells of at least ``grow_threshold``, and
        (``fill_holes``) the cells those enclose. A cell whose probability is None (not
        classified) joins no chain but can be enclosed."""
        out = set(seeds)
        missing = out - p_artifact.keys()
        if missing:
            raise ValueError(f"artifact context: seeds outside the grid: {sorted(missing)[:5]}")
        g = self.grow_threshold
        weak = set() if g is None else {c for c, p in p_artifact.items() if p is not None and p >= g}
        todo = deque(out)
        while todo:
            r, c = todo.popleft()
            for dr, dc in NEIGHBOURS_8:
                n = (r + dr, c + dc)
                if n in weak and n not in out:
                    out.add(n)
                    todo.append(n)
        if self.fill_holes and out:
            out |= enclosed(p_artifact.keys(), out)
        return out


def enclosed(cells: Iterable[Cell], flagged: set[Cell]) -> set[Cell]:
    """The cells of ``cells`` not in ``flagged`` that cannot reach the outside of the grid's bounding
    box through unflagged positions (4-connected)."""
    grid = set(cells)
    if not grid:
        return set()
    r0, r1 = min(r for r, _ in grid) - 1, max(r for r, _ in grid) + 1
    c0, c1 = min(c for _, c in grid) - 1, max(c for _, c in grid) + 1
    border = [(r, c) for r in (r0, r1) for c in range(c0, c1 + 1)]
    border += [(r, c) for c in (c0, c1) for r in range(r0 + 1, r1)]
    outside = set(border)
    todo = deque(border)
    while todo:
        r, c = todo.popleft()
        for dr, dc in NEIGHBOURS_4:
            n = (r + dr, c + dc)
            if r0 <= n[0] <= r1 and c0 <= n[1] <= c1 and n not in outside and n not in flagged:
                outside.add(n)
                todo.append(n)
    return {c for c in grid if c not in flagged and c not in outside}


@dataclass(frozen=True)
class FieldClass:
    """What the context pass needs of a scan's field: its place, the model's flag, its p(artifact)."""

    row: int
    col: int
    artifact: bool  # the model flagged the field (any window)
    p_artifact: float | None  # the strongest window's p(artifact); None: not classified


def scan_context(fields: Iterable[FieldClass], context: ArtifactContext | None = None) -> dict[Cell, bool]:
    """Per field (row, col): whether it is an artifact after context (the model's flag or added by
    context); computed at the scan's end, over the whole field grid."""
    ctx = context or ArtifactContext()
    fl = list(fields)
    grid = {(f.row, f.col): f.p_artifact for f in fl}
    flagged = ctx.flags(grid, [(f.row, f.col) for f in fl if f.artifact])
    return {c: c in flagged for c in grid}
