"""The deque accumulator: turns a serpentine stream of tiles into final mosaic bands.

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
   position and feathered over what is already in the band
   (``runtime.stitching.blending``).
4. **Flush** every band above the highest row any tile still to come could
   reach (its predicted top minus the stage's largest error) to the Zarr
   store, which also builds the pyramid.

What it holds: the bands from the first non-final mosaic row to the bottom of
the last blended tile (about a tile height plus the stage error plus a chunk,
full mosaic width); for registration, grey overlap strips only -- the
trailing strip of the previous tile and the bottom strips of the previous
row's tiles, each dropped as soon as its neighbour has used it; and the tiles
that wait: for ``lag_tiles``, for the flat-field warm-up (at most
``flatfield_warmup_tiles``, once, at the start) or for a neighbour to ground
them (at most ``cols + 1``; in a typical scan only at its start and where
tissue begins after glass). Memory is bounded by the row width and the tile
size, not by the slide.

The mosaic keeps the commanded grid's extent (``MosaicGeometry.shape``);
tiles moved by their stage error are clipped to it, and pixels no tile
covers stay white (glass).
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from runtime.config import StitchConfig
from runtime.devices.scan_plan import FieldPlan, GridPlan
from runtime.output.mosaic_store import MosaicStore
from runtime.stitching.blending import composite, feather_alpha, subpixel_shift
from runtime.stitching.flatfield import FlatField, FlatFieldEstimator
from runtime.stitching.positions import Link, PositionSolver
from runtime.stitching.registration import RegistrationParams, register_pair, texture, to_grey

U8 = npt.NDArray[np.uint8]
Key = tuple[int, int]


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


@dataclass
class _Band:
    y: int
    pixels: U8
    covered: npt.NDArray[np.bool_]


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
    peak_bands: int = 0
    peak_held_bytes: int = 0


class DequeAccumulator:
    """Receives tiles in acquisition order; writes final bands to the mosaic store."""

    def __init__(self, geometry: MosaicGeometry, store: MosaicStore, params: StitchConfig | None = None) -> None:
        """``params``: the ``[stitch]`` config section (validated there; None: its defaults).
        ``stage_sigma_um`` weighs the stage prior; ``max_stage_error_um``, twice, bounds the
        registration search between two tiles and, once, the margin before a band is final;
        ``lag_tiles``: later tiles a tile waits for before it is final (0: final on arrival)."""
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
        self._strip_x = min(geometry.tile_width, ov_x + math.ceil(self._reg.search_px) + 8)
        self._strip_y = min(geometry.tile_height, ov_y + math.ceil(self._reg.search_px) + 8)
        th, tw = geometry.tile_height, geometry.tile_width
        self._ff_est = FlatFieldEstimator(th, tw) if self.params.flatfield else None
        self._flat: FlatField | None = None if self.params.flatfield else FlatField.identity(th, tw)
        self._bands: deque[_Band] = deque()
        self._first_band_y = 0  # mosaic row of the first band not yet written
        # (key, field, tile, arrival number); a replayed field whose rows are all written has no tile
        self._pending: list[tuple[Key, FieldPlan, U8 | None, int]] = []
        self._trailing: dict[Key, _Strip] = {}
        self._bottom: dict[Key, _Strip] = {}
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

    # ------------------------------------------------------------------ public

    @property
    def peak_bands(self) -> int:
        return self.stats.peak_bands

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
            self._replay_links(key, replay, None if tile is None else to_grey(tile))
        elif self.params.registration:
            assert tile is not None
            self._arrival_links, self._arrival_pairs, self._arrival_ncc = [], [], []
            self._register(key, to_grey(tile))
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
        # The ring slot is handed back after add(): keep a copy while the tile waits.
        self._pending.append((key, field, None if tile is None else np.array(tile, copy=True), arrival))
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
                self._flat = self._ff_est.estimate()
                if self.observer is not None:
                    self.observer.flatfield_ready(arrival, self._flat)
            self.stats.flatfield_s += time.perf_counter() - t2
        self._advance(finishing=False)
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
        # Complete or cancelled, nothing captured is lost: every band goes out
        # (a cancelled scan keeps its partial bottom band too).
        while self._bands:
            self._write(self._bands.popleft())
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
            "stage_rotation_deg": model.rotation_deg,
            "stage_scale": list(model.scale),
            "clipped_rows": s.clipped_rows,
            "peak_bands": s.peak_bands,
            "peak_held_mib": round(s.peak_held_bytes / 2**20, 1),
            "positions": positions,
        }

    @staticmethod
    def bands_bound(geometry: MosaicGeometry, chunk: int, max_stage_error_px: float = 0.0) -> int:
        """The most bands the deque can hold at once: a tile's height, the stage margin, alignment."""
        return math.ceil((geometry.tile_height + 2 * max_stage_error_px + 4) / chunk) + 2

    # ------------------------------------------------------------------ registration

    def _previous_in_row(self, key: Key) -> Key:
        r, c = key
        return (r, c - 1) if r % 2 == 0 else (r, c + 1)

    def _next_in_row(self, key: Key) -> Key:
        r, c = key
        return (r, c + 1) if r % 2 == 0 else (r, c - 1)

    def _register(self, key: Key, grey: U8) -> None:
        for nb, strips in ((self._previous_in_row(key), self._trailing), ((key[0] - 1, key[1]), self._bottom)):
            strip = strips.pop(nb, None)
            if strip is None:
                continue
            py, px = self.solver.predicted_displacement(nb, key)
            m = register_pair(strip.grey, grey, (py - strip.oy, px - strip.ox), self._reg)
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
            trailing = texture(strip.grey) >= self._reg.min_texture
        if (key[0] + 1, key[1]) in self._fields:
            self._bottom[key] = _Strip(grey[th - self._strip_y :].copy(), th - self._strip_y, 0)
            bottom = texture(self._bottom[key].grey) >= self._reg.min_texture
        self._content[key] = (trailing, bottom)

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
        # neighbour can tie it (glass, or its neighbours came and went): final on what is known.
        return self.solver.grounded(key) or not self._expects_link(key)

    def _advance(self, finishing: bool) -> None:
        """Finalise and blend the waiting tiles that may be; flush final bands."""
        while self._pending and self._flat is not None:
            self.solver.solve()
            ready = [e for e in self._pending if self._may_fix(e[0], e[3], finishing)]
            if not ready and len(self._pending) > self._max_pending:
                ready = [self._pending[0]]  # memory cap: the oldest goes on what is known
            if not ready:
                break
            for entry in ready:
                self._pending.remove(entry)
                key, field, tile, _ = entry
                self.solver.fix([key])
                self._blend(key, field, tile)
        self._flush(self._final_y())

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
        y = y0
        if y < y1 and x0 < x1:
            assert tile is not None
            moved = subpixel_shift(self._flat.correct(tile), fy, fx)
            alpha = feather_alpha(th, tw, **self._earlier_edges(key, iy, ix, th, tw))
        while y < y1 and x0 < x1:
            band = self._band_for(y)
            y_end = min(y1, band.y + band.pixels.shape[0])
            by, ty = slice(y - band.y, y_end - band.y), slice(y - iy, y_end - iy)
            bx, tx = slice(x0, x1), slice(x0 - ix, x1 - ix)
            composite(band.pixels[by, bx], band.covered[by, bx], moved[ty, tx], alpha[ty, tx])
            y = y_end
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

    # ------------------------------------------------------------------ bands

    def _band_for(self, y: int) -> _Band:
        idx = (y - self._first_band_y) // self.chunk
        if idx < 0:
            raise ValueError(f"mosaic row {y} was already written")
        while len(self._bands) <= idx:
            band_y = self._first_band_y + len(self._bands) * self.chunk
            h = min(self.chunk, self.height - band_y)
            # Glass is bright: pixels no tile covers stay white.
            self._bands.append(
                _Band(band_y, np.full((h, self.width, 3), 255, np.uint8), np.zeros((h, self.width), bool))
            )
        self.stats.peak_bands = max(self.stats.peak_bands, len(self._bands))
        return self._bands[idx]

    def _final_y(self) -> int:
        """Mosaic rows above this are final: no tile still to come can reach them."""
        top = self.height
        model = self.solver.model
        for key, _, _, _ in self._pending:
            top = min(top, math.floor(self.solver.position(key)[0]) - self._margin)
        # Tiles not yet captured: the rest of this scan row and the next one bound all later rows.
        fields = self.geometry.plan.fields
        rows_seen = 0
        last_row = -1
        for n in range(self._next_index, len(fields)):
            f = fields[n]
            if f.row != last_row:
                rows_seen += 1
                last_row = f.row
                if rows_seen > 2:
                    break
            top = min(top, math.floor(model.predict(self.geometry.commanded_top_left(f))[0]) - self._margin)
        return max(top, 0)

    def _flush(self, final_y: int) -> None:
        while self._bands and self._bands[0].y + self._bands[0].pixels.shape[0] <= final_y:
            self._write(self._bands.popleft())

    def _write(self, band: _Band) -> None:
        if band.y != self._first_band_y:
            raise RuntimeError(f"band at {band.y}, expected {self._first_band_y}")
        self.store.write_band(band.y, band.pixels)
        self._first_band_y = band.y + band.pixels.shape[0]

    def _note_memory(self) -> None:
        held = sum(b.pixels.nbytes + b.covered.nbytes for b in self._bands)
        held += sum(s.grey.nbytes for s in self._trailing.values())
        held += sum(s.grey.nbytes for s in self._bottom.values())
        held += sum(e[2].nbytes for e in self._pending if e[2] is not None)
        self.stats.peak_held_bytes = max(self.stats.peak_held_bytes, held)
