"""Artifact context (runtime.ml.artifact_context): hysteresis and enclosed cells over a grid."""

from __future__ import annotations

import pytest

from runtime.ml.artifact_context import (
    WINDOW_GROW_THRESHOLD,
    ArtifactContext,
    FieldClass,
    context_report,
    enclosed,
    scan_context,
    scan_window_context,
)

CTX = ArtifactContext(grow_threshold=0.4)
NO_FILL = ArtifactContext(grow_threshold=0.4, fill_holes=False)
P = {"S": 0.9, "w": 0.5, "t": 0.05, "g": 0.01}


def grid(*rows: str) -> dict[tuple[int, int], float | None]:
    """A grid from rows of letters (``P``; ``.``: not classified; ``S``: a seed)."""
    return {(r, c): (None if ch == "." else P[ch]) for r, row in enumerate(rows) for c, ch in enumerate(row)}


def seeds(g: dict[tuple[int, int], float | None]) -> set[tuple[int, int]]:
    return {c for c, p in g.items() if p == P["S"]}


def test_a_bubble_interior_is_enclosed_by_its_rim() -> None:
    # A ring of seeds (the rim) around cells the model calls tissue (haze over tissue), tissue outside.
    g = grid("ttttt", "tSSSt", "tSttt", "tSSSt", "ttttt")
    assert CTX.flags(g, seeds(g)) == seeds(g)  # the ring is open at (2, 3): nothing enclosed
    g[(2, 3)] = P["S"]
    assert CTX.flags(g, seeds(g)) == seeds(g) | {(2, 2)}
    assert NO_FILL.flags(g, seeds(g)) == seeds(g)


def test_a_ring_at_the_grid_edge_encloses_nothing_outside_the_grid() -> None:
    g = grid("tSt", "SgS", "tSt")
    assert CTX.flags(g, seeds(g)) == seeds(g) | {(1, 1)}  # 4-connected outside: the corners do not leak in
    g = grid("SSS", "Stt", "SSS")
    assert CTX.flags(g, seeds(g)) == seeds(g)  # open to the right edge


def test_weak_cells_join_a_seed_through_a_chain() -> None:
    g = grid("Swwwt", "ttttw", "ttttt")
    assert CTX.flags(g, seeds(g)) - seeds(g) == {(0, 1), (0, 2), (0, 3), (1, 4)}  # (1, 4): diagonal


def test_weak_cells_without_a_seed_stay_tissue() -> None:
    # Unusual content: many cells above the grow threshold, none flagged by the model.
    g = grid("wwwww", "wwtww", "wwwww")
    assert CTX.flags(g, set()) == set()


def test_tissue_next_to_a_seed_stays_tissue() -> None:
    g = grid("tttt", "tSSt", "tttt")
    assert CTX.flags(g, seeds(g)) == seeds(g)


def test_an_unclassified_cell_breaks_a_chain_but_can_be_enclosed() -> None:
    g = grid("Sw.ww")
    assert CTX.flags(g, seeds(g)) == {(0, 0), (0, 1)}
    g = grid("SSS", "S.S", "SSS")
    assert enclosed(g.keys(), seeds(g)) == {(1, 1)}


def test_the_grow_threshold_is_inclusive() -> None:
    g = {(0, 0): 0.9, (0, 1): 0.4, (0, 2): 0.3999, (0, 3): 0.9}
    assert NO_FILL.flags(g, {(0, 0)}) == {(0, 0), (0, 1)}  # (0, 3) is no seed: the model did not flag it


def test_seeds_must_be_in_the_grid() -> None:
    with pytest.raises(ValueError, match="outside the grid"):
        CTX.flags({(0, 0): 0.9}, {(5, 5)})


@pytest.mark.parametrize("grow", [0.0, 1.0, -0.1])
def test_bad_thresholds_are_refused(grow: float) -> None:
    with pytest.raises(ValueError, match="artifact context"):
        ArtifactContext(grow_threshold=grow)


