"""The tile classifier's decision rule: flips/transposes averaged, an artifact threshold chosen on
validation data, read from model.json by the runtime (issue 11: tissue the models never saw)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime.ml.backends import OrtBackend
from runtime.ml.model_folder import default_model_dir, load_model_folder
from runtime.ml.tasks import DIHEDRAL, ClassifierDecision, TileClassifierModel, dihedral


def test_dihedral_gives_the_eight_distinct_flips_and_transposes() -> None:
    x = np.random.default_rng(0).random((2, 3, 5, 5)).astype(np.float32)
    outs = [dihedral(x, d) for d in range(DIHEDRAL)]
    np.testing.assert_array_equal(outs[0], x)
    assert len({o.tobytes() for o in outs}) == DIHEDRAL  # all different on a random window
    for o in outs:  # each is a rearrangement of the same pixels, per window and channel
        np.testing.assert_array_equal(np.sort(o.reshape(2, 3, -1)), np.sort(x.reshape(2, 3, -1)))
    np.testing.assert_array_equal(outs[1], x[..., ::-1])
    np.testing.assert_array_equal(outs[4], np.swapaxes(x, 2, 3))


def test_window_labels_with_and_without_a_threshold() -> None:
    p = np.array(
        [[0.45, 0.18, 0.37], [0.0, 0.499, 0.501], [0.0, 0.39, 0.61], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]], np.float32
    )
    assert ClassifierDecision().window_labels(p).tolist() == [0, 2, 2, 2, 0]
    # Below the threshold an artifact-leaning window is whichever of glass and tissue is likelier.
    assert ClassifierDecision(1, 0.65).window_labels(p).tolist() == [0, 1, 1, 2, 0]
    with pytest.raises(ValueError, match="transforms must be 1, 2, 4 or 8"):
        ClassifierDecision(3)
    with pytest.raises(ValueError, match="artifact_threshold must be in"):
        ClassifierDecision(8, 1.5)


def test_threshold_keeps_the_target_recall_and_transforms_follow_validation_accuracy() -> None:
    from export.classifier_decision import choose, threshold_for_recall

    pa = np.array([0.95, 0.9, 0.8, 0.7, 0.62, 0.55, 0.4, 0.3, 0.2, 0.1])
    t = threshold_for_recall(pa, 0.8)
    assert t == 0.3 and np.mean(pa >= t) == 0.8 and np.mean(pa >= t + 1e-4) < 0.8  # 8 of 10 kept
    assert threshold_for_recall(np.array([0.56789]), 1.0) == 0.5678  # rounded down: the tile stays in

    # Validation windows: (tiles, 8 transforms, 3). One pass calls a tissue window artifact; the
    # mean over 8 does not, so 8 transforms win on accuracy.
    rng = np.random.default_rng(1)
    labels = np.array([1] * 20 + [2] * 10)
    probs = np.zeros((30, 8, 3), np.float32)
    probs[:20] = [0.0, 0.9, 0.1]
    probs[20:] = [0.0, 0.1, 0.9]
    probs[0, :4] = [0.0, 0.4, 0.6]  # a tissue window that leans to artifact in half of its transforms
    probs[20:, :, 2] = rng.uniform(0.6, 1.0, (10, 8))
    probs[20:, :, 1] = 1 - probs[20:, :, 2]
    rule, cands = choose(probs, labels)
    assert rule.transforms == 8  # only the mean over all 8 calls that window tissue
    assert cands["argmax_x1"]["tissue_called_artifact"] == 0.05 and cands["argmax_x8"]["tissue_called_artifact"] == 0
    # Default target: the single-pass recall (here all 10), kept by the threshold.
    assert cands[f"threshold_x{rule.transforms}"]["artifact_recall"] >= cands["argmax_x1"]["artifact_recall"]


def test_committed_classifier_reads_its_decision_and_averages_transforms_in_one_call() -> None:
    folder = load_model_folder(default_model_dir("classifier"), "classifier")
    model = TileClassifierModel(folder, OrtBackend(folder, cuda=False))
    rec = folder.meta["decision"]
    assert model.decision == ClassifierDecision(rec["transforms"], rec["artifact_threshold"])
    assert rec["chosen_on"]["splits"] and "never_read" in rec["chosen_on"]
    assert rec["heldout_metrics"]["heldout"]["rule"]["artifact_recall"] >= 0.9  # the target

    rng = np.random.default_rng(3)
    tile = (rng.random((512, 512, 3)) * 255).astype(np.uint8)
    x = model.pre.inputs(tile, 0.25)
    p, emb = model.window_probabilities(x)
    singles = [model.window_probabilities(dihedral(x, d), transforms=1)[0] for d in range(model.decision.transforms)]
    np.testing.assert_allclose(p, np.mean(singles, axis=0), atol=1e-5)
    np.testing.assert_allclose(emb, model.backend.run(x)["embedding"], atol=1e-6)  # untransformed windows
    got = model.classify(tile, 0.25)
    want = ["background", "tissue", "artifact"][int(model.decision.window_labels(p).max())]
    assert got.label == want


def test_a_bad_decision_in_model_json_is_named(tmp_path: Path) -> None:
    dst = tmp_path / "classifier"
    shutil.copytree(default_model_dir("classifier"), dst)
    meta = json.loads((dst / "model.json").read_text())
    meta["decision"] = {"transforms": 5}
    (dst / "model.json").write_text(json.dumps(meta))
    folder = load_model_folder(dst, "classifier")
    with pytest.raises(ValueError, match=r"model\.json: classifier decision: transforms must be 1, 2, 4 or 8"):
        TileClassifierModel(folder, OrtBackend(folder, cuda=False))
    del meta["decision"]  # a folder without a decision: one pass, argmax (every folder before this one)
    (dst / "model.json").write_text(json.dumps(meta))
    folder = load_model_folder(dst, "classifier")
    assert TileClassifierModel(folder, OrtBackend(folder, cuda=False)).decision == ClassifierDecision()
