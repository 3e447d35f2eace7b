import cv2
import numpy as np
import pytest

from runtime.devices.protocols import StagePosition
from runtime.focus.surface import FocusSurface
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


def test_sweep_found_focus_only_for_an_interior_peak() -> None:
    from runtime.focus.field import sweep_found_focus
    from runtime.focus.sweep import FocusResult

    assert sweep_found_focus(FocusResult(0.5, 5, (1.0, 2.0, 3.0, 2.0, 1.0)))
    assert not sweep_found_focus(FocusResult(2.0, 5, (1.0, 2.0, 3.0, 4.0, 5.0)))  # focus beyond the end
    assert not sweep_found_focus(FocusResult(0.0, 5, (5.0, 4.0, 3.0, 2.0, 1.0)))
    assert not sweep_found_focus(FocusResult(0.0, 5, (1.0, 1.0, 1.01, 1.0, 1.0)))  # flat: glass or noise
    assert not sweep_found_focus(FocusResult(0.0, 2, (1.0, 2.0)))


class _UnreadableModels:
    """A model that sees content but cannot read it: each estimate says 'move 3 µm down'."""

    def __init__(self) -> None:
        self.notes: dict[str, object] = {}

    def estimate(self, capture: object) -> object:
        from runtime.ml.tasks import DefocusEstimate

        return DefocusEstimate(defocus_um=3.0, content_crops=4, crops=4)

    def classify(self, capture: object) -> object:
        return None


def test_a_sweep_fallback_teaches_the_focus_surface() -> None:
    """Content the model cannot read, without the near-focus checks: the field falls back to the
    sweep, whose measured focus then predicts the next field (before, fallback fields never taught
    the surface). With them (the default), the frames' sharpness finishes it: the model's move and
    the move to the other side were both less sharp than the first frame, so the focus lies near it
    (runtime.focus.single_shot.sharpest_between), and the fit's focus teaches the surface."""
    from runtime.config import FocusConfig
    from runtime.devices.scan_plan import FieldPlan
    from runtime.focus.field import FieldFocuser

    for checks in ("off", "adaptive"):
        stage = _BlurStage()
        focuser = FieldFocuser(
            FocusConfig(strategy="single_shot", sweep_half_range_um=3.0, sweep_steps=13, near_focus=checks),
            _UnreadableModels(),  # type: ignore[arg-type]
            _BlurCamera(stage),
            stage,
        )
        done = focuser.focus_field(FieldPlan(0, 0, 0, 100.0, 100.0), lambda: False)
        assert abs(done.z_um - 0.7) < 0.3, (checks, done.z_um)
        if checks == "off":
            assert done.method == "single_shot:sweep_fallback", done.method
        else:
            assert done.method == "single_shot" and done.sign_resolution == "fit", done.method
            assert done.captures <= 7, done.captures  # the sweep alone is 14
        assert focuser.surface.points and abs(focuser.surface.predict(120.0, 100.0) - done.z_um) < 0.2


class _GlassCamera(_BlurCamera):
    """A faint speck on glass under camera noise: the frame's sharpness hardly changes with z."""

    def __init__(self, stage: _BlurStage) -> None:
        super().__init__(stage)
        self.img = np.full((128, 128, 3), 220, np.uint8)
        cv2.circle(self.img, (64, 64), 2, (210, 210, 210), -1)
        self.noise = np.random.default_rng(0).normal(0.0, 6.0, (128, 128, 3))

    def snap(self) -> np.ndarray:
        sigma = 0.3 + 1.2 * abs(self.stage.z - 0.7)
        blurred = cv2.GaussianBlur(self.img.astype(np.float64), (0, 0), sigma)
        return np.clip(blurred + self.noise, 0, 255).astype(np.uint8)


class _FarReadingModels(_UnreadableModels):
    """Reads the first frame (z = 0) as 3.5 µm off and every other frame as 7 µm off: the loop's move
    and its second shot on the other side both fail, leaving captures at 0 and +-3.5 µm."""

    def __init__(self, stage: _BlurStage) -> None:
        super().__init__()
        self.stage = stage

    def estimate(self, capture: object) -> object:
        from runtime.ml.tasks import DefocusEstimate

        return DefocusEstimate(defocus_um=3.5 if self.stage.z == 0.0 else 7.0, content_crops=4, crops=4)


