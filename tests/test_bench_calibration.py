"""``python -m bench calibration``: ``--seed`` reaches ``export calibrate``, into a model folder of its own; the
calibration and the scored recordings show disjoint content (``--content-split``); a model is scored against
the paraxial truth and against each field's own in-focus plane (the stack's Brenner peak), side by side."""

from __future__ import annotations

import argparse
import dataclasses
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
    assert default == Path("/d/af-calibrated-training-ihc-left-512")  # the default run's cached models
    assert calibration.calibrated_dir(_args(), "flipped", "synthetic") == Path("/d/af-calibrated-flipped-512")
    seeded = {s: calibration.calibrated_dir(_args("--seed", s), "training", "ihc") for s in ("0", "1", "2")}
    assert seeded["1"] == Path("/d/af-calibrated-training-ihc-left-512-seed1")
    assert len({default, *seeded.values()}) == 4  # no seed, 0 included, overwrites another's models


class _Stop(Exception):
    pass


@pytest.mark.parametrize(
    ("argv", "expected", "threads"), [((), None, None), (("--seed", "3"), 3, None), (("--threads", "1"), None, 1)]
)
def test_seed_reaches_export_calibrate(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: tuple[str, ...], expected: int | None, threads: int | None
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
    assert seen.get("threads") == threads  # absent: export calibrate's default threads
    assert seen["out"] == calibration.calibrated_dir(args, "training", "ihc")


def _coded_image(path: Path) -> tuple[str, float]:
    """A 64 x 48 px image whose pixel (x, y) is coded in its colour (R = 3 + 4x, G = 3 + 5y), shown at 2 µm
    per pixel: the recordings' areas (hundreds of µm) tile it many times over by mirroring."""
    import cv2
    import numpy as np

    x, y = np.meshgrid(np.arange(64), np.arange(48))
    rgb = np.stack([3 + 4 * x, 3 + 5 * y, np.full_like(x, 200)], axis=-1).astype(np.uint8)
    cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))
    return f"file:{path}", 2.0