def test_scan_context_flags_fields_by_row_and_col() -> None:
    from runtime.ml.artifact_context import FieldClass, scan_context

    ring = {(r, c) for r in range(3) for c in range(3)} - {(1, 1)}
    fields = [FieldClass(r, c, (r, c) in ring, 0.9 if (r, c) in ring else 0.1) for r in range(4) for c in range(4)]
    fields.append(FieldClass(5, 5, False, None))  # not classified
    out = scan_context(fields)
    assert {c for c, v in out.items() if v} == ring | {(1, 1)}
    assert len(out) == 17


def test_the_committed_classifier_misses_a_bubble_interior_that_context_finds() -> None:
    """An air bubble of radius 230 µm over tissue, rendered as a scan sees it (bench.classifier_layout: 5 x 5
    fields, 10 x 10 windows): the model alone flags the rim only; context flags every window of
    the bubble and no tissue window."""
    import numpy as np

    from bench.classifier_layout import FIELD_PX, FIELDS, PX_UM, _render_block, context_flags, window_p_artifact
    from hw_sim.optics import CameraParams, Optics, OpticsParams
    from hw_sim.slide import SlideSpec, SyntheticSlide
    from runtime.ml.backends import select_backend
    from runtime.ml.model_folder import default_model_dir, load_model_folder
    from runtime.ml.tasks import TileClassifierModel

    slide = SyntheticSlide(SlideSpec(seed=15, width_um=4000.0, height_um=3000.0, artifacts=8))
    bubble = slide.artifacts[0]
    assert bubble.kind == "bubble" and bubble.radius > 200
    optics = Optics(OpticsParams(), PX_UM, (FIELD_PX * FIELDS,) * 2, CameraParams())
    img, label, _, _ = _render_block(slide, optics, bubble.cx - 320, bubble.cy - 320, 0.0, np.random.default_rng(0))
    folder = load_model_folder(default_model_dir("classifier"), "classifier")
    p, seeds = window_p_artifact(TileClassifierModel(folder, select_backend(folder, "ort_cpu").backend), img[None])
    art, tissue = label == 2, label == 1
    assert art.sum() > 40 and tissue.sum() > 20
    assert seeds[0][art].mean() < 0.7  # the interior looks like tissue to one window
    flags = context_flags(p, seeds, ArtifactContext())[0]
    assert flags[art].all()
    assert not flags[tissue].any()


