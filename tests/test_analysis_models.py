"""The committed slide-analysis models (tumour, nuclei, slide_mil) behind their Protocols.

Real ONNX Runtime sessions on the committed folders; the images are rendered by hw_sim from
held-out slide seeds (900000+), which no model trained on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hw_sim.lesions import HELD_OUT_SEEDS
from hw_sim.slide import SlideSpec, SyntheticSlide
from runtime.analysis.models import AnalysisModels, load_analysis_models, load_slide_model, load_tumour_model
from runtime.analysis.nuclei import find_peaks, merge_seam_duplicates
from runtime.analysis.types import NucleiModel, SlideModel, TumourModel
from runtime.ml.model_folder import ModelFolderError, default_model_dir, sha256_file

SEED = HELD_OUT_SEEDS.start + 4242


@pytest.fixture(scope="module")
def models() -> AnalysisModels:
    return load_analysis_models(backend="ort_cpu")


@pytest.fixture(scope="module")
def lesion_slide() -> tuple[SyntheticSlide, object]:
    """A held-out slide with one large tumour lesion (and a mimic), and that lesion."""
    slide = SyntheticSlide(
        SlideSpec(seed=SEED, width_um=3000, height_um=3000, pieces=1, lesions=1, mimics=1,
                  lesion_min_um=700, lesion_max_um=900)
    )
    assert slide.lesions is not None
    return slide, next(les for les in slide.lesions.lesions if les.tumour)


def _rgb_rect(slide: SyntheticSlide, x0: float, y0: float, h: int, w: int, px: float) -> np.ndarray:
    return np.clip(np.rint(slide.transmittance(x0, y0, h, w, px) * 240.0), 0, 255).astype(np.uint8)


def _patches(slide: SyntheticSlide, centres: list[tuple[float, float]], p: int = 64) -> np.ndarray:
    return np.stack([_rgb_rect(slide, cx - p / 2, cy - p / 2, p, p, 1.0) for cx, cy in centres])


def _lesion_and_benign(slide: SyntheticSlide, les: object, n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Patch centres well inside the lesion, and tissue patches far from every lesion and mimic."""
    assert slide.lesions is not None
    rng = np.random.default_rng(0)
    inside: list[tuple[float, float]] = []
    benign: list[tuple[float, float]] = []
    piece = slide._pieces[0]
    while len(inside) < n or len(benign) < n:
        if len(inside) < n:
            r, a = 0.6 * les.radius * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)  # type: ignore[attr-defined]
            inside.append((les.cx + r * np.cos(a), les.cy + r * np.sin(a)))  # type: ignore[attr-defined]
        x = piece.cx + rng.uniform(-0.8, 0.8) * piece.a
        y = piece.cy + rng.uniform(-0.8, 0.8) * piece.b
        far = all(np.hypot(x - o.cx, y - o.cy) > o.reach + 80 for o in slide.lesions.lesions)
        if len(benign) < n and far and slide.tissue_fraction(x - 32, y - 32, 64, 64, 1.0) > 0.6:
            benign.append((x, y))
    return _patches(slide, inside), _patches(slide, benign)


# ---------------------------------------------------------------------------- loading


def test_builtin_models_load_and_satisfy_the_protocols(models: AnalysisModels) -> None:
    # The Protocols are not runtime-checkable: check their members (mypy checks the signatures).
    protocols = ((models.tumour, TumourModel), (models.nuclei, NucleiModel), (models.slide, SlideModel))
    for obj, proto in protocols:
        members = [n for n in vars(proto) if not n.startswith("_")]
        assert members and all(hasattr(obj, n) for n in members), (proto, members)
    assert models.tumour.patch_px == 64 and models.tumour.pixel_size_um == 1.0
    assert models.tumour.embedding_dim == models.slide.embedding_dim
    assert models.nuclei.pixel_size_um == 0.5 and models.nuclei.halo_px > 0
    for task in ("tumour", "nuclei", "slide_mil"):
        meta = json.loads((default_model_dir(task) / "model.json").read_text())
        tr = meta["training"]  # a re-calibrated model records its training run under "init"
        assert meta["heldout_metrics"] and (tr["train_seconds"] or tr["init"]["train_seconds"]) > 0
        assert all(s >= HELD_OUT_SEEDS.start for s in meta["heldout_metrics"]["heldout_slide_seeds"])


def _copy(task: str, tmp_path: Path) -> Path:
    dst = tmp_path / task
    shutil.copytree(default_model_dir(task), dst)
    return dst


