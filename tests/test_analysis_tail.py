"""What a scan waits for after its slide (issue 13, cost): the analysis worker feeds the scan's rows
on a niced thread (on one at normal priority while it is too far behind) and finishes on its main
thread at normal priority (runtime/workers/analysis.py ``_Feeder``), and the nuclei model runs on
windows as large as the pipeline's regions (export/nuclei_window.py), one model call per region."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import zarr

from bench.analysis import ArraySource, match_points, render_slide
from export.nuclei_window import rewindow_folder
from runtime.analysis.models import load_nuclei_model
from runtime.analysis.pipeline import (
    MosaicSource,
    SlideAnalyzer,
    analyze_source,
    baseline_models,
    load_models,
)
from runtime.config import AnalysisConfig
from runtime.ml.model_folder import default_model_dir, load_model_folder
from runtime.output.mosaic_store import MosaicStore
from runtime.workers.analysis import _Feeder, _Run

PX_UM = 0.5


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Zarr mosaic (uncompressed, as the runtime writes it) of a 400 µm development slide with lesions."""
    level0 = render_slide(1234, 0, 400.0, held_out=False).levels[0]
    path = tmp_path_factory.mktemp("mosaic") / "mosaic.zarr"
    store = MosaicStore.create(path, *level0.shape[:2], pixel_size_um=PX_UM, compressor="none", min_level_size=128)
    group = zarr.open_group(str(path), mode="r+")
    for k, (h, w) in enumerate(store.level_shapes):
        img = level0 if k == 0 else cv2.resize(level0, (w, h), interpolation=cv2.INTER_AREA)
        array = group[str(k)]
        assert isinstance(array, zarr.Array)
        array[:] = img
    store.close()
    return path


