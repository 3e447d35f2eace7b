"""The deque accumulator: turns a serpentine stream of tiles into final mosaic blocks.

Per tile, as it arrives (``add``):

1. **Register** it against the neighbours already captured -- the previous
   tile in its row and the tile above -- on their overlap strips
   (``runtime.stitching.registration``), starting from where the stage model predicts.
2. **Solve** positions (``runtime.stitching.positions``): the tiles not yet final are the
   unknowns of a small weighted least-squares system over the measured links
   and the stage prior; final tiles are constants.
3. **Finalise and blend** every tile whose position cannot usefully change
   any more (after ``lag_tiles`` later tiles; 0: at once): a tile that
   registration ties to tiles already blended (*grounded*), or one no later
   neighbour could register against (glass, or its neighbours came and
   went). A tile with content but no accepted link to the mosaic yet -- the
   first tiles of a scan, tissue beyond glass, overlaps too thin to match --
   waits for its later neighbours (the next in the row, the one below), at
   most about a row of tiles: finalising it on the stage prior would leave a
   seam of the stage error's size once a neighbour ties it in. Final tiles are
   flat-field corrected (``runtime.stitching.flatfield``), moved to their subpixel
   position and feathered over what is already in the canvas
   (``runtime.stitching.blending``).
4. **Flush** every canvas block (a Zarr chunk of level 0) that no tile still
   to come can reach -- the waiting tiles' solved extents and the next
   fields' predicted ones, each grown by the stage's largest error -- to the
   Zarr store; once a whole chunk row of blocks is final, the store announces
   the rows and builds the pyramid below them from each written block's 2x
   reduction, kept (in the same cache as the blocks) until its chunk of the
   level below is built.

What it holds: the canvas as chunk-sized blocks (pixels, and the rectangles of the tiles blended
into each, which say what is covered) that tiles have touched and that are not final yet -- the
blocks under the current tile and, all along the scan row, the bottom blocks the next row will blend
over; the tiles that wait (for ``lag_tiles``, for the flat-field warm-up, at most
``flatfield_warmup_tiles`` once, or for a neighbour to ground them, at most ``cols + 1``: in a
typical scan at its start and where tissue begins after glass); and for registration, grey overlap
strips -- the trailing strip of the previous tile and the bottom strips of the previous row's tiles,
each dropped as soon as its neighbour has used it. Blocks, waiting tiles and bottom strips live in a
:class:`~runtime.stitching.spill.SpillCache`: at most ``memory_budget_mib`` of them in RAM, the
least recently used spilled to a folder beside the mosaic and read back when a tile needs them. What
stays in RAM is set by that budget (plus one tile's working copies while it is blended), not by the
mosaic's width or the slide's size. On disk the spill holds about two chunk rows of the mosaic's
width (the bottom blocks a scan row leaves for the next) and, at the start of a scan, the first
row's waiting tiles.

The mosaic keeps the commanded grid's extent (``MosaicGeometry.shape``);
tiles moved by their stage error are clipped to it, and pixels no tile
covers stay white (glass).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from runtime.config import StitchConfig
from runtime.devices.scan_plan import FieldPlan, GridPlan
from runtime.output.mosaic_store import MosaicStore
from runtime.stitching.backends import select_stitch_backend
from runtime.stitching.blending import composite_feathered, feather_ramps
from runtime.stitching.flatfield import FlatField, FlatFieldEstimator
from runtime.stitching.positions import Link, PositionSolver
from runtime.stitching.registration import PairMeasurement, RegistrationParams, texture, to_grey
from runtime.stitching.spill import SpillCache

U8 = npt.NDArray[np.uint8]
Key = tuple[int, int]

# The accumulator's default RAM for canvas blocks, waiting tiles and strips (the daemon derives
# its own from ``daemon.memory_budget_mib``).
DEFAULT_HELD_MIB = 64.0


@dataclass(frozen=True)
class MosaicGeometry:
    """Where each field's pixels go in the mosaic (level 0, pixels), by the commanded grid."""

    plan: GridPlan
    tile_height: int
    tile_width: int
    pixel_size_um: float

    @property
    def step_px(self) -> tuple[float, float]:
        return (self.plan.step_y_um / self.pixel_size_um, self.plan.step_x_um / self.pixel_size_um)

    @property
    def shape(self) -> tuple[int, int]:
        sy, sx = self.step_px
        return (
            round((self.plan.rows - 1) * sy) + self.tile_height,
            round((self.plan.cols - 1) * sx) + self.tile_width,
        )

    @property
    def overlap_px(self) -> tuple[int, int]:
        """Nominal overlap of neighbouring tiles (rows, columns)."""
        sy, sx = self.step_px
        return (max(0, math.ceil(self.tile_height - sy)), max(0, math.ceil(self.tile_width - sx)))

    def commanded_top_left(self, field: FieldPlan) -> tuple[float, float]:
        """Mosaic (y, x) of the tile's top-left corner at its commanded position (unrounded)."""
        ox, oy = self.plan.origin_um
        x = (field.x_um - self.plan.field_width_um / 2 - ox) / self.pixel_size_um
        y = (field.y_um - self.plan.field_height_um / 2 - oy) / self.pixel_size_um
        return (y, x)

    def top_left(self, field: FieldPlan) -> tuple[int, int]:
        """Mosaic pixel of the tile's top-left corner at its commanded position."""
        y, x = self.commanded_top_left(field)
        return (round(y), round(x))


