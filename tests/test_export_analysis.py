"""Training the slide-analysis models (export/): data, tiny training runs, export, loading.

Tiny on purpose (a few small slides, one epoch): they check that each trainer renders its
data, trains, exports a parity-checked folder the runtime loads, and records its figures --
not how good the models get (the committed folders' held-out metrics say that).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from export.analysis_data import analysis_slide, render_nuclei_regions, render_slide_grid, slide_seed
from export.analysis_metrics import match_points, roc_auc
from hw_sim.lesions import HELD_OUT_SEEDS


def test_training_seeds_never_reach_the_held_out_range() -> None:
    assert slide_seed("train", 0) < HELD_OUT_SEEDS.start
    assert slide_seed("heldout", 0) in HELD_OUT_SEEDS
    with pytest.raises(ValueError, match="held out"):
        slide_seed("train", 800_000)
    with pytest.raises(ValueError, match="split"):
        slide_seed("val", 0)


def test_slide_grid_labels_follow_the_lesions() -> None:
    g = render_slide_grid("train", 3, True, size_um=600.0)
    n = len(g["patches"])
    assert g["patches"].shape == (n, 64, 64, 3) and g["patches"].dtype == np.uint8
    assert g["coords_um"].shape == (n, 2) and np.all(g["tissue_fraction"] >= 0.1)
    assert bool(g["slide_tumour"][0]) and g["tumour_fraction"].max() > 0
    # The labels agree with the lesion membership at the patch centres (the same slide, rebuilt).
    seed = int(g["slide_seed"][0])
    slide = analysis_slide(seed, True, np.random.default_rng([seed, 7]), 600.0)
    assert slide.lesions is not None
    cy, cx = (g["coords_um"][:, i].astype(np.float64) for i in (0, 1))
    t_c, _, _, m_c = slide.lesions.membership_pts(cx, cy)
    assert np.all(t_c[g["tumour_fraction"] >= 0.9] > 0.5)
    assert np.all(g["tumour_fraction"][t_c > 0.5] > 0)
    assert np.all(g["tumour_fraction"][m_c > 0.5] == 0)  # mimics are never tumour
    none = render_slide_grid("train", 4, False, size_um=600.0)
    assert not none["slide_tumour"][0] and none["tumour_fraction"].max() == 0


def test_nuclei_regions_carry_their_centroids() -> None:
    r = render_nuclei_regions("train", 1, 3)
    assert r["images"].shape == (3, 128, 128, 3) and r["centroids"].shape[0] == 3
    assert np.all(r["count"] > 0)
    c = r["centroids"][0][: r["count"][0]]
    assert np.all((c > -20) & (c < 148))  # inside the region or its 8 µm halo


def test_metrics() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert np.isnan(roc_auc([1, 1], [0.1, 0.2]))
    assert match_points([[0, 0], [5, 5], [30, 30]], [[1, 0], [5, 6.5], [9, 9]], 2.0) == (2, 1, 1)
    assert match_points(np.zeros((0, 2)), [[1, 1]], 2.0) == (0, 0, 1)


def test_tiny_training_runs_export_folders_the_runtime_loads(tmp_path: Path) -> None:
    from export.train_mil import train_mil
    from export.train_nuclei import train_nuclei
    from export.train_tumour import train_tumour
    from runtime.analysis.models import load_analysis_models

    data = tmp_path / "data"
    small = {"slide_um": 500.0, "train_slides": 4, "heldout_slides": 2, "val_slides": 1, "workers": 1}
    tumour = train_tumour(data, tmp_path / "tumour", epochs=1, batch=16, other_content=2, **small)  # type: ignore[arg-type]
    assert set(tumour["heldout_metrics"]) >= {"auc", "accuracy", "false_positive_rate_benign", "heldout_slide_seeds"}
    assert all(s in HELD_OUT_SEEDS for s in tumour["heldout_metrics"]["heldout_slide_seeds"])
    nuclei = train_nuclei(
        data, tmp_path / "nuclei", epochs=1, batch=2, train_slides=2, per_slide=3, heldout_slides=1,
        heldout_per_slide=2, workers=1,
    )
    assert 0.0 <= nuclei["heldout_metrics"]["f1"] <= 1.0 and nuclei["heldout_metrics"]["match_um"] == 4.0
    mil = train_mil(data, tmp_path / "mil", tmp_path / "tumour", epochs=1, **small)  # type: ignore[arg-type]
    assert "baseline_max_probability_auc" in mil["heldout_metrics"]
    models = load_analysis_models(tmp_path / "tumour", tmp_path / "nuclei", tmp_path / "mil", backend="ort_cpu")
    out = models.tumour.predict(np.full((2, 64, 64, 3), 200, np.uint8))
    score = models.slide.predict(out.embedding, np.asarray([[0, 0], [0, 64]], np.float32))
    assert abs(float(score.attention.sum()) - 1.0) < 1e-5
    for name in ("tumour", "nuclei", "mil"):
        meta = json.loads((tmp_path / name / "model.json").read_text())
        assert meta["parity"]["max_abs_diff"] and meta["training"]["train_seconds"] >= 0
