"""The lesion head (issue 13): its committed model folder loads with its parity recorded, and it
re-outlines a tiny lesion from one window and a larger one from a mosaic of windows, from the slide's
pixels, without adding or removing a detection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import box

from bench.analysis import ArraySource, render_slide
from runtime.analysis import geojson
from runtime.analysis.lesion_head import MAX_WINDOWS, load_lesion_head, reoutline
from runtime.analysis.lesions import Lesion
from runtime.ml.model_folder import ModelFolderError, default_model_dir, load_model_folder

PX_UM = 0.5


def _lesion(geom: shapely.Geometry) -> Lesion:
    return Lesion(geom, geom.area * (PX_UM / 1000) ** 2, geojson.max_diameter(geom) * PX_UM / 1000, 0.7, 0.9)


def test_folder_loads_with_parity_and_training_range_seeds() -> None:
    mf = load_model_folder(default_model_dir("lesion_head"), "lesion_head")
    assert mf.input_shape == (3, 224, 224) and mf.pixel_size_um == 1.0
    parity = mf.meta["parity"]
    assert max(parity["max_abs_diff"].values()) <= parity["atol"] <= 1e-3
    assert mf.meta["training"]["train_slide_seeds"][1] < 900000
    assert mf.meta["heldout_metrics"]["dev_slide_seeds"][1] < 900000
    with pytest.raises(ModelFolderError, match="expected a 'tumour' model"):
        load_model_folder(default_model_dir("lesion_head"), "tumour")


@pytest.mark.parametrize("edge", [20.45, 20.55, 31.2])
def test_outline_edge_falls_between_the_head_cells(edge: float) -> None:
    """The head's map is resampled finer before its 0.5 contour (OUTLINE_UPSAMPLE): an edge a fraction of a
    4 µm cell past a cell centre is placed there, not on the cells' staircase (half a cell off at 20.45)."""
    from runtime.analysis.lesion_head import OUTLINE_UPSAMPLE, Window, head_outline

    cells, cell_l0 = 56, 8.0  # a 224 µm window of 4 µm cells at 0.5 µm/px
    centres = np.arange(cells) + 0.5
    prob = np.zeros((cells, cells), np.float32)
    prob[10:40] = np.clip(0.5 + 0.25 * (edge - centres), 0.0, 1.0)  # 0.5 at x = edge (cells), falling to the right
    win = Window(100.0, 200.0, 2.0, cell_l0)
    seed = box(100 + 5 * cell_l0, 200 + 15 * cell_l0, 100 + 10 * cell_l0, 200 + 20 * cell_l0)
    err = {}
    for up in (OUTLINE_UPSAMPLE, 1):
        geom = head_outline(prob, seed, win, [], upsample=up)
        assert geom is not None and geom.contains(seed)
        err[up] = abs((geom.bounds[2] - 100) / cell_l0 - edge)  # the outline's right edge, in cells
    assert err[OUTLINE_UPSAMPLE] <= 0.125 + 1e-9, err  # within half of a quarter cell
    assert err[1] >= 0.2 - 1e-9, err  # the staircase: on a cell boundary


def test_tiny_lesion_is_reoutlined_and_no_detection_removed() -> None:
    s = render_slide(330000, 2, 500.0, held_out=False)  # training-range seed: one ~4,100 µm² lesion
    truth = s.tumour[0]
    x0, y0, x1, y1 = truth.bounds
    blur = box(x0 - 24, y0 - 24, x1 + 24, y1 + 24)  # what a 64 µm patch map draws: too large, square
    # 850 µm long: its box needs 6 x 6 windows, more than MAX_WINDOWS (25): untouched
    big = box(0, 0, 1700, 30)
    assert not big.intersects(truth.buffer(40))
    lesions = [_lesion(big), _lesion(blur)]
    head = load_lesion_head(None, "ort_cpu")
    out, stats = reoutline(ArraySource(s.levels, PX_UM), lesions, head, PX_UM)
    assert len(out) == len(lesions) and out[0] is lesions[0]
    assert stats["calls"] == 1 and stats["windows"] == 1 and stats["reoutlined"] == 1 and head.calls == 1
    new = out[1].geometry
    assert new.intersects(blur) and not new.equals(blur)
    err_before = abs(blur.area - truth.area) / truth.area
    err_after = abs(new.area - truth.area) / truth.area
    assert err_after < err_before and err_after < 0.35, (err_before, err_after)
    # Measurements follow the new outline (the GeoJSON's area and diameter); the scores do not move.
    assert out[1].area_mm2 == pytest.approx(new.area * (PX_UM / 1000) ** 2)
    assert out[1].max_diameter_mm == pytest.approx(geojson.max_diameter(new) * PX_UM / 1000)
    assert (out[1].mean_probability, out[1].max_probability) == (0.7, 0.9)
    # The new outline does not reach into another lesion.
    assert new.intersection(big).area == pytest.approx(0.0, abs=1e-6)


