"""Fine-tuning the tile classifier's tail on cached front features (export.classifier_finetune), the
artifact kind recorded with each rendered classifier tile, and the bench's recall by kind."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.calibrate import torch_dihedral  # noqa: E402
from export.classifier_finetune import (  # noqa: E402
    _Tail,
    fine_tune,
    front_features,
    load_onnx_classifier,
)
from export.datasets import ClassifierJob, artifact_kind, render_classifier_config  # noqa: E402
from hw_sim.slide import ARTIFACT_KINDS, SlideSpec, SyntheticSlide  # noqa: E402
from runtime.ml.backends import OrtBackend  # noqa: E402
from runtime.ml.model_folder import default_model_dir, load_model_folder  # noqa: E402
from runtime.ml.tasks import dihedral  # noqa: E402


def test_torch_model_from_the_committed_onnx_computes_what_onnx_runtime_does() -> None:
    folder = load_model_folder(default_model_dir("classifier"), "classifier")
    model = load_onnx_classifier(folder.path)
    x = np.random.default_rng(0).normal(0.0, 1.0, (6, 3, 64, 64)).astype(np.float32)
    ref = OrtBackend(folder, cuda=False).run(x)
    with torch.no_grad():
        logits, emb = model(torch.from_numpy(x))
    np.testing.assert_allclose(logits.numpy(), ref["logits"], atol=1e-4)
    np.testing.assert_allclose(emb.numpy(), ref["embedding"], atol=1e-5)


def test_torch_dihedral_is_the_runtime_one() -> None:
    x = np.random.default_rng(1).random((2, 3, 5, 5)).astype(np.float32)
    for d in range(8):
        np.testing.assert_array_equal(torch_dihedral(torch.from_numpy(x), d).numpy(), dihedral(x, d))


def test_fine_tune_trains_the_tail_only_and_learns_the_labels() -> None:
    model = load_onnx_classifier(default_model_dir("classifier"))
    front_before = {k: v.clone() for k, v in model.features[:4].state_dict().items()}
    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 1.0, (96, 3, 64, 64)).astype(np.float32)
    labels = np.arange(96) % 3
    x[labels == 2, :, 20:40, 20:40] += 3.0  # an "artifact": a bright square
    x[labels == 0] *= 0.1  # "glass": flat
    feats = front_features(model.features[:4], x, 2)
    assert feats.shape == (2, 96, 64, 16, 16) and feats.dtype == np.float16
    hist = fine_tune(model, feats, labels, 4, epochs=12, lr=3e-3, seed=0, batch=32)
    assert len(hist) == 12 and hist[-1]["loss"] < hist[0]["loss"]
    for k, v in model.features[:4].state_dict().items():  # the frozen front did not move
        torch.testing.assert_close(v, front_before[k])
    tail = _Tail(model, 4).eval()
    with torch.no_grad():
        pred = tail(torch.from_numpy(feats[0].astype(np.float32))).argmax(1).numpy()
        full, _ = model.eval()(torch.from_numpy(x))
    assert np.mean(pred == labels) > 0.9
    np.testing.assert_array_equal(full.argmax(1).numpy(), pred)  # the whole model computes the same


def test_artifact_kind_names_the_artifact_covering_the_region() -> None:
    slide = SyntheticSlide(SlideSpec(seed=5, artifacts=8))
    for a in slide.artifacts[:4]:
        if a.kind == "fold":
            continue  # a fold is labelled only where there is tissue under it
        size = 64
        x0, y0 = a.cx - size * 0.25 / 2, a.cy - size * 0.25 / 2
        if a.kind == "bubble":  # the rim, not the middle
            x0 += a.radius
        if slide.artifact_fraction(x0, y0, size, size, 0.25) == 0:
            continue
        assert ARTIFACT_KINDS[artifact_kind(slide, x0, y0, size, 0.25)] == a.kind
    assert artifact_kind(slide, -5000.0, -5000.0, 64, 0.25) == -1  # off the slide: none
    assert len(slide.artifacts) == 8  # restored


def test_rendered_tiles_record_the_artifact_kind_and_more_artifacts_near_them() -> None:
    d = render_classifier_config(ClassifierJob("train", 0, 300, 1, 8, tile=128, near_artifact=1.0, artifacts=(8, 9)))
    kinds, labels = d["artifact_kind"], d["label"]
    assert kinds.shape == labels.shape == (8,)
    assert np.all((kinds >= 0) == (labels == 2))  # every artifact tile has a kind, the others -1
    assert (labels == 2).sum() >= 4  # every tile centred near an artifact


def test_bench_reports_artifact_recall_by_kind() -> None:
    from bench.classifier import evaluate
    from runtime.ml.tasks import TileClass

    class Fake:
        def classify_batch(self, tiles: list[Any], px: float) -> list[TileClass]:
            return [TileClass(("background", "tissue", "artifact")[int(t[0, 0, 0])], (0, 0, 0), ()) for t in tiles]

    raw = np.zeros((5, 8, 8, 3), np.uint8)
    raw[:, 0, 0, 0] = [2, 1, 2, 1, 0]  # predicted class per tile
    data = {"raw": raw, "label": np.array([2, 2, 2, 1, 0]), "artifact_kind": np.array([0, 0, 2, -1, -1])}
    r = evaluate(Fake(), data)
    assert r["artifact_recall_by_kind"]["ink"] == {"recall": 0.5, "support": 2}
    assert r["artifact_recall_by_kind"]["dust"] == {"recall": 1.0, "support": 1}
    assert r["artifact_recall_by_kind"]["fold"] == {"recall": None, "support": 0}
    del data["artifact_kind"]
    assert evaluate(Fake(), data)["artifact_recall_by_kind"] == {}


def test_split_data_takes_training_splits_only(tmp_path: Any) -> None:
    from export.classifier_finetune import split_data

    for bad in ("heldout", "val:0.5", "train_nonesuch"):
        with pytest.raises(ValueError, match="not a classifier training split"):
            split_data(bad, tmp_path, 0, 1)
