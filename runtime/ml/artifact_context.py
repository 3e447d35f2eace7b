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
(``bench classifier --layout``) or a scan's (:func:`context_report`, for ``report.json``: each
field's windows, row by row, placed on the slide's window grid by the field's plan row and column;
a field's probability is the strongest of its windows', and the model flagged it if it flagged any
window). :data:`GROW_THRESHOLD` (fields) and :data:`WINDOW_GROW_THRESHOLD` (windows) were chosen on
the simulator's validation slides for the committed classifier (``bench classifier --layout``),
never on the held-out or unseen sets the bench scores.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Cell = tuple[int, int]

NEIGHBOURS_8: tuple[Cell, ...] = tuple((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0))
NEIGHBOURS_4: tuple[Cell, ...] = ((-1, 0), (1, 0), (0, -1), (0, 1))

GROW_THRESHOLD: float | None = None
"""A scan's fields (the scan-end pass when no field carries window values, e.g. a journal written
before them): enclosed cells only, no hysteresis. Chosen for the committed classifier (ONNX sha256
6302b6ff...) on the validation blocks of ``bench classifier --layout`` at field level: the most
permissive rule within +1 point of the model's own share of validation tissue fields called artifact
(hysteresis at 0.5 already added 1.3 points there; on 64 µm windows grow 0.5 passed)."""

WINDOW_GROW_THRESHOLD: float | None = None
"""A scan's classifier windows (64 µm): enclosed cells only, no hysteresis. Re-chosen at stop 34 for the
committed classifier (ONNX sha256 aa694347..., fine-tuned with real tissue at stop 33) the way stop 25 chose
grow 0.5 for the one before it (6302b6ff...): ``bench classifier --layout`` picks, on the 64 µm windows of the
validation blocks only (``val`` and ``val_hard`` pooled), the most permissive rule whose tissue called artifact
stays within +1 point of the model's own (:func:`bench.classifier_layout.choose_context`; the same procedure
on 6302b6ff still gives grow 0.5). Validation with aa694347: model alone 2.18% / recall 0.792, enclosed only
2.31% / 0.868, grow 0.5 3.55% (over the 3.18% limit; faint stain 2.87 -> 5.32%). Held-out, scored once
(220 blocks, 3,476 tissue windows): model alone 0.868 / 1.35%, grow 0.5 + enclosed 0.937 / 2.33%, enclosed
only 0.916 / 1.38%; in the daemon (``bench classifier --scan``, 32 held-out recordings) 0.869 -> 0.913."""


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
    """What the context pass needs of a scan's field: its place, the model's flag, its p(artifact),
    and per window (row by row of the field's window grid) p(artifact) and the model's flag."""

    row: int
    col: int
    artifact: bool  # the model flagged the field (any window)
    p_artifact: float | None  # the strongest window's p(artifact); None: not classified
    # None (a journal written before windows were carried): each window takes the field's values.
    window_p: Sequence[Sequence[float]] | None = None
    window_flags: Sequence[Sequence[bool]] | None = None

    @property
    def window_shape(self) -> tuple[int, int] | None:
        """(rows, cols) of the windows it carries (None: none)."""
        return (len(self.window_p), len(self.window_p[0])) if self.window_p else None

    def windows(self, shape: tuple[int, int]) -> dict[Cell, tuple[float | None, bool]]:
        """Its windows (row, col within the field) with p(artifact) and the model's flag: its own
        when it carries them in ``shape``, else the field's values in each."""
        rows, cols = shape
        cells = [(i, j) for i in range(rows) for j in range(cols)]
        wp, wf = self.window_p, self.window_flags
        if wp is None or wf is None or len(wp) != rows or len(wf) != rows:
            return dict.fromkeys(cells, (self.p_artifact, self.artifact))
        if any(len(r) != cols for r in wp) or any(len(r) != cols for r in wf):
            return dict.fromkeys(cells, (self.p_artifact, self.artifact))
        return {(i, j): (float(wp[i][j]), bool(wf[i][j])) for i, j in cells}