def _edit(folder: Path, **changes: object) -> None:
    meta = json.loads((folder / "model.json").read_text())
    meta.update(changes)
    (folder / "model.json").write_text(json.dumps(meta))


def test_loader_rejects_bad_folders_with_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_tumour_model(tmp_path / "nowhere")
    with pytest.raises(ModelFolderError, match="'classifier' model, expected a 'tumour' model"):
        load_tumour_model(default_model_dir("classifier"))
    bad = _copy("tumour", tmp_path)
    meta = json.loads((bad / "model.json").read_text())
    _edit(bad, preprocess={**meta["preprocess"], "kind": "classifier_v1"})
    with pytest.raises(ModelFolderError, match=r"'preprocess' is invalid.*rgb_patch_v1"):
        load_tumour_model(bad)
    _edit(bad, preprocess={**meta["preprocess"], "size": 32})
    with pytest.raises(ModelFolderError, match="disagrees with 'preprocess'"):
        load_tumour_model(bad)
    _edit(bad, preprocess=meta["preprocess"])
    (bad / "model.onnx").write_bytes((bad / "model.onnx").read_bytes()[:-10])
    with pytest.raises(ModelFolderError, match=r"does not match model\.json key 'onnx_sha256'"):
        load_tumour_model(bad)
    mil = _copy("slide_mil", tmp_path)
    pre = json.loads((mil / "model.json").read_text())["preprocess"]
    _edit(mil, preprocess={**pre, "embedding_dim": pre["embedding_dim"] + 1})
    with pytest.raises(ModelFolderError, match="disagrees with 'preprocess'"):
        load_slide_model(mil)


def test_slide_model_must_match_its_tumour_model(tmp_path: Path) -> None:
    mil = _copy("slide_mil", tmp_path)
    _edit(mil, tumour_model={"sha256": "0" * 64, "embedding_dim": 32})
    with pytest.raises(ModelFolderError, match="trained on the embeddings of tumour model"):
        load_analysis_models(slide=mil, backend="ort_cpu")
    with pytest.raises(ModelFolderError, match="ONNX Runtime only"):
        load_slide_model(default_model_dir("slide_mil"), backend="tensorrt")


# ---------------------------------------------------------------------------- tumour