def test_larger_lesion_is_reoutlined_from_a_mosaic_of_windows() -> None:
    """A lesion whose box does not fit one window (with its 32 µm context) is read as a k x k mosaic of
    windows in one model call; the outline follows the truth, placed where it lies on the slide. Only
    lesions below ``max_area_um2`` when one is given (the head's first domain)."""
    s = render_slide(330005, 0, 500.0, held_out=False)  # training-range seed: a ~39,700 µm² lesion, 250 µm
    truth = max(s.tumour, key=lambda g: g.area)
    x0, y0, x1, y1 = truth.bounds
    assert max(x1 - x0, y1 - y0) * PX_UM > 160.0  # more than one window's inner part
    blur = box(x0 - 24, y0 - 24, x1 + 24, y1 + 24)
    src = ArraySource(s.levels, PX_UM)
    head = load_lesion_head(None, "ort_cpu")
    out, stats = reoutline(src, [_lesion(blur)], head, PX_UM)
    assert stats["calls"] == 1 and stats["windows"] == 4 <= MAX_WINDOWS and stats["reoutlined"] == 1
    new = out[0].geometry
    dice = 2 * new.intersection(truth).area / (new.area + truth.area)
    assert abs(new.area - truth.area) / truth.area < abs(blur.area - truth.area) / truth.area
    assert dice > 0.9, dice
    assert out[0].max_probability == 0.9  # the map's score
    same, st = reoutline(src, [_lesion(blur)], head, PX_UM, max_area_um2=10000.0)
    assert same[0].geometry.equals(blur) and st["calls"] == 0
    none, st = reoutline(src, [_lesion(blur)], head, PX_UM, max_windows=3)
    assert none[0].geometry.equals(blur) and st["calls"] == 0


def test_lesion_without_tumour_in_the_head_keeps_its_outline() -> None:
    s = render_slide(330000, 2, 500.0, held_out=False)
    glass = box(2, 2, 40, 40)  # a false positive on glass at the slide's corner: the head finds no tumour
    for g in s.tumour:
        assert not g.intersects(glass.buffer(120))
    # The corner's 150 µm made glass on every level (the slide has benign tissue there, where a head may
    # call a few 4 µm specks tumour: the retrained one outlines 64 µm² of it there; the first one 0).
    levels = [lv.copy() for lv in s.levels]
    for k, lv in enumerate(levels):
        lv[: 300 >> k, : 300 >> k] = 255
    head = load_lesion_head(None, "ort_cpu")
    out, stats = reoutline(ArraySource(levels, PX_UM), [_lesion(glass)], head, PX_UM)
    assert len(out) == 1 and out[0].geometry.equals(glass) and stats["kept"] == 1
    assert np.isfinite(out[0].area_mm2)


def test_training_refuses_held_out_seeds() -> None:
    from export.train_lesion_head import check_training_seed, windows

    check_training_seed(320000)
    with pytest.raises(ValueError, match="training-range seeds"):
        check_training_seed(900000)
    with pytest.raises(ValueError, match="got 900001"):
        windows(899990, 12, Path("/nonexistent"), 1)  # refused before anything renders


