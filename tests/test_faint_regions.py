"""The faint-region threshold of a lesion head (issue 13): a head folder names it in its model.json
(``"faint_regions"``), the analysis uses the head's own, and ``python -m export.fit_faint`` chooses it on
training-range slides and writes it there."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench.analysis import PX_UM, ArraySource, render_slide
from export.fit_faint import choose, main
from runtime.analysis.lesion_head import CANDIDATE_MIN_UM2, CANDIDATE_THRESHOLD, load_lesion_head
from runtime.analysis.pipeline import analyze_source, head_outlined, load_models, slide_lesions
from runtime.ml.model_folder import ModelFolderError, default_model_dir


def _head_copy(tmp_path: Path, faint: object | None) -> Path:
    folder = tmp_path / "lesion_head"
    shutil.copytree(default_model_dir("lesion_head"), folder)
    meta = json.loads((folder / "model.json").read_text())
    meta.pop("faint_regions", None)
    if faint is not None:
        meta["faint_regions"] = faint
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


def test_head_folder_names_its_faint_settings(tmp_path: Path) -> None:
    """Without the key the module's defaults; with it the folder's; a bad value is a one-line error naming the key."""
    head = load_lesion_head(_head_copy(tmp_path / "a", None), "ort_cpu")
    assert (head.faint_threshold, head.faint_min_um2) == (CANDIDATE_THRESHOLD, CANDIDATE_MIN_UM2)
    head = load_lesion_head(_head_copy(tmp_path / "b", {"threshold": 0.2, "min_um2": 50}), "ort_cpu")
    assert (head.faint_threshold, head.faint_min_um2) == (0.2, 50.0)
    head = load_lesion_head(_head_copy(tmp_path / "c", {"threshold": 0.25}), "ort_cpu")
    assert (head.faint_threshold, head.faint_min_um2) == (0.25, CANDIDATE_MIN_UM2)
    for bad in (0.2, {"min_um2": 10}, {"threshold": 1.5}, {"threshold": "low"}, {"threshold": 0.2, "min_um2": -1}):
        with pytest.raises(ModelFolderError, match="faint_regions") as err:
            load_lesion_head(_head_copy(tmp_path / "bad", bad), "ort_cpu")
        assert "\n" not in str(err.value)
        shutil.rmtree(tmp_path / "bad")


def test_faint_lesion_is_added_at_the_heads_threshold_only(tmp_path: Path) -> None:
    """A small lesion whose map peaks at 0.3: under the default 0.35 no faint region holds it; a head whose
    folder says 0.25 confirms it; a threshold given to slide_lesions overrides the head's."""
    s = render_slide(330000, 2, 500.0, held_out=False)  # training-range seed: one ~4,100 µm² lesion
    src = ArraySource(s.levels, PX_UM)
    models = load_models(None, None, None)
    res = analyze_source(src, models, nuclei=False, subdivide=2)
    peak = 0.3
    res.probability = (res.probability * (peak / res.probability.max())).astype(np.float32)
    default = dataclasses.replace(models, lesion_head=load_lesion_head(_head_copy(tmp_path / "a", None), "ort_cpu"))
    assert slide_lesions(res, default, src) == []
    lower = load_lesion_head(_head_copy(tmp_path / "b", {"threshold": 0.25}), "ort_cpu")
    with_lower = dataclasses.replace(models, lesion_head=lower)
    found = slide_lesions(res, with_lower, src)
    assert len(found) == 1 and found[0].geometry.intersects(s.tumour[0]) and res.stats["lesion_head_added"] == 1
    assert slide_lesions(res, with_lower, src, faint_threshold=0.35) == []
    # the re-outlined lesions computed once and passed in give what slide_lesions computes itself
    outlined = head_outlined(res, with_lower, src)
    assert slide_lesions(res, with_lower, src, outlined=outlined) == found
    assert slide_lesions(res, with_lower, src, faint_threshold=0.35, outlined=outlined) == []