def scan_context(fields: Iterable[FieldClass], context: ArtifactContext | None = None) -> dict[Cell, bool]:
    """Per field (row, col): whether it is an artifact after context (the model's flag or added by
    context), over the field grid (a field is one cell: its windows are not used)."""
    ctx = context or ArtifactContext()
    fl = list(fields)
    grid = {(f.row, f.col): f.p_artifact for f in fl}
    flagged = ctx.flags(grid, [(f.row, f.col) for f in fl if f.artifact])
    return {c: c in flagged for c in grid}


@dataclass(frozen=True)
class WindowContext:
    """The window rule over a scan: per field (row, col), its windows (row, col within the field)
    the model flagged and those that are artifacts after context."""

    shape: tuple[int, int]  # windows per field (rows, cols)
    by_model: dict[Cell, frozenset[Cell]]
    in_context: dict[Cell, frozenset[Cell]]


def scan_window_context(fields: Iterable[FieldClass], context: ArtifactContext | None = None) -> WindowContext | None:
    """The window rule (default: :data:`WINDOW_GROW_THRESHOLD`, enclosed cells only) over a scan's
    windows. Window (i, j) of field (row, col) is cell (row * rows + i, col * cols + j) of the slide's
    window grid (the plan's rows run down the slide and its columns across, as a frame's windows do;
    fields overlap a little, so neighbours stay neighbours). The grid's shape is the one most fields
    carry; a field without windows of that shape takes its own values in each. None: no field
    carries windows."""
    ctx = context or ArtifactContext(WINDOW_GROW_THRESHOLD)
    fl = list(fields)
    shapes = Counter(s for f in fl if (s := f.window_shape) is not None)
    if not shapes:
        return None
    shape = shapes.most_common(1)[0][0]
    rows, cols = shape
    per_field = {(f.row, f.col): f.windows(shape) for f in fl}
    grid: dict[Cell, float | None] = {}
    seeds: list[Cell] = []
    for (r, c), wins in per_field.items():
        for (i, j), (p, flag) in wins.items():
            grid[(r * rows + i, c * cols + j)] = p
            if flag:
                seeds.append((r * rows + i, c * cols + j))
    flagged = ctx.flags(grid, seeds)
    return WindowContext(
        shape,
        {k: frozenset(w for w, (_, flag) in wins.items() if flag) for k, wins in per_field.items()},
        {
            (r, c): frozenset((i, j) for i, j in wins if (r * rows + i, c * cols + j) in flagged)
            for (r, c), wins in per_field.items()
        },
    )


def context_report(fields: Sequence[FieldClass]) -> tuple[dict[Cell, dict[str, Any]], dict[str, Any] | None]:
    """What ``report.json`` says of the scan-end context: per field (row, col),
    ``artifact_in_context`` and ``artifact_windows_in_context`` ([row, col] within the field; None
    without windows), and the summary (None: no field was classified). The window rule runs when
    fields carry windows, else (a journal written before them) the field rule."""
    if all(f.p_artifact is None for f in fields):
        none = {"artifact_in_context": False, "artifact_windows_in_context": None}
        return {(f.row, f.col): dict(none) for f in fields}, None
    fields_by_model = sum(f.artifact for f in fields)
    wc = scan_window_context(fields)
    if wc is None:
        rule = ArtifactContext()
        by_field = scan_context(fields, rule)
        per: dict[Cell, dict[str, Any]] = {
            k: {"artifact_in_context": v, "artifact_windows_in_context": None} for k, v in by_field.items()
        }
        windows: dict[str, Any] = {"windows_per_field": None}
    else:
        rule = ArtifactContext(WINDOW_GROW_THRESHOLD)
        per = {
            k: {"artifact_in_context": bool(w), "artifact_windows_in_context": [list(c) for c in sorted(w)]}
            for k, w in wc.in_context.items()
        }
        by_model = sum(len(w) for w in wc.by_model.values())
        windows = {
            "windows_per_field": list(wc.shape),
            "windows_flagged_by_model": by_model,
            "windows_added_by_context": sum(len(w) for w in wc.in_context.values()) - by_model,
        }
    return per, {
        "unit": "field" if wc is None else "window",
        "grow_threshold": rule.grow_threshold,
        "fill_holes": rule.fill_holes,
        "fields_flagged_by_model": fields_by_model,
        "fields_added_by_context": sum(v["artifact_in_context"] for v in per.values()) - fields_by_model,
        **windows,
    }