class AccumulatorObserver(Protocol):
    """What a scan journal needs to hear from the accumulator (runtime/output/journal.py)."""

    def registered(
        self, field: FieldPlan, links: list[Link], pairs: list[str], ncc: list[float], content: tuple[bool, bool]
    ) -> None:
        """The field's pair measurements on arrival (before the solve)."""

    def flatfield_ready(self, arrival: int, flat: FlatField) -> None:
        """The flat-field became known at this arrival (1-based)."""

    def placed(self, field: FieldPlan, y: float, x: float, iy: int, ix: int) -> None:
        """The field is final at (y, x) and blended with its top-left at (iy, ix)."""


@dataclass(frozen=True)
class Replay:
    """A field's journaled arrival, replayed on resume instead of registering it again: the links it
    measured, whether its strips have texture, and (at the arrival where it became known) the
    flat-field. Its tile may be gone (None in :meth:`DequeAccumulator.add`) once its rows are in
    the mosaic."""

    links: tuple[Link, ...]
    content: tuple[bool, bool]
    pairs: tuple[str, ...] = ()
    ncc: tuple[float, ...] = ()
    flat: FlatField | None = None


@dataclass
class _Strip:
    grey: U8
    oy: int  # the strip's origin in its tile's frame
    ox: int


class _CachedStrips(MutableMapping[Key, _Strip]):
    """The bottom strips of the previous row's tiles, kept in the spill cache: a scan row of them
    is as wide as the mosaic. A mapping like the dict of :class:`_Strip` it stands for."""

    def __init__(self, cache: SpillCache) -> None:
        self._cache = cache
        self._origin: dict[Key, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self._origin)

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._origin))

    def __setitem__(self, key: Key, strip: _Strip) -> None:
        self._cache.put((("strip", *key), strip.grey))
        self._origin[key] = (strip.oy, strip.ox)

    def __getitem__(self, key: Key) -> _Strip:
        (grey,) = self._cache.get(("strip", *key))
        return _Strip(grey, *self._origin[key])

    def __delitem__(self, key: Key) -> None:
        del self._origin[key]
        self._cache.discard(("strip", *key))


@dataclass
class StitchStats:
    """What the accumulator did, for the scan report and the bench."""

    pairs: Counter[str] = field(default_factory=Counter)
    ncc: list[float] = field(default_factory=list)
    register_s: float = 0.0
    solve_s: float = 0.0
    blend_s: float = 0.0
    flatfield_s: float = 0.0
    tiles: int = 0
    clipped_rows: int = 0
    clipped_blocks: int = 0  # parts of tiles that reached a block already written (stage beyond its margin)
    peak_blocks: int = 0  # canvas blocks not yet final, in RAM or spilled
    peak_held_bytes: int = 0  # blocks, waiting tiles and strips in RAM
    spilled: int = 0  # arrays written to the spill folder
    reloaded: int = 0  # and read back