@pytest.mark.parametrize("antialias", [True, False])
def test_antialiased_pool_moves_its_output_with_the_input(antialias: bool) -> None:
    """``--antialias``: a bright pixel moved by 1 px moves the pool's output centroid by half a cell, at every
    phase (a 2x2 max pool at stride 2 leaves it in place, then jumps a whole cell), with the max pool's output
    size and cell centres."""
    import torch
    from torch import nn

    from export.train_lesion_head import BlurPool, LesionHead

    pool = BlurPool(1) if antialias else nn.MaxPool2d(2)
    centroids = []
    for p in range(8, 16):
        x = torch.zeros(1, 1, 24, 24)
        x[0, 0, 11, p] = 1.0
        y = pool(x)[0, 0].sum(dim=0)
        assert y.shape == (12,)
        centroids.append(float((y * torch.arange(12)).sum() / y.sum()))
    steps = np.diff(centroids)
    if antialias:
        assert np.allclose(steps, 0.5, atol=1e-6) and abs(centroids[0] - (8 - 0.5) / 2) < 1e-6, centroids
    else:
        assert not np.allclose(steps, 0.5, atol=0.1), centroids
    net = LesionHead(antialias=antialias)
    assert net(torch.zeros(1, 3, 224, 224))[0].shape == (1, 1, 56, 56)
    assert set(net.state_dict()) == set(LesionHead().state_dict())  # the same weights load into either


