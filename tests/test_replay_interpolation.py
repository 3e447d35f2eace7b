"""The replay driver between recorded planes: a frame's sharpness must lie between the two planes'.

A pixel blend of two differently defocused planes is less sharp than either (their fine detail is
out of phase and partly cancels), so the sharpness a focus loop samples between planes used to dip
(real tissue through a flipped objective: ln Brenner up to 0.65 below the less sharp plane), which
pulled every sharpness fit towards recorded planes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hw_sim.replay import SNAP_UM, ReplayDriver, blend_spectra, spectrum
from hw_sim.synth import SynthParams, objective_params, synthesize
from runtime.devices.recording import Recording
from runtime.focus.sweep import sharpness


@pytest.fixture(scope="module")
def tissue_stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real tissue (scikit-image's IHC image) through the flipped objective: where blends dipped most."""
    params = SynthParams(
        fields_x=1,
        fields_y=1,
        seed=11,
        tile=256,
        z_planes=9,
        z_step_um=0.5,
        stage_error_um=0.0,
        coarse_focus_error_um=0.0,
        content="ihc",
        **objective_params("flipped"),  # type: ignore[arg-type]
    )
    return synthesize(tmp_path_factory.mktemp("replay") / "flipped-ihc.zarr", params)


def _ln_brenner(drv: ReplayDriver, z: float) -> float:
    drv.stage.move_z(z)
    return float(np.log(sharpness(drv.camera.snap(), "brenner")))


def test_sharpness_between_planes_never_dips_below_either_plane(tissue_stack: Path) -> None:
    rec = Recording.open(tissue_stack)
    drv = ReplayDriver(rec)
    zs = rec.z_um[0]
    for k in range(len(zs) - 1):
        ends = _ln_brenner(drv, float(zs[k])), _ln_brenner(drv, float(zs[k + 1]))
        inside = [_ln_brenner(drv, float(zs[k] + w * (zs[k + 1] - zs[k]))) for w in (0.2, 0.35, 0.5, 0.65, 0.8)]
        assert min(inside) >= min(ends) - 0.01, (k, ends, inside)
        assert max(inside) <= max(ends) + 0.01, (k, ends, inside)


def test_planes_whose_detail_is_out_of_phase_blend_without_losing_it() -> None:
    """Two planes with the same detail a pixel apart (out of phase at the finest scale): their pixel
    blend is much less sharp than either; the replay's blend is as sharp as they are."""
    rng = np.random.default_rng(3)
    texture = rng.integers(40, 215, (128, 128, 3)).astype(np.uint8)
    a, b = texture, np.roll(texture, 1, axis=1)
    ln_a = np.log(sharpness(a, "brenner"))
    pixel = (0.5 * (a.astype(np.float32) + b) + 0.5).astype(np.uint8)
    assert np.log(sharpness(pixel, "brenner")) < ln_a - 0.3
    mid = blend_spectra(spectrum(a), spectrum(b), 0.5, a.shape[:2])
    assert abs(np.log(sharpness(mid, "brenner")) - ln_a) < 0.05


def test_a_z_near_a_plane_is_that_plane(tissue_stack: Path) -> None:
    rec = Recording.open(tissue_stack)
    drv = ReplayDriver(rec)
    z = float(rec.z_um[0][4])
    for dz in (0.0, 0.9 * SNAP_UM, -0.9 * SNAP_UM):
        drv.stage.move_z(z + dz)
        assert np.array_equal(drv.camera.snap(), rec.plane(0, 4))
    drv.stage.move_z(z + 2 * SNAP_UM)
    between = drv.camera.snap()
    assert between.dtype == np.uint8 and between.shape == rec.plane(0, 4).shape
    assert not np.array_equal(between, rec.plane(0, 4))
    # Brightness is kept: the mean is the blend's (the zero frequency is blended linearly in power,
    # which for a positive mean is within a grey level of the pixel blend's).
    w = 2 * SNAP_UM / float(rec.z_um[0][5] - z)
    expected = (1 - w) * rec.plane(0, 4).mean() + w * rec.plane(0, 5).mean()
    assert abs(float(between.mean()) - expected) < 1.0
