"""Content the models never trained on: real images and textures under the simulator's optics."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest

from hw_sim.content import PACKAGED, ContentError, ImageSlide, _mirror, load_content
from hw_sim.slide import SlideSpec, SyntheticSlide

SPEC = SlideSpec(seed=1, origin_x_um=0.0, origin_y_um=0.0, width_um=600.0, height_um=600.0)


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_packaged_content_loads_without_a_download(name: str) -> None:
    image = load_content(name)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] >= 256 and image.shape[1] >= 256
    assert image.std() > 10  # a real picture, not a blank


def test_image_slide_shows_the_image_in_tissue_and_glass_elsewhere() -> None:
    image = load_content("ihc")
    slide, plain = ImageSlide(SPEC, image, 0.5), SyntheticSlide(SPEC)
    t = slide.transmittance(100.0, 100.0, 256, 256, 0.25)
    p = plain.transmittance(100.0, 100.0, 256, 256, 0.25)
    assert t.shape == (256, 256, 3) and t.dtype == np.float32
    assert t.min() > 0.0 and t.max() <= 1.0
    # Same layout and focus surface as the procedural slide, other pixels inside tissue.
    assert slide.focus_z_um(300.0, 300.0) == plain.focus_z_um(300.0, 300.0)
    assert slide.tissue_fraction(100.0, 100.0, 256, 256, 0.25) == plain.tissue_fraction(100.0, 100.0, 256, 256, 0.25)
    glass = np.isclose(p, 10.0**-SPEC.glass_od, atol=1e-4).all(axis=2)
    assert np.allclose(t[glass], p[glass], atol=1e-4)
    assert np.abs(t[~glass] - p[~glass]).mean() > 0.05
    # The image's brown (DAB) and blue (haematoxylin) show through: red/blue differ by place.
    ratio = t[~glass][:, 0] / t[~glass][:, 2]
    assert ratio.min() < 0.9 < 1.1 < ratio.max()


def test_mirror_tiling_is_continuous() -> None:
    coords = np.array([-1.0, 0.0, 5.0, 9.0, 10.0, 17.0, 18.0, 19.0])
    assert list(_mirror(coords, 10)) == [1.0, 0.0, 5.0, 9.0, 8.0, 1.0, 0.0, 1.0]


def test_any_image_file_and_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "tex.png"
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[..., 0] = 200  # red, so a BGR/RGB swap would show
    cv2.imwrite(str(path), rgb[..., ::-1])
    loaded = load_content(f"file:{path}")
    assert loaded.shape == (32, 48, 3) and loaded[..., 0].min() == 200 and loaded[..., 2].max() == 0
    with pytest.raises(ContentError, match="unknown content 'nope'"):
        load_content("nope")
    with pytest.raises(ContentError, match="cannot read an image"):
        load_content(f"file:{tmp_path / 'missing.png'}")
    with pytest.raises(ContentError, match="image_px_um must be positive"):
        ImageSlide(SPEC, rgb, 0.0)


def test_a_sampling_suffix_sets_the_image_pixel_size(tmp_path: Path) -> None:
    from hw_sim.content import make_slide, split_sampling

    path = tmp_path / "tex@home.png"  # an '@' that is not a sampling stays part of the path
    rgb = np.full((32, 48, 3), 120, np.uint8)
    cv2.imwrite(str(path), rgb)
    assert split_sampling(f"file:{path}") == (f"file:{path}", None)
    assert split_sampling(f"file:{path}@0.25") == (f"file:{path}", 0.25)
    assert load_content(f"file:{path}@0.25").shape == (32, 48, 3)
    with pytest.raises(ContentError, match="positive number of µm per pixel"):
        split_sampling("ihc@0")

    def image_px_um(content: str, content_px_um: float = 0.0) -> float:
        slide = make_slide(dataclasses.replace(SPEC, content=content, content_px_um=content_px_um))
        assert isinstance(slide, ImageSlide)
        return slide.image_px_um

    names = ("ihc", "ihc@0.25", f"file:{path}", f"file:{path}@1.5")
    assert [image_px_um(n) for n in names] == [0.5, 0.25, 0.5, 1.5]
    assert image_px_um("ihc@0.25", content_px_um=0.4) == 0.4  # an explicit content_px_um still wins


def test_synth_records_the_content_and_truth_rebuilds_it(tmp_path: Path) -> None:
    from hw_sim.synth import SynthParams, synthesize
    from hw_sim.truth import TruthRenderer
    from runtime.devices.recording import Recording

    params = SynthParams(fields_x=1, fields_y=1, tile=96, z_planes=3, content="ihc", content_px_um=0.4)
    rec = Recording.open(synthesize(tmp_path / "ihc.zarr", params))
    assert rec.meta.slide is not None
    assert rec.meta.slide["content"] == "ihc" and rec.meta.slide["content_px_um"] == 0.4
    renderer = TruthRenderer(rec.meta)
    assert isinstance(renderer.slide, ImageSlide) and renderer.slide.image_px_um == 0.4


def test_content_region_shows_only_its_half() -> None:
    from hw_sim.content import region_pixels

    assert region_pixels("", 512, 512) == (0, 0, 512, 512)
    assert region_pixels("left", 48, 65) == (0, 0, 32, 48) and region_pixels("right", 48, 65) == (32, 0, 65, 48)
    assert region_pixels("top", 48, 65) == (0, 0, 65, 24) and region_pixels("bottom", 48, 65) == (0, 24, 65, 48)
    with pytest.raises(ContentError, match="unknown content region"):
        region_pixels("middle", 48, 64)
    image = load_content("ihc")
    whole = ImageSlide(SPEC, image, 0.5)
    right = ImageSlide(
        SlideSpec(**{**SPEC.to_dict(), "content": "ihc", "content_region": "right"}), image, 0.5, region="right"
    )
    assert right.pixel_box == (256, 0, 512, 512)
    # Right half at the slide origin: the whole image's column 256 there; mirrored at its last column (128 µm on).
    a = right.image_content(0.0, 0.0, 4, 300, 0.5)
    b = whole.image_content(128.0, 0.0, 4, 256, 0.5)
    assert np.allclose(a[:, :256], b, atol=1e-6)
    assert np.allclose(a[:, 256:300], b[:, 253:209:-1], atol=1e-6)  # crop x 256.5 + k -> 253.5 - k
    with pytest.raises(ValueError, match="content_region"):
        SlideSpec(seed=1, content_region="right")  # the procedural tissue has no image to cut
    with pytest.raises(ValueError, match="content_region"):
        SlideSpec(seed=1, content="ihc", content_region="middle")