def test_tumour_model_shapes_and_bad_input(models: AnalysisModels) -> None:
    d = models.tumour.embedding_dim
    empty = models.tumour.predict(np.zeros((0, 64, 64, 3), np.uint8))
    assert empty.probability.shape == (0,) and empty.embedding.shape == (0, d)
    out = models.tumour.predict(np.full((3, 64, 64, 3), 230, np.uint8))
    assert out.probability.dtype == np.float32 and out.probability.shape == (3,)
    assert out.embedding.dtype == np.float32 and out.embedding.shape == (3, d)
    assert np.all((out.probability >= 0) & (out.probability <= 1))
    with pytest.raises(ValueError, match=r"\(N, 64, 64, 3\)"):
        models.tumour.predict(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        models.tumour.predict(np.zeros((2, 64, 64, 3), np.float32))  # type: ignore[arg-type]


def test_tumour_model_separates_a_held_out_lesion_from_benign_tissue(
    models: AnalysisModels, lesion_slide: tuple[SyntheticSlide, object]
) -> None:
    slide, les = lesion_slide
    tumour, benign = _lesion_and_benign(slide, les)
    pt = models.tumour.predict(tumour).probability
    pb = models.tumour.predict(benign).probability
    assert np.mean(pt > 0.5) >= 0.8, pt
    assert np.mean(pb < 0.5) >= 0.9, pb
    assert np.median(pt) > np.median(pb) + 0.5


# ---------------------------------------------------------------------------- slide model


def test_slide_model_attention_sums_to_one_and_score_rises_with_tumour(
    models: AnalysisModels, lesion_slide: tuple[SyntheticSlide, object]
) -> None:
    slide, les = lesion_slide
    tumour, benign = _lesion_and_benign(slide, les, n=16)
    eb = models.tumour.predict(benign).embedding
    et = models.tumour.predict(tumour[:4]).embedding
    rng = np.random.default_rng(1)
    cb = rng.uniform(0, 2000, (len(eb), 2)).astype(np.float32)
    ct = rng.uniform(0, 2000, (len(et), 2)).astype(np.float32)
    neg = models.slide.predict(eb, cb)
    pos = models.slide.predict(np.concatenate([eb, et]), np.concatenate([cb, ct]))
    for s in (neg, pos):
        assert s.attention.dtype == np.float32 and abs(float(s.attention.sum()) - 1.0) < 1e-4
        assert 0.0 <= s.score <= 1.0
    assert pos.attention.shape == (len(eb) + len(et),)
    assert pos.score > neg.score + 0.3, (neg.score, pos.score)
    assert pos.attention[len(eb) :].sum() > 0.5  # the tumour patches draw the attention
    none = models.slide.predict(np.zeros((0, models.slide.embedding_dim), np.float32), np.zeros((0, 2), np.float32))
    assert none.score == 0.0 and none.attention.shape == (0,)
    with pytest.raises(ValueError, match="one \\(y, x\\) centre per embedding"):
        models.slide.predict(eb, cb[:-1])


# ---------------------------------------------------------------------------- nuclei


def test_find_peaks_refines_to_the_blob_centre() -> None:
    yy, xx = np.mgrid[0:20, 0:30].astype(np.float32) + 0.5
    heat = np.exp(-((yy - 6.3) ** 2 + (xx - 9.6) ** 2) / 2) + np.exp(-((yy - 14.5) ** 2 + (xx - 22.5) ** 2) / 2)
    pk = find_peaks(heat.astype(np.float32), 0.3, 1)
    pk = pk[np.argsort(pk[:, 0])]
    assert pk.shape == (2, 2)
    assert np.abs(pk - [[6.3, 9.6], [14.5, 22.5]]).max() < 0.35
    assert find_peaks(np.zeros((5, 5), np.float32), 0.3, 1).shape == (0, 2)


def test_find_peaks_keeps_one_peak_of_a_plateau() -> None:
    """Equal neighbours are both their neighbourhood's maximum: one peak each plateau (the greedy
    pass, which runs only where two peaks lie within min_distance), separate equal peaks all kept."""
    heat = np.zeros((12, 20), np.float32)
    heat[3, 4:6] = 0.9  # a two-cell plateau
    heat[8, 10] = heat[8, 14] = 0.8  # equal, farther apart than min_distance
    pk = find_peaks(heat, 0.3, 1)
    assert pk.shape == (3, 2)
    assert sorted(np.floor(pk[:, 1]).astype(int).tolist()) == [5, 10, 14]  # the plateau's centre: 5.0


def test_seam_duplicates_are_merged_and_nothing_else() -> None:
    """Two windows each answer for their side of a seam (x = 255 here) and may place one nucleus on
    both sides of it: the weaker of two detections within min_distance cells across a seam goes; as
    close a pair away from the seams, and a pair farther apart on a seam, both stay."""
    pts = np.asarray([[100.0, 254.6], [100.2, 255.1],  # one nucleus, answered by both windows
                      [40.0, 254.0], [40.0, 256.5],  # two nuclei 2.5 px apart on the seam
                      [10.0, 100.0], [10.5, 100.4]], np.float32)  # close, but no seam near
    val = np.asarray([0.8, 0.9, 0.7, 0.7, 0.6, 0.6], np.float32)
    out = merge_seam_duplicates(pts, val, [], [255.0], 2.0)
    assert out.tolist() == pts[[1, 2, 3, 4, 5]].tolist()
    assert merge_seam_duplicates(pts, val, [101.0], [], 2.0).tolist() == pts[[1, 2, 3, 4, 5]].tolist()
    assert merge_seam_duplicates(pts, val, [], [], 2.0) is pts
    flat = np.asarray([[5.0, 9.5], [5.0, 10.5]], np.float32)  # a tie: the first stays
    assert merge_seam_duplicates(flat, np.ones(2, np.float32), [], [10.0], 2.0).tolist() == [[5.0, 9.5]]


def test_nuclei_detector_skips_glass_windows_without_losing_nuclei(
    models: AnalysisModels, lesion_slide: tuple[SyntheticSlide, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tissue in one corner of a glass region: the windows whose core has no stained pixel are not
    run, and the detections are exactly those of running every window."""
    import runtime.analysis.nuclei as nuclei_mod

    slide, les = lesion_slide
    px = models.nuclei.pixel_size_um
    tissue = _rgb_rect(slide, les.cx - 50, les.cy - 50, 150, 150, px)  # type: ignore[attr-defined]
    region = np.full((400, 400, 3), 255, np.uint8)
    region[:150, :150] = tissue
    det = models.nuclei
    calls: list[int] = []
    run = det.backend.run
    monkeypatch.setattr(det.backend, "run", lambda x: (calls.append(len(x)), run(x))[1])
    skipped = det.detect(region)
    run_skipping = sum(calls)
    calls.clear()
    assert det.detect(np.full((300, 300, 3), 255, np.uint8)).shape == (0, 2) and calls == []  # glass: no call
    monkeypatch.setattr(nuclei_mod, "stained", lambda rgb: np.ones(rgb.shape[:-1], bool))  # every window runs
    calls.clear()
    every = det.detect(region)
    per_side = len(nuclei_mod._starts(400, det.params.size, det.params.halo))
    assert per_side >= 2 and run_skipping < sum(calls) == per_side**2  # 400 px: 2 x 2 windows of 320 px
    assert len(skipped) > 50 and skipped.shape == every.shape
    np.testing.assert_allclose(skipped[np.lexsort(skipped.T)], every[np.lexsort(every.T)], atol=1e-4)


def test_nuclei_detector_finds_held_out_nuclei_within_4_um(
    models: AnalysisModels, lesion_slide: tuple[SyntheticSlide, object]
) -> None:
    from export.analysis_metrics import f1_report, match_points

    slide, les = lesion_slide
    px = models.nuclei.pixel_size_um
    h, w = 200, 700  # wider than two windows: the sliding window and its seams are exercised
    # Straddling the lesion edge: tumour nuclei on one side, benign tissue on the other.
    x0, y0 = les.cx + les.radius * 0.85 - w * px / 2, les.cy - h * px / 2  # type: ignore[attr-defined]
    region = _rgb_rect(slide, x0, y0, h, w, px)
    found = models.nuclei.detect(region)
    assert found.dtype == np.float32 and found.ndim == 2 and found.shape[1] == 2
    cx, cy, _ = slide.nuclei(x0, y0, x0 + w * px, y0 + h * px)
    truth = np.stack([(cy - y0) / px - 0.5, (cx - x0) / px - 0.5], axis=1)
    rep = f1_report(*match_points(found, truth, 4.0 / px))
    assert rep["f1"] >= 0.8, rep
    # No duplicates at the window seams: no two detections closer than 1 µm.
    d = np.hypot(*(found[:, None, :] - found[None, :, :]).transpose(2, 0, 1)) + np.eye(len(found)) * 1e9
    assert d.min() > 1.0 / px
    assert models.nuclei.detect(region[:5, :7]).shape[1] == 2  # a region smaller than a window
    with pytest.raises(ValueError, match="RGB uint8"):
        models.nuclei.detect(region[..., 0])


def test_float_nuclei_model_answers_a_seam_nucleus_once(lesion_slide: tuple[SyntheticSlide, object]) -> None:
    """The float folder (what TensorRT and ONNX Runtime CUDA take; ort_cpu takes the int8 copy) places a
    nucleus of this region 0.57 px either side of the seam at x = 255 px (windows at 0 and 190 px): it
    is answered once (merge_seam_duplicates)."""
    from runtime.analysis.models import load_nuclei_model

    slide, les = lesion_slide
    det = load_nuclei_model(default_model_dir("nuclei"), backend="ort_cpu")
    px = det.pixel_size_um
    h, w = 200, 700
    x0, y0 = les.cx + les.radius * 0.85 - w * px / 2, les.cy - h * px / 2  # type: ignore[attr-defined]
    found = det.detect(_rgb_rect(slide, x0, y0, h, w, px))
    d = np.hypot(*(found[:, None, :] - found[None, :, :]).transpose(2, 0, 1)) + np.eye(len(found)) * 1e9
    assert len(found) > 300 and d.min() > 1.0 / px
    assert np.any(np.abs(found[:, 1] - 255.0) < 1.0)  # the seam nucleus is there, once


def test_analysis_sessions_run_one_cpu_thread_unless_asked() -> None:
    """The analysis worker is a niced background process: its ONNX Runtime CPU sessions take one
    intra-op thread (no spinning pool competing with the stitcher for the cores)."""
    from runtime.analysis.models import load_nuclei_model

    def threads(det: object) -> int:
        return int(det.backend._sess.get_session_options().intra_op_num_threads)  # type: ignore[attr-defined]

    assert threads(load_nuclei_model(backend="ort_cpu")) == 1
    assert threads(load_nuclei_model(backend="ort_cpu", cpu_threads=2)) == 2


def test_committed_folders_are_small_and_consistent() -> None:
    for task in ("tumour", "nuclei", "slide_mil"):
        folder = default_model_dir(task)
        size = (folder / "model.onnx").stat().st_size
        assert size < 4_000_000, (task, size)
        meta = json.loads((folder / "model.json").read_text())
        assert meta["onnx_sha256"] == sha256_file(folder / "model.onnx")
    mil = json.loads((default_model_dir("slide_mil") / "model.json").read_text())
    assert mil["tumour_model"]["sha256"] == sha256_file(default_model_dir("tumour") / "model.onnx")
