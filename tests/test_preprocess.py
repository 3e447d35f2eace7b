"""Model input preprocessing (runtime/ml/preprocess.py): the v1 and v2 autofocus inputs."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from runtime.ml.preprocess import AutofocusPreprocess, PreprocessError


def _tile(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth random texture (blurred noise), so every crop has contrast.
    noise = rng.normal(0, 1, (n, n, 3)).astype(np.float32)
    img = cv2.GaussianBlur(noise, (0, 0), 3.0)
    img = 150 + 60 * img / img.std()
    return np.clip(img, 0, 255).astype(np.uint8)


def _wide_expected(window: np.ndarray) -> np.ndarray:
    """The documented wide channels: the window area-downsampled to 64 px, per-channel contrast x 4."""
    small = cv2.resize(window.astype(np.float32) / 255.0, (64, 64), interpolation=cv2.INTER_AREA)
    mean = small.reshape(-1, 3).mean(axis=0)
    return np.asarray(((small / mean - 1.0) * 4.0).transpose(2, 0, 1))


def test_v2_adds_the_wide_window_and_keeps_the_v1_channels() -> None:
    v1, v2 = AutofocusPreprocess(), AutofocusPreprocess(wide=512)
    tile = _tile(512)
    a, pos_a = v1.inputs_at(tile)
    b, pos_b = v2.inputs_at(tile)
    assert v1.input_shape == (7, 64, 64) and v2.input_shape == (10, 64, 64)
    assert a.shape == (16, 7, 64, 64) and b.shape == (16, 10, 64, 64)
    assert pos_a == pos_b
    np.testing.assert_array_equal(a, b[:, :7])
    # A 512-px tile and a 512-px wide window: every crop sees the whole tile, downsampled 8x.
    expected = _wide_expected(tile)
    for i in range(len(b)):
        np.testing.assert_allclose(b[i, 7:], expected, atol=1e-4)


def test_v2_wide_window_follows_the_context_window_on_a_large_tile() -> None:
    v2 = AutofocusPreprocess(wide=512)
    tile = _tile(1024, seed=1)
    x, pos = v2.inputs_at(tile)
    by_window: dict[tuple[int, int], np.ndarray] = {}
    for i, (wy, wx, _, _) in enumerate(pos):
        by_window.setdefault((wy, wx), x[i, 7:])
        np.testing.assert_array_equal(x[i, 7:], by_window[(wy, wx)])  # one wide window per context window
    assert len(by_window) == 16
    # Centred on the context window where it fits, shifted inside the tile where it does not.
    for (wy, wx), top_left in (((0, 0), (0, 0)), ((256, 256), (128, 128)), ((768, 512), (512, 384))):
        y, x = top_left
        np.testing.assert_allclose(by_window[(wy, wx)], _wide_expected(tile[y : y + 512, x : x + 512]), atol=1e-4)


def test_v2_mirror_pads_a_tile_narrower_than_the_wide_window() -> None:
    v2 = AutofocusPreprocess(wide=512)
    x = v2.inputs(_tile(256, seed=2))
    assert x.shape == (4, 10, 64, 64)
    assert np.isfinite(x).all()


def test_preprocess_dict_round_trip_and_errors() -> None:
    for pre in (AutofocusPreprocess(), AutofocusPreprocess(wide=512)):
        assert AutofocusPreprocess.from_dict(pre.to_dict()) == pre
    assert AutofocusPreprocess().to_dict()["kind"] == "autofocus_v1"
    assert AutofocusPreprocess(wide=512).to_dict()["kind"] == "autofocus_v2"
    with pytest.raises(PreprocessError, match="autofocus_v3"):
        AutofocusPreprocess.from_dict({"kind": "autofocus_v3", "crop": 64, "context": 256, "crops_per_window": 4})
    with pytest.raises(ValueError, match="wide window 128"):
        AutofocusPreprocess(wide=128)
