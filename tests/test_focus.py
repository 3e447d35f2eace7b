import cv2
import numpy as np
import pytest

from runtime.devices.protocols import StagePosition
from runtime.focus.sweep import ContrastSweep, parabolic_peak, sharpness


def _texture(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
    return cv2.GaussianBlur(img, (0, 0), 1.0)


@pytest.mark.parametrize("metric", ["normalized_variance", "brenner", "tenengrad"])
def test_sharpness_drops_with_blur(metric: str) -> None:
    img = _texture()
    blurred = cv2.GaussianBlur(img, (0, 0), 3.0)
    assert sharpness(img, metric) > sharpness(blurred, metric)  # type: ignore[arg-type]


def test_parabolic_peak_finds_vertex() -> None:
    z = np.linspace(-2, 2, 9)
    s = -((z - 0.3) ** 2) + 10
    assert parabolic_peak(z, s) == pytest.approx(0.3, abs=1e-9)
    # Peak at the end of the sweep: no extrapolation.
    assert parabolic_peak(z, z) == pytest.approx(2.0)


class _BlurStage:
    def __init__(self) -> None:
        self.z = 0.0

    def move_xy(self, x_um: float, y_um: float) -> None:
        pass

    def move_z(self, z_um: float) -> None:
        self.z = z_um

    def position(self) -> StagePosition:
        return StagePosition(0, 0, self.z)


class _BlurCamera:
    """A tiny optical model: Gaussian blur growing with distance from focus at z=0.7."""

    def __init__(self, stage: _BlurStage) -> None:
        self.stage = stage
        self.img = _texture(1)

    @property
    def frame_shape(self) -> tuple[int, int]:
        return (128, 128)

    @property
    def pixel_size_um(self) -> float:
        return 0.25

    def snap(self) -> np.ndarray:
        sigma = 0.3 + 1.2 * abs(self.stage.z - 0.7)
        return cv2.GaussianBlur(self.img, (0, 0), sigma)


def test_contrast_sweep_converges_near_focus() -> None:
    stage = _BlurStage()
    result = ContrastSweep(half_range_um=3.0, steps=13).focus(_BlurCamera(stage), stage, 0.0)
    assert result.captures == 13
    assert abs(result.z_um - 0.7) < 0.3
