"""``python -m export``: every training option reaches the training function, and the command a
model folder records (``model.json`` training.command) asks for the same training again.

Training itself is replaced by a recorder here (it takes minutes to hours); what is under test is
the plumbing between the command line, the training call and the recorded command -- a flag once
parsed but never passed on trained the wrong model for a whole session."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from export import __main__ as cli
from export import train
from export.datasets import EXTRA_TRAIN_SPLITS
from export.onnx_export import _extra_args


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    seen: list[tuple[str, dict[str, Any]]] = []

    def recorder(name: str) -> Any:
        def fn(data_dir: Path, out: Path, seed: int = 0, **kw: Any) -> dict[str, Any]:
            seen.append((name, {"data_dir": data_dir, "out": out, "seed": seed, **kw}))
            return {"heldout_metrics": {}}

        return fn

    monkeypatch.setattr(train, "train_autofocus", recorder("autofocus"))
    monkeypatch.setattr(train, "train_classifier", recorder("classifier"))
    return seen


AUTOFOCUS_FLAGS = ("far", "edge", "small", "optics", "content", "tissue")


@pytest.mark.parametrize("flag", AUTOFOCUS_FLAGS)
def test_each_autofocus_flag_reaches_training(calls: list[tuple[str, dict[str, Any]]], flag: str) -> None:
    assert cli.main(["train-autofocus", "--wide", "512", f"--{flag}", "--seed", "3", "--out", "x.pt"]) == 0
    ((name, kw),) = calls
    assert name == "autofocus" and kw["seed"] == 3 and kw["wide"] == 512 and kw["out"] == Path("x.pt")
    assert kw[flag] is True
    assert not any(kw[f] for f in AUTOFOCUS_FLAGS if f != flag)


def test_hard_flag_reaches_classifier_training(calls: list[tuple[str, dict[str, Any]]]) -> None:
    assert cli.main(["train-classifier", "--hard", "--epochs", "2"]) == 0
    ((name, kw),) = calls
    assert name == "classifier" and kw["hard"] is True and kw["epochs"] == 2
    assert kw["content"] is False and kw["device"] == "cpu"


def test_content_flag_and_device_reach_classifier_training(calls: list[tuple[str, dict[str, Any]]]) -> None:
    assert cli.main(["train-classifier", "--content", "--device", "cuda"]) == 0
    ((name, kw),) = calls
    assert name == "classifier" and kw["content"] is True and kw["device"] == "cuda" and kw["hard"] is False


def test_every_extra_split_has_a_flag_on_its_training_command() -> None:
    autofocus = set(AUTOFOCUS_FLAGS)
    assert set(EXTRA_TRAIN_SPLITS.values()) == autofocus | {"hard"}


@pytest.mark.parametrize(
    "splits",
    [["train", "train_far"], ["train", "train_far", "train_edge", "train_small", "train_optics"], ["train"]],
)
def test_recorded_command_retrains_with_the_same_sets(
    calls: list[tuple[str, dict[str, Any]]], splits: list[str]
) -> None:
    result = {"train_splits": splits, "wide": 512, "lr": 0.003}
    extra = _extra_args(result, Path("out/models/af.pt"))
    assert cli.main(["train-autofocus", "--seed", "0", *shlex.split(extra)]) == 0
    ((_, kw),) = calls
    wanted = {EXTRA_TRAIN_SPLITS[s] for s in splits if s != "train"}
    assert {f for f in AUTOFOCUS_FLAGS if kw[f]} == wanted
    assert kw["wide"] == 512 and kw["out"] == Path("out/models/af.pt")


def test_a_folder_fine_tune_records_its_command(calls: list[tuple[str, dict[str, Any]]]) -> None:
    folder = str(Path(__file__).resolve().parents[1] / "runtime" / "ml" / "builtin" / "autofocus_v3")
    argv = ["train-autofocus", "--wide", "512", "--content", "--tissue", "--init", folder, "--epochs", "4"]
    assert cli.main(argv) == 0
    ((_, kw),) = calls
    assert kw["tissue"] and kw["content"] and kw["init"] == Path(folder)
    assert "--tissue" in kw["command"] and folder in kw["command"]
