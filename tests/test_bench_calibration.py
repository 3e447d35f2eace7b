"""``python -m bench calibration --seed``: the seed reaches ``export calibrate``, into a model folder of its own."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

import export.calibrate
from bench import calibration


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    calibration.add_arguments(p)
    return p.parse_args(["--data", "/d", *argv])


def test_seed_gets_its_own_model_folder() -> None:
    default = calibration.calibrated_dir(_args(), "training", "ihc")
    assert default == Path("/d/af-calibrated-training-ihc-512")  # the default run's cached models
    assert calibration.calibrated_dir(_args(), "flipped", "synthetic") == Path("/d/af-calibrated-flipped-512")
    seeded = {s: calibration.calibrated_dir(_args("--seed", s), "training", "ihc") for s in ("0", "1", "2")}
    assert seeded["1"] == Path("/d/af-calibrated-training-ihc-512-seed1")
    assert len({default, *seeded.values()}) == 4  # no seed, 0 included, overwrites another's models


class _Stop(Exception):
    pass


@pytest.mark.parametrize(("argv", "expected"), [((), None), (("--seed", "3"), 3)])
def test_seed_reaches_export_calibrate(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: tuple[str, ...], expected: int | None
) -> None:
    seen: dict[str, Any] = {}

    def fake_calibrate(recordings: Any, init: Any, out: Path, **kw: Any) -> dict[str, Any]:
        seen.update(kw, out=out)
        raise _Stop

    monkeypatch.setattr(calibration, "_objective_recording", lambda *a, **k: tmp_path / "rec.zarr")
    monkeypatch.setattr(export.calibrate, "calibrate", fake_calibrate)
    args = _args(*argv, "--objectives", "training", "--contents", "ihc")
    args.data = tmp_path
    with pytest.raises(_Stop):
        calibration.run(args)
    assert seen.get("seed") == expected  # absent: export calibrate's default seed
    assert seen["out"] == calibration.calibrated_dir(args, "training", "ihc")
