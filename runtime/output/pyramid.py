"""Streaming 2x area-averaging pyramid: level-k row bands in, level-(k+1) bands out.

Each output pixel is the mean of a 2x2 window of the level above, rounded half
up: ``(a + b + c + d + 2) >> 2``. Odd heights/widths: the last row/column
window is completed by *edge replication*, which for a 2x2 mean is the same as
averaging only the pixels that exist (``(a + b + a + b) / 4 == (a + b) / 2``),
so both readings of "odd sizes" give identical results. Level k+1 therefore
has shape ``ceil(h_k / 2), ceil(w_k / 2)``.

The even part goes through ``cv2.resize(INTER_AREA)``: for an exact 2x
reduction of uint8 it computes the same round-half-up 2x2 mean (checked
against a numpy reference in the tests) and is ~20x faster than numpy.

:class:`PyramidBuilder` never sees a whole level: each level keeps one output
band (``chunk`` rows of its own width) plus at most one carried odd input row,
so its memory is below ``chunk * width0 * channels`` bytes in total for all
levels together -- a width-sized buffer. Where that is too much (the stitcher on
a wide slide), ``MosaicStore.complete_rows`` builds the levels chunk by chunk
with :func:`downsample2x` instead: a 2x2 mean of even-sized chunks is the same
as of the whole rows, so both give identical levels.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import cv2
import numpy as np

__all__ = ["Emit", "PyramidBuilder", "downsample2x", "level_shapes"]

# (level, first row, rows): called with a level-k band once it is final. The
# array is the builder's reusable buffer: the callee must finish with it (write
# it, copy it) before returning.
Emit = Callable[[int, int, np.ndarray], None]


def level_shapes(height: int, width: int, min_level_size: int) -> list[tuple[int, int]]:
    """Shapes of levels 0..n-1: halve (ceil) until max(h, w) <= min_level_size."""
    if height < 1 or width < 1:
        raise ValueError(f"image must be non-empty, got {height} x {width}")
    if min_level_size < 1:
        raise ValueError(f"min_level_size must be >= 1, got {min_level_size}")
    shapes = [(height, width)]
    while max(shapes[-1]) > min_level_size:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def downsample2x(band: np.ndarray) -> np.ndarray:
    """Halve a (h, w) or (h, w, c) uint8 array: round-half-up 2x2 mean, odd edges replicated."""
    if band.dtype != np.uint8:
        raise TypeError(f"downsample2x expects uint8, got {band.dtype}")
    if band.ndim not in (2, 3) or band.shape[0] == 0 or band.shape[1] == 0:
        raise ValueError(f"downsample2x expects a non-empty (h, w[, c]) array, got {band.shape}")
    h, w = band.shape[:2]
    he, we = h - h % 2, w - w % 2
    out = np.empty(((h + 1) // 2, (w + 1) // 2, *band.shape[2:]), dtype=np.uint8)
    if he and we:
        # cv2 wants (w, h) and takes row-strided views without copying.
        half = cv2.resize(band[:he, :we], (we // 2, he // 2), interpolation=cv2.INTER_AREA)
        out[: he // 2, : we // 2] = half.reshape(he // 2, we // 2, *band.shape[2:])
    if w % 2:
        # Last column: vertical pairs only (the horizontal neighbour is the replicated edge).
        col = band[:, w - 1].astype(np.uint16)
        out[: he // 2, -1] = (col[0:he:2] + col[1:he:2] + 1) >> 1
    if h % 2:
        row = band[h - 1].astype(np.uint16)
        out[-1, : we // 2] = (row[0:we:2] + row[1:we:2] + 1) >> 1
        if w % 2:
            out[-1, -1] = band[h - 1, w - 1]
    return out


class _Level:
    """State of one level k >= 1: its output band buffer and how far it got."""

    __slots__ = ("buf", "carry", "fill", "height", "height_in", "rows_in", "y")

    def __init__(self, shape: tuple[int, int], height_in: int, chunk: int, channels: int, y: int) -> None:
        self.height, width = shape
        self.height_in = height_in  # rows of level k-1
        self.buf = np.empty((chunk, width, channels), dtype=np.uint8)
        self.fill = 0  # rows of buf holding output not yet emitted
        self.y = y  # level rows already emitted; buf row 0 is level row y
        self.rows_in = 2 * y  # level k-1 rows received so far
        self.carry: np.ndarray | None = None  # one unpaired input row, waiting for its partner


class PyramidBuilder:
    """Turn level-0 row bands (top to bottom) into bands of every lower level.

    ``shapes`` are the level shapes (level 0 first, as :func:`level_shapes`
    returns them). ``emit(k, y0, rows)`` receives each finished band of level
    k >= 1: ``chunk`` rows starting at a multiple of ``chunk``, or the bottom
    rows of the level. Once the last level-0 row is pushed, every level has
    been emitted completely. Level 0 itself is the caller's business.

    ``start_rows[k-1]`` resumes level k after an interruption: the number of
    its rows already emitted (a multiple of ``chunk``). The caller then
    re-feeds level k-1 from row ``2 * start_rows[k-1]`` with
    :meth:`push_level`, deepest level first (``MosaicStore`` does this).
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        chunk: int,
        emit: Emit,
        *,
        channels: int = 3,
        start_rows: Sequence[int] | None = None,
    ) -> None:
        if chunk < 2:
            raise ValueError(f"chunk must be >= 2, got {chunk}")
        if not shapes:
            raise ValueError("need at least one level shape")
        for (h0, w0), (h1, w1) in itertools.pairwise(shapes):
            if (h1, w1) != ((h0 + 1) // 2, (w0 + 1) // 2):
                raise ValueError(f"level shapes must halve (ceil): {h0}x{w0} -> {h1}x{w1}")
        starts = list(start_rows) if start_rows is not None else [0] * (len(shapes) - 1)
        if len(starts) != len(shapes) - 1:
            raise ValueError(f"start_rows needs {len(shapes) - 1} entries, got {len(starts)}")
        if any(s % chunk or not 0 <= s <= h for s, (h, _) in zip(starts, shapes[1:], strict=True)):
            raise ValueError(f"start_rows must be multiples of {chunk} within each level: {starts}")
        self.shapes = [(int(h), int(w)) for h, w in shapes]
        self.chunk = chunk
        self.channels = channels
        self._emit = emit
        # Index 0 is a placeholder so that self._levels[k] is level k.
        self._levels: list[_Level | None] = [None]
        for k in range(1, len(self.shapes)):
            self._levels.append(_Level(self.shapes[k], self.shapes[k - 1][0], chunk, channels, starts[k - 1]))

    @property
    def n_levels(self) -> int:
        return len(self.shapes)

    def rows_emitted(self, k: int) -> int:
        """Rows of level k >= 1 emitted so far (final rows only, not :meth:`flush` previews)."""
        lvl = self._levels[k]
        assert lvl is not None
        return lvl.y

    def push(self, band: np.ndarray) -> None:
        """Feed the next level-0 rows (any count, in order, full width)."""
        if self.n_levels > 1:
            self.push_level(1, band)

    def push_level(self, k: int, rows: np.ndarray) -> None:
        """Feed the next rows of level k-1 into level k (in order, full width of level k-1)."""
        if not 1 <= k < self.n_levels:
            raise ValueError(f"level {k} out of range 1..{self.n_levels - 1}")
        w_in = self.shapes[k - 1][1]
        if rows.ndim != 3 or rows.shape[1:] != (w_in, self.channels) or rows.dtype != np.uint8:
            want = f"(n, {w_in}, {self.channels}) uint8"
            raise ValueError(f"level {k - 1} rows must be {want}, got {rows.shape} {rows.dtype}")
        lvl = self._levels[k]
        assert lvl is not None
        n = rows.shape[0]
        if lvl.rows_in + n > lvl.height_in:
            raise ValueError(f"level {k - 1} has {lvl.height_in} rows; got rows up to {lvl.rows_in + n}")
        lvl.rows_in += n
        if n == 0:
            return
        if lvl.carry is not None:
            # The previous band had an odd row count: pair its last row with our first.
            pair = np.concatenate([lvl.carry, rows[:1]])
            lvl.carry = None
            self._append(k, lvl, downsample2x(pair))
            rows = rows[1:]
        n_even = rows.shape[0] - rows.shape[0] % 2
        step = 2 * self.chunk  # bounds the temporary to one output band
        for y in range(0, n_even, step):
            self._append(k, lvl, downsample2x(rows[y : min(y + step, n_even)]))
        if n_even < rows.shape[0]:
            if lvl.rows_in == lvl.height_in:
                # Odd last row of the level above: its window is completed by edge replication.
                self._append(k, lvl, downsample2x(rows[n_even:]))
            else:
                lvl.carry = rows[n_even:].copy()  # copy: the caller may reuse its buffer

    def flush(self) -> None:
        """Emit a preview of every level's unfinished rows, as if the rows pushed so far were all.

        For an interrupted scan: afterwards each lower level on disk reflects
        exactly the level-0 rows pushed so far. The builder's state is not
        changed, so pushing can continue and re-emits those bands in full
        later. After the last level-0 row this is a no-op. A preview band
        starts at a multiple of ``chunk`` and has fewer than ``2 * chunk``
        rows.
        """
        extra: np.ndarray | None = None  # preview rows of level k-1 that level k has not been fed
        for k in range(1, self.n_levels):
            lvl = self._levels[k]
            assert lvl is not None
            parts = [p for p in (lvl.carry, extra) if p is not None and p.shape[0]]
            head = lvl.buf[: lvl.fill]
            if parts:
                pending = parts[0] if len(parts) == 1 else np.concatenate(parts)
                out = np.concatenate([head, downsample2x(pending)])
            elif lvl.fill:
                out = head
            else:
                extra = None  # level k is clean, but a deeper level may still hold rows
                continue
            self._emit(k, lvl.y, out)
            extra = out

    def _append(self, k: int, lvl: _Level, out: np.ndarray) -> None:
        """Append output rows to level k's buffer, emitting (and cascading) every finished band."""
        done = 0
        while done < out.shape[0]:
            n = min(self.chunk - lvl.fill, out.shape[0] - done)
            lvl.buf[lvl.fill : lvl.fill + n] = out[done : done + n]
            lvl.fill += n
            done += n
            if lvl.fill == self.chunk or lvl.y + lvl.fill == lvl.height:
                band = lvl.buf[: lvl.fill]
                self._emit(k, lvl.y, band)
                lvl.y += lvl.fill
                lvl.fill = 0
                if k + 1 < self.n_levels:
                    # The next level consumes the band now, before the buffer is reused.
                    self.push_level(k + 1, band)
