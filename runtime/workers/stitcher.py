"""The stitching worker: takes tiles out of the ring, accumulates them into the Zarr mosaic.

It gives each slot back as soon as the tile is pasted, so acquisition is
never held up by more than one paste. Rows of the mosaic that become final
are announced to the writer (:class:`~runtime.ipc.messages.MosaicRows`) as
they are written; after the acquisition's :class:`~runtime.ipc.messages.EndOfStream`
the mosaic is finished and :class:`~runtime.ipc.messages.MosaicDone` goes to the
writer and the scan job. If this worker fails, the writer's stream is ended
without a MosaicDone (the writer then keeps no slide).

It also keeps the scan journal (runtime/output/journal.py): each tile goes to the spill
(``tiles/``) before anything else, then its ``field`` record (capture, focus, the pair
measurements) is appended; final positions (``placed``) and the mosaic rows on disk
(``written``) follow, and a tile's spill file goes once its rows are written. All of that is
done, in that order, by one background thread (:class:`JournalObserver`): the fsyncs it waits for
(~9 ms per tile, ~150 ms per chunk row of the mosaic here) no longer hold up the tiles, and a
crash still finds each field's record only after its tile is on disk and each ``written`` record
only after its rows are. A resumed
scan (``StitchJob.resume``) reopens the mosaic, replays the journal into the accumulator --
the journaled links, flat-field and positions, the spilled tiles' pixels -- so that its state
is the one the interrupted scan had, announces the rows already on disk to the writer and
carries on with the tiles acquisition captures next.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing.queues import Queue
from pathlib import Path
from typing import NoReturn, TypeAlias, assert_never

import numpy as np

from runtime.config import DaemonConfig, MosaicConfig, StitchConfig, WriterConfig
from runtime.devices.scan_plan import FieldPlan
from runtime.errors import describe
from runtime.ipc.messages import (
    EndOfStream,
    EventQueue,
    MosaicBlocks,
    MosaicDone,
    MosaicRows,
    SlotQueue,
    TileQueue,
    TileReady,
    WorkerFailed,
    WriterQueue,
    peak_rss_bytes,
)
from runtime.ipc.ring import RingSpec
from runtime.output.journal import (
    FLATFIELD_NAME,
    JOURNAL_NAME,
    FieldEntry,
    JournalError,
    JournalState,
    LinkEntry,
    ScanJournal,
    TileSpill,
    load_arrays,
    read_journal,
    save_arrays,
)
from runtime.output.mosaic_store import BlocksFinal, MosaicError, MosaicStore, RowsFinal
from runtime.stitching.accumulator import DequeAccumulator, MosaicGeometry, Replay
from runtime.stitching.backends import StitchBackendError
from runtime.stitching.flatfield import FlatField
from runtime.stitching.positions import Link
from runtime.workers.skeleton import POLL_S, WorkerContext, run_worker

log = logging.getLogger("wsi.stitcher")

# What the stitcher process needs besides what its accumulator holds, at 1024 px RGB tiles: the
# interpreter and its libraries (numpy, OpenCV, Zarr, imagecodecs), the ring's slots it reads (shared
# memory, ~24 MiB), a tile's float working copies while it is blended, the heap glibc keeps (up to
# M_TRIM_THRESHOLD below). Measured (stop 23, workers forked from the fork server) with `python -m bench
# e2e --tile 1024 --cores 2` as peak RSS minus the held budget, at 48 / 72 / 80 MiB held: 160 / 145 / 141
# MiB at 16x12 fields (15k px wide), 152 / - / 152 at 36x2 (33k), 170 / 180 / 176 at 100x2 (92k) -- so
# 192 (the widest's 180 and some margin; it was 208 with spawned workers): 64 MiB held at the default
# 768, peak RSS 215 / 216 / 238 MiB at those widths; on the 16x12 scan 39 canvas arrays spilled (179
# with 48 MiB held).
STITCHER_BASE_MIB = 192
STITCHER_SHARE = 1 / 3  # of daemon.memory_budget_mib
MIN_HELD_MIB = 16.0  # a tile and the blocks under it (below this the cache thrashes)


MMAP_THRESHOLD = 4 * 2**20  # glibc's M_MMAP_THRESHOLD in the stitcher (bytes)
TRIM_THRESHOLD = 32 * 2**20  # and M_TRIM_THRESHOLD


def return_freed_memory() -> None:
    """Fix glibc's allocation thresholds for the stitcher (Linux; elsewhere a no-op): arrays below
    :data:`MMAP_THRESHOLD` come from the heap, which keeps up to :data:`TRIM_THRESHOLD` of free memory at
    its top instead of returning it at once; larger ones (the flat-field fit's float64 planes, once) are
    mapped and given back on free.

    The stitcher's per-tile temporaries (registration strips, blend strips, canvas blocks, spilled
    arrays, waiting tiles: 0.25-3 MiB each) were mapped and unmapped one by one with the 256 KiB
    threshold used until stop 22, and paging them in again (faults, zeroing, memcg) was a third of its
    main thread's CPU-seconds (perf on ``bench e2e``, 16 x 12 fields). glibc's dynamic threshold would
    keep RSS drifting up to the largest array freed. Measured on that e2e (2 cores, load 8-25, stitcher
    CPU-s/Gpx; peak RSS at 16 x 12 and 100 x 2 fields): 256 KiB 55-57, 211 MiB; 16 MiB 52-56, 237-240 /
    248-249 MiB; 4 MiB 51-55, 227 / 237 MiB (the trim threshold, 16 or 32 MiB, changed neither)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; setting it turns the dynamic threshold off
        libc.mallopt(-1, TRIM_THRESHOLD)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def held_budget_mib(memory_budget_mib: float) -> float:
    """The accumulator's RAM (canvas blocks, waiting tiles, strips) in a daemon of this budget."""
    return max(MIN_HELD_MIB, memory_budget_mib * STITCHER_SHARE - STITCHER_BASE_MIB)


