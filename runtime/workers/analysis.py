"""The analysis worker: slide analysis (runtime.analysis) on the mosaic's final rows, during the scan.

Started by the scan job beside the writer when ``[analysis] enabled``, it receives the same
row announcements as the writer -- the stitcher's :class:`~runtime.ipc.messages.MosaicRows`
reach both through a :class:`~runtime.ipc.messages.TeeQueue` -- reads the newly final rows of the pyramid levels its
models need from the Zarr mosaic (slide coordinates: the stitcher has placed every tile) and
feeds them to a :class:`~runtime.analysis.pipeline.SlideAnalyzer`, so most of the analysis is
done by the time the last tile is stitched. On :class:`~runtime.ipc.messages.MosaicDone` it
feeds the rest, finishes, writes the outputs into the scan folder (heatmap.ome.tif,
heatmap.png, attention.png, annotations.geojson, nuclei.geojson, analysis.json) and reports
:class:`~runtime.ipc.messages.AnalysisDone` with the summary.

It runs at a lower CPU priority (``os.nice``): capture, stitching and writing come first. It
never fails the scan: a missing or bad model folder, or any error while analysing, ends in an
``AnalysisDone`` naming the error (the scan job puts it in the report), and the slide is
written as without analysis. A cancelled or failed scan (an incomplete MosaicDone, or
EndOfStream) writes nothing.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from pathlib import Path
from typing import Any, assert_never

from runtime.config import AnalysisConfig
from runtime.errors import one_line
from runtime.ipc.messages import (
    AnalysisDone,
    EndOfStream,
    EventQueue,
    MosaicDone,
    MosaicRows,
    WriterQueue,
    peak_rss_bytes,
)
from runtime.workers.skeleton import POLL_S, WorkerContext, run_worker

log = logging.getLogger("wsi.analysis")

FEED_ROWS = 256  # rows per read from the mosaic: a heartbeat between reads

def _load_models(cfg: AnalysisConfig) -> Any:
    from runtime.analysis.pipeline import baseline_models, load_models

    if cfg.models == "baseline":
        return baseline_models()
    return load_models(cfg.tumour_dir, cfg.nuclei_dir, cfg.slide_dir, backend=cfg.backend, with_nuclei=cfg.nuclei)


class _Run:
    """One scan's analysis: the analyzer over the mosaic, fed as rows become final."""

    def __init__(self, cfg: AnalysisConfig, models: Any, mosaic_path: str, beat: Any) -> None:
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
        )
        self.beat = beat
        self.t0 = time.perf_counter()

    def rows_final(self, level: int, rows: int) -> None:
        if level not in self.analyzer.levels:
            return
        y = self.analyzer.rows_needed(level)
        rows = min(rows, self.source.geometry.level_shapes[level][0])
        while y < rows:
            y1 = min(rows, y + FEED_ROWS)
            self.analyzer.feed(level, y, self.source.read_rows(level, y, y1))
            self.beat()
            y = y1

    def finish(self, out_dir: Path) -> dict[str, Any]:
        from runtime.analysis.heatmap import OVERLAY_MAX_PX
        from runtime.analysis.pipeline import write_outputs

        for level in self.analyzer.levels:
            self.rows_final(level, self.source.geometry.level_shapes[level][0])
        result = self.analyzer.finish()
        result.stats["analysis_s"] = time.perf_counter() - self.t0
        self.beat()
        thumb = self.source.thumbnail(OVERLAY_MAX_PX)
        summary = write_outputs(out_dir, result, self.models, thumb, threshold=self.cfg.threshold)
        self.store.close()
        return summary


def analysis_main(out_dir: str, cfg: AnalysisConfig, from_stitcher: WriterQueue, events: EventQueue) -> None:
    """Process entry point (spawned): analyse the scan's mosaic into ``out_dir`` (see the module docstring)."""

    def body(worker: WorkerContext) -> None:
        try:
            os.nice(cfg.nice)
        except OSError as err:  # not worth failing over: the analysis only runs at normal priority
            log.warning("could not lower the analysis worker's priority: %s", err)
        t_start = time.perf_counter()
        try:
            models = _load_models(cfg)
        except Exception as err:  # a missing or bad model folder: the scan goes on without analysis
            events.put(AnalysisDone(None, f"analysis models: {one_line(str(err))}", 0.0, peak_rss_bytes()))
            return
        load_s = time.perf_counter() - t_start
        run: _Run | None = None
        error: str | None = None
        while True:
            worker.beat()
            try:
                msg = from_stitcher.get(timeout=POLL_S)
            except queue.Empty:
                continue
            match msg:
                case MosaicRows():
                    if error is not None:
                        continue
                    try:
                        if run is None:
                            run = _Run(cfg, models, msg.path, worker.beat)
                        run.rows_final(msg.level, msg.rows)
                    except Exception as err:  # analysis failed: the slide is not affected
                        log.exception("analysis failed")
                        error = f"analysis failed: {one_line(f'{type(err).__name__}: {err}')}"
                case MosaicDone(complete=True):
                    summary = None
                    if error is None:
                        try:
                            if run is None:
                                run = _Run(cfg, models, msg.path, worker.beat)
                            summary = run.finish(Path(out_dir))
                            summary["timing_s"]["load_models"] = round(load_s, 3)
                        except Exception as err:
                            log.exception("analysis failed")
                            error = f"analysis failed: {one_line(f'{type(err).__name__}: {err}')}"
                            summary = None
                    events.put(AnalysisDone(summary, error, time.perf_counter() - t_start, peak_rss_bytes()))
                    return
                case MosaicDone() | EndOfStream():
                    events.put(
                        AnalysisDone(None, "the scan did not complete", time.perf_counter() - t_start, peak_rss_bytes())
                    )
                    return
                case _:
                    assert_never(msg)

    run_worker("analysis", events, body)
