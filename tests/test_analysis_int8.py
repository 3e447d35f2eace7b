"""The int8 copies of the tumour and nuclei CNNs (``python -m export.quantize_analysis``): committed
folders made from the committed float ones, taken by default on ONNX Runtime CPU, answering as the
float ones do on held-out tissue (seed 900000+, which neither calibration nor training used).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from hw_sim.lesions import HELD_OUT_SEEDS
from hw_sim.slide import SlideSpec, SyntheticSlide
from runtime.analysis.models import (
    INT8_TASKS,
    int8_dir,
    load_analysis_models,
    load_nuclei_model,
    load_tumour_model,
)
from runtime.ml.model_folder import ModelFolderError, default_model_dir, load_model_folder

SEED = HELD_OUT_SEEDS.start + 4243
# What the int8 folder's model.json says of its own graph (the tumour model's unseen_content: measured again).
DERIVED = {"onnx_sha256", "parity", "quantized", "unseen_content"}


def test_int8_folders_are_copies_of_the_committed_float_models() -> None:
    for task in ("tumour", "nuclei"):
        q, f = load_model_folder(int8_dir(task), task), load_model_folder(default_model_dir(task), task)
        rec = q.meta["quantized"]
        # A retrained float model needs its int8 copy made again (the command is in the record).
        assert rec["from"]["onnx_sha256"] == f.sha256 != q.sha256, task
        assert rec["command"].startswith(f"python -m export.quantize_analysis runtime/ml/builtin/{task} ")
        seeds = rec["calibration"]["slide_seeds"] + rec["calibration"]["parity_seeds"]
        assert seeds and all(s < HELD_OUT_SEEDS.start for s in seeds)
        assert not set(rec["calibration"]["slide_seeds"]) & set(rec["calibration"]["parity_seeds"])
        assert (q.input_shape, q.output_names, q.pixel_size_um) == (f.input_shape, f.output_names, f.pixel_size_um)
        # The rest of model.json (preprocess, figures, the outline fit) is the float folder's.
        assert {k: v for k, v in q.meta.items() if k not in DERIVED} == {
            k: v for k, v in f.meta.items() if k not in DERIVED
        }
        par = q.meta["parity"]
        assert par["samples"] > 0 and all(par["max_abs_diff"][k] <= par["atol"][k] for k in q.output_names)
    par = load_model_folder(int8_dir("nuclei")).meta["parity"]
    det = par["detections"]
    assert det["float"] > 1000 and det["agree_within_1um"] >= 0.99 * max(det["float"], det["int8"])
    # Content the simulator never drew: the nuclei of a real IHC image, tumour calls on non-tissue.
    assert par["ihc"]["float"] > 300 and par["ihc"]["float_matched_within_1um"] >= 0.9
    assert abs(par["ihc"]["int8"] - par["ihc"]["float"]) <= 0.05 * par["ihc"]["float"]
    q, f = (
        load_model_folder(d, "tumour").meta["unseen_content"] for d in (int8_dir("tumour"), default_model_dir("tumour"))
    )
    kinds = [k for k in f if isinstance(f[k], dict)]
    assert kinds and all(q[k]["false_positive_rate"] <= f[k]["false_positive_rate"] + 0.01 for k in kinds)


def test_builtin_models_take_the_int8_copies_on_ort_cpu_and_a_named_folder_as_it_is() -> None:
    m = load_analysis_models(backend="ort_cpu")
    assert INT8_TASKS == ("nuclei",)  # the int8 tumour model is an option (tumour_dir), see models.py
    assert (m.tumour.folder.path, m.nuclei.folder.path) == (default_model_dir("tumour"), int8_dir("nuclei"))
    assert m.tumour.backend.name == m.nuclei.backend.name == "ort_cpu"
    assert load_analysis_models(tumour=int8_dir("tumour"), backend="ort_cpu").tumour.folder.path == int8_dir("tumour")
    float_dir = default_model_dir("nuclei")
    assert load_nuclei_model(float_dir, "ort_cpu").folder.path == float_dir  # the float model stays an option
    assert load_tumour_model(default_model_dir("tumour"), "ort_cpu").folder.sha256 == m.slide.folder.meta[
        "tumour_model"
    ]["sha256"]


def test_slide_model_takes_an_int8_tumour_model_only_of_its_own_float_model(tmp_path: Path) -> None:
    load_analysis_models(tumour=int8_dir("tumour"), backend="ort_cpu")  # the float model it was trained on
    other = tmp_path / "tumour_int8"
    shutil.copytree(int8_dir("tumour"), other)
    meta = json.loads((other / "model.json").read_text())
    meta["quantized"]["from"]["onnx_sha256"] = "0" * 64
    (other / "model.json").write_text(json.dumps(meta))
    load_tumour_model(other, "ort_cpu")  # a valid folder ...
    with pytest.raises(ModelFolderError, match="trained on the embeddings of tumour model"):
        load_analysis_models(tumour=other, backend="ort_cpu")  # ... but not of the slide model's tumour model


@pytest.fixture(scope="module")
def slide() -> SyntheticSlide:
    s = SyntheticSlide(
        SlideSpec(seed=SEED, width_um=2000, height_um=2000, pieces=1, lesions=1, mimics=1,
                  lesion_min_um=500, lesion_max_um=700)
    )
    assert s.lesions is not None
    return s


def _rgb(slide: SyntheticSlide, x0: float, y0: float, h: int, w: int, px: float) -> np.ndarray:
    return np.asarray(np.clip(np.rint(slide.transmittance(x0, y0, h, w, px) * 240.0), 0, 255), np.uint8)


def test_int8_models_answer_as_the_float_ones_on_held_out_tissue(slide: SyntheticSlide) -> None:
    assert slide.lesions is not None
    les = next(les for les in slide.lesions.lesions if les.tumour)
    cx, cy, r = les.cx, les.cy, les.radius
    # Nuclei: a 700 x 700 px region (0.5 µm/px) across the lesion's edge, through both detectors.
    q8, fl = load_nuclei_model(int8_dir("nuclei"), "ort_cpu"), load_nuclei_model(default_model_dir("nuclei"), "ort_cpu")
    region = _rgb(slide, cx + r * 0.8 - 175, cy - 175, 700, 700, 0.5)
    a, b = fl.detect(region), q8.detect(region)
    assert len(a) > 300
    d, _ = cKDTree(b).query(a)
    assert (d <= 2.0).mean() >= 0.98 and abs(len(a) - len(b)) <= 0.02 * len(a), (len(a), len(b), (d <= 2.0).mean())
    # Tumour: 64 µm patches on a grid over the lesion and around it.
    t8, tf = load_tumour_model(int8_dir("tumour"), "ort_cpu"), load_tumour_model(default_model_dir("tumour"), "ort_cpu")
    grid = _rgb(slide, cx - 1.6 * r, cy - 1.6 * r, 512, 512, 1.0) if r * 3.2 <= 512 else _rgb(
        slide, cx - 256, cy - 256, 512, 512, 1.0
    )
    patches = grid.reshape(8, 64, 8, 64, 3).transpose(0, 2, 1, 3, 4).reshape(64, 64, 64, 3)
    p8, pf = t8.predict(patches), tf.predict(patches)
    assert (pf.probability > 0.5).any() and (pf.probability < 0.5).any()  # both kinds of patch
    assert float(np.abs(p8.probability - pf.probability).max()) < 0.05
    assert ((p8.probability > 0.5) == (pf.probability > 0.5)).mean() >= 0.98
    assert float(np.abs(p8.embedding - pf.embedding).max()) < 0.5