@dataclass(frozen=True)
class StitchJob:
    """What is particular to this scan (the settings come as config sections beside it)."""

    geometry: MosaicGeometry
    ring: RingSpec
    mosaic_path: str
    folder: str = ""  # the scan's folder: journal, spill (empty: no journal, e.g. a bench)
    resume: bool = False  # continue the journaled scan in ``folder``
    # daemon.memory_budget_mib: the stitcher holds what it must keep within its share
    memory_budget_mib: int = DaemonConfig.model_fields["memory_budget_mib"].default


class JournalObserver:
    """Writes what the accumulator decides into the scan journal, and drops spilled tiles whose
    mosaic rows are on disk. While a journal is replayed it checks instead of writing.

    The disk work -- tile spill, journal records, fsyncs of mosaic rows -- runs in one background
    thread, first in first out, so it keeps the order that makes a crash safe (a tile before its
    ``field`` record, rows before their ``written`` record) while the main thread goes on with the
    next tile. A tile's ring slot is reused only once the tile is spilled (:meth:`save_tile`'s ``then``, or
    :meth:`wait_tile`); :meth:`flush` before the mosaic is announced done."""

    MAX_QUEUED = 64  # jobs behind the disk before the main thread waits (bounds the memory they hold)

    def __init__(self, journal: ScanJournal, folder: Path, geometry: MosaicGeometry, store: MosaicStore) -> None:
        self.journal = journal
        self.folder = folder
        self.spill = TileSpill(folder)
        self.geometry = geometry
        self.store = store
        self._io = ThreadPoolExecutor(1, thread_name_prefix="journal")
        self._queued: deque[Future[None]] = deque()
        self._tile_saved: dict[int, Future[None]] = {}
        self._durable_rows = 0  # level-0 rows whose ``written`` record is on disk (set by the thread)
        self._failed: BaseException | None = None  # the thread's first error: it then does nothing more
        self.current: TileReady | None = None  # the tile being added
        self.replaying: JournalState | None = None
        self.flatfield_journaled = False
        # Called once per placed tile: the worker's heartbeat. finish() blends every waiting tile
        # (up to a row of them) and writes their blocks and pyramid rows without returning to the
        # worker's loop; on a wide scan under load that outlasted the heartbeat timeout.
        self.on_placed: Callable[[], None] | None = None
        # An incomplete stream's finish() blends what waits on what is known and writes every band
        # (for an export): not what the scan would have done, so none of it is journaled, and a
        # resume rewinds the mosaic to the journal's rows.
        self.frozen = False
        self._bottoms: dict[int, int] = {}  # placed fields still spilled: index -> mosaic row below the tile
        self._rows = 0  # level-0 rows handed to the thread to journal
        self._level_rows: dict[int, int] = {}  # levels >= 1: rows handed to the thread to journal

    # ---------------------------------------------------------------- the background thread

    def _later(self, fn: Callable[[], None]) -> Future[None]:
        fut = self._io.submit(self._run, fn)
        self._queued.append(fut)
        while self._queued and (self._queued[0].done() or len(self._queued) > self.MAX_QUEUED):
            self._queued.popleft().result()  # re-raises the thread's error here
        return fut

    def _run(self, fn: Callable[[], None]) -> None:
        """In the thread: one job, unless an earlier one failed -- then nothing after it may reach the
        disk (a ``field`` record whose tile was not saved, say, would be a field lost on resume)."""
        if self._failed is not None:
            raise RuntimeError(f"an earlier journal write failed: {self._failed}")
        try:
            fn()
        except BaseException as err:
            self._failed = err
            raise

    def save_tile(self, index: int, tile: np.ndarray, then: Callable[[], None] | None = None) -> None:
        """Spill the tile (durably) in the background; its ``field`` record waits for it. ``then``: called by
        the thread once the tile is on disk (not if the spill failed)."""

        def save() -> None:
            self.spill.save(index, tile)
            if then is not None:
                then()

        fut = self._later(save)
        if then is None:  # for wait_tile (a caller with ``then`` does not wait: nothing to keep)
            self._tile_saved[index] = fut

    def wait_tile(self, index: int) -> None:
        """Block until tile ``index`` is in the spill: its ring slot may then be reused."""
        fut = self._tile_saved.pop(index, None)
        if fut is not None:
            fut.result()

    def flush(self) -> None:
        """Wait until everything handed to the thread is on disk; drop the tiles it made redundant."""
        while self._queued:
            self._queued.popleft().result()
        self._tile_saved.clear()
        self._drop_durable()

    def close(self, *, flush: bool = True) -> None:
        """Flush (on any exit path: a failed scan keeps what was made durable) and close the journal.
        ``flush=False`` drops what the thread has not started, as a crash would (for tests)."""
        try:
            if flush:
                self.flush()
        finally:
            self._io.shutdown(wait=True, cancel_futures=not flush)
            self.journal.close()

    def registered(
        self, field: FieldPlan, links: list[Link], pairs: list[str], ncc: list[float], content: tuple[bool, bool]
    ) -> None:
        msg = self.current
        if msg is None or msg.plan.index != field.index:
            raise RuntimeError(f"field {field.index} registered without its capture")
        focus = msg.focus
        entry = FieldEntry(
            index=field.index,
            row=field.row,
            col=field.col,
            record=_json_record(asdict(msg.field)),
            focus={}
            if focus is None
            else {"last_z_um": focus.last_z_um, "surface": [list(p) for p in focus.surface], "sign": list(focus.sign)},
            links=tuple(
                LinkEntry(_key(lk.a), _key(lk.b), (float(lk.shift[0]), float(lk.shift[1])), lk.sigma) for lk in links
            ),
            pairs=tuple(pairs),
            ncc=tuple(float(v) for v in ncc),
            content=content,
        )
        record = entry.to_json()
        self._later(lambda: self.journal.append("field", **record))

    def flatfield_ready(self, arrival: int, flat: FlatField) -> None:
        if self.flatfield_journaled or self.frozen:
            return

        def save() -> None:
            save_arrays(
                self.folder,
                FLATFIELD_NAME,
                gain=flat.gain,
                source=np.array(flat.source),
                coefficients=np.array(flat.coefficients, dtype=np.float64),
            )
            self.journal.append("flatfield", after=arrival)

        self._later(save)
        self.flatfield_journaled = True

    def placed(self, field: FieldPlan, y: float, x: float, iy: int, ix: int) -> None:
        if self.frozen:
            return
        state = self.replaying
        if state is not None and field.index in state.placements:
            p = state.placements[field.index]
            if abs(p.y - y) > 1e-6 or abs(p.x - x) > 1e-6 or (p.iy, p.ix) != (iy, ix):
                raise JournalError(
                    f"replaying the journal placed field {field.index} at ({y:.4f}, {x:.4f}), "
                    f"the scan had placed it at ({p.y:.4f}, {p.x:.4f})"
                )
        else:
            index = field.index
            self._later(lambda: self.journal.append("placed", index=index, y=y, x=x, iy=iy, ix=ix))
        self._bottoms[field.index] = iy + self.geometry.tile_height
        self._drop_durable()
        if self.on_placed is not None:
            self.on_placed()

    def rows(self, level: int, rows: int) -> None:
        """The store's rows callback: rows [0, rows) of ``level`` are on disk; fsynced, then journaled."""
        done = self._rows if level == 0 else self._level_rows.get(level, 0)
        if rows <= done or self.frozen:
            return
        if level == 0:
            self._rows = rows
        else:
            self._level_rows[level] = rows

        def sync() -> None:
            self.store.sync_rows(level, done, rows)
            if level == 0:
                self.journal.append("written", rows=rows)
                self._durable_rows = rows
            else:
                self.journal.append("written", rows=rows, level=level)

        self._later(sync)
        self._drop_durable()

    def start(self, rows: int, level_rows: dict[int, int]) -> None:
        self._rows = self._durable_rows = rows
        self._level_rows = dict(level_rows)

    def _drop_durable(self) -> None:
        """Drop the spilled tiles whose rows a ``written`` record on disk covers (in the thread, after
        the record: a tile is never gone before the journal vouches for its rows)."""
        durable = self._durable_rows
        drop = [i for i, b in self._bottoms.items() if b <= durable]
        for index in drop:
            del self._bottoms[index]
        if drop:

            def unlink() -> None:
                for index in drop:
                    self.spill.drop(index)

            self._later(unlink)