def test_shifted_crop_reads_the_truth_at_every_phase_of_the_grid() -> None:
    """``--shift`` crops at any 1 µm offset: the crop is the image's, and each 4 µm cell's target is the
    truth's mean over the cell's own pixels (exact for a truth uniform within the window's cells, as here;
    swapped or missing overlap weights fail at every phase but 0)."""
    from export.train_lesion_head import CELL, CROP, shifted_crop

    n = CROP // CELL
    mask = np.zeros((160, 200), np.float32)
    mask[36:120, 52:140] = 1.0  # edges on the window's cells
    mask[8:20, 8:180] = 0.5
    t4 = mask.reshape(160 // CELL, CELL, 200 // CELL, CELL).mean(axis=(1, 3))
    img = np.random.default_rng(0).integers(0, 256, (160, 200, 3), dtype=np.uint8)
    for y, x in [(0, 0), (1, 2), (3, 3), (30, 50), (63, 101), (64, 104)]:
        im, t = shifted_crop(img, t4, y, x)
        exact = mask[y : y + CROP, x : x + CROP].reshape(n, CELL, n, CELL).mean(axis=(1, 3))
        assert np.array_equal(im, img[y : y + CROP, x : x + CROP])
        assert t.shape == (n, n) and np.abs(t - exact).max() < 1e-6, (y, x)


def test_shifted_crop_with_the_1um_truth_is_exact_where_edges_cut_the_cells() -> None:
    """With the cache's 1 µm truth ``t1`` the target is exact at every phase, also where the truth's edges
    fall inside the 4 µm cells (the ``t4``-only overlap weighting blurs those: the test checks it does)."""
    from export.train_lesion_head import CELL, CROP, cell_mean, shifted_crop

    n = CROP // CELL
    t1 = np.zeros((160, 200), np.uint8)
    t1[37:119, 53:141] = 1  # edges inside the cells
    yy, xx = np.mgrid[:160, :200]
    t1[(yy - 30) ** 2 + (xx - 170) ** 2 < 13**2] = 1
    t4 = cell_mean(t1)
    img = np.random.default_rng(0).integers(0, 256, (160, 200, 3), dtype=np.uint8)
    blurred = 0.0
    for y, x in [(0, 0), (1, 2), (3, 3), (30, 50), (63, 101), (64, 104)]:
        im, t = shifted_crop(img, t4, y, x, t1=t1)
        exact = t1[y : y + CROP, x : x + CROP].reshape(n, CELL, n, CELL).mean(axis=(1, 3))
        assert np.array_equal(im, img[y : y + CROP, x : x + CROP])
        assert t.shape == (n, n) and t.dtype == np.float32 and np.abs(t - exact).max() < 1e-6, (y, x)
        blurred = max(blurred, float(np.abs(shifted_crop(img, t4, y, x)[1] - exact).max()))
    assert blurred > 0.1


def test_window_cache_holds_the_1um_truth_and_refuses_an_old_format(tmp_path: Path) -> None:
    """The cache stores format 2 (windows with ``t1``, whose cell means are ``t4``); a format-1 file (a bare
    list of 4 µm-truth windows) is refused with a message that says how to re-render."""
    import pickle

    from export.train_lesion_head import CACHE_FORMAT, cell_mean, read_cache, windows

    wins = windows(320001, 1, tmp_path, 1)  # one ordinary tumour slide (bench index 0)
    d = pickle.loads((tmp_path / "320001.pkl").read_bytes())
    assert d["format"] == CACHE_FORMAT == 2 and len(d["windows"]) == len(wins) > 0
    assert any(w["t1"].any() for w in wins)
    for w in wins:
        assert w["t1"].dtype == np.uint8 and w["t1"].shape == w["img"].shape[:2] and set(np.unique(w["t1"])) <= {0, 1}
        assert np.array_equal(cell_mean(w["t1"]), w["t4"])
    assert len(windows(320001, 1, tmp_path, 1)) == len(wins)  # read back, not rendered again
    old = tmp_path / "320002.pkl"
    old.write_bytes(pickle.dumps([{"img": wins[0]["img"], "t4": wins[0]["t4"]}]))
    with pytest.raises(ValueError, match=r"format 1, this export needs format 2.*re-render"):
        read_cache(old)
    with pytest.raises(ValueError, match=r"320002\.pkl is lesion-head window cache format 1"):
        windows(320001, 2, tmp_path, 1)


def test_windows_in_both_carcinoma_looks_are_the_same_windows_drawn_otherwise(tmp_path: Path) -> None:
    """``--vesicular-max V --both-looks``: each slide's windows twice, cached per look; the same boxes and
    truth, the lesions' pixels drawn otherwise."""
    from export.train_lesion_head import cache_name, train_lesion_head, windows

    plain = windows(320001, 1, tmp_path, 1)
    both = windows(320001, 1, tmp_path, 1, looks=(0.0, 1.0))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["320001-ves1.pkl", "320001.pkl"]
    assert cache_name(320001, 1.0) == "320001-ves1.pkl" and cache_name(320001) == "320001.pkl"
    assert len(both) == 2 * len(plain) > 0
    ves = both[len(plain) :]
    for a, b in zip(plain, ves, strict=True):
        assert np.array_equal(a["t1"], b["t1"]) and a["img"].shape == b["img"].shape
    lesion = [i for i, w in enumerate(plain) if w["t1"].any()]
    assert lesion and all(not np.array_equal(plain[i]["img"], ves[i]["img"]) for i in lesion)
    with pytest.raises(ValueError, match="second look"):
        train_lesion_head(tmp_path / "out", cache=tmp_path, both_looks=True)
    with pytest.raises(ValueError, match=r"vesicular_max must be in \[0, 1\]"):
        train_lesion_head(tmp_path / "out", cache=tmp_path, vesicular_max=1.5)
    assert not (tmp_path / "out").exists()


def test_stroma_ring_is_the_truths_inner_edge_only() -> None:
    """``--ring-weight``'s ring: the truth's pixels within ``ring_um`` of its edge, none outside the truth,
    none deep inside it, and the window's border is not an edge."""
    from export.train_lesion_head import cell_mean, crop_target, stroma_ring

    yy, xx = np.mgrid[:200, :200]
    d = np.hypot(yy - 100.0, xx - 100.0)
    t1 = (d < 60).astype(np.uint8)
    r = stroma_ring(t1, 12)
    assert r.dtype == np.uint8 and not (r & (1 - t1)).any()
    assert r[d < 46].sum() == 0 and r[(d > 49) & (d < 59)].all()
    band = stroma_ring(t1, 12, outer=True)  # --ring-outer: across the edge, both sides
    assert np.array_equal(band & t1, r) and band[(d > 61) & (d < 71)].all() and band[d > 74].sum() == 0
    img = np.zeros((200, 200, 3), np.uint8)
    w = {"img": img, "t1": t1, "t4": cell_mean(t1)}
    _, t, wt = crop_target(w, r, 4, 4, 96, True, 2.0)
    exact = cell_mean(t1[4:100, 4:100])
    assert np.array_equal(t, exact) and wt.dtype == np.float32 and wt.shape == t.shape
    assert wt.max() == 3.0 and np.all(wt[t == 0] == 1.0) and np.all(wt >= 1.0)
    assert np.allclose(wt, 1 + 2 * cell_mean(r[4:100, 4:100]))
    assert wt[-1, -1] == 1.0 and t[-1, -1] == 1.0  # deep inside: truth, no extra weight
    _, t4_target, ones = crop_target(w, None, 5, 6, 96, False, 2.0)  # no ring; the 4 µm cells' target
    assert np.all(ones == 1.0) and np.abs(t4_target - cell_mean(t1[5:101, 6:102])).max() > 0.05
    full = np.ones((100, 100), np.uint8)
    assert stroma_ring(full, 12).sum() == 0
    assert stroma_ring(np.zeros_like(full), 12).sum() == 0


def test_training_content_and_init_from_the_committed_folder() -> None:
    """``--init`` reads the committed folder's ONNX weights into the torch head (same outputs as ONNX
    Runtime); the other-content negatives are crops-sized images none of the held-out files; the colour
    jitter keeps the window's shape and glass white-ish."""
    import torch

    from export.content_mix import TRAIN_IMAGES
    from export.train_lesion_head import (
        CROP,
        folder_head,
        jitter_colour,
        other_content_images,
        to_input,
    )
    from hw_sim.content import PACKAGED

    net = folder_head(default_model_dir("lesion_head"))  # its architecture (model.json) and ONNX weights
    net.eval()
    s = render_slide(330000, 2, 500.0, held_out=False)
    win = np.ascontiguousarray(s.levels[1][:224, :224])
    with torch.no_grad():
        p_torch = net(torch.from_numpy(to_input(win))[None])[0].numpy()
    p_ort = load_lesion_head(None, "ort_cpu").predict(win[None])
    assert np.abs(p_torch.reshape(p_ort.shape) - p_ort).max() < 1e-3
    rng = np.random.default_rng(0)
    imgs = other_content_images(rng, 2, 2)
    assert len(imgs) == 4 and all(min(im.shape[:2]) >= CROP and im.dtype == np.uint8 for im in imgs)
    assert not set(PACKAGED.values()) & set(TRAIN_IMAGES)
    glass = np.full((8, 8, 3), 255, np.uint8)
    j = jitter_colour(np.concatenate([glass, win[:8, :8]]), rng, 0.15)
    assert j.shape == (16, 8, 3) and j.dtype == np.uint8 and j[:8].min() >= 200


def test_faint_region_confirmed_by_the_head_becomes_a_lesion() -> None:
    """A small lesion whose map peaks under 0.5 forms no region; the head, asked about the faint region,
    finds its tumour and adds it (scored by the map's peak, below every thresholded lesion). A faint
    region the head finds no tumour in adds nothing, and without the head nothing is added."""
    import dataclasses

    from runtime.analysis.lesion_head import CANDIDATE_THRESHOLD, confirm_faint
    from runtime.analysis.pipeline import analyze_source, load_models, slide_lesions

    s = render_slide(330000, 2, 500.0, held_out=False)  # training-range seed: one ~4,100 µm² lesion
    src = ArraySource(s.levels, PX_UM)
    models = load_models(None, None, None)
    res = analyze_source(src, models, nuclei=False, subdivide=2)
    peak = 0.45  # between CANDIDATE_THRESHOLD and 0.5
    assert CANDIDATE_THRESHOLD < peak < 0.5
    res.probability = (res.probability * (peak / res.probability.max())).astype(np.float32)  # a faint map
    assert slide_lesions(res, models, src) == []  # nothing at 0.5, and without the head nothing is added
    with_head = dataclasses.replace(models, lesion_head=load_lesion_head(None, "ort_cpu"))
    found = slide_lesions(res, with_head, src)
    assert len(found) == 1 and res.stats["lesion_head_added"] == 1
    assert found[0].geometry.intersects(s.tumour[0])
    assert CANDIDATE_THRESHOLD <= found[0].max_probability <= peak  # the map's peak (between cell centres)
    err = abs(found[0].geometry.area - s.tumour[0].area) / s.tumour[0].area
    assert err < 0.5, err
    # The same faint level over tumour-free tissue: the head finds nothing there.
    ty, tx = np.unravel_index(int(np.argmax(res.probability)), res.probability.shape)
    far = np.zeros_like(res.probability)
    fy, fx = (ty + res.probability.shape[0] // 2) % res.probability.shape[0], tx
    far[fy, fx] = peak
    far[fy, max(0, fx - 1)] = peak
    benign = dataclasses.replace(res, probability=far)
    head = load_lesion_head(None, "ort_cpu")
    out, st = confirm_faint(src, benign, [], head)
    assert st["candidates"] >= 1 and st["calls"] >= 1
    assert all(not les.geometry.intersects(s.tumour[0]) for les in out)
    assert st["added"] == 0, [les.area_mm2 for les in out]


def test_scan_cost_compares_the_head_on_trained_models_only() -> None:
    """``bench analysis --scan-cost --cost-compare lesion-head``: both settings run the analysis, the
    head off and on; it needs the trained models (refused before any recording is made)."""
    import argparse

    from bench.analysis import add_arguments, scan_cost

    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["--slides", "0", "--scan-cost", "--cost-compare", "lesion-head", "--cost-lesions", "6"])
    assert (a.cost_compare, a.cost_lesions, a.cost_seed, a.cost_paces) == ("lesion-head", 6, 900_500, [0.0, 1.0])
    with pytest.raises(ValueError, match="trained models"):
        scan_cost(2, 1, trained=False, compare="lesion-head")


def test_window_reads_only_its_region_where_the_source_can() -> None:
    """A source with ``read_region`` (the scan's mosaic, a TIFF) is read for the window alone, and the
    window is the one whole rows give (also at the slide's edge, glass beyond it)."""
    from runtime.analysis.lesion_head import read_window

    rng = np.random.default_rng(0)
    levels = [rng.integers(0, 255, (600, 900, 3), dtype=np.uint8)]
    levels.append(levels[0][::2, ::2].copy())
    head = load_lesion_head(None, "ort_cpu")
    reads: list[tuple[int, ...]] = []

    class RegionSource(ArraySource):
        def read_rows(self, level: int, y0: int, y1: int) -> np.ndarray:
            raise AssertionError("whole rows read")

        def read_region(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            reads.append((level, y0, y1, x0, x1))
            return self.levels[level][y0:y1, x0:x1]

    for cx, cy in ((450.0, 300.0), (20.0, 580.0)):
        want, wwin = read_window(ArraySource(levels, PX_UM), head, cx, cy)
        got, gwin = read_window(RegionSource(levels, PX_UM), head, cx, cy)
        assert np.array_equal(want, got) and wwin == gwin
        _level, y0, y1, x0, x1 = reads[-1]
        assert x1 - x0 <= head.size and y1 - y0 <= head.size  # the window, not the level's width


def test_bench_lesion_head_scores_every_unseen_image_at_every_pixel_size(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from bench.__main__ import main as bench_main
    from bench.lesion_head import SCALES, unseen_images, windows

    assert bench_main(["lesion-head", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["lesion_head_unseen"]
    images = unseen_images()
    assert {(r["image"], r["um_per_px"]) for r in rows} == {(n, round(1 / s, 2)) for n in images for s in SCALES}
    for r in rows:
        assert r["windows"] == len(windows(images[r["image"]], 224, 1 / r["um_per_px"]))
        assert 0.0 <= r["tumour_cells_pct"] <= 100.0 and 0.0 <= r["mean_p"] <= 1.0


def test_head_calls_little_of_held_out_content_tumour() -> None:
    """The committed head calls under 10% of the 4 µm cells of the held-out content tumour (scikit-image's
    IHC section and brick, gravel and grass textures, at 2, 1 and 0.5 µm/px; none is tumour and no training
    set uses them). The first head, trained on simulated H&E only, called 72-100% of them tumour."""
    from bench.lesion_head import SCALES, held_out, unseen_images, windows

    head = load_lesion_head(None, "ort_cpu")
    images = {n: im for n, im in unseen_images().items() if held_out(n)}
    assert set(images) == {"immunohistochemistry", "brick", "gravel", "grass"}
    for name, im in images.items():
        for scale in SCALES:
            w = windows(im, head.size, scale)
            assert len(w), (name, scale)
            called = float(np.mean(head.predict(w) >= 0.5))
            assert called < 0.10, (name, 1 / scale, called)


def _tissue_with_glass(
    hole_centre: tuple[int, int], hole_r: int, edge_glass: bool, noise: float = 0.0
) -> list[np.ndarray]:
    """A 600 px (0.5 µm/px) pink tissue square with a round slide hole (glass at 236 grey levels, as the
    simulator's camera reads it) and, if ``edge_glass``, a bay of glass beyond the tissue's edge reaching in from
    the right; Gaussian camera noise of ``noise`` grey levels; levels 0 and 1."""
    import cv2

    img = np.empty((600, 600, 3), np.uint8)
    img[:] = (205, 120, 185)
    cv2.circle(img, hole_centre, hole_r, (236, 236, 236), -1)
    if edge_glass:
        img[270:330, 320:] = 236
    if noise:
        rng = np.random.default_rng(1)
        img = np.clip(img + rng.normal(0.0, noise, img.shape), 0, 255).astype(np.uint8)
    return [img, np.asarray(cv2.resize(img, (300, 300), interpolation=cv2.INTER_AREA))]


@pytest.mark.parametrize("noise", [0.0, 3.0])
def test_glass_fill_completes_a_lesion_across_a_slide_hole_only(noise: float) -> None:
    """A lesion outline cut by a slide hole (the head stops where the tissue does) takes the hole's glass inside
    its convex hull, with or without camera noise; glass that reaches the read region's edge (beyond the tissue)
    and glass outside the hull are not added, nor the parts of ``others``."""
    from shapely.geometry import Point

    from runtime.analysis.lesion_head import glass_fill

    disc = Point(300, 300).buffer(60)  # a 60 µm lesion (0.5 µm/px)
    hole = Point(300, 355).buffer(30)  # a hole crossing its lower edge
    cut = disc.difference(hole)
    src = ArraySource(_tissue_with_glass((300, 355), 30, False, noise), PX_UM)
    filled = glass_fill(src, cut, cut.bounds, [])
    inside = cut.convex_hull.intersection(hole).difference(cut).area
    assert inside > 0.08 * cut.area  # what there is to recover: over 8% of the outline
    assert filled.area == pytest.approx(cut.area + inside, rel=0.03)
    assert filled.difference(cut.convex_hull.buffer(1.0)).area < 1.0  # nothing outside the hull
    # Another lesion's outline over part of that glass keeps it.
    other = box(280, 330, 320, 400)
    with_other = glass_fill(src, cut, cut.bounds, [other])
    assert with_other.intersection(other).area < 1.0 and with_other.area < filled.area
    # The same lesion cut by a bay of glass beyond the tissue's edge (it reaches the read region's edge): unchanged.
    edge_cut = disc.difference(box(320, 270, 600, 330))
    assert edge_cut.convex_hull.difference(edge_cut).area > 0.08 * edge_cut.area
    src2 = ArraySource(_tissue_with_glass((0, 0), 0, True, noise), PX_UM)
    assert glass_fill(src2, edge_cut, edge_cut.bounds, []) is edge_cut


def test_reoutline_glass_fill_switch() -> None:
    """``reoutline`` completes a small head outline across a hole by default and not with ``glass_fill_max_um2``
    None (stats ``glass_filled``); the rendered tiny lesion of the tests above is cut by a painted hole."""
    s = render_slide(330000, 2, 500.0, held_out=False)
    (g,) = s.tumour
    x0, y0, x1, y1 = g.bounds
    cx, cy, r = int((x0 + x1) / 2), int(y1), int((y1 - y0) / 4)
    levels = [lv.copy() for lv in s.levels]
    import cv2

    for k, lv in enumerate(levels):
        cv2.circle(lv, (cx >> k, cy >> k), max(1, r >> k), (240, 240, 240), -1)
    head = load_lesion_head(None, "ort_cpu")
    src = ArraySource(levels, PX_UM)
    on, st_on = reoutline(src, [_lesion(g)], head, PX_UM)
    off, st_off = reoutline(src, [_lesion(g)], head, PX_UM, glass_fill_max_um2=None)
    assert st_off["glass_filled"] == 0 and st_on["reoutlined"] == st_off["reoutlined"] == 1
    assert st_on["glass_filled"] == 1
    assert on[0].geometry.area > off[0].geometry.area and on[0].geometry.contains(off[0].geometry.buffer(-0.5))
    assert on[0].area_mm2 == pytest.approx(on[0].geometry.area * (PX_UM / 1000) ** 2)


def test_bench_analysis_takes_the_lesion_head_of_a_model_root_that_has_one(tmp_path: Path) -> None:
    from bench.analysis import lesion_head_dir

    assert lesion_head_dir(None) is None and lesion_head_dir(tmp_path) is None  # the committed head
    (tmp_path / "lesion_head").mkdir()
    assert lesion_head_dir(tmp_path) == tmp_path / "lesion_head"


def test_bench_lesion_head_scores_the_folder_it_is_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import main as bench_main
    from runtime.errors import run_cli

    assert run_cli(bench_main, ["lesion-head", "--model", str(tmp_path / "none")]) == 1  # as `python -m bench` runs
    out = capsys.readouterr()
    assert f"model folder {tmp_path / 'none'} does not exist" in out.err and "Traceback" not in out.err
    assert "lesion_head_unseen" not in out.out
