"""Real tissue as classifier and autofocus training content (export.content_mix.TRAINING_TISSUE) and dense
staining."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("skimage")

from export import __main__ as cli
from export import content_mix, train
from export.content_mix import TrainingTissue, augmented_tissue, describe, training_tissue_files
from export.datasets import (
    AUTOFOCUS_V2_DATA,
    CLASSIFIER_DATA,
    AutofocusJob,
    ClassifierDataSpec,
    ClassifierJob,
    random_slide,
    render_autofocus_config,
    render_classifier_config,
)
from hw_sim.content import ImageSlide


def _tissue_image(seed: int = 0) -> np.ndarray:
    """A small H&E-like image: purple blobs on pink, some glass."""
    rng = np.random.default_rng(seed)
    img = np.full((120, 200, 3), (225, 170, 210), np.uint8)
    for _ in range(60):
        x, y = (int(v) for v in rng.integers(0, (200, 120)))
        cv2.circle(img, (x, y), int(rng.integers(3, 7)), (90, 60, 150), -1)
    img[:10, :20] = 250
    return img


@pytest.fixture
def tissue_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with one image registered as known training tissue (its sha256 in TRAINING_TISSUE)."""
    path = tmp_path / "tissue" / "t.png"
    path.parent.mkdir()
    cv2.imwrite(str(path), _tissue_image()[..., ::-1])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    known = {digest: TrainingTissue("t.png", "test", "CC0 (test)", 0.5)}
    monkeypatch.setattr(content_mix, "TRAINING_TISSUE", known)
    monkeypatch.setenv(content_mix.TRAINING_TISSUE_DIR_ENV, str(path.parent))
    return path.parent


def test_training_tissue_refuses_unknown_images_and_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no training tissue"):
        training_tissue_files(tmp_path)
    cv2.imwrite(str(tmp_path / "x.png"), _tissue_image())
    with pytest.raises(ValueError, match="not a known training tissue image"):
        training_tissue_files(tmp_path)


def test_known_training_tissue_is_found_and_named_in_the_description(tissue_dir: Path) -> None:
    assert training_tissue_files() == [tissue_dir / "t.png"]
    d = describe(tissue=True)
    assert d["real_tissue_images"] == {
        "t.png": {
            "sha256": next(iter(content_mix.TRAINING_TISSUE)),
            "source": "test",
            "licence": "CC0 (test)",
            "px_um": 0.5,
        }
    }
    assert "no_tissue_images" not in d and "no_tissue_images" in describe()


def test_the_shipped_table_names_a_licence_for_every_image() -> None:
    for digest, t in content_mix.TRAINING_TISSUE.items():
        assert len(digest) == 64 and t.licence and t.source and t.px_um > 0


def test_augmented_tissue_follows_the_seed_and_changes_the_stain() -> None:
    img = _tissue_image()
    a = augmented_tissue(np.random.default_rng(4), img)
    b = augmented_tissue(np.random.default_rng(4), img)
    assert a.dtype == np.uint8 and sorted(a.shape[:2]) == sorted(img.shape[:2]) and a.shape[2] == 3
    assert np.array_equal(a, b)
    means = [augmented_tissue(np.random.default_rng(s), img).mean() for s in range(12)]
    assert max(means) - min(means) > 10.0  # densities differ between draws
    assert a.max() >= 240  # glass stays near white


def test_real_tissue_tiles_carry_the_image_and_clean_tiles_no_artifact(tissue_dir: Path) -> None:
    files = tuple(str(f) for f in training_tissue_files())
    spec = CLASSIFIER_DATA["train_tissue_clean"]
    assert spec.real_tissue and spec.artifacts == (0, 1)
    clean = ClassifierJob("train", 0, 950, 2, 6, tile=128, content_mix=True, real_tissue=files, artifacts=(0, 1))
    d = render_classifier_config(clean)
    assert len(d["x"]) == 12 and 1 in set(d["label"].tolist()) and 2 not in set(d["label"].tolist())
    job = ClassifierJob("train", 0, 900, 2, 6, tile=128, content_mix=True, real_tissue=files, artifacts=(6, 7))
    assert 2 in set(render_classifier_config(job)["label"].tolist())


