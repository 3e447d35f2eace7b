"""The analysis worker: slide analysis (runtime.analysis) on the mosaic's final rows, during the scan.

One process serves every scan of the daemon (``[analysis] enabled``): the supervisor starts it
with the daemon and keeps it (:mod:`runtime.daemon.analysis_service`), so that a scan does not pay
the worker's start -- the interpreter, the imports (zarr, onnxruntime, OpenCV, shapely) and the
ONNX Runtime sessions, about 0.8 CPU s on the 2-core x86 test machine, a large part of a small
scan's added wall time when the worker was started per scan. It loads the models once, at its start,
and again only when a scan's :class:`~runtime.ipc.messages.AnalysisBegin` asks for other ones
(:func:`model_key`: the config's model choice and the identity of each model folder on disk, so
a folder re-exported in place is re-loaded too).

Per scan (:data:`~runtime.ipc.messages.AnalysisMessage`, in order): ``AnalysisBegin`` names the
scan's folder and mosaic; the stitcher's row announcements (:class:`~runtime.ipc.messages.MosaicRows`,
relayed by the scan job) say which rows of which pyramid level are final, and the worker reads
them from the Zarr mosaic and feeds them to a :class:`~runtime.analysis.pipeline.SlideAnalyzer`,
so most of the analysis is done by the time the last tile is stitched. On a complete
:class:`~runtime.ipc.messages.MosaicDone` it feeds the rest, finishes, writes the outputs into the
scan folder (heatmap.ome.tif, heatmap.png, attention.png, annotations.geojson, nuclei.geojson,
analysis.json) and reports :class:`~runtime.ipc.messages.AnalysisDone` with the summary and this
scan's CPU seconds. An incomplete MosaicDone or :class:`~runtime.ipc.messages.AnalysisCancel`
drops the scan (nothing is written); :class:`~runtime.ipc.messages.EndOfStream` stops the worker.
Messages of another scan's mosaic (a late announcement of a dropped scan) are ignored.

Priorities: while the scan runs, the rows are fed on a thread of lower CPU priority
(:class:`_Feeder`, ``[analysis] nice``), so capture, stitching and writing come first. Once the
slide is written (MosaicDone) nothing of that scan competes any more and its analysis is what the
scan waits for: the main thread, at the process's normal priority, takes the analyzer over, feeds
what is left and writes the outputs. (A niced process could not raise its priority again without
privileges; a thread's niceness is its own, so the main thread never gives it up.) It
never fails a scan: a missing or bad model folder, or any error while analysing, ends in an
``AnalysisDone`` naming the error (the scan job puts it in the report), and the slide is written
as without analysis. A crash or a hang is the supervisor's to notice (heartbeats, exit code): it
restarts the worker, and the scan still completes. (The main thread beats while the feeding thread
works; a feeding thread stuck in a model call stops the heartbeats once the main thread waits for
it, at the slide's end.)
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, assert_never

from runtime.config import AnalysisConfig
from runtime.errors import one_line
from runtime.ipc.messages import (
    AnalysisBegin,
    AnalysisCancel,
    AnalysisDone,
    AnalysisLoading,
    AnalysisQueue,
    AnalysisReady,
    EndOfStream,
    EventQueue,
    MosaicDone,
    MosaicRows,
    cpu_seconds,
    peak_rss_bytes,
)
from runtime.workers.skeleton import POLL_S, WorkerContext, run_worker

log = logging.getLogger("wsi.analysis")


# The most work the niced feeding may leave behind, in level-0 megapixels of announced rows not yet
# fed: ``[analysis] backlog_mpx`` (the operator's, like ``nice``; 4 by default, about 0.05 CPU-s per
# Mpx on the 2-core x86 test machine, nuclei and tumour models together). Past it the feeding moves
# to a thread at normal priority until half of it is left. On a busy machine the niced thread gets
# almost no CPU during the scan (load ~19: 2.6 s of rows were left for after an 8 x 8 slide, +53%
# wall); the bound keeps what is left for after the slide to about 0.2 CPU-s on any slide, at the
# price of that work competing with the scan when it is behind.
BACKLOG_MPX: float = AnalysisConfig.model_fields["backlog_mpx"].default

ModelKey = tuple[object, ...]


def _folder_identity(folder: Path) -> tuple[object, ...]:
    """What changes when a model folder is re-exported or edited: the folder's and its
    ``model.json``'s inode, size and modification time (``python -m export`` swaps a folder in
    whole; an edited ONNX without a new model.json fails its sha256 check at load anyway)."""
    ident: list[object] = [str(folder)]
    for path in (folder, folder / "model.json"):
        try:
            st = path.stat()
            ident += [st.st_ino, st.st_size, st.st_mtime_ns]
        except OSError:
            ident.append(None)  # missing: the load will say so; its appearing changes the key
    return tuple(ident)


def model_key(cfg: AnalysisConfig) -> ModelKey:
    """What the loaded models depend on. Equal keys: the loaded models serve the scan as they are."""
    from runtime.ml.model_folder import default_model_dir

    if cfg.models == "baseline":
        return ("baseline", cfg.nuclei)
    folders: list[object] = []
    for task, value, used in (
        ("tumour", cfg.tumour_dir, True),
        ("nuclei", cfg.nuclei_dir, cfg.nuclei),
        ("slide_mil", cfg.slide_dir, cfg.slide_dir != "none"),
    ):
        if used:
            folders.append(_folder_identity(default_model_dir(task) if value == "builtin" else Path(value)))
    return (cfg.models, cfg.backend, cfg.nuclei, cfg.slide_dir == "none", *folders)


def _load_models(cfg: AnalysisConfig) -> Any:
    from runtime.analysis.pipeline import baseline_models, load_models

    if cfg.models == "baseline":
        return baseline_models()
    return load_models(
        cfg.tumour_dir,
        cfg.nuclei_dir,
        cfg.slide_dir,
        backend=cfg.backend,
        with_nuclei=cfg.nuclei,
        lesion_head=cfg.lesion_head,
    )


def _warm_up() -> None:
    """Import what every scan's analysis uses (not only what loading the models does), so that
    the first scan pays none of it either."""
    import runtime.analysis.geojson
    import runtime.analysis.heatmap
    import runtime.analysis.lesions
    import runtime.analysis.pipeline
    import runtime.analysis.summary
    import runtime.output.mosaic_store  # noqa: F401


class _Models:
    """The loaded models and what they were loaded for; re-loaded when a scan needs other ones."""

    def __init__(self) -> None:
        self.key: ModelKey | None = None
        self.models: Any = None
        self.error: str | None = None
        self.loads = 0
        self.load_s = 0.0

    def changed(self, cfg: AnalysisConfig) -> bool:
        """Would ``cfg`` need other models than those loaded?"""
        return model_key(cfg) != self.key

    def ensure(self, cfg: AnalysisConfig) -> bool:
        """Have the models for ``cfg`` loaded (or their error recorded); True if this loaded them."""
        key = model_key(cfg)
        if key == self.key:
            return False
        t0 = time.perf_counter()
        self.models = None  # the old sessions go before the new ones are made (memory)
        try:
            self.models, self.error = _load_models(cfg), None
        except Exception as err:  # a missing or bad model folder: every scan says so until it changes
            self.error = f"analysis models: {one_line(str(err))}"
        self.key = key
        self.loads += 1
        self.load_s = time.perf_counter() - t0
        return True


class _Run:
    """One scan's analysis: the analyzer over the mosaic, fed as rows become final."""

    def __init__(self, cfg: AnalysisConfig, models: Any, mosaic_path: str, beat: Any, pause: Any = None) -> None:
        from runtime.analysis.pipeline import MosaicSource, SlideAnalyzer
        from runtime.output.mosaic_store import MosaicStore

        self.cfg = cfg
        self.models = models
        self.store = MosaicStore.open(Path(mosaic_path))
        self.source = MosaicSource(self.store)
        self.analyzer = SlideAnalyzer(
            self.source.geometry,
            models,
            batch_size=cfg.batch_size,
            nuclei=cfg.nuclei,
            beat=beat,
            subdivide=cfg.subdivide,
            pause=pause,
        )
        self.beat = beat
        self.t0 = time.perf_counter()

    def behind(self, level: int, rows: int) -> bool:
        """Are rows of ``level`` below ``rows`` still to be fed?"""
        return level in self.analyzer.levels and self.analyzer.rows_needed(level) < min(
            rows, self.source.geometry.level_shapes[level][0]
        )

    def backlog_mpx(self, want: dict[int, int]) -> float:
        """Announced rows not fed yet (``want``: level -> rows final), in level-0 megapixels (the most
        of any level: the analyzer needs every level's rows to go on)."""
        g = self.source.geometry
        width0 = g.level_shapes[0][1]
        rows0 = max(
            (
                (min(rows, g.level_shapes[level][0]) - self.analyzer.rows_needed(level)) * g.downsample(level)
                for level, rows in want.items()
                if level in self.analyzer.levels
            ),
            default=0.0,
        )
        return max(0.0, rows0) * width0 / 1e6

    def all_announced(self, want: dict[int, int]) -> bool:
        """Has the slide's last row of every level the analyzer reads been announced?"""
        shapes = self.source.geometry.level_shapes
        return all(want.get(level, 0) >= shapes[level][0] for level in self.analyzer.levels)

    def resume(self) -> None:
        """Run the work a pause left (the bands the rows fed so far allow): feed no rows."""
        import numpy as np

        for level in self.analyzer.levels:
            y, width = self.analyzer.rows_needed(level), self.source.geometry.level_shapes[level][1]
            self.analyzer.feed(level, y, np.empty((0, width, 3), np.uint8))
        self.beat()

    def feed_piece(self, level: int, rows: int) -> None:
        """Feed the next rows of ``level`` below ``rows``, to the end of the mosaic's chunk row at most
        (a read decodes whole chunks: pieces that split a chunk row decoded its chunks once per piece)."""
        y = self.analyzer.rows_needed(level)
        chunk = self.store.chunk
        y1 = min(rows, self.source.geometry.level_shapes[level][0], (y // chunk + 1) * chunk)
        self.analyzer.feed(level, y, self.source.read_rows(level, y, y1))
        self.beat()

    def rows_final(self, level: int, rows: int) -> None:
        while self.behind(level, rows):
            self.feed_piece(level, rows)

    def finish(self, out_dir: Path) -> dict[str, Any]:
        from runtime.analysis.heatmap import OVERLAY_MAX_PX
        from runtime.analysis.pipeline import write_outputs

        t0 = time.perf_counter()
        for level in self.analyzer.levels:
            self.rows_final(level, self.source.geometry.level_shapes[level][0])
        t1 = time.perf_counter()
        result = self.analyzer.finish()
        result.stats["analysis_s"] = time.perf_counter() - self.t0
        self.beat()
        thumb = self.source.thumbnail(OVERLAY_MAX_PX)
        summary = write_outputs(out_dir, result, self.models, thumb, threshold=self.cfg.threshold, source=self.source)
        self.close()
        # What the scan waited for after its slide: the rows fed then (the last band, and whatever the
        # niced feeding had not done yet), the slide model, the outputs.
        summary["timing_s"]["rows_after_slide"] = round(t1 - t0, 3)
        summary["timing_s"]["finish_and_outputs"] = round(time.perf_counter() - t1, 3)
        return summary

    def close(self) -> None:
        self.store.close()


class _Feeder:
    """Feeds the scan's announced rows to its analyzer on a thread of lower CPU priority, and on a
    thread of normal priority while it is too far behind.

    The main thread :meth:`hand` s it a run and :meth:`announce` s rows as they become final; a
    thread feeds them a piece (at most a chunk row of the mosaic: :meth:`_Run.feed_piece`) at a time.
    Normally the *niced* thread does
    (``[analysis] nice``: capture, stitching and writing come first). When the rows announced but not
    fed pass ``backlog_mpx`` (the niced thread starved by a busy machine), or once the slide's last
    row is announced, the feeding is *urgent*: the niced thread stops at its next nuclei region or
    tumour band (the analyzer's ``pause``) and a thread at the process's normal priority goes on,
    until half the bound is left. (A thread cannot raise its own priority again without privileges,
    so the urgent work goes to a second thread, started at normal priority.) Only one of them uses
    the analyzer at a time. :meth:`take` stops both after the piece in hand and gives the run back:
    from then on only the caller's thread touches the analyzer. An exception while feeding is kept
    for :meth:`take`.
    """

    def __init__(self, nice: int, backlog_mpx: float = BACKLOG_MPX) -> None:
        self.nice = nice
        self.backlog_mpx = backlog_mpx
        self._cv = threading.Condition()
        self._run: _Run | None = None
        self._want: dict[int, int] = {}  # level -> rows final so far
        self._busy = False
        self._urgent = False
        self._left = False  # a pause left work the rows fed so far allow (fed by the next piece)
        self._error: Exception | None = None
        self.urgent_pieces = 0  # pieces fed at normal priority for the current run (report)
        self._niced = threading.Thread(target=self._loop, args=(False,), name="analysis-feed", daemon=True)
        self._normal = threading.Thread(target=self._loop, args=(True,), name="analysis-feed-urgent", daemon=True)
        self._niced.start()
        self._normal.start()  # started by the caller (normal priority): it keeps that priority

    def hand(self, run: _Run) -> None:
        with self._cv:
            self._run, self._want, self._error = run, {}, None
            self._urgent = self._left = False
            self.urgent_pieces = 0

    def announce(self, level: int, rows: int) -> None:
        with self._cv:
            self._want[level] = max(rows, self._want.get(level, 0))
            self._update_urgency()
            self._cv.notify_all()

    def _update_urgency(self) -> None:
        run = self._run
        if run is None:
            return
        backlog = run.backlog_mpx(self._want)
        if backlog >= self.backlog_mpx or run.all_announced(self._want):
            self._urgent = True
        elif backlog <= self.backlog_mpx / 2:
            self._urgent = False

    def should_pause(self) -> bool:
        """The analyzer's ``pause``: True on a feeding thread once :meth:`take` waits for the run, and
        on the niced one once the feeding is urgent (the piece in hand then ends at the next nuclei
        region or tumour band, not the end of a band of regions: a niced thread on a busy machine
        would keep the tail, or the urgent thread, waiting)."""
        me = threading.current_thread()
        pause = (me is self._niced or me is self._normal) and (
            self._run is None or (me is self._niced and self._urgent)
        )
        if pause:
            self._left = True
        return pause

    def take(self) -> tuple[dict[int, int], Exception | None]:
        """Stop feeding (after the piece in hand); the rows announced so far and the error, if any."""
        with self._cv:
            want, error = self._want, self._error
            self._run, self._want, self._error = None, {}, None
            self._cv.notify_all()
            self._cv.wait_for(lambda: not self._busy)
        return want, error

    def _next(self, urgent: bool) -> tuple[_Run, int, int] | None:
        """The next piece for the niced (``urgent`` False) or the normal thread: (run, level, rows);
        level -1: only what a pause left."""
        run = self._run
        if run is None or self._busy or urgent != self._urgent:
            return None
        for level, rows in self._want.items():
            if run.behind(level, rows):
                return run, level, rows
        return (run, -1, 0) if self._left else None

    def _loop(self, urgent: bool) -> None:
        if not urgent:
            try:  # this thread only (Linux: a thread id names one thread); the others keep their priority
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, max(self.nice, os.getpriority(os.PRIO_PROCESS, tid)))
            except OSError as err:  # not worth failing over: the analysis only runs at normal priority
                log.warning("could not lower the analysis feeding thread's priority: %s", err)
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._next(urgent) is not None)
                job = self._next(urgent)
                assert job is not None
                self._busy, self._left = True, False
                if urgent:
                    self.urgent_pieces += 1
            run, level, rows = job
            try:
                if level < 0:
                    run.resume()
                else:
                    run.feed_piece(level, rows)
            except Exception as err:  # kept for take(); this scan's analysis fails, the slide does not
                with self._cv:
                    if self._run is run:
                        self._error, self._run = err, None
            finally:
                with self._cv:
                    self._busy = False
                    self._update_urgency()
                    self._cv.notify_all()


