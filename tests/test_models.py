"""Model folders, inference backends and the engine cache (no GPU needed), ONNX export parity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.focus.surface import FocusSurface
from runtime.ml.backends import (
    EngineCache,
    EngineKey,
    InferenceError,
    OrtBackend,
    select_backend,
)
from runtime.ml.model_folder import (
    ModelFolderError,
    builtin_autofocus_dir,
    default_model_dir,
    load_model_folder,
    write_model_json,
)
from runtime.ml.tasks import AutofocusModel, TileClassifierModel, load_models

# ---------------------------------------------------------------------------- committed models


@pytest.mark.parametrize("task", ["autofocus", "classifier"])
def test_committed_models_load_validate_and_run(task: str) -> None:
    folder = load_model_folder(default_model_dir(task), task)
    meta = folder.meta
    assert meta["pixel_size_um"] == 0.25 and meta["heldout_metrics"] and meta["versions"]["onnxruntime"]
    assert len(meta["onnx_sha256"]) == 64
    sel = select_backend(folder, "ort_cpu")
    out = sel.backend.run(np.zeros((3, *folder.input_shape), np.float32))
    assert all(v.shape[0] == 3 for v in out.values())


V2_DIR = default_model_dir("autofocus").parent / "autofocus_v2"


def test_committed_autofocus_v2_folder_loads_and_tells_far_defocus_sign() -> None:
    """The wide-window model (for frames of 512 px and more): its own folder, validated like the
    default; on a 512 px render it gets the sign and roughly the size of large defocus."""
    folder = load_model_folder(V2_DIR, "autofocus")
    assert folder.meta["preprocess"]["kind"] == "autofocus_v2" and folder.input_shape == (10, 64, 64)
    model = AutofocusModel(folder, OrtBackend(folder, cuda=False))
    for d in (-8.0, -3.0, -1.0, 1.0, 3.0, 8.0):
        est = model.estimate(_render(d, tile=512, max_defocus_um=9.0))
        assert est.defocus_um is not None
        assert abs(est.defocus_um - d) < 0.15 * abs(d) + 0.5, (d, est)


def _render(defocus_um: float, seed: int = 11, tile: int = 256, max_defocus_um: float = 6.0) -> np.ndarray:
    from hw_sim.optics import Optics, OpticsParams
    from hw_sim.slide import SlideSpec, SyntheticSlide

    slide = SyntheticSlide(SlideSpec(seed=seed, width_um=2000, height_um=1500, pieces=1))
    p = slide._pieces[0]
    optics = Optics(OpticsParams(spherical_waves=0.09, max_defocus_um=max_defocus_um), 0.25, (tile, tile))
    m = optics.margin_px
    x0, y0 = p.cx - tile * 0.125 - m * 0.25, p.cy - tile * 0.125 - m * 0.25
    obj = optics.prepare(slide.transmittance(x0, y0, tile + 2 * m, tile + 2 * m, 0.25))
    return optics.camera_capture(optics.image(obj, defocus_um), np.random.default_rng(seed))


V3_DIR = default_model_dir("autofocus").parent / "autofocus_v3"


def test_committed_autofocus_v3_reads_size_and_sign_with_its_magnitude_head() -> None:
    """v3 (wider content, magnitude head): the runtime's estimate on a 512 px render, near and far."""
    folder = load_model_folder(V3_DIR, "autofocus")
    assert "abs_defocus_um" in folder.output_names and folder.input_shape == (10, 64, 64)
    assert "training_content" in folder.meta
    model = AutofocusModel(folder, OrtBackend(folder, cuda=False))
    for d in (-8.0, -3.0, -1.0, 1.0, 3.0, 8.0):
        est = model.estimate(_render(d, tile=512, max_defocus_um=9.0))
        assert est.defocus_um is not None and est.signed_um is not None
        assert abs(est.defocus_um - d) < 0.15 * abs(d) + 0.5, (d, est)


