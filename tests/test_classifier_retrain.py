"""Retraining the tile classifier from a model folder (``python -m export train-classifier --init DIR
--extra SPLIT ...``): the options reach training, every layer trains from the folder's weights with its
folded BatchNorm kept the identity, and the fold-targeted splits put tiles on folds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export import __main__ as cli  # noqa: E402
from export import train  # noqa: E402
from export.classifier_finetune import load_onnx_classifier  # noqa: E402
from export.datasets import CLASSIFIER_DATA, ClassifierJob, render_classifier_config  # noqa: E402
from export.onnx_export import export_checkpoint  # noqa: E402
from hw_sim.slide import ARTIFACT_KINDS  # noqa: E402
from runtime.ml.model_folder import default_model_dir, load_model_folder  # noqa: E402


def test_init_extra_and_lr_reach_classifier_training(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    def fn(data_dir: Path, out: Path, seed: int = 0, **kw: Any) -> dict[str, Any]:
        seen.append(kw)
        return {"heldout_metrics": {}}

    monkeypatch.setattr(train, "train_classifier", fn)
    argv = ["train-classifier", "--hard", "--init", "m", "--extra", "train_folds", "train_artifacts", "--lr", "0.001"]
    assert cli.main(argv) == 0
    ((kw,),) = [seen]
    assert kw["init"] == Path("m") and kw["extra_splits"] == ("train_folds", "train_artifacts") and kw["lr"] == 0.001
    assert kw["command"] == "python -m export " + " ".join(argv)
    seen.clear()
    assert cli.main(["train-classifier", "--hard"]) == 0  # the plain command records nothing extra
    assert seen[0]["init"] is None and seen[0]["extra_splits"] == () and "command" not in seen[0]


def _fake_cache(data: Path, split: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (n, 3, 64, 64)).astype(np.float16)
    label = np.arange(n) % 3
    x[label == 0] *= np.float16(0.1)
    np.savez(data / f"classifier-{split}-seed0.npz", x=x, label=label, optics_json=np.asarray(json.dumps([])))


def test_fine_tune_from_a_folder_trains_every_layer_and_keeps_batchnorm_the_identity(tmp_path: Path) -> None:
    for k, split in enumerate(("train", "train_folds", "val", "heldout")):
        _fake_cache(tmp_path, split, 48 if split.startswith("train") else 12, k)
    init = default_model_dir("classifier")
    before = load_onnx_classifier(init).state_dict()
    out = tmp_path / "ft.pt"
    r = train.train_classifier(
        tmp_path, out, epochs=1, batch=16, lr=1e-3, init=init, extra_splits=("train_folds",), command="cmd"
    )
    assert r["train_splits"] == ["train", "train_folds"] and r["train_samples"] == 96
    assert r["init_folder"]["folder"] == str(init) and len(r["init_folder"]["onnx_sha256"]) == 64
    assert r["command"] == "cmd"
    after = torch.load(out, weights_only=False)["state_dict"]
    for k in ("features.0.0.weight", "features.5.0.weight", "classify.weight"):  # first and last layers moved
        assert not torch.equal(before[k], after[k]), k
    for k in after:  # the folded BatchNorm statistics stay the identity
        if k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(after[k], before[k])
    # The exported folder records the whole chain: the init folder's commands, then this run's.
    meta = export_checkpoint(out, tmp_path / "folder", np.zeros((4, 3, 64, 64), np.float32))
    init_cmds = load_model_folder(init, "classifier").meta["training"]["commands"]
    cmds = meta["training"]["commands"]
    assert cmds[: len(init_cmds)] == init_cmds and cmds[len(init_cmds)] == "cmd"
    assert cmds[-1].startswith("python -m export onnx ") and len(cmds) == len(init_cmds) + 2


def test_extra_split_must_be_a_training_split(tmp_path: Path) -> None:
    _fake_cache(tmp_path, "train", 12, 0)
    with pytest.raises(ValueError, match="not a classifier training split"):
        train.train_classifier(tmp_path, tmp_path / "x.pt", epochs=1, extra_splits=("val_content",))


def test_fold_targeted_tiles_land_on_folds() -> None:
    spec = CLASSIFIER_DATA["train_folds_hard"]
    fold = ARTIFACT_KINDS.index("fold")

    def folds(near_kind: str) -> int:
        job = ClassifierJob(
            "train",
            0,
            spec.config_offset,
            2,
            16,
            tile=128,
            hard=True,
            near_artifact=0.6,
            artifacts=(8, 16),
            near_kind=near_kind,
        )
        return int(np.sum(render_classifier_config(job)["artifact_kind"] == fold))

    targeted, anyk = folds("fold"), folds("")
    assert targeted >= 6 and targeted > 2 * anyk