class SlotRelease:
    """Gives a ring slot back (``free_slots.put(slot)``) once each of its ``users`` has called :meth:`done`,
    from whichever thread calls last: the stitcher's main thread (the accumulator has read the tile) and
    the journal thread (the tile is spilled). The main thread used to wait for the spill before it took
    the next tile -- behind every fsync queued before it (journal records, a mosaic row's chunk files):
    in ``bench e2e --fields 16 12 --tile 1024 --cores 2`` (py-spy --idle) 3.9 of its 12.3 s went to that
    wait, and acquisition waited 8.1 s for free slots."""

    def __init__(self, free_slots: SlotQueue, slot: int, users: int) -> None:
        self._free_slots = free_slots
        self._slot = slot
        self._left = users
        self._lock = threading.Lock()

    def done(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._free_slots.put(self._slot)


def _key(k: object) -> tuple[int, int]:
    assert isinstance(k, tuple) and len(k) == 2
    return (int(k[0]), int(k[1]))


def _json_record(d: dict[str, object]) -> dict[str, object]:
    """A FieldRecord as JSON (a non-finite z becomes null)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, float) and not np.isfinite(v):
            v = None
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def reopen_mosaic(
    path: Path,
    state: JournalState,
    create: Callable[[], MosaicStore],
    on_rows: RowsFinal,
    on_blocks: BlocksFinal | None = None,
) -> MosaicStore:
    """The interrupted scan's mosaic, or a new one (``create``) when the scan was interrupted before
    the mosaic was made or any of its rows written (the spill then holds every journaled tile)."""
    try:
        return MosaicStore.open(path, on_rows=on_rows, on_blocks=on_blocks)
    except MosaicError as err:
        if state.rows_written:
            raise JournalError(f"the journal says {state.rows_written} mosaic rows were written, but {err}") from None
        return create()


def resume(acc: DequeAccumulator, store: MosaicStore, state: JournalState, observer: JournalObserver) -> None:
    """A fresh accumulator on a reopened mosaic, brought to the journaled scan's state: the mosaic
    rewound to the journal's rows (a cancel's or failure's last flush wrote rows that were not
    final), then the journal replayed."""
    lower = [state.level_rows.get(k, 0) for k in range(1, store.n_levels)]
    store.rewind(min(state.rows_written, store.rows_written), lower)
    rows = store.rows_written
    observer.start(rows, {k: store.level_rows_written(k) for k in range(1, store.n_levels)})
    acc.resume_at(rows)
    replay_journal(acc, state, observer, {f.index: f for f in acc.geometry.plan.fields})


def replay_journal(
    acc: DequeAccumulator, state: JournalState, observer: JournalObserver, fields: dict[int, FieldPlan]
) -> None:
    """Bring a fresh accumulator (``resume_at`` already called) to the journaled scan's state."""
    flat: FlatField | None = None
    if state.flatfield_after is not None:
        arrays = load_arrays(observer.folder, FLATFIELD_NAME)
        coeffs = tuple(tuple(float(c) for c in row) for row in arrays["coefficients"])
        flat = FlatField(np.asarray(arrays["gain"], np.float32), str(arrays["source"]), coeffs)
        observer.flatfield_journaled = True
    observer.replaying = state
    try:
        for n, entry in enumerate(state.fields, start=1):
            plan = fields.get(entry.index)
            if plan is None or (plan.row, plan.col) != (entry.row, entry.col):
                where = f"{entry.index} ({entry.row}, {entry.col})"
                raise JournalError(f"journaled field {where} is not in this scan's plan")
            tile = observer.spill.load(entry.index)
            links = tuple(Link(lk.a, lk.b, lk.shift, lk.sigma) for lk in entry.links)
            replay = Replay(links, entry.content, entry.pairs, entry.ncc, flat if n == state.flatfield_after else None)
            acc.add(plan, tile, replay)
    finally:
        observer.replaying = None


