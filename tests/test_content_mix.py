"""Wider training content (export.content_mix) and the autofocus magnitude head, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("skimage")

from export.content_mix import (
    SIGN_KNOWN,
    TRAIN_IMAGES,
    random_content_slide,
    random_objective,
    random_texture,
)
from export.datasets import AutofocusJob, ClassifierJob, render_autofocus_config, render_classifier_config
from hw_sim.content import PACKAGED, ImageSlide
from hw_sim.slide import SlideSpec


def test_benchmark_content_is_never_training_content() -> None:
    assert not set(PACKAGED.values()) & set(TRAIN_IMAGES)


def test_objective_families_have_the_signs_they_claim() -> None:
    rng = np.random.default_rng(0)
    seen: dict[str, list[tuple[float, float, float]]] = {}
    for _ in range(400):
        o = random_objective(rng, 10.0)
        sa, (red, _, blue) = o.params.spherical_waves, o.params.chromatic_shift_um
        seen.setdefault(o.family, []).append((sa, red, blue))
        assert o.sign_known == SIGN_KNOWN[o.family]
    assert set(seen) == {"training", "strong", "flipped", "apochromat"}
    for sa, red, blue in seen["training"]:
        assert 0.04 <= sa <= 0.12 and red > 0 > blue
    for sa, red, blue in seen["strong"]:
        assert 0.12 <= sa <= 0.3 and red > 0 > blue
    for sa, red, blue in seen["flipped"]:
        assert -0.12 <= sa <= -0.04 and red < 0 < blue
    for sa, red, blue in seen["apochromat"]:
        assert abs(sa) <= 0.02 and abs(red) <= 0.06 and abs(blue) <= 0.06


def test_textures_vary_and_follow_the_seed() -> None:
    a = random_texture(np.random.default_rng(1), 128)
    b = random_texture(np.random.default_rng(1), 128)
    c = random_texture(np.random.default_rng(2), 128)
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.std() > 3.0  # there is something to focus on


def test_content_slides_cover_every_kind_and_keep_the_layout() -> None:
    rng = np.random.default_rng(3)
    kinds = set()
    for i in range(30):
        slide, kind = random_content_slide(rng, SlideSpec(seed=100 + i, width_um=4000.0, height_um=3000.0))
        kinds.add(kind)
        assert (kind == "synthetic") != isinstance(slide, ImageSlide)
    assert kinds == {"synthetic", "texture", "photo"}


def test_image_slides_keep_their_artifacts() -> None:
    """Ink on an image slide darkens it as on the procedural slide (the classifier's labels
    come from the procedural layout, so the pixels must show them)."""
    image = np.full((64, 64, 3), 200, np.uint8)
    spec = SlideSpec(seed=5, width_um=2000.0, height_um=2000.0, artifacts=8)
    with_art = ImageSlide(spec, image, 0.5)
    ink = next(a for a in with_art.artifacts if a.kind == "ink")
    x0, y0 = ink.cx - 20, ink.cy - 20
    plain = ImageSlide(SlideSpec(seed=5, width_um=2000.0, height_um=2000.0), image, 0.5)
    t_art = with_art.transmittance(x0, y0, 160, 160, 0.25)
    t_plain = plain.transmittance(x0, y0, 160, 160, 0.25)
    assert with_art.artifact_fraction(x0, y0, 160, 160, 0.25) > 0.02
    assert float((t_plain - t_art).max()) > 0.1


def test_mixed_autofocus_data_mark_which_samples_the_signed_head_may_learn() -> None:
    families = set()
    for config in range(600, 606):
        d = render_autofocus_config(
            AutofocusJob("train", 0, config, 1, 2, 10.0, tile=256, crops_per_tile=2, content_mix=True)
        )
        family = d["optics"]["objective"].removeprefix("mix:")
        families.add(family)
        assert set(np.unique(d["sign_known"])) == {1.0 if SIGN_KNOWN[family] else 0.0}
        assert 0.225 <= d["optics"]["pixel_size_um"] <= 0.275
        assert len(d["x"]) == len(d["defocus_um"]) == len(d["sign_known"])
    assert len(families) >= 2
    plain = render_autofocus_config(AutofocusJob("train", 0, 0, 1, 2, 10.0, tile=256, crops_per_tile=2))
    assert np.all(plain["sign_known"] == 1.0) and plain["optics"]["pixel_size_um"] == 0.25


def test_mixed_classifier_data_have_artifacts_on_any_content() -> None:
    d = render_classifier_config(ClassifierJob("train", 0, 200, 2, 12, tile=128, content_mix=True))
    assert len(d["x"]) == 24 and set(d["label"].tolist()) <= {0, 1, 2}


@pytest.mark.parametrize(("signed", "magnitude", "expected"), [(0.5, 3.0, 3.0), (-0.5, 3.0, -3.0), (0.1, 0.3, 0.1)])
def test_magnitude_head_sets_the_size_and_the_signed_head_the_sign(
    tmp_path: Path, signed: float, magnitude: float, expected: float
) -> None:
    """A model whose last layer outputs constants, exported and run by the runtime: the estimate
    is the magnitude head's size with the signed head's sign away from focus (the signed head alone
    within 1 µm, where a magnitude is biased), and the signed head alone decides
    whether the sign is uncertain."""
    import torch

    from export.onnx_export import _spec, export_model
    from runtime.ml.tasks import load_models

    spec = _spec("AutofocusNet", {"kind": "autofocus_v1", "crop": 64, "context": 256, "crops_per_window": 4}, True)
    model = spec["model"]
    last = model.head[3]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([signed, 5.0, magnitude]))
    samples = np.random.default_rng(0).random((4, *spec["input_shape"]), dtype=np.float32)
    meta = export_model(model, spec, tmp_path / "af", samples, {}, {"seed": 0})
    assert [o["name"] for o in meta["outputs"]] == ["defocus_um", "content_logit", "abs_defocus_um"]
    af, _, _ = load_models(tmp_path / "af", None, "ort_cpu")
    tile = (np.random.default_rng(1).random((256, 256, 3)) * 255).astype(np.uint8)
    est = af.estimate(tile)
    assert est.defocus_um == pytest.approx(expected, abs=1e-4)
    assert est.signed_um == pytest.approx(signed, abs=1e-4)
    assert not est.sign_uncertain  # every crop agrees, |signed| > its spread (0)