def _wait(cond: object, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_rows_fed_on_the_niced_thread_then_finished_on_the_caller_give_the_whole_slide_answer(
    mosaic: Path, tmp_path: Path
) -> None:
    cfg = AnalysisConfig(enabled=True, subdivide=2)
    models = load_models(backend="ort_cpu")
    run = _Run(cfg, models, str(mosaic), lambda: None)
    shapes = run.source.geometry.level_shapes
    base_nice = os.getpriority(os.PRIO_PROCESS, 0)
    feeder = _Feeder(min(19, base_nice + 3))
    feeder.hand(run)
    # Half of each level announced (in two announcements), fed by the feeding thread ...
    for frac in (0.25, 0.5):
        for level in run.analyzer.levels:
            feeder.announce(level, int(shapes[level][0] * frac))
    _wait(lambda: all(not run.behind(lv, shapes[lv][0] // 2) for lv in run.analyzer.levels))
    (thread,) = [t for t in threading.enumerate() if t.name == "analysis-feed"]
    assert thread.native_id is not None
    assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == min(19, base_nice + 3)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base_nice  # this (the main) thread keeps its priority
    # ... then taken back mid-way: the rest is fed and finished here.
    for level in run.analyzer.levels:
        feeder.announce(level, shapes[level][0])
    want, error = feeder.take()
    assert error is None and want == {lv: shapes[lv][0] for lv in run.analyzer.levels}
    summary = run.finish(tmp_path / "out")
    assert summary["timing_s"]["rows_after_slide"] >= 0 and (tmp_path / "out" / "analysis.json").is_file()

    _assert_same_as_the_whole_slide(summary, mosaic, models, score_tol=1e-3)


def _assert_same_as_the_whole_slide(summary: dict[str, Any], mosaic: Path, models: Any, score_tol: float) -> None:
    """The scan's analysis summary equals the analysis of the finished mosaic in one go."""
    store = MosaicStore.open(mosaic)
    try:
        whole = analyze_source(MosaicSource(store), models, subdivide=2)
    finally:
        store.close()
    assert summary["nuclei_count"] == len(whole.nuclei) > 50
    assert summary["patches"] == whole.stats["patches"]
    assert summary["slide_model_score"] == pytest.approx(whole.slide_score, abs=score_tol)


def test_feeding_too_far_behind_moves_to_a_thread_at_normal_priority(mosaic: Path, tmp_path: Path) -> None:
    """A niced feeding thread starved by a busy machine leaves its rows for after the slide; past
    ``backlog_mpx`` of rows announced and not fed, a thread at normal priority feeds them (until half
    the bound is left), and once the last row is announced; the answer does not change."""
    cfg = AnalysisConfig(enabled=True, models="baseline", subdivide=2)
    models = baseline_models()
    base_nice = os.getpriority(os.PRIO_PROCESS, 0)
    feeder = _Feeder(min(19, base_nice + 3), backlog_mpx=0.1)
    fed_by: list[str] = []  # the thread of each heartbeat: feed_piece beats after each piece
    run = _Run(cfg, models, str(mosaic), lambda: fed_by.append(threading.current_thread().name), feeder.should_pause)
    feeder.hand(run)
    geometry = run.source.geometry
    shapes, width0 = geometry.level_shapes, geometry.level_shapes[0][1]

    def announce(rows0: int) -> None:  # level-0 rows final, announced on every level the analyzer reads
        for level in run.analyzer.levels:
            feeder.announce(level, int(rows0 / geometry.downsample(level)))
        _wait(
            lambda: all(not run.behind(lv, int(rows0 / geometry.downsample(lv))) for lv in run.analyzer.levels)
            and not feeder._busy
            and not feeder._left
        )

    step = int(0.04e6 / width0)  # 0.04 Mpx: under the bound
    announce(step)
    assert set(fed_by) == {"analysis-feed"} and feeder.urgent_pieces == 0
    announce(step + int(0.3e6 / width0))  # 0.3 Mpx behind at once: urgent
    assert "analysis-feed-urgent" in fed_by and feeder.urgent_pieces > 0
    for thread, nice in ((feeder._normal, base_nice), (feeder._niced, min(19, base_nice + 3))):
        assert thread.native_id is not None and os.getpriority(os.PRIO_PROCESS, thread.native_id) == nice
    fed_by.clear()
    pieces = feeder.urgent_pieces
    announce(2 * step + int(0.3e6 / width0))  # caught up: a step under the bound is the niced thread's again
    assert set(fed_by) == {"analysis-feed"} and feeder.urgent_pieces == pieces
    announce(shapes[0][0])  # the last row: urgent whatever the backlog
    assert feeder.urgent_pieces > pieces
    _, error = feeder.take()
    assert error is None
    summary = run.finish(tmp_path / "out")
    _assert_same_as_the_whole_slide(summary, mosaic, models, score_tol=1e-6)


def test_an_analyzer_paused_between_regions_and_bands_gives_the_same_answer() -> None:
    levels = render_slide(1234, 0, 400.0, held_out=False).levels
    src = ArraySource(levels, PX_UM)
    whole = SlideAnalyzer(src.geometry, baseline_models(), subdivide=2)
    for lv in whole.levels:
        whole.feed(lv, 0, levels[lv])
    a = whole.finish()

    asked = [0]

    def pause() -> bool:  # every other question: stop here
        asked[0] += 1
        return asked[0] % 2 == 0

    paused = SlideAnalyzer(src.geometry, baseline_models(), subdivide=2, pause=pause)
    for lv in paused.levels:
        for y in range(0, levels[lv].shape[0], 50):
            paused.feed(lv, y, levels[lv][y : y + 50])
    assert paused._n_band < paused._n_bands or paused._t_band < paused.grid_shape[0]  # work was left
    b = paused.finish()
    assert asked[0] > 20
    np.testing.assert_array_equal(a.probability, b.probability)
    np.testing.assert_array_equal(a.analysed, b.analysed)
    assert a.slide_score == b.slide_score and len(a.nuclei) > 50
    np.testing.assert_array_equal(np.sort(a.nuclei, axis=0), np.sort(b.nuclei, axis=0))


def test_a_feeding_error_is_kept_for_the_main_thread(mosaic: Path, tmp_path: Path) -> None:
    broken = tmp_path / "mosaic.zarr"
    shutil.copytree(mosaic, broken)
    cfg = AnalysisConfig(enabled=True)
    run = _Run(cfg, load_models(backend="ort_cpu"), str(broken), lambda: None)
    level = run.analyzer.levels[0]
    (broken / str(level) / "c" / "0" / "0" / "0").write_bytes(b"not a chunk")  # a damaged mosaic: reads fail
    feeder = _Feeder(0)
    feeder.hand(run)
    feeder.announce(level, 64)
    _wait(lambda: feeder._run is None)  # the thread gave the run up on the error
    _, error = feeder.take()
    assert error is not None
    run.close()


def test_a_nuclei_model_on_larger_windows_finds_the_same_nuclei_in_one_call_per_region(
    tmp_path: Path, mosaic: Path
) -> None:
    # The committed folder runs 320-px windows (export/nuclei_window.py); the same weights on the
    # 128-px windows they were exported with must agree with it.
    meta = rewindow_folder(default_model_dir("nuclei"), tmp_path / "nuclei128", 128)
    assert meta["rewindowed"]["parity_max_abs_diff"] == 0.0  # same weights: equal wherever both see everything
    assert meta["preprocess"]["size"] == 128 and meta["input"]["shape"] == ["batch", 3, 128, 128]
    assert meta["heldout_metrics"]["window"] == meta["rewindowed"]["from"]["size"] == 320  # not measured again
    load_model_folder(tmp_path / "nuclei128", "nuclei")

    big = load_nuclei_model(default_model_dir("nuclei"), "ort_cpu")
    small = load_nuclei_model(tmp_path / "nuclei128", "ort_cpu")
    assert (big.step_px, small.step_px) == (288, 96)
    store = MosaicStore.open(mosaic)
    try:
        region = MosaicSource(store).read_rows(0, 200, 520)[:, 200:520]  # one pipeline region: 288 + 2 x 16 px
        geometry = MosaicSource(store).geometry
    finally:
        store.close()
    calls: list[tuple[int, ...]] = []
    run = big.backend.run

    def counted(x: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(x.shape)
        return run(x)

    big.backend.run = counted  # type: ignore[method-assign]
    a, b = big.detect(region), small.detect(region)
    assert calls == [(1, 3, 320, 320)]  # 128-px windows: 3 x 3 of them
    assert len(a) > 20 and match_points(b.astype(np.float64), a, 2.0) >= 0.95 * max(len(a), len(b))

    # Both cut the slide into the same regions: 1 step of the 320-px window, 3 of the 128-px one.
    for nuclei in (default_model_dir("nuclei"), tmp_path / "nuclei128"):
        assert SlideAnalyzer(geometry, load_models(nuclei=nuclei, backend="ort_cpu")).win_l == 288