def test_builtin_autofocus_follows_the_camera_frame() -> None:
    """The wide window (v3) needs 512 px; smaller (or unknown) frames get v1."""
    assert builtin_autofocus_dir((512, 512)) == V3_DIR
    assert builtin_autofocus_dir((2048, 1536)) == V3_DIR
    assert builtin_autofocus_dir((256, 256)) == default_model_dir("autofocus")
    assert builtin_autofocus_dir((256, 1024)) == default_model_dir("autofocus")  # the short side decides
    assert builtin_autofocus_dir(None) == default_model_dir("autofocus")
    af, _, _ = load_models(None, None, "ort_cpu", frame_shape=(512, 640))
    assert af.folder.path == V3_DIR and af.describe().startswith("autofocus_v3 (")
    assert load_models(Path(default_model_dir("autofocus")), None, "ort_cpu", frame_shape=(512, 512))[0].pre.wide == 0


def test_committed_autofocus_estimates_signed_defocus() -> None:
    folder = load_model_folder(default_model_dir("autofocus"), "autofocus")
    model = AutofocusModel(folder, OrtBackend(folder, cuda=False))
    for d in (-3.0, -1.0, 1.0, 3.0):
        est = model.estimate(_render(d))
        assert est.defocus_um is not None
        assert abs(est.defocus_um - d) < 0.8, (d, est)
    # Glass: nothing to focus on, the model abstains.
    glass = np.full((256, 256, 3), 238, np.uint8) + np.random.default_rng(0).integers(0, 4, (256, 256, 3), np.uint8)
    assert model.estimate(glass).defocus_um is None


def test_committed_classifier_tells_glass_from_tissue() -> None:
    folder = load_model_folder(default_model_dir("classifier"), "classifier")
    model = TileClassifierModel(folder, OrtBackend(folder, cuda=False))
    glass = np.full((512, 512, 3), 240, np.uint8)
    tissue = _render(0.0)
    got = model.classify_batch([glass, tissue], 0.25)
    assert [g.label for g in got] == ["background", "tissue"]
    assert len(got[1].embedding) == 64


# ---------------------------------------------------------------------------- bad folders


@pytest.fixture()
def folder_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "classifier"
    shutil.copytree(default_model_dir("classifier"), dst)
    return dst


def test_missing_onnx_is_named(folder_copy: Path) -> None:
    (folder_copy / "model.onnx").unlink()
    with pytest.raises(ModelFolderError, match=r"model\.onnx: missing"):
        load_model_folder(folder_copy)


def test_missing_json_is_named(folder_copy: Path) -> None:
    (folder_copy / "model.json").unlink()
    with pytest.raises(ModelFolderError, match=r"model\.json: missing"):
        load_model_folder(folder_copy)


def test_wrong_sha256_is_rejected(folder_copy: Path) -> None:
    blob = bytearray((folder_copy / "model.onnx").read_bytes())
    blob[-10] ^= 0xFF
    (folder_copy / "model.onnx").write_bytes(bytes(blob))
    with pytest.raises(ModelFolderError, match=r"sha256 .* does not match model\.json key 'onnx_sha256'"):
        load_model_folder(folder_copy)


def _edit_json(folder: Path, **changes: Any) -> None:
    meta = json.loads((folder / "model.json").read_text())
    for k, v in changes.items():
        if v is None:
            del meta[k]
        else:
            meta[k] = v
    (folder / "model.json").write_text(json.dumps(meta))


def test_wrong_input_shape_is_rejected(folder_copy: Path) -> None:
    meta = json.loads((folder_copy / "model.json").read_text())
    # Self-consistent JSON (preprocess agrees) that disagrees with the ONNX graph.
    _edit_json(
        folder_copy,
        input={**meta["input"], "shape": ["batch", 3, 32, 32]},
        preprocess={**meta["preprocess"], "size": 32},
    )
    with pytest.raises(ModelFolderError, match=r"graph input shape .* != model\.json key 'input\.shape'"):
        load_model_folder(folder_copy)
    # And JSON that contradicts itself is caught before the graph is opened.
    _edit_json(folder_copy, input={**meta["input"], "shape": ["batch", 3, 32, 32]}, preprocess=meta["preprocess"])
    with pytest.raises(ModelFolderError, match="disagrees with 'preprocess'"):
        load_model_folder(folder_copy, check_graph=False)