def _failure(err: Exception) -> str:
    log.error("analysis failed", exc_info=err)
    return f"analysis failed: {one_line(f'{type(err).__name__}: {err}')}"


@dataclass
class _Scan:
    """The scan being analysed: its begin message, its run once the mosaic exists, its error."""

    begin: AnalysisBegin
    t0: float
    cpu0: float
    loaded: bool  # the models were (re)loaded for this scan
    run: _Run | None = None
    error: str | None = None

    @property
    def mosaic(self) -> str:
        return self.begin.mosaic_path


class _Worker:
    """The worker's state across scans (the body of :func:`analysis_main`)."""

    def __init__(self, worker: WorkerContext, events: EventQueue, nice: int, backlog_mpx: float) -> None:
        self.worker = worker
        self.events = events
        self.models = _Models()
        self.scans = 0
        self.scan: _Scan | None = None
        self.feeder = _Feeder(nice, backlog_mpx)

    def begin(self, msg: AnalysisBegin) -> None:
        self.drop()
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        loaded = False
        if self.models.changed(msg.cfg):
            self.events.put(AnalysisLoading(msg.scan_id))  # no heartbeat while loading
            loaded = self.models.ensure(msg.cfg)
            self.events.put(AnalysisReady(os.getpid(), self.models.load_s, self.models.error))
        self.scans += 1
        self.scan = _Scan(msg, t0, cpu0, loaded, error=self.models.error)

    def rows(self, msg: MosaicRows) -> None:
        scan = self.scan
        if scan is None or scan.error is not None or msg.path != scan.mosaic:
            return
        try:
            if scan.run is None:  # opened here, on the main thread: Zarr's I/O threads keep its priority
                scan.run = _Run(
                    scan.begin.cfg, self.models.models, scan.mosaic, self.worker.beat, self.feeder.should_pause
                )
                self.feeder.hand(scan.run)
            self.feeder.announce(msg.level, msg.rows)
        except Exception as err:  # analysis failed: the slide is not affected
            scan.error = _failure(err)

    def done(self, msg: MosaicDone) -> None:
        scan = self.scan
        if scan is None or msg.path != scan.mosaic:
            return
        if not msg.complete:
            self.drop()
            return
        summary = None
        urgent_pieces = self.feeder.urgent_pieces
        _, feed_error = self.feeder.take()  # the rest is this thread's, at normal priority
        if feed_error is not None and scan.error is None:
            scan.error = _failure(feed_error)
        if scan.error is None:
            try:
                if scan.run is None:
                    scan.run = _Run(scan.begin.cfg, self.models.models, scan.mosaic, self.worker.beat)
                summary = scan.run.finish(Path(scan.begin.out_dir))
                summary["timing_s"]["load_models"] = round(self.models.load_s if scan.loaded else 0.0, 3)
                summary["worker"] = {
                    "pid": os.getpid(),
                    "scans": self.scans,  # scans this process has served, this one included
                    "model_loads": self.models.loads,
                    "models_loaded_for_this_scan": scan.loaded,
                }
                # Pieces of rows fed at normal priority during the scan (the niced feeding fell behind
                # by backlog_mpx, or the slide's last row was announced): 0 on a machine with CPU to spare.
                summary["worker"]["urgent_pieces"] = urgent_pieces
            except Exception as err:
                scan.error = _failure(err)
                summary = None
        self.scan = None
        self.events.put(
            AnalysisDone(
                scan.begin.scan_id,
                summary,
                scan.error,
                time.perf_counter() - scan.t0,
                peak_rss_bytes(),
                cpu_seconds() - scan.cpu0,
            )
        )

    def cancel(self, msg: AnalysisCancel) -> None:
        if self.scan is not None and self.scan.begin.scan_id == msg.scan_id:
            self.drop()

    def drop(self) -> None:
        """Forget the current scan (a cancelled or failed one: nothing is written)."""
        scan, self.scan = self.scan, None
        if scan is not None and scan.run is not None:
            self.feeder.take()
            try:
                scan.run.close()
            except Exception as err:  # the scan is gone anyway
                log.warning("closing a dropped scan's mosaic: %s", err)


def analysis_main(cfg: AnalysisConfig, inbox: AnalysisQueue, events: EventQueue) -> None:
    """Process entry point (spawned by the supervisor): serve scans until EndOfStream (module docstring).

    ``cfg``: the daemon's ``[analysis]`` section, whose models are loaded at once (a scan may
    name others in its :class:`AnalysisBegin`)."""

    def body(worker: WorkerContext) -> None:
        state = _Worker(worker, events, cfg.nice, cfg.backlog_mpx)
        _warm_up()
        state.models.ensure(cfg)
        events.put(AnalysisReady(os.getpid(), state.models.load_s, state.models.error))
        while True:
            worker.beat()
            try:
                msg = inbox.get(timeout=POLL_S)
            except queue.Empty:
                continue
            match msg:
                case AnalysisBegin():
                    state.begin(msg)
                case MosaicRows():
                    state.rows(msg)
                case MosaicDone():
                    state.done(msg)
                case AnalysisCancel():
                    state.cancel(msg)
                case EndOfStream():
                    state.drop()
                    return
                case _:
                    assert_never(msg)

    run_worker("analysis", events, body)