def test_choice_is_the_highest_threshold_of_the_best_sensitivity() -> None:
    rows = [
        {"threshold": 0.35, "sensitivity_at_0.5_fp": 0.86},
        {"threshold": 0.25, "sensitivity_at_0.5_fp": 0.94},
        {"threshold": 0.2, "sensitivity_at_0.5_fp": 0.94},
        {"threshold": 0.15, "sensitivity_at_0.5_fp": 0.92},
    ]
    assert choose(rows)["threshold"] == 0.25


def test_fit_faint_scores_training_slides_and_writes_the_choice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "models"
    root.mkdir()
    for name in ("tumour", "nuclei", "slide_mil"):
        (root / name).symlink_to(default_model_dir(name))
    _head_copy(root, None)
    args = ["--models", str(root), "--first-seed", "330000", "--slides", "3", "--size-um", "500", "--workers", "1"]
    assert main([*args, "--lows", "0.3", "0.2", "--write"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["threshold"] for r in out[:2]] == [0.3, 0.2] and out[2]["chosen"] in (0.3, 0.2)
    assert all(r["lesions"] >= 1 and 0.0 <= r["sensitivity_at_0.5_fp"] <= 1.0 for r in out[:2])
    faint = json.loads((root / "lesion_head" / "model.json").read_text())["faint_regions"]
    assert faint["threshold"] == out[2]["chosen"] and faint["seeds"] == "330000-330002"
    assert faint["command"].startswith("python -m export.fit_faint ") and len(faint["chosen_on"]) == 2
    assert load_lesion_head(root / "lesion_head", "ort_cpu").faint_threshold == faint["threshold"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--both-looks"], "--both-looks needs --vesicular-max"),
        (["--lows", "0.6"], "--lows must lie in"),
        (["--first-seed", "900000"], "is held out for figures"),
    ],
)
def test_fit_faint_refuses_bad_arguments(extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        main(["--slides", "1", "--workers", "1", *extra])
    text = capsys.readouterr().err + str(err.value)
    assert message in text, text


def test_a_map_lesion_the_head_finds_no_tumour_in_is_vetoed() -> None:
    """A blob painted at 0.9 on the map over benign tissue forms a lesion that the head, reading the slide
    there, finds no tumour in: the analysis drops it (without the veto it stays, with the map's outline);
    the slide's true lesion stays."""
    import shapely

    from runtime.analysis import lesions
    from runtime.analysis.lesion_head import reoutline

    s = render_slide(330000, 2, 500.0, held_out=False)  # training-range seed: one ~4,100 µm² lesion
    src = ArraySource(s.levels, PX_UM)
    models = load_models(None, None, None)
    models = dataclasses.replace(models, lesion_head=load_lesion_head(default_model_dir("lesion_head"), "ort_cpu"))
    res = analyze_source(src, models, nuclei=False, subdivide=2)
    cell = res.cell_px
    x0, y0, x1, y1 = s.tumour[0].bounds
    near = np.zeros(res.probability.shape, bool)
    near[max(0, int(y0 // cell) - 3) : int(y1 // cell) + 4, max(0, int(x0 // cell) - 3) : int(x1 // cell) + 4] = True
    calm = res.analysed & (res.probability < 0.1) & ~near
    ys, xs = np.nonzero(calm[1:-1, 1:-1] & calm[:-2, 1:-1] & calm[2:, 1:-1] & calm[1:-1, :-2] & calm[1:-1, 2:])
    assert ys.size, "no benign tissue away from the lesion to paint on"
    r, c = ys[ys.size // 2] + 1, xs[ys.size // 2] + 1
    res.probability[r - 1 : r + 2, c - 1 : c + 2] = 0.9
    fake = shapely.box((c - 1) * cell, (r - 1) * cell, (c + 2) * cell, (r + 2) * cell)  # the painted cells
    drawn = lesions.model_lesions(res, models.tumour)
    assert any(les.geometry.intersects(fake) for les in drawn)  # the map draws it
    kept, st = reoutline(src, drawn, models.lesion_head, res.pixel_size_um)
    assert any(les.geometry.intersects(fake) for les in kept) and st["vetoed"] == 0
    found = slide_lesions(res, models, src)
    assert not any(les.geometry.intersects(fake) for les in found)
    assert any(les.geometry.intersects(s.tumour[0]) for les in found)
    assert res.stats["lesion_head_vetoed"] >= 1
