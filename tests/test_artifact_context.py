"""Artifact context (runtime.ml.artifact_context): hysteresis and enclosed cells over a grid."""

from __future__ import annotations

import pytest

from runtime.ml.artifact_context import ArtifactContext, enclosed

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