def _pixels_shown(params: Any) -> set[tuple[int, int]]:
    """Every image pixel (x, y) the recording's slide maps anywhere onto its scanned area (plus a PSF margin),
    decoded from the coded image's colours (bilinear sampling: both neighbours of a fractional position)."""
    import numpy as np

    from hw_sim.content import ImageSlide, load_content, make_slide
    from hw_sim.synth import grid_for, slide_spec

    slide = make_slide(slide_spec(params))
    assert isinstance(slide, ImageSlide)
    area = grid_for(params).area
    px = 0.5
    margin = 20.0
    t = slide.image_content(
        area.x_um - margin,
        area.y_um - margin,
        round((area.height_um + 2 * margin) / px),
        round((area.width_um + 2 * margin) / px),
        px,
    )
    image = load_content(params.content)
    white = np.percentile(image.reshape(-1, 3), 99.5, axis=0)  # ImageSlide's white point
    x = (t[..., 0].ravel() * white[0] - 3) / 4
    y = (t[..., 1].ravel() * white[1] - 3) / 5
    codes = [
        np.unique(a.astype(np.int64) * 1000 + b.astype(np.int64))
        for a in (np.floor(x + 1e-3), np.ceil(x - 1e-3))
        for b in (np.floor(y + 1e-3), np.ceil(y - 1e-3))
    ]
    return {(int(c) // 1000, int(c) % 1000) for c in np.unique(np.concatenate(codes))}


@pytest.mark.parametrize("split", ["left", "right", "top", "bottom"])
def test_calibration_and_scored_recordings_share_no_content(tmp_path: Path, split: str) -> None:
    """The default (and every half) calibrates on image pixels the scored recording never shows;
    ``--content-split none`` (the behaviour before stop 30) shows both recordings the same pixels."""
    content, px_um = _coded_image(tmp_path / "coded.png")
    args = _args("--content-split", split) if split != "left" else _args()
    pixels = {
        name: _pixels_shown(dataclasses.replace(params, content_px_um=px_um))
        for name, params in zip(("cal", "scored"), calibration.recording_params(args, "training", content), strict=True)
    }
    half = 64 * 48 // 2
    assert len(pixels["cal"]) >= 0.9 * half and len(pixels["scored"]) >= 0.9 * half  # each shows its whole half
    assert not pixels["cal"] & pixels["scored"]

    overlap = _args("--content-split", "none")
    cal, scored = (
        dataclasses.replace(p, content_px_um=px_um) for p in calibration.recording_params(overlap, "training", content)
    )
    assert len(_pixels_shown(cal) & _pixels_shown(scored)) > half  # the old recordings: the same content


def test_split_names_what_each_recording_showed(tmp_path: Path) -> None:
    args = _args()
    assert calibration.content_regions(args, "ihc") == ("left", "right")
    assert calibration.content_regions(args, "synthetic") == ("", "")  # procedural tissue: per slide seed
    assert calibration.content_regions(_args("--content-split", "none"), "ihc") == ("", "")
    assert calibration.content_text("ihc", "left", 1) == "ihc left half (px x 0-256, y 0-512 of 512 x 512)"
    assert calibration.content_text("ihc", "right", 1) == "ihc right half (px x 256-512, y 0-512 of 512 x 512)"
    assert calibration.content_text("synthetic", "", 5) == "procedural H&E of slide seed 5"
    # Models of split and overlapping calibrations never share a folder.
    assert calibration.calibrated_dir(args, "training", "ihc") != calibration.calibrated_dir(
        _args("--content-split", "none"), "training", "ihc"
    )


class _Estimate:
    def __init__(self, defocus_um: float) -> None:
        self.defocus_um = defocus_um
        self.sign_uncertain = False


class _FakeRecording:
    """Three tissue fields, 41 planes 0.5 µm apart around the paraxial focus ``truth``; a plane is (field, k)."""

    def __init__(self) -> None:
        import numpy as np

        self.truth_focus_z_um = np.asarray([0.0, 1.0, -0.5])
        self.z_um = self.truth_focus_z_um[:, None] + np.arange(-10.0, 10.01, 0.5)[None, :]

    def plane(self, f: int, k: int) -> tuple[int, int]:
        return f, k


def test_model_scored_against_paraxial_and_in_focus_plane(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each field's in-focus plane (its stack's Brenner peak) 1.2 µm above the paraxial focus, the third field's
    stack without a peak; the model reads exactly the distance to the in-focus plane. Against that plane: no
    error, every sign right, the peakless field left out; against the paraxial focus: 1.2 µm everywhere and the
    planes at +1.0 µm (between the two foci) read with the wrong sign. Each plane is estimated once."""
    import numpy as np

    import bench.autofocus
    import runtime.ml.tasks

    rec = _FakeRecording()
    peaks = rec.truth_focus_z_um + np.asarray([1.2, 1.2, np.nan])
    calls: list[tuple[int, int]] = []

    class Model:
        def estimate(self, plane: tuple[int, int]) -> _Estimate:
            calls.append(plane)
            f, k = plane
            return _Estimate(float(rec.z_um[f, k] - rec.truth_focus_z_um[f] - 1.2))

    monkeypatch.setattr(bench.autofocus, "_tissue_fields", lambda r: np.ones(3, bool))
    monkeypatch.setattr(calibration, "_resolutions", lambda paths, model_dir: {"within_half_dof": 1.0})
    monkeypatch.setattr(runtime.ml.tasks, "load_models", lambda *a: (Model(), None, None))

    references = calibration.focus_references(rec, peaks)
    scored = calibration.score_model(tmp_path / "rec.zarr", tmp_path / "model", rec, references)
    para, in_focus = scored["model_alone"], scored["model_alone_in_focus_plane"]
    assert scored["scan_path"] == {"within_half_dof": 1.0}
    assert in_focus["fields"] == 2 and in_focus["planes"] == 2 * 32  # |z - peak| <= 8 (z -6.5 .. +9) on two fields
    assert in_focus["mae_um"] == pytest.approx(0.0, abs=1e-9)
    assert in_focus["sign_accuracy_abs_ge_1um"] == 1.0 and in_focus["near_focus_q95_um"] == pytest.approx(0.0, abs=1e-9)
    assert para["fields"] == 3 and para["planes"] == 3 * 33
    assert para["mae_um"] == pytest.approx(1.2) and para["near_focus_q95_um"] == pytest.approx(1.2)
    assert para["sign_wrong_planes"] == 3  # z = +1.0 from paraxial: 0.2 µm below the in-focus plane, read < 0
    assert para["sign_accuracy_abs_ge_1um"] == pytest.approx(1 - 3 / (3 * 30))  # 30 planes per field at |z| >= 1
    # The union of both references' planes, each estimated once: z -8 .. +9 on two fields, -8 .. +8 on one.
    assert len(calls) == len(set(calls)) == 2 * 35 + 33
    # The old figures are unchanged: bench autofocus's paraxial sign_confidence reads the same.
    assert bench.autofocus.sign_confidence([rec], Model()) == para

    # Per field: every field read 1.2 µm low against paraxial; the peakless field absent from the plane's list.
    assert [(f["field"], f["planes"]) for f in para["per_field"]] == [(0, 33), (1, 33), (2, 33)]
    assert all(
        f["mae_um"] == pytest.approx(1.2) and f["near_focus_bias_um"] == pytest.approx(-1.2) for f in para["per_field"]
    )
    assert [f["field"] for f in in_focus["per_field"]] == [0, 1]
    assert calibration.worst_fields(para, 2).startswith("field ")

    offsets = calibration.reference_offsets(rec, peaks)
    assert offsets["fields"] == 2 and offsets["mean_um"] == pytest.approx(1.2)
    labels = [{"field": f, "focus_z_um": float(peaks[f]) if f < 2 else 0.0} for f in range(3)]
    assert calibration.label_errors(labels, rec)["mean_um"] == pytest.approx((1.2 + 1.2 + 0.5) / 3)
    to_plane = calibration.label_errors(labels, rec, peaks)
    assert to_plane["fields"] == 2 and to_plane["max_abs_um"] == pytest.approx(0.0, abs=1e-9)
