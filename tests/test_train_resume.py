"""A training run (autofocus or classifier) that is stopped (a GPU lease running out, a killed job)
resumes from its last finished epoch and ends where an uninterrupted run of the same arguments ends."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

import torch

from export import __main__ as cli
from export import datasets, train


@pytest.fixture
def tiny_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """v1 autofocus data of one objective and two fields per split (rendered in-process, ~1 s)."""
    tiny = {k: dataclasses.replace(s, configs=1, fields=2, z_per_field=3) for k, s in datasets.AUTOFOCUS_DATA.items()}
    monkeypatch.setattr(datasets, "AUTOFOCUS_DATA", tiny)


class Stop(Exception):
    pass


def _stop_at_validation(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Raise at the ``call``-th validation pass: the run dies inside that epoch, after its steps."""
    real = train.predict_autofocus
    seen = [0]

    def predict(*a: Any, **kw: Any) -> Any:
        seen[0] += 1
        if seen[0] == call:
            raise Stop
        return real(*a, **kw)

    monkeypatch.setattr(train, "predict_autofocus", predict)


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch.load(path, weights_only=False)["state_dict"].items()}


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    tiny_data: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    whole = train.train_autofocus(data, tmp_path / "whole.pt", epochs=3, batch=16, workers=1)
    assert not train.epoch_state_path(tmp_path / "whole.pt").exists()  # removed with the checkpoint

    out = tmp_path / "cut.pt"
    with monkeypatch.context() as m:
        _stop_at_validation(m, call=2)  # dies in epoch 1: epoch 0's state is on disk
        with pytest.raises(Stop):
            train.train_autofocus(data, out, epochs=3, batch=16, workers=1)
    assert train.epoch_state_path(out).exists() and not out.exists()

    resumed = train.train_autofocus(data, out, epochs=3, batch=16, workers=1, resume=True)
    assert resumed["resumed_after_epoch"] == 0 and whole["resumed_after_epoch"] is None
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    a, b = _weights(tmp_path / "whole.pt"), _weights(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert resumed["heldout_metrics"] == whole["heldout_metrics"]


def test_a_fine_tune_from_a_checkpoint_resumes(
    tiny_data: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``init`` is a path: the saved state's copy of it must still match once loaded again."""
    data = tmp_path / "data"
    init = tmp_path / "init.pt"
    train.train_autofocus(data, init, epochs=1, batch=16, workers=1)
    whole = train.train_autofocus(data, tmp_path / "whole.pt", epochs=2, batch=16, workers=1, init=init)
    out = tmp_path / "cut.pt"
    with monkeypatch.context() as m:
        _stop_at_validation(m, call=2)
        with pytest.raises(Stop):
            train.train_autofocus(data, out, epochs=2, batch=16, workers=1, init=init)
    resumed = train.train_autofocus(data, out, epochs=2, batch=16, workers=1, init=init, resume=True)
    assert resumed["resumed_after_epoch"] == 0
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]


def test_the_state_of_other_arguments_is_refused_by_name(
    tiny_data: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "m.pt"
    with monkeypatch.context() as m:
        _stop_at_validation(m, call=2)
        with pytest.raises(Stop):
            train.train_autofocus(tmp_path, out, epochs=3, batch=16, workers=1)
    with pytest.raises(ValueError, match=r"m\.pt\.partial: saved by a run of other arguments \(epochs 3 != 4\)"):
        train.train_autofocus(tmp_path, out, epochs=4, batch=16, workers=1, resume=True)
    # without --resume a new run starts over and replaces the old state
    train.train_autofocus(tmp_path, out, epochs=1, batch=16, workers=1)
    assert out.exists() and not train.epoch_state_path(out).exists()


@pytest.mark.parametrize("kind", ["autofocus", "classifier"])
def test_resume_reaches_training_from_the_command_line(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    got: dict[str, Any] = {}

    def record(*a: Any, **kw: Any) -> dict[str, Any]:
        got.update(kw)
        return {"heldout_metrics": {}}

    monkeypatch.setattr(train, f"train_{kind}", record)
    assert cli.main([f"train-{kind}", "--resume", "--out", "x.pt"]) == 0
    assert got["resume"] is True
    assert cli.main([f"train-{kind}", "--out", "x.pt"]) == 0
    assert got["resume"] is False


def test_the_classifier_resumes_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = {
        k: dataclasses.replace(s, configs=1, slides=1, tiles_per_slide=12) for k, s in datasets.CLASSIFIER_DATA.items()
    }
    monkeypatch.setattr(datasets, "CLASSIFIER_DATA", tiny)
    monkeypatch.setattr(train, "CLASSIFIER_DATA", tiny)
    data = tmp_path / "data"
    whole = train.train_classifier(data, tmp_path / "whole.pt", epochs=3, batch=8, workers=1, threads=1)
    out = tmp_path / "cut.pt"
    real = train.predict_classifier
    seen = [0]

    def predict(*a: Any, **kw: Any) -> Any:
        seen[0] += 1
        if seen[0] == 2:
            raise Stop
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(train, "predict_classifier", predict)
        with pytest.raises(Stop):
            train.train_classifier(data, out, epochs=3, batch=8, workers=1, threads=1)
    resumed = train.train_classifier(data, out, epochs=3, batch=8, workers=1, threads=1, resume=True)
    assert resumed["resumed_after_epoch"] == 0
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    a, b = _weights(tmp_path / "whole.pt"), _weights(out)
    assert all(np.array_equal(a[k], b[k]) for k in a) and not train.epoch_state_path(out).exists()