def test_default_strength_draws_what_random_slide_draws() -> None:
    default = inspect.signature(random_slide).parameters["strength"].default
    assert ClassifierJob("train", 0, 0, 1, 1).strength == default == ClassifierDataSpec(1, 1, 1).strength
    dense = CLASSIFIER_DATA["train_dense"]
    assert dense.strength[0] > default[1] * 0.8 and not dense.content_mix


def test_threads_reach_classifier_training(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    def fn(data_dir: Path, out: Path, seed: int = 0, **kw: Any) -> dict[str, Any]:
        seen.append(kw)
        return {"heldout_metrics": {}}

    monkeypatch.setattr(train, "train_classifier", fn)
    assert cli.main(["train-classifier", "--threads", "1"]) == 0
    assert cli.main(["train-classifier"]) == 0
    assert [kw["threads"] for kw in seen] == [1, 2]


def test_image_slide_is_what_a_real_tissue_slide_is(tissue_dir: Path) -> None:
    rng = np.random.default_rng(0)
    slide = content_mix.random_tissue_slide(rng, random_slide(rng, 5, artifacts=2), (str(tissue_dir / "t.png"),))
    assert isinstance(slide, ImageSlide) and 0.35 <= slide.image_px_um <= 0.75 and len(slide.artifacts) == 2


def test_autofocus_fields_of_real_tissue_show_the_image(tissue_dir: Path) -> None:
    files = tuple(str(f) for f in training_tissue_files())
    spec = AUTOFOCUS_V2_DATA["train_tissue"]
    assert spec.real_tissue and spec.content_mix and spec.config_offset not in (0, 600)
    job = AutofocusJob("train", 0, 900, 2, 2, tile=256, content_mix=True, real_tissue=files)
    real = render_autofocus_config(job)
    again = render_autofocus_config(job)
    mixed = render_autofocus_config(AutofocusJob("train", 0, 900, 2, 2, tile=256, content_mix=True))
    assert np.array_equal(real["x"], again["x"]) and real["x"].shape == mixed["x"].shape
    assert not np.array_equal(real["x"], mixed["x"])  # the fields show the image, not the content mix
    assert real["content"].mean() > 0.5  # the image is tissue nearly everywhere (the layout's holes aside)
    assert set(real["sign_known"].tolist()) <= {0.0, 1.0}


def test_autofocus_tissue_needs_the_wide_model_and_the_content_mix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give content"):
        train.train_autofocus(tmp_path, tmp_path / "m.pt", wide=512, tissue=True)
    with pytest.raises(ValueError, match="v2 model only"):
        train.train_autofocus(tmp_path, tmp_path / "m.pt", content=True, tissue=True)
    assert not any(tmp_path.iterdir())  # refused before any data was rendered


def test_an_autofocus_model_folder_is_fine_tuned_only_with_its_own_inputs_and_heads() -> None:
    builtin = Path(__file__).resolve().parents[1] / "runtime" / "ml" / "builtin"
    model, meta = train._recover_init_folder(builtin / "autofocus_v3", True, (10, 64, 64))
    assert model.magnitude and len(meta["onnx_sha256"]) == 64 and meta["commands"]
    with pytest.raises(ValueError, match="magnitude head present"):
        train._recover_init_folder(builtin / "autofocus_v3", False, (10, 64, 64))
    with pytest.raises(ValueError, match="--wide"):
        train._recover_init_folder(builtin / "autofocus", True, (10, 64, 64))


def test_stacked_rows_gather_what_the_stacked_array_holds() -> None:
    import torch

    parts = [np.arange(n * 6, dtype=np.float16).reshape(n, 2, 3) + 100 * k for k, n in enumerate((4, 1, 7))]
    rows = train.StackedRows([torch.from_numpy(p) for p in parts])
    whole = np.concatenate(parts)
    assert len(rows) == len(whole) == 12
    idx = torch.tensor([11, 0, 4, 5, 3, 4, 10])
    assert np.array_equal(rows[idx].numpy(), whole[idx.numpy()])
    assert np.array_equal(rows[torch.randperm(12)[:0]].numpy(), whole[:0])