class DequeAccumulator:
    """Receives tiles in acquisition order; writes final blocks and rows to the mosaic store."""

    def __init__(
        self,
        geometry: MosaicGeometry,
        store: MosaicStore,
        params: StitchConfig | None = None,
        *,
        memory_budget_mib: float = DEFAULT_HELD_MIB,
        spill_dir: str | Path | None = None,
    ) -> None:
        """``params``: the ``[stitch]`` config section (validated there; None: its defaults).
        ``stage_sigma_um`` weighs the stage prior; ``max_stage_error_um``, twice, bounds the
        registration search between two tiles and, once, the margin before a block is final;
        ``lag_tiles``: later tiles a tile waits for before it is final (0: final on arrival).
        ``memory_budget_mib``: canvas blocks, waiting tiles and bottom strips held in RAM at most
        (the rest is spilled); ``spill_dir``: where they go (default: ``<mosaic>.spill`` beside the
        store; drafts, emptied on creation, removed by :meth:`finish`).

        A tile's two overlap pairs are registered one after the other: on two threads (with OpenCV on
        one) the stitcher used no fewer CPU-seconds in the daemon and its tail grew (stop 21), and
        OpenCV's own pool already spreads the larger filters over the cores, so the option was removed
        (stop 22)."""
        self.geometry = geometry
        self.store = store
        self.params = params or StitchConfig()
        self.chunk = store.chunk
        self.height, self.width = geometry.shape
        px = geometry.pixel_size_um
        self._margin = math.ceil(self.params.max_stage_error_um / px) + 2
        self.solver = PositionSolver(self.params.stage_sigma_um / px)
        ov_y, ov_x = geometry.overlap_px
        # Two moves can err in opposite directions: neighbours differ by up to twice the error.
        search = 2 * self.params.max_stage_error_um / px
        self._reg = RegistrationParams(search_px=max(search, 2.0), min_ncc=self.params.min_ncc)
        # stitch.backend: where resampling and registration's NCC surface run (cpu, or a GPU's cupy).
        self._backend = select_stitch_backend(self.params.backend)
        self._kernels = self._backend.kernels
        self._strip_x = min(geometry.tile_width, ov_x + math.ceil(self._reg.search_px) + 8)
        self._strip_y = min(geometry.tile_height, ov_y + math.ceil(self._reg.search_px) + 8)
        th, tw = geometry.tile_height, geometry.tile_width
        self._ff_est = FlatFieldEstimator(th, tw) if self.params.flatfield else None
        self._flat: FlatField | None = None if self.params.flatfield else FlatField.identity(th, tw)
        folder = Path(spill_dir) if spill_dir is not None else store.path.with_name(store.path.name + ".spill")
        self._cache = SpillCache(folder, int(memory_budget_mib * 2**20))
        # The pyramid's pieces (each written block's 2x reduction, waiting for its lower-level chunk)
        # share the budget: level 0 is then never read back from the store.
        store.keep_pieces(self._cache)
        self._blocks: set[Key] = set()  # canvas blocks (chunk row, chunk column) touched, not final
        # per such block, the rectangles (y0, y1, x0, x1, block coordinates) tiles were blended into
        self._rects: dict[Key, list[tuple[int, int, int, int]]] = {}
        self._done: set[Key] = set()  # blocks written below _first_band_y (their row is not complete)
        self._first_band_y = 0  # mosaic row of the first chunk row not yet complete
        # (key, field, has pixels, arrival number): the tile is in the cache under ("tile", index);
        # a replayed field whose rows are all written has none.
        self._pending: list[tuple[Key, FieldPlan, bool, int]] = []
        self._trailing: dict[Key, _Strip] = {}
        self._bottom = _CachedStrips(self._cache)
        self._content: dict[Key, tuple[bool, bool]] = {}  # trailing / bottom strip has texture
        self._placed: dict[Key, tuple[int, int]] = {}  # integer top-left of blended tiles (recent rows)
        plan = geometry.plan
        self._fields = {(f.row, f.col): f for f in plan.fields}
        self._arrived: set[Key] = set()
        # Tiles held at most (beyond the flat-field warm-up): ungrounded tiles wait for a later
        # neighbour to tie them in, at most about a row (the serpentine's next row is below).
        self._max_pending = max(self.params.lag_tiles + 1, plan.cols + 1)
        self._blended_per_row = [0] * plan.rows
        self._next_index = 0  # plan index of the next field expected (for the flush bound)
        self.stats = StitchStats()
        # Set to a list to record every pair (a, b, outcome, shift in a's tile frame): for benches.
        self.pair_log: list[tuple[Key, Key, str, tuple[float, float]]] | None = None
        self.observer: AccumulatorObserver | None = None
        self._arrival_links: list[Link] | None = None  # the links of the tile being added (for the observer)
        self._arrival_pairs: list[str] = []
        self._arrival_ncc: list[float] = []
        self._grey: U8 | None = None  # _to_grey's buffer
        # every field's commanded top-left (y, x), by plan index: _reach predicts where they land
        self._commanded = np.array([geometry.commanded_top_left(f) for f in plan.fields], np.float64).reshape(-1, 2)

    # ------------------------------------------------------------------ public

    @property
    def flatfield(self) -> FlatField | None:
        return self._flat

    @property
    def all_arrived(self) -> bool:
        """Every field of the plan has been added (finish() then completes the mosaic)."""
        return len(self._arrived) == len(self._fields)

    def resume_at(self, rows_written: int) -> None:
        """Before replaying a journal: the mosaic's rows ``[0, rows_written)`` are on disk already."""
        if self.stats.tiles:
            raise RuntimeError("resume_at() must come before the first tile")
        self._first_band_y = rows_written

    def add(self, field: FieldPlan, tile: U8 | None, replay: Replay | None = None) -> None:
        """Register, solve, blend what is final, write what is final.

        ``replay``: the field's journaled arrival (a resumed scan): its links are used instead of
        registering again, and ``tile`` may be None when every row it covers is in the mosaic."""
        key = (field.row, field.col)
        if key in self._arrived:
            raise ValueError(f"field {key} arrived twice")
        if tile is None and replay is None:
            raise ValueError(f"field {key} has no pixels")
        if tile is not None and tile.shape[:2] != (self.geometry.tile_height, self.geometry.tile_width):
            raise ValueError(f"tile is {tile.shape}, expected {(self.geometry.tile_height, self.geometry.tile_width)}")
        self._arrived.add(key)
        self._next_index = max(self._next_index, field.index + 1)
        self.stats.tiles += 1
        arrival = self.stats.tiles
        t0 = time.perf_counter()
        self.solver.add_tile(key, self.geometry.commanded_top_left(field))
        if replay is not None:
            self._replay_links(key, replay, None if tile is None else self._to_grey(tile))
        elif self.params.registration:
            assert tile is not None
            self._arrival_links, self._arrival_pairs, self._arrival_ncc = [], [], []
            self._register(key, self._to_grey(tile))
            if self.observer is not None:
                content = self._content.get(key, (False, False))
                self.observer.registered(field, self._arrival_links, self._arrival_pairs, self._arrival_ncc, content)
            self._arrival_links = None
        elif self.observer is not None:
            self.observer.registered(field, [], [], [], (False, False))
        t1 = time.perf_counter()
        self.solver.solve()
        t2 = time.perf_counter()
        self.stats.register_s += t1 - t0
        self.stats.solve_s += t2 - t1
        # The ring slot is handed back after add(): the tile is held as it is during add() and
        # copied at its end only if it still waits (most tiles are blended within their add()).
        if tile is not None:
            self._cache.put((("tile", field.index), tile))
        self._pending.append((key, field, tile is not None, arrival))
        if self._flat is None and replay is not None and replay.flat is not None:
            self._flat = replay.flat
        elif self._flat is None and self._ff_est is not None and tile is None:
            # A replayed warm-up tile already in the mosaic: the journaled flat-field (estimated
            # before it could be blended) comes with the arrival that completed the estimate.
            pass
        elif self._flat is None and self._ff_est is not None:
            assert tile is not None
            self._ff_est.add(tile)
            if self._ff_est.ready or self._ff_est.tiles >= self.params.flatfield_warmup_tiles:
                # The fit needs ~8 float64 planes of a tile for a moment: the warm-up tiles that
                # wait meanwhile go to the spill, so that the peak is the fit's, not the fit's + theirs.
                self._cache.trim()
                self._flat = self._ff_est.estimate()
                if self.observer is not None:
                    self.observer.flatfield_ready(arrival, self._flat)
            self.stats.flatfield_s += time.perf_counter() - t2
        self._advance(finishing=False)
        if tile is not None and self._cache.holds(("tile", field.index), tile):
            self._cache.put((("tile", field.index), np.array(tile, copy=True)))
        self._note_memory()

    def _replay_links(self, key: Key, replay: Replay, grey: U8 | None) -> None:
        """A journaled arrival: its links, content and pair outcomes, and its strips if it has pixels."""
        # The strips its neighbours left for it were used when it first arrived.
        self._trailing.pop(self._previous_in_row(key), None)
        self._bottom.pop((key[0] - 1, key[1]), None)
        for link in replay.links:
            self.solver.add_link(link)
        self.stats.pairs.update(replay.pairs)
        self.stats.ncc.extend(replay.ncc)
        self._content[key] = replay.content
        if grey is None:
            return
        th, tw = grey.shape
        nxt = self._next_in_row(key)
        if nxt in self._fields:
            if nxt[1] > key[1]:
                self._trailing[key] = _Strip(grey[:, tw - self._strip_x :].copy(), 0, tw - self._strip_x)
            else:
                self._trailing[key] = _Strip(grey[:, : self._strip_x].copy(), 0, 0)
        if (key[0] + 1, key[1]) in self._fields:
            self._bottom[key] = _Strip(grey[th - self._strip_y :].copy(), th - self._strip_y, 0)

    def finish(self) -> bool:
        """Blend and flush everything left. Returns True if every field arrived (the mosaic is complete)."""
        if self._flat is None:
            assert self._ff_est is not None
            self._flat = self._ff_est.estimate()
        self._advance(finishing=True)
        complete = len(self._arrived) == len(self._fields)
        # Complete or cancelled, nothing captured is lost: every block goes out
        # (a cancelled scan keeps its partial bottom rows too).
        for key in sorted(self._blocks):
            self._write_block(key)
        bottom = max((min((i + 1) * self.chunk, self.height) for i, _ in self._done), default=0)
        if bottom > self._first_band_y:
            self.store.complete_rows(bottom)
            self._first_band_y = bottom
        self._done.clear()
        self._note_memory()
        self.store.keep_pieces(None)  # a cancelled scan's pieces: a later finish() reads its rows back
        self._cache.close()
        return complete

    def summary(self) -> dict[str, Any]:
        """JSON-able figures: pair outcomes, timings, the stage model, the flat-field, positions."""
        s = self.stats
        model = self.solver.model
        n = max(s.tiles, 1)
        positions = []
        for key in sorted(self._arrived, key=lambda k: self._fields[k].index):
            f = self._fields[key]
            y, x = self.solver.position(key)
            cy, cx = self.geometry.commanded_top_left(f)
            positions.append(
                {
                    "index": f.index,
                    "row": f.row,
                    "col": f.col,
                    "y_px": round(y, 4),
                    "x_px": round(x, 4),
                    "dy_px": round(y - cy, 4),
                    "dx_px": round(x - cx, 4),
                    "registered": self.solver.linked(key),
                }
            )
        ff = self._flat
        return {
            "pairs": dict(s.pairs),
            "ncc_median": float(np.median(s.ncc)) if s.ncc else None,
            "register_ms_per_tile": 1000 * s.register_s / n,
            "solve_ms_per_tile": 1000 * s.solve_s / n,
            "blend_ms_per_tile": 1000 * s.blend_s / n,
            "flatfield_source": ff.source if ff else None,
            "backend": self._kernels.name,
            "backend_refused": dict(self._backend.refused),
            "stage_rotation_deg": model.rotation_deg,
            "stage_scale": list(model.scale),
            "clipped_rows": s.clipped_rows,
            "clipped_blocks": s.clipped_blocks,
            "peak_blocks": s.peak_blocks,
            "peak_held_mib": round(s.peak_held_bytes / 2**20, 1),
            "memory_budget_mib": round(self._cache.budget_bytes / 2**20, 1),
            "spilled": s.spilled,
            "reloaded": s.reloaded,
            "positions": positions,
        }

    # ------------------------------------------------------------------ registration

    def _to_grey(self, tile: U8) -> U8:
        """The tile's grey, in one buffer reused tile after tile (only its strips are kept, as copies)."""
        if self._grey is None or self._grey.shape != tile.shape[:2]:
            self._grey = np.empty(tile.shape[:2], np.uint8)
        return to_grey(tile, out=self._grey)

    def _previous_in_row(self, key: Key) -> Key:
        r, c = key
        return (r, c - 1) if r % 2 == 0 else (r, c + 1)

    def _next_in_row(self, key: Key) -> Key:
        r, c = key
        return (r, c + 1) if r % 2 == 0 else (r, c - 1)

    def _register(self, key: Key, grey: U8) -> None:
        pairs: list[tuple[Key, _Strip, tuple[float, float]]] = []
        for nb, strips in ((self._previous_in_row(key), self._trailing), ((key[0] - 1, key[1]), self._bottom)):
            strip = strips.pop(nb, None)
            if strip is not None:
                # The prior does not depend on the links of this arrival: both guesses are made first.
                py, px = self.solver.predicted_displacement(nb, key)
                pairs.append((nb, strip, (py - strip.oy, px - strip.ox)))
        measured: list[PairMeasurement] = []
        for nb, strip, guess in pairs:
            near = self._near(pairs, measured, nb, strip)
            measured.append(self._kernels.register(strip.grey, grey, guess, self._reg, near))
        for (nb, strip, _), m in zip(pairs, measured, strict=True):
            self.stats.pairs[m.reason] += 1
            if self._arrival_links is not None:
                self._arrival_pairs.append(m.reason)
            if self.pair_log is not None:
                self.pair_log.append((nb, key, m.reason, (m.shift[0] + strip.oy, m.shift[1] + strip.ox)))
            if m.accepted:
                self.stats.ncc.append(m.ncc)
                link = Link(nb, key, (m.shift[0] + strip.oy, m.shift[1] + strip.ox), m.sigma)
                self.solver.add_link(link)
                if self._arrival_links is not None:
                    self._arrival_links.append(link)
                    self._arrival_ncc.append(m.ncc)
        # Keep only the strips later neighbours will need, and whether they show anything.
        th, tw = grey.shape
        nxt = self._next_in_row(key)
        trailing = bottom = False
        if nxt in self._fields:
            if nxt[1] > key[1]:
                strip = _Strip(grey[:, tw - self._strip_x :].copy(), 0, tw - self._strip_x)
            else:
                strip = _Strip(grey[:, : self._strip_x].copy(), 0, 0)
            self._trailing[key] = strip
            trailing = texture(strip.grey, row_step=4) >= self._reg.min_texture  # every 4th row: same figure
        if (key[0] + 1, key[1]) in self._fields:
            self._bottom[key] = _Strip(grey[th - self._strip_y :].copy(), th - self._strip_y, 0)
            bottom = texture(self._bottom[key].grey, row_step=4) >= self._reg.min_texture
        self._content[key] = (trailing, bottom)

    def _near(
        self,
        pairs: list[tuple[Key, _Strip, tuple[float, float]]],
        measured: list[PairMeasurement],
        nb: Key,
        strip: _Strip,
    ) -> tuple[float, float] | None:
        """Where the new tile lies in ``nb``'s ``strip`` frame, from the pair measured before it (its other
        neighbour's accepted link and the solved positions of both neighbours), when the two neighbours are
        tied by links (one island: their relative position is measured, to hundredths of a pixel): the
        second pair's subpixel step starts there and skips the coarse search (see ``register_pair``).
        None for the first pair, or when the first was rejected or the neighbours are not tied."""
        if not measured or not measured[0].accepted:
            return None
        first, strip0, _ = pairs[0]
        if self.solver.island(first) != self.solver.island(nb):
            return None
        m = measured[0]
        p0, pn = self.solver.position(first), self.solver.position(nb)
        ty, tx = p0[0] + m.shift[0] + strip0.oy, p0[1] + m.shift[1] + strip0.ox  # the new tile's top-left
        return (ty - pn[0] - strip.oy, tx - pn[1] - strip.ox)

    # ------------------------------------------------------------------ blending

    def _expects_link(self, key: Key) -> bool:
        """Whether a neighbour still to come could register against this tile's content."""
        trailing, bottom = self._content.get(key, (False, False))
        later = []
        if trailing:
            later.append(self._next_in_row(key))
        if bottom:
            later.append((key[0] + 1, key[1]))
        return any(k in self._fields and k not in self._arrived for k in later)

    def _may_fix(self, key: Key, arrival: int, finishing: bool) -> bool:
        if finishing:
            return True
        if self.stats.tiles - arrival < self.params.lag_tiles:
            return False
        # Tied by registration to pixels already blended: final now. Not tied, but no later
        # neighbour can tie its island (glass, or the neighbours came and went): final on what is
        # known. The island, not the tile: one tile of an island made final grounds all of it, and
        # an island grounded on the stage prior while a later row could still join it to the mosaic
        # leaves that row a misclosure of the stage error's size to spread as a shear (16x12 e2e
        # recording: neighbours 0.3-8 px apart below such a join).
        if self.solver.grounded(key):
            return True
        island = self.solver.island(key)
        return not any(self._expects_link(k) for k, _, _, _ in self._pending if self.solver.island(k) == island)

    def _advance(self, finishing: bool) -> None:
        """Finalise and blend the waiting tiles that may be; flush final blocks and rows."""
        while self._pending and self._flat is not None:
            self.solver.solve()
            ready = [e for e in self._pending if self._may_fix(e[0], e[3], finishing)]
            if not ready and len(self._pending) > self._max_pending:
                ready = [self._pending[0]]  # memory cap: the oldest goes on what is known
            if not ready:
                break
            for entry in ready:
                self._pending.remove(entry)
                key, field, has_tile, _ = entry
                self.solver.fix([key])
                self._blend(key, field, self._cache.pop(("tile", field.index)) if has_tile else None)
        self._flush()

    def _blend(self, key: Key, field: FieldPlan, tile: U8 | None) -> None:
        assert self._flat is not None
        t0 = time.perf_counter()
        y, x = self.solver.position(key)
        iy, ix = math.floor(y + 0.5), math.floor(x + 0.5)  # fraction in [-0.5, 0.5): the least resampling
        fy, fx = y - iy, x - ix
        th, tw = self.geometry.tile_height, self.geometry.tile_width
        # Clip to the mosaic, and to rows not yet written (never reached with a sane stage margin).
        y0, y1 = max(iy, self._first_band_y, 0), min(iy + th, self.height)
        x0, x1 = max(ix, 0), min(ix + tw, self.width)
        if self.observer is not None:
            self.observer.placed(field, y, x, iy, ix)
        if tile is None:
            # A replayed field whose pixels are all in the mosaic already (runtime/output/journal.py).
            if y0 < y1 and x0 < x1:
                raise ValueError(f"field {key} covers mosaic rows {y0}..{y1} not yet written, but its tile is gone")
            y1 = y0
        else:
            self.stats.clipped_rows += max(0, min(self._first_band_y, iy + th) - max(iy, 0))
        if y0 < y1 and x0 < x1:
            assert tile is not None
            feather = feather_ramps(th, tw, **self._earlier_edges(key, iy, ix, th, tw))
            # flat-field and shift in one pass
            # moved8: what the opaque part of the tile becomes, rounded once; moved (float) is read
            # only outside it, where the strips are blended
            moved, moved8 = self._kernels.shift(
                tile, fy, fx, self._flat.inverse, self.params.resampling_kernel, opaque=feather.opaque()
            )
            c = self.chunk
            for bi in range(y0 // c, (y1 - 1) // c + 1):
                for bj in range(x0 // c, (x1 - 1) // c + 1):
                    # The tile's part in block (bi, bj), in mosaic coordinates.
                    ya, yb = max(y0, bi * c), min(y1, (bi + 1) * c)
                    xa, xb = max(x0, bj * c), min(x1, (bj + 1) * c)
                    if (bi, bj) in self._done:
                        self.stats.clipped_blocks += 1  # final already: never reached with a sane stage margin
                        continue
                    pixels = self._block((bi, bj))
                    rect = (ya - bi * c, yb - bi * c, xa - bj * c, xb - bj * c)
                    covered = self._covered_in((bi, bj), rect)
                    by, bx = slice(rect[0], rect[1]), slice(rect[2], rect[3])
                    composite_feathered(pixels[by, bx], covered, moved, moved8, feather, ya - iy, xa - ix)
                    self._rects[(bi, bj)].append(rect)
        self._placed[key] = (iy, ix)
        # Ramps need the placements of the rows next to any tile still to be blended.
        oldest = min([e[0][0] for e in self._pending] + [key[0]])
        for old in [k for k in self._placed if k[0] < oldest - 1]:
            del self._placed[old]
        self._blended_per_row[key[0]] += 1
        self.stats.blend_s += time.perf_counter() - t0

    def _earlier_edges(self, key: Key, iy: int, ix: int, th: int, tw: int) -> dict[str, float]:
        """Where earlier (already blended) neighbours end inside this tile, for its feather ramps."""
        edges: dict[str, float] = {}
        r, c = key
        for side, nb in (("left", (r, c - 1)), ("right", (r, c + 1))):
            p = self._placed.get(nb)
            if p is not None and abs(p[0] - iy) < th and abs(p[1] - ix) < tw:
                edges[side] = float(p[1] + tw - ix) if side == "left" else float(p[1] - ix)
        above, below = [], []
        for k, p in self._placed.items():
            if abs(k[0] - r) == 1 and abs(k[1] - c) <= 1 and p[1] < ix + tw and p[1] + tw > ix:
                if k[0] < r and p[0] < iy:
                    above.append(p[0] + th - iy)
                elif k[0] > r and p[0] > iy:
                    below.append(p[0] - iy)
        # Alpha must reach 1 before any earlier tile ends (where coverage changes).
        if above:
            edges["top"] = float(min(above))
        if below:
            edges["bottom"] = float(max(below))
        return edges

    # ------------------------------------------------------------------ canvas blocks

    def _block(self, key: Key) -> U8:
        """Canvas block ``key``: its (rows, columns, 3) pixels."""
        if key in self._blocks:
            (pixels,) = self._cache.get(("block", *key))
            return pixels
        i, j = key
        c = self.chunk
        h, w = min(c, self.height - i * c), min(c, self.width - j * c)
        pixels = np.full((h, w, 3), 255, np.uint8)  # glass is bright: pixels no tile covers stay white
        self._cache.put((("block", *key), pixels))
        self._blocks.add(key)
        self._rects[key] = []
        self.stats.peak_blocks = max(self.stats.peak_blocks, len(self._blocks))
        return pixels

    def _covered_in(self, key: Key, rect: tuple[int, int, int, int]) -> npt.NDArray[np.bool_]:
        """Which pixels of block ``key``'s rectangle ``rect`` (y0, y1, x0, x1) earlier tiles cover.

        A tile covers the whole rectangle it was blended into, so a block's covered pixels are the
        union of those rectangles: kept as a few tuples rather than a mask a quarter of the block's
        size (that mask was a fifth of what the cache held and spilled, and glue per tile)."""
        y0, y1, x0, x1 = rect
        covered = np.zeros((y1 - y0, x1 - x0), np.bool_)
        for ry0, ry1, rx0, rx1 in self._rects[key]:
            ya, yb, xa, xb = max(ry0, y0), min(ry1, y1), max(rx0, x0), min(rx1, x1)
            if ya < yb and xa < xb:
                covered[ya - y0 : yb - y0, xa - x0 : xb - x0] = True
        return covered

    def _reach(self) -> tuple[npt.NDArray[np.int64], int]:
        """Where tiles still to come can still blend: rectangles (top, bottom, left, right) of the
        waiting tiles (solved) and of the rest of this scan row and the next (predicted), grown by
        the stage margin; and the row above which the scan rows after those cannot reach.

        Called after every tile: the predictions (up to two scan rows of fields) are one array
        operation, not a call per field (at 100 fields a row that was ~4 ms of Python per tile)."""
        th, tw, m = self.geometry.tile_height, self.geometry.tile_width, self._margin
        solved = np.array([self.solver.position(key) for key, _, _, _ in self._pending], np.float64).reshape(-1, 2)
        fields = self.geometry.plan.fields
        limit = self.height
        rows_seen, last_row, n0 = 0, -1, self._next_index
        n, ends = n0, []
        while n < len(fields):
            if fields[n].row != last_row:
                rows_seen += 1
                last_row = fields[n].row
            if rows_seen > 2:
                # The scan row after next: its ends bound its top (a straight row, turned at most).
                ends = [n, min(len(fields), n + self.geometry.plan.cols) - 1]
                break
            n += 1
        predicted = self.solver.model.predict_many(self._commanded[[*range(n0, n), *ends]])
        if ends:
            limit = int(np.floor(predicted[n - n0 :, 0]).min()) - m
        corner = np.floor(np.concatenate([solved, predicted[: n - n0]])).astype(np.int64)
        rects = np.stack(
            [corner[:, 0] - m, corner[:, 0] + th + m + 1, corner[:, 1] - m, corner[:, 1] + tw + m + 1], axis=1
        )
        return rects.reshape(-1, 4), max(limit, 0)

    def _flush(self) -> None:
        """Write every block no tile still to come can reach; complete the chunk rows that are all final."""
        rects, limit = self._reach()
        c = self.chunk
        if self._blocks:
            keys = sorted(self._blocks)
            b = np.array(
                [(i * c, min((i + 1) * c, self.height), j * c, min((j + 1) * c, self.width)) for i, j in keys],
                dtype=np.int64,
            )
            hit = (
                (b[:, None, 0] < rects[None, :, 1])
                & (b[:, None, 1] > rects[None, :, 0])
                & (b[:, None, 2] < rects[None, :, 3])
                & (b[:, None, 3] > rects[None, :, 2])
            )
            final = ~hit.any(axis=1) & (b[:, 1] <= limit)
            for key, done in zip(keys, final.tolist(), strict=True):
                if done:
                    self._write_block(key)
        final_y = min([limit, *rects[:, 0].tolist()])
        while self._first_band_y < self.height:
            end = min(self._first_band_y + c, self.height)
            if end > final_y:
                break
            row = self._first_band_y // c
            for key in [k for k in self._blocks if k[0] == row]:
                self._write_block(key)  # final by the rectangles already: kept for safety
            self.store.complete_rows(end)
            self._done = {k for k in self._done if k[0] != row}
            self._first_band_y = end

    def _write_block(self, key: Key) -> None:
        del self._rects[key]
        self.store.write_block(key[0], key[1], self._cache.pop(("block", *key)))
        self._blocks.discard(key)
        self._done.add(key)

    def _note_memory(self) -> None:
        held = self._cache.peak_held_bytes + sum(s.grey.nbytes for s in self._trailing.values())
        self.stats.peak_held_bytes = max(self.stats.peak_held_bytes, held)
        self.stats.spilled, self.stats.reloaded = self._cache.spilled, self._cache.reloaded