def refuse_backend(err: StitchBackendError, events: EventQueue, to_writer: WriterQueue) -> NoReturn:
    """``stitch.backend`` cannot run here (CuPy without a device, or disagreeing with the CPU): the operator's
    configuration, not a bug, so the scan fails with the message alone -- no traceback in the log. Does what the
    skeleton does for a failure (``WorkerFailed`` first, then the writer's stream ended), then exits 1."""
    message = describe(err)
    log.error("stitcher worker failed: %s", message)
    events.put(WorkerFailed("stitcher", message))
    to_writer.put(EndOfStream("the stitcher failed"))
    raise SystemExit(1)  # past run_worker's Exception handler (which logs a traceback); its exit callbacks run


StitchJobQueue: TypeAlias = "Queue[StitchJob | EndOfStream]"


def wait_for_job(worker: WorkerContext, jobs: StitchJobQueue) -> StitchJob | None:
    """The scan's :class:`StitchJob`, beating meanwhile: the stitcher is forked when the scan starts, while
    acquisition opens the devices, and gets its job once the plan is known. None when the scan ended first
    (:class:`EndOfStream`: the scan job tells the writer itself)."""
    while True:
        worker.beat()  # raises SystemExit once the supervisor is gone
        try:
            msg = jobs.get(timeout=POLL_S)
        except queue.Empty:
            continue
        return msg if isinstance(msg, StitchJob) else None