def test_a_featureless_field_is_not_swept() -> None:
    """Captures over the sweep's range on both sides whose sharpness hardly changes: nothing to focus
    on, so the field keeps the frame held (the surface's z) at 3 captures instead of sweeping (3 + 14),
    and teaches the surface nothing. The same readings on content are focused."""
    from runtime.config import FocusConfig
    from runtime.devices.scan_plan import FieldPlan
    from runtime.focus.field import FieldFocuser, featureless

    cfg = FocusConfig(strategy="single_shot", sweep_half_range_um=3.0, sweep_steps=13)
    for camera in (_GlassCamera, _BlurCamera):
        stage = _BlurStage()
        focuser = FieldFocuser(cfg, _FarReadingModels(stage), camera(stage), stage)  # type: ignore[arg-type]
        done = focuser.focus_field(FieldPlan(0, 0, 0, 100.0, 100.0), lambda: False)
        if camera is _GlassCamera:
            assert done.method == "single_shot:featureless", (done.method, done.captures)
            assert done.z_um == 0.0 and done.captures == 3 and done.sign_resolution is None
            assert not focuser.surface.points
        else:  # the frame held is sharper than both sides: the near-focus fit finishes the field
            assert done.method == "single_shot" and done.sign_resolution == "fit", done.method
            assert abs(done.z_um - 0.7) < 0.3 and focuser.surface.points
    # Only a reach over the sweep's range on both sides counts, and only a change under the sweep's rise.
    flat = ((0.0, 1.66), (3.5, 1.67), (-3.5, 1.65))
    assert featureless(flat, 0.0, 3.0)
    assert not featureless(flat, 0.0, 4.0)
    assert not featureless(((0.0, 1.66), (3.5, 1.67), (-3.5, 1.72)), 0.0, 3.0)
    assert not featureless(flat[:2], 0.0, 3.0)


def test_normalized_variance_is_the_gray_images_variance_over_its_mean() -> None:
    """The one-pass OpenCV form equals the textbook definition on the 8-bit luminance."""
    image = (np.random.default_rng(3).random((300, 200, 3)) * 255).astype(np.uint8)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float64)
    assert sharpness(image, "normalized_variance") == pytest.approx(gray.var() / gray.mean(), rel=1e-9)
    flat = np.full((64, 64, 3), 200, np.uint8)
    assert sharpness(flat, "normalized_variance") == 0.0


@pytest.mark.parametrize("jitter_um", [0.0, 1.0])
def test_the_first_field_of_the_next_row_is_predicted_at_the_rows_level(jitter_um: float) -> None:
    """One scan row of points (a serpentine's first, y the same or jittering by a micrometre): the
    field below the row's last one is predicted at the row's extrapolated level, and the surface
    says that prediction assumes a flat slide across rows. (The fit used to be solved about the
    field predicted, where a min-norm solution traded the intercept for a cross-row slope: the
    bench recordings' second rows started 0.4-0.6 µm off.)"""
    s = FocusSurface(default_z_um=0.0)
    assert s.assumes_flat(0.0, 0.0)
    jitter = np.random.default_rng(3).uniform(-jitter_um, jitter_um, 4)
    for i, x in enumerate((1064.0, 1179.0, 1294.0)):
        s.add(x, 814.0 + jitter[i], 0.3 + 0.002 * (x - 1064.0))
    row_end = 0.3 + 0.002 * (1410.0 - 1064.0)
    assert s.predict(1410.0, 814.0) == pytest.approx(row_end, abs=0.02)
    assert not s.assumes_flat(1410.0, 814.0)
    assert s.predict(1410.0, 929.0) == pytest.approx(row_end, abs=0.02)
    assert s.assumes_flat(1410.0, 929.0)
    s.add(1410.0, 929.0 + jitter[3], row_end + 0.1)  # the second row is 0.1 µm higher
    assert not s.assumes_flat(1294.0, 929.0)
    assert s.predict(1294.0, 929.0) == pytest.approx(0.3 + 0.002 * 230.0 + 0.1, abs=0.05)