def test_the_bench_chooses_the_most_permissive_context_within_the_tissue_budget() -> None:
    """bench.classifier_layout.choose_context on a made-up validation block: a bubble ring whose
    inside the model misses, and a tissue patch at p 0.42 beside a false seed. Enclosed cells
    cost no tissue; growing at <= 0.4 calls the patch artifact, past the 1-point budget."""
    import numpy as np

    from bench.classifier_layout import Unit, choose_context

    n = 10
    label = np.ones((1, n, n), np.int64)
    p = np.full((1, n, n), 0.05, np.float32)
    label[0, 1:6, 1:6] = 2  # the bubble: a ring of seeds, its inside at p 0.1
    p[0, 1:6, 1:6] = 0.1
    ring = np.zeros((n, n), bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False
    p[0][ring] = 0.95
    p[0, 7, 7] = 0.9  # a false seed in tissue, with weak tissue around it
    p[0, 7, 8:10] = 0.42
    p[0, 8:10, 7:10] = 0.42
    seeds = p >= 0.56
    u = Unit("windows", label, np.where(label == 2, 1, -1), (label == 2).astype(np.float32), p, seeds, slice(0, n))
    chosen, table = choose_context([u])
    assert chosen is not None and chosen.grow_threshold == 0.45 and chosen.fill_holes
    rows = {r["rule"]: r for r in table}
    assert rows["model alone"]["artifact_recall"] == 16 / 25
    assert rows["context: enclosed only"]["artifact_recall"] == 1.0
    assert (
        rows["context: grow 0.4, enclosed"]["tissue_called_artifact"]
        > rows["model alone"]["tissue_called_artifact"] + 0.01
    )


def _fields(windows: dict[tuple[int, int], list[list[float]]], seed: float = 0.6) -> list[FieldClass]:
    """Fields of 2 x 2 windows from their window p(artifact); a window is flagged by the model at
    p >= ``seed`` (the field: any window; its p: the strongest window's)."""
    return [
        FieldClass(
            r,
            c,
            any(p >= seed for row in w for p in row),
            max(p for row in w for p in row),
            tuple(tuple(row) for row in w),
            tuple(tuple(p >= seed for p in row) for row in w),
        )
        for (r, c), w in windows.items()
    ]


# A bubble of 3 x 3 windows (64 µm each) on the corner of four fields of 2 x 2 windows: its rim is
# flagged (0.9), its centre, window (1, 1) of field (0, 0), reads like tissue (0.1). Field (1, 1)
# has one flagged window, (0, 0), which borders the centre. Field (0, 2) has no flagged window,
# but its window (0, 0) at 0.55 touches the rim window (0, 1) of field (0, 1).
BUBBLE = {
    (0, 0): [[0.9, 0.9], [0.9, 0.1]],
    (0, 1): [[0.9, 0.55], [0.9, 0.05]],
    (1, 0): [[0.9, 0.9], [0.05, 0.05]],
    (1, 1): [[0.9, 0.05], [0.05, 0.05]],
    (0, 2): [[0.55, 0.05], [0.05, 0.05]],
    (1, 2): [[0.05, 0.05], [0.05, 0.05]],
}


def test_the_window_rule_runs_over_the_scan_s_windows_by_field_row_and_col() -> None:
    assert WINDOW_GROW_THRESHOLD is None  # the committed rule: enclosed windows only (see its docstring)
    wc = scan_window_context(_fields(BUBBLE))
    assert wc is not None and wc.shape == (2, 2)
    assert wc.by_model[(0, 0)] == {(0, 0), (0, 1), (1, 0)}
    assert wc.in_context[(0, 0)] == {(0, 0), (0, 1), (1, 0), (1, 1)}  # the enclosed centre
    assert wc.in_context[(1, 1)] == wc.by_model[(1, 1)] == {(0, 0)}
    # No hysteresis: the 0.55 windows of fields (0, 1) and (0, 2) stay as the model left them.
    assert wc.in_context[(0, 1)] == wc.by_model[(0, 1)] == {(0, 0), (1, 0)}
    assert wc.in_context[(0, 2)] == wc.in_context[(1, 2)] == frozenset()
    # Grow 0.5: the 0.55 window of field (0, 1) joins its flagged neighbour, and through it the
    # 0.55 window of field (0, 2), which the model did not flag.
    grown = scan_window_context(_fields(BUBBLE), ArtifactContext(0.5))
    assert grown is not None
    assert grown.in_context[(0, 1)] == {(0, 0), (0, 1), (1, 0)}
    assert grown.in_context[(0, 2)] == {(0, 0)}
    assert grown.in_context[(1, 2)] == frozenset()
    # The field rule (enclosed fields only) adds nothing here.
    assert sum(scan_context(_fields(BUBBLE)).values()) == 4


def test_the_report_gives_each_field_its_windows_in_context() -> None:
    per, summary = context_report(_fields(BUBBLE))
    assert per[(0, 0)] == {"artifact_in_context": True, "artifact_windows_in_context": [[0, 0], [0, 1], [1, 0], [1, 1]]}
    assert per[(1, 1)] == {"artifact_in_context": True, "artifact_windows_in_context": [[0, 0]]}
    assert per[(0, 2)] == {"artifact_in_context": False, "artifact_windows_in_context": []}
    assert per[(1, 2)] == {"artifact_in_context": False, "artifact_windows_in_context": []}
    assert summary == {
        "unit": "window",
        "grow_threshold": None,
        "fill_holes": True,
        "fields_flagged_by_model": 4,
        "fields_added_by_context": 0,
        "windows_per_field": [2, 2],
        "windows_flagged_by_model": 8,
        "windows_added_by_context": 1,
    }


def test_a_field_without_windows_takes_its_own_values_in_each() -> None:
    """A journal written before windows were carried: its fields resume without them."""
    from dataclasses import replace

    old = [replace(f, window_p=None, window_flags=None) if (f.row, f.col) == (1, 1) else f for f in _fields(BUBBLE)]
    wc = scan_window_context(old)
    assert wc is not None
    assert wc.by_model[(1, 1)] == wc.in_context[(1, 1)] == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert wc.in_context[(0, 0)] == {(0, 0), (0, 1), (1, 0), (1, 1)}
    # No field carries windows: the field rule, as before.
    none = [replace(f, window_p=None, window_flags=None) for f in _fields(BUBBLE)]
    assert scan_window_context(none) is None
    per, summary = context_report(none)
    assert summary is not None and summary["unit"] == "field" and summary["grow_threshold"] is None
    assert summary["windows_per_field"] is None and summary["fields_added_by_context"] == 0
    assert all(v["artifact_windows_in_context"] is None for v in per.values())
    # Nothing classified: no summary.
    assert context_report([FieldClass(0, 0, False, None)])[1] is None


def test_a_journal_record_without_windows_resumes_into_the_field_values() -> None:
    from runtime.ipc.messages import FieldRecord

    rec = {"index": 0, "row": 0, "col": 0, "x_um": 0.0, "y_um": 0.0, "z_um": 1.0, "captures": 1}
    r = FieldRecord(**rec, focus_method="single_shot", artifact=True, artifact_probability=0.8)
    assert r.window_p_artifact is None and r.window_artifact is None
    f = FieldClass(r.row, r.col, r.artifact, r.artifact_probability, r.window_p_artifact, r.window_artifact)
    assert f.windows((2, 2)) == dict.fromkeys([(0, 0), (0, 1), (1, 0), (1, 1)], (0.8, True))


def test_the_classifier_gives_each_window_its_p_artifact_and_flag_row_by_row() -> None:
    """TileClass carries the decision's per-window mean p(artifact) and flag in the window grid
    ClassifierPreprocess.window_grid names (3 x 3 for a 600 x 520 px tile at 0.25 µm)."""
    import numpy as np

    from runtime.ml.backends import select_backend
    from runtime.ml.model_folder import default_model_dir, load_model_folder
    from runtime.ml.tasks import TileClassifierModel

    folder = load_model_folder(default_model_dir("classifier"), "classifier")
    model = TileClassifierModel(folder, select_backend(folder, "ort_cpu").backend)
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 255, (600, 520, 3), dtype=np.uint8), np.full((512, 512, 3), 250, np.uint8)]
    tiles[0][:150, :260] = 0  # black ink over a corner
    out = model.classify_batch(tiles, 0.25)
    for t, tc in zip(tiles, out, strict=True):
        rows, cols = model.pre.window_grid(t.shape[0], t.shape[1], 0.25)
        assert rows * cols == len(model.pre.inputs(t, 0.25))
        p = np.array(tc.window_p_artifact)
        assert p.shape == (rows, cols) and np.array(tc.window_artifact).shape == (rows, cols)
        assert p.max() == tc.probabilities[2]
        assert any(any(r) for r in tc.window_artifact) == (tc.label == "artifact")
        probs, _ = model.window_probabilities(model.pre.inputs(t, 0.25))
        np.testing.assert_allclose(p.reshape(-1), probs[:, 2], rtol=1e-5)
        assert (np.array(tc.window_artifact).reshape(-1) == (model.decision.window_labels(probs) == 2)).all()
    assert out[0].window_p_artifact and (len(out[0].window_p_artifact), len(out[0].window_p_artifact[0])) == (3, 3)