def stitcher_main(
    jobs: StitchJobQueue,
    mosaic: MosaicConfig,
    stitch: StitchConfig,
    writer: WriterConfig,
    tiles: TileQueue,
    free_slots: SlotQueue,
    to_writer: WriterQueue,
    events: EventQueue,
) -> None:
    """Process entry point (spawned). Waits for its :class:`StitchJob` on ``jobs``, then ends on the
    acquisition's :class:`EndOfStream`.

    ``writer``: for ``min_level_size``, where the mosaic's pyramid (which the writer streams)
    stops."""

    def body(worker: WorkerContext) -> None:
        worker.on_failure(lambda _: to_writer.put(EndOfStream("the stitcher failed")))
        return_freed_memory()
        job = wait_for_job(worker, jobs)
        if job is None:
            log.debug("the scan ended before its plan: nothing to stitch")
            return
        ring = worker.attach(job.ring)
        h, w = job.geometry.shape
        observer: JournalObserver | None = None

        def on_rows(level: int, rows: int) -> None:
            if observer is not None:
                observer.rows(level, rows)  # durable first: the journal says what the writer may read
            # The writer streams the OME-TIFF from the rows that become final (see runtime.workers.writer).
            to_writer.put(MosaicRows(job.mosaic_path, level, rows))
            if threading.current_thread() is threading.main_thread():
                worker.beat()  # the pyramid rows of finish() come without a tile in between

        def on_blocks(level: int, blocks: list[tuple[int, int]]) -> None:
            # Not journaled: blocks are ahead of the rows a resume may trust. The writer encodes them
            # now instead of when their chunk row is final (the tail of a wide slide's last rows).
            to_writer.put(MosaicBlocks(job.mosaic_path, level, tuple(blocks)))

        # The writer only takes blocks where a tile is a chunk and no DICOM copy (row-major frames)
        # is made (OmeTiffStream.blocks_final): otherwise there is nothing to announce.
        blocks_cb = on_blocks if writer.tile == mosaic.chunk and not writer.dicom else None

        def create(overwrite: bool = False) -> MosaicStore:
            return MosaicStore.create(
                Path(job.mosaic_path),
                h,
                w,
                chunk=mosaic.chunk,
                pixel_size_um=job.geometry.pixel_size_um,
                compressor=mosaic.compressor,
                min_level_size=writer.min_level_size,
                on_rows=on_rows,
                on_blocks=blocks_cb,
                overwrite=overwrite,
            )

        state: JournalState | None = None
        if job.resume:
            state = read_journal(Path(job.folder) / JOURNAL_NAME)
            store = reopen_mosaic(Path(job.mosaic_path), state, lambda: create(overwrite=True), on_rows, blocks_cb)
            if store.shape != (h, w):
                raise JournalError(f"the mosaic is {store.shape}, this scan's plan makes {(h, w)}")
        else:
            store = create()
        # OpenCV keeps its own pool (a thread per core): with one OpenCV thread and the two registration
        # pairs on two threads instead the stitcher used no fewer CPU-s/Gpx in the daemon, and the tail
        # grew (16x12 e2e, load 4-5: 1.07/1.11 s against 0.76/0.56 s), since finish() blends and reduces
        # on the main thread alone (notes/h15-glue.md); that option of the accumulator is gone.
        try:
            acc = DequeAccumulator(
                job.geometry, store, stitch, memory_budget_mib=held_budget_mib(job.memory_budget_mib)
            )
        except StitchBackendError as err:
            refuse_backend(err, events, to_writer)
        if job.folder:
            journal = ScanJournal.open(job.folder)
            observer = JournalObserver(journal, Path(job.folder), job.geometry, store)
            worker.on_exit(observer.close)  # before the ring closes: a tile may still be being spilled
            observer.on_placed = worker.beat
            acc.observer = observer
        if state is not None:
            assert observer is not None
            resume(acc, store, state, observer)
            rows = store.rows_written
            # What is on disk already, for the writer (it writes the slide from the start).
            for level in range(store.n_levels):
                to_writer.put(MosaicRows(job.mosaic_path, level, store.level_rows_written(level)))
            log.info("resumed: %d fields replayed, mosaic rows %d on disk", len(state.fields), rows)
        while True:
            worker.beat()
            try:
                msg = tiles.get(timeout=POLL_S)
            except queue.Empty:
                continue
            match msg:
                case TileReady():
                    tile = ring.slot(msg.slot)
                    # The slot is read by the accumulator and by the spill: it goes back to acquisition once
                    # both are done with it, whichever finishes last (see SlotRelease).
                    release = SlotRelease(free_slots, msg.slot, users=2 if observer is not None else 1)
                    if observer is not None:
                        # durable before it is journaled; the journal thread gives the slot back once the tile
                        # is on disk, so this thread goes on with the next tile meanwhile
                        observer.save_tile(msg.plan.index, tile, then=release.done)
                        observer.current = msg
                    acc.add(msg.plan, tile)
                    release.done()
                case EndOfStream():
                    log.debug("tile stream ended: %s", msg.reason)
                    break
                case _:
                    assert_never(msg)
        if observer is not None and not acc.all_arrived:
            observer.frozen = True
        complete = acc.finish()
        if complete:
            store.finish()
        summary = acc.summary()
        # The writer first: it closes the slide while the journal thread fsyncs the last rows (the
        # scan job writes ``completed`` only once this process is gone, so after the flush below).
        to_writer.put(MosaicDone(job.mosaic_path, (h, w), complete, peak_rss_bytes(), summary))
        if observer is not None:
            observer.flush()  # every record on disk before the scan job hears the mosaic is done
        events.put(MosaicDone(job.mosaic_path, (h, w), complete, peak_rss_bytes(), summary))

    run_worker("stitcher", events, body)