def test_wrong_task_and_missing_key(folder_copy: Path) -> None:
    with pytest.raises(ModelFolderError, match="this is a 'classifier' model, expected a 'autofocus' model"):
        load_model_folder(folder_copy, "autofocus")
    _edit_json(folder_copy, onnx_sha256=None)
    with pytest.raises(ModelFolderError, match="missing key 'onnx_sha256'"):
        load_model_folder(folder_copy)
    (folder_copy / "model.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        load_model_folder(folder_copy)


# ---------------------------------------------------------------------------- backend selection


def test_auto_selection_on_this_machine_and_forced_backends() -> None:
    folder = load_model_folder(default_model_dir("classifier"))
    sel = select_backend(folder, "auto")
    # Whatever this machine has, the choice is the first in order that works, and every
    # backend ahead of it is listed with the reason it was refused.
    order = ["tensorrt", "ort_cuda", "ort_cpu"]
    assert list(sel.refused) == order[: order.index(sel.backend.name)]
    if sel.backend.name == "ort_cpu":
        with pytest.raises(InferenceError, match=r"'tensorrt' was forced but cannot run .*tensorrt: "):
            select_backend(folder, "tensorrt")


class _Broken:
    """A backend whose engine builds but returns a wrong batch axis (as a bad engine would)."""

    name = "tensorrt"

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": np.zeros((len(x) + 1, 3), np.float32), "embedding": np.zeros((len(x) + 1, 64), np.float32)}

    def close(self) -> None:
        pass


def test_selection_skips_what_fails_and_never_falls_back_when_forced() -> None:
    folder = load_model_folder(default_model_dir("classifier"))
    everything = {"tensorrt": None, "ort_cuda": None, "ort_cpu": None}

    def no_cuda(_m: Any) -> Any:
        raise RuntimeError("CUDA driver version is insufficient")

    factories: Any = {
        "tensorrt": lambda m: _Broken(),
        "ort_cuda": no_cuda,
        "ort_cpu": lambda m: OrtBackend(m, cuda=False),
    }
    sel = select_backend(folder, "auto", factories=factories, installed=everything)
    assert sel.backend.name == "ort_cpu"
    assert "shape" in sel.refused["tensorrt"] and "insufficient" in sel.refused["ort_cuda"]
    with pytest.raises(InferenceError, match=r"'ort_cuda' was forced.*insufficient"):
        select_backend(folder, "ort_cuda", factories=factories, installed=everything)
    with pytest.raises(InferenceError, match="unknown inference backend"):
        select_backend(folder, "tflite", factories=factories, installed=everything)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- engine cache


def _key(**over: Any) -> EngineKey:
    base: dict[str, Any] = {
        "onnx_sha256": "a" * 64,
        "tensorrt_version": "10.3.0",
        "gpu_name": "Orin",
        "precision": "fp16",
        "input_shape": (7, 64, 64),
        "min_batch": 1,
        "opt_batch": 16,
        "max_batch": 64,
    }
    base.update(over)
    return EngineKey(**base)


def test_engine_cache_builds_once_per_key(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    builds: list[EngineKey] = []

    def builder(key: EngineKey) -> Any:
        def build() -> bytes:
            builds.append(key)
            return f"engine for {key.digest()}".encode()

        return build

    k = _key()
    blob, built = cache.get_or_build(k, builder(k))
    assert built and len(builds) == 1
    assert cache.get_or_build(k, builder(k)) == (blob, False)  # nothing rebuilt needlessly
    # Each ingredient of the key, changed alone, rebuilds exactly once.
    for change in (
        {"onnx_sha256": "b" * 64},
        {"tensorrt_version": "10.4.0"},
        {"gpu_name": "NVIDIA H200"},
        {"precision": "fp32"},
        {"max_batch": 128},
    ):
        k2 = _key(**change)
        n = len(builds)
        assert cache.get_or_build(k2, builder(k2))[1] is True
        assert cache.get_or_build(k2, builder(k2))[1] is False
        assert len(builds) == n + 1
    # The original engine is still there and still valid.
    assert cache.get_or_build(k, builder(k)) == (blob, False)
    # A sidecar that does not match the key (corruption, stray file) forces a rebuild.
    cache.path(k).with_suffix(".json").write_text("{}")
    assert cache.get_or_build(k, builder(k))[1] is True


def test_engine_cache_refuses_an_empty_engine(tmp_path: Path) -> None:
    with pytest.raises(InferenceError, match="empty engine"):
        EngineCache(tmp_path).get_or_build(_key(), lambda: b"")
    assert not EngineCache(tmp_path).path(_key()).exists()


def test_engine_cache_never_follows_planted_links(tmp_path: Path) -> None:
    """The cache lives in the data root: a planted link must neither be loaded nor written through."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.bin"
    victim.write_bytes(b"precious")
    cache_dir = tmp_path / "engines"
    cache_dir.mkdir()
    k = _key()
    cache = EngineCache(cache_dir)
    # An engine file that is a link to a file outside: refused, the target untouched.
    cache.path(k).symlink_to(victim)
    cache.path(k).with_suffix(".json").write_text(json.dumps(k.as_dict()))
    with pytest.raises(InferenceError, match="cannot read cached engine"):
        cache.get_or_build(k, lambda: b"engine")
    assert victim.read_bytes() == b"precious"
    # A stale .partial planted as a link is replaced, never written through.
    cache.path(k).unlink()
    partial = cache_dir / (cache.path(k).name + ".partial")
    partial.symlink_to(victim)
    assert cache.get_or_build(k, lambda: b"engine") == (b"engine", True)
    assert victim.read_bytes() == b"precious" and not cache.path(k).is_symlink()
    # The cache folder itself a link: refused.
    linked = tmp_path / "linked-engines"
    linked.symlink_to(outside, target_is_directory=True)
    with pytest.raises(InferenceError, match="is a link"):
        EngineCache(linked).get_or_build(k, lambda: b"engine")
    assert sorted(p.name for p in outside.iterdir()) == ["victim.bin"]


# ---------------------------------------------------------------------------- focus surface


def test_focus_surface_follows_a_tilted_slide() -> None:
    s = FocusSurface(default_z_um=5.0)
    assert s.predict(0, 0) == 5.0

    def z(x: float, y: float) -> float:
        return 1.0 + 0.0004 * x - 0.00025 * y

    for x in range(0, 1000, 200):  # one row so far: the cross-row slope is unknown, assumed flat
        s.add(x, 0.0, z(x, 0.0))
    assert s.predict(1000, 0) == pytest.approx(z(1000, 0), abs=0.02)
    for x in range(0, 1000, 200):
        s.add(x, 200.0, z(x, 200.0))
    assert s.predict(1000, 400) == pytest.approx(z(1000, 400), abs=0.02)


# ---------------------------------------------------------------------------- export parity


def test_export_parity_and_folder(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    from export.models import TileClassifier
    from export.onnx_export import ParityError, _spec, export_model

    torch.manual_seed(0)
    spec = _spec("TileClassifier")
    spec["model"] = TileClassifier(width=4)  # tiny and untrained: parity does not need accuracy
    samples = np.random.default_rng(0).normal(size=(8, 3, 64, 64)).astype(np.float32)
    meta = export_model(spec["model"], spec, tmp_path / "m", samples, {"note": "untrained"}, {"seed": 0})
    assert meta["parity"]["max_abs_diff"]["logits"] < 1e-4
    folder = load_model_folder(tmp_path / "m", "classifier")  # the runtime accepts what export writes
    assert folder.sha256 == meta["onnx_sha256"]
    out = OrtBackend(folder, cuda=False).run(samples[:5])
    assert out["logits"].shape == (5, 3)  # dynamic batch
    # A tolerance nothing can meet fails loudly, and leaves no folder behind.
    with pytest.raises(ParityError, match="differ beyond atol"):
        export_model(spec["model"], spec, tmp_path / "bad", samples, {}, {}, atol=-1.0)
    assert not (tmp_path / "bad").exists()


def test_model_json_is_rewritten_whole_in_the_exporters_form(tmp_path: Path) -> None:
    """``write_model_json``: a copied builtin folder with one key changed still loads, keeps its µ
    unescaped, ends with a newline and leaves no temporary file behind."""
    folder = tmp_path / "af"
    shutil.copytree(default_model_dir("autofocus"), folder)
    meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    meta["note"] = "pixel 0.25 µm"
    path = write_model_json(folder, meta)
    text = path.read_text(encoding="utf-8")
    assert "0.25 µm" in text and "\\u00b5" not in text and text.endswith("}\n")
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx"]
    assert load_model_folder(folder, "autofocus").meta["note"] == "pixel 0.25 µm"
