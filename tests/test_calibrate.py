"""Self-labelled calibration: stack labels against the simulator's truth, weight recovery from
ONNX, and a tiny calibration whose model folder loads and runs a scan in the daemon."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hw_sim.synth import SynthParams, synthesize
from runtime.devices.recording import Recording
from runtime.focus.stack_labels import LabelParams, fit_peak, label_stack
from runtime.ml.model_folder import MODELS_DIR, load_model_folder

# An objective outside the committed models' training range (opposite-sign aberrations), fields
# far apart (stage error) so each sees other tissue, and tissue only in part of the area: the
# stacks cover about ±5 µm around a coarse focus that is up to 1 µm off.
PARAMS = SynthParams(
    fields_x=3,
    fields_y=2,
    seed=41,
    tile=256,
    z_planes=21,
    z_step_um=0.5,
    stage_error_um=20.0,
    spherical_waves=-0.08,
    chromatic_shift_um=(-0.15, 0.0, 0.2),
)


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("cal") / "rec.zarr", PARAMS)


def _stack(rec: Recording, f: int) -> list[np.ndarray]:
    return [rec.plane(f, k) for k in range(rec.meta.n_z)]


# --------------------------------------------------------------------------- labels


def test_stack_labels_match_the_truth(recording: Path) -> None:
    rec = Recording.open(recording)
    truth = rec.truth_focus_z_um
    assert truth is not None
    errors = []
    for f in range(rec.meta.n_fields):
        lab = label_stack(f, rec.z_um[f], _stack(rec, f))
        if lab.focus_z_um is not None:
            errors.append(lab.focus_z_um - float(truth[f]))
            assert lab.status == "ok" and lab.regions_used >= 2
    assert len(errors) >= 4, errors  # the test slide puts tissue under most fields
    assert np.max(np.abs(errors)) <= 0.15, errors


def test_flat_and_noise_only_stacks_are_skipped(recording: Path) -> None:
    rec = Recording.open(recording)
    z = rec.z_um[0]
    rng = np.random.default_rng(0)
    glass = [np.clip(rng.normal(235, 3, (256, 256, 3)), 0, 255).astype(np.uint8) for _ in z]
    assert label_stack(0, z, glass).status == "no_content"
    # Tissue that never comes into focus: every plane is the same (out-of-focus) frame plus noise.
    frame = rec.plane(0, 0).astype(np.float32)
    flat = [np.clip(frame + rng.normal(0, 4, frame.shape), 0, 255).astype(np.uint8) for _ in z]
    lab = label_stack(0, z, flat)
    assert lab.focus_z_um is None and lab.status == "no_content", lab


def _gauss(z: np.ndarray, mu: float, sigma: float = 0.8, height: float = 10.0) -> np.ndarray:
    return 1.0 + height * np.exp(-0.5 * ((z - mu) / sigma) ** 2)


def test_peak_fit_survives_noise_edges_and_two_peaks() -> None:
    z = np.arange(41) * 0.5 - 10.0
    rng = np.random.default_rng(3)
    for mu in (-3.3, 0.12, 4.71):
        noisy = _gauss(z, mu) * (1 + rng.normal(0, 0.03, z.shape))
        fit = fit_peak(z, noisy)
        assert fit.status == "ok" and fit.z_um is not None and abs(fit.z_um - mu) < 0.1, (mu, fit)
    assert fit_peak(z, 1.0 + rng.normal(0, 0.02, z.shape)).status == "flat"
    assert fit_peak(z, _gauss(z, 10.6)).status == "edge"  # focus beyond the last plane
    assert fit_peak(z, _gauss(z, -10.4)).status == "edge"
    # Two comparable peaks (dust on the cover glass above the tissue): ambiguous, no label.
    assert fit_peak(z, _gauss(z, -4.0) + _gauss(z, 3.0, height=9.0) - 1).status == "ambiguous"
    # A dominant peak and a small one: the dominant one, not a blend.
    two = fit_peak(z, _gauss(z, -4.0) + _gauss(z, 3.0, height=3.0) - 1)
    assert two.status == "ok" and two.z_um is not None and abs(two.z_um + 4.0) < 0.1, two
    assert fit_peak(z[:4], _gauss(z[:4], -9.0)).status == "too_few_planes"


def test_field_label_is_robust_to_one_bad_region() -> None:
    from runtime.focus.stack_labels import label_curves

    z = np.arange(25) * 0.5 - 6.0
    curves = np.stack([_gauss(z, 1.0 + d) for d in (0.0, 0.05, -0.05, 0.02)] + [_gauss(z, -4.0)], axis=1)
    lab = label_curves(0, z, curves, LabelParams())
    assert lab.status == "ok" and lab.focus_z_um is not None and abs(lab.focus_z_um - 1.0) < 0.06, lab


# --------------------------------------------------------------------------- weight recovery


@pytest.mark.parametrize("name", ["autofocus", "autofocus_v2", "autofocus_v3"])
def test_recovered_weights_reproduce_the_onnx_model(recording: Path, name: str) -> None:
    pytest.importorskip("torch")
    from export.calibrate import recover_autofocus, recovery_error

    folder = load_model_folder(MODELS_DIR / name, "autofocus")
    model = recover_autofocus(folder)
    rec = Recording.open(recording)
    pre = folder.autofocus_preprocess()
    x = np.concatenate([pre.inputs(rec.plane(f, k)) for f in (0, 3) for k in (0, 10, 20)])
    err = recovery_error(model, folder, x)
    assert max(err.values()) < 1e-4, err


# --------------------------------------------------------------------------- calibration end to end


def test_tiny_calibration_loads_and_runs_in_the_daemon(
    recording: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    from export.__main__ import main

    # The calibration path must never read the truth.
    def _no_truth(self: Recording) -> None:
        raise AssertionError("calibration read the recording's truth")

    monkeypatch.setattr(Recording, "truth_focus_z_um", property(_no_truth))
    monkeypatch.setattr(Recording, "truth_actual_xy_um", property(_no_truth))
    out = tmp_path / "af-cal"
    rc = main(
        [
            "calibrate",
            str(recording),
            "--init",
            str(MODELS_DIR / "autofocus"),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--crops",
            "2",
            "--holdout",
            "0.3",
        ]
    )
    assert rc == 0
    monkeypatch.undo()
    folder = load_model_folder(out, "autofocus")
    meta = folder.meta
    cal = meta["calibration"]
    init = load_model_folder(MODELS_DIR / "autofocus", "autofocus")
    assert cal["init_model"]["onnx_sha256"] == init.sha256
    assert cal["recordings"][0]["path"] == str(recording) and cal["recordings"][0]["fields"]
    assert cal["label_method"]["name"] == "stack_sharpness_peak"
    assert cal["heldout_fields"] and cal["train_fields"]
    # Estimate then refit (the default): the hold-out pass is split by field, the refit trains on every field.
    assert (
        cal["procedure"]["name"] == "estimate_then_refit"
        and cal["procedure"]["heldout_metrics_model"] == "holdout_pass"
    )
    held = {(h["recording"], h["field"]) for h in cal["heldout_fields"]}
    estimated = {(t["recording"], t["field"]) for t in cal["holdout_pass"]["train_fields"]}
    assert estimated and not held & estimated  # split by field
    assert held | estimated == {(t["recording"], t["field"]) for t in cal["train_fields"]}
    assert len(cal["train_fields"]) == cal["fields_labelled"]
    for key in ("heldout_metrics_before", "heldout_metrics_after"):
        assert {"mae_um", "sign_accuracy_abs_ge_1um"} <= set(cal[key]), cal[key]
    assert meta["parity"]["max_abs_diff"]["defocus_um"] <= meta["parity"]["atol"]
    assert meta["preprocess"] == init.meta["preprocess"]
    assert meta["training"]["commands"][0].startswith("python -m export calibrate ")
    assert cal["method"]["contrast_jitter"] == 0.1 and cal["method"]["tta"] == 4  # the defaults since stop 31

    from tests.test_daemon import _wait_idle, live_daemon

    with live_daemon(
        tmp_path,
        "cal",
        recording,
        focus={"strategy": "single_shot"},
        models={"backend": "ort_cpu", "autofocus_dir": str(out)},
    ) as (_, client):
        client.request("start_scan", output_name="calibrated")
        assert _wait_idle(client)["last_finish"] == "completed"
    report = json.loads((tmp_path / "data" / "calibrated" / "report.json").read_text())
    assert len(report["fields"]) == PARAMS.fields_x * PARAMS.fields_y
    assert all(f["focus_method"].startswith("single_shot") for f in report["fields"])
    assert report["inference"]["autofocus_model"].startswith("af-cal ("), report["inference"]


def test_frozen_front_calibration_keeps_the_front_and_records_the_method(recording: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import onnx
    from onnx import numpy_helper

    from export.calibrate import DIHEDRAL, calibrate, front_features, recover_autofocus

    init = load_model_folder(MODELS_DIR / "autofocus", "autofocus")
    out = tmp_path / "af-frozen"
    cal = calibrate(
        [recording], MODELS_DIR / "autofocus", out, epochs=1, crops=2, holdout=0.3, freeze_blocks=6, refit=False
    )  # one pass: quick (the refit runs the same train_pass)
    assert cal["method"]["name"] == "frozen_front" and cal["method"]["frozen_blocks"] == 6
    assert cal["procedure"]["name"] == "single_pass" and cal["holdout_pass"] is None
    assert cal["method"]["batch"] == 256 and cal["lr"] == 1e-3  # the frozen method's own defaults
    assert cal["method"]["contrast_jitter"] == 0.0  # its front features are cached: nothing to jitter
    assert cal["history"] and {"mae_um", "sign_accuracy_abs_ge_1um"} <= set(cal["heldout_metrics_after"])
    folder = load_model_folder(out, "autofocus")
    assert folder.meta["parity"]["max_abs_diff"]["defocus_um"] <= folder.meta["parity"]["atol"]

    def conv_weights(path: Path) -> list[np.ndarray]:
        g = onnx.load(str(path)).graph
        inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        return [inits[n.input[1]] for n in g.node if n.op_type == "Conv"]

    before, after = conv_weights(init.onnx_path), conv_weights(folder.onnx_path)
    for k in range(6):
        np.testing.assert_array_equal(before[k], after[k], err_msg=f"frozen block {k + 1} changed")
    assert not np.array_equal(before[6], after[6])  # the last block was trained

    # The cached features: transform 0 is the untransformed crop, and all 8 transforms are present.
    model = recover_autofocus(init)
    x = init.autofocus_preprocess().inputs(Recording.open(recording).plane(0, 10))[:3].astype(np.float16)
    feats = front_features(model.features[:6], x)
    assert feats.shape[:2] == (DIHEDRAL, 3)
    import torch

    with torch.no_grad():
        ref = model.features[:6](torch.from_numpy(x.astype(np.float32)))
    np.testing.assert_allclose(feats[0].float().numpy(), ref.numpy(), atol=2e-2, rtol=1e-2)


def _onnx_weights(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path / "model.onnx")).graph.initializer}


def test_refit_exports_the_every_field_model_with_the_holdout_pass_metrics(recording: Path, tmp_path: Path) -> None:
    """Estimate then refit: the exported model is the one a single pass on every labelled field trains
    (holdout 0, which has no held-out metrics and is never trusted at start), and model.json's held-out
    metrics -- which the scan's near-focus trust reads -- are the hold-out pass's: those of the single
    pass with the same split (``refit=False``, whose exported model they measure)."""
    pytest.importorskip("torch")
    from export.calibrate import calibrate
    from runtime.ml.model_folder import calibrated_near_focus_mae_um

    init, tiny = MODELS_DIR / "autofocus", {"epochs": 1, "crops": 2}
    every = calibrate([recording], init, tmp_path / "af-all", holdout=0.0, **tiny)
    single = calibrate([recording], init, tmp_path / "af-single", holdout=0.3, refit=False, **tiny)
    refit = calibrate([recording], init, tmp_path / "af-refit", holdout=0.3, **tiny)

    # holdout 0: every labelled field trains, nothing held out, the training fit recorded.
    assert every["fields_labelled"] >= 4 and len(every["train_fields"]) == every["fields_labelled"]
    assert every["heldout_fields"] == [] and every["heldout_metrics_after"] == {}
    assert every["procedure"]["name"] == "single_pass" and every["procedure"]["heldout_metrics_model"] is None
    for key in ("train_metrics_before", "train_metrics_after"):
        assert {"mae_um", "sign_accuracy_abs_ge_1um"} <= set(every[key]), every[key]
    assert calibrated_near_focus_mae_um(tmp_path / "af-all") is None
    assert load_model_folder(tmp_path / "af-all", "autofocus").meta["heldout_metrics"] == {}

    # The single pass: its own model is what the held-out metrics measure.
    assert single["procedure"]["name"] == "single_pass" and single["procedure"]["heldout_metrics_model"] == "exported"
    assert single["holdout_pass"] is None and len(single["train_fields"]) < single["fields_labelled"]

    # The refit: exported = the every-field model, bit for bit; held-out figures = the single pass's.
    assert refit["procedure"]["name"] == "estimate_then_refit"
    assert refit["train_fields"] == every["train_fields"] and refit["output_line"] == every["output_line"]
    assert refit["heldout_fields"] == single["heldout_fields"]
    assert refit["holdout_pass"]["train_fields"] == single["train_fields"]
    assert refit["holdout_pass"]["output_line"] == single["output_line"]
    assert refit["heldout_metrics_before"] == single["heldout_metrics_before"]
    assert refit["heldout_metrics_after"] == single["heldout_metrics_after"]
    assert refit["train_metrics_after"] == every["train_metrics_after"]
    exported, all_w, single_w = (_onnx_weights(tmp_path / d) for d in ("af-refit", "af-all", "af-single"))
    assert exported.keys() == all_w.keys()
    for name, w in exported.items():
        np.testing.assert_array_equal(w, all_w[name], err_msg=name)
    assert any(not np.array_equal(w, single_w[name]) for name, w in exported.items())
    near = refit["heldout_metrics_after"]["mae_near_focus_um"]
    assert calibrated_near_focus_mae_um(tmp_path / "af-refit") == pytest.approx(near)
    meta = load_model_folder(tmp_path / "af-refit", "autofocus").meta
    assert meta["heldout_metrics"]["model"].startswith("holdout_pass")
    assert meta["heldout_metrics"]["mae_um"] == refit["heldout_metrics_after"]["mae_um"]


def test_the_holdout_metrics_record_the_95th_percentile_of_the_near_focus_error() -> None:
    """``near_focus_abs_error_q95_um`` (what the scan spends out of its tolerance before a calibrated model keeps a
    frame unchecked) is the 95th percentile of |estimate - true| over the tiles within 2 µm of focus -- the tiles
    ``mae_near_focus_um`` averages -- leaving out farther tiles and abstentions; NaN with no such tile."""
    pytest.importorskip("torch")
    from export.calibrate import metrics

    true = np.array([-6.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 5.0])
    err = np.array([4.0, 2.0, 0.1, 0.2, 0.05, 0.0, 0.9, -0.1, 0.3, -0.15, 0.1, 3.0, 1.0])
    est = true + err
    est[6] = np.nan  # an abstention (its error 0.9 must not count)
    m = metrics(true, est)
    near = np.abs(err[[2, 3, 4, 5, 7, 8, 9, 10]])
    assert m["near_focus_abs_error_q95_um"] == pytest.approx(float(np.quantile(near, 0.95)))
    assert m["mae_near_focus_um"] == pytest.approx(float(near.mean()))
    assert m["near_focus_abs_error_q95_um"] > m["mae_near_focus_um"]
    assert np.isnan(metrics(np.array([-5.0, 4.0]), np.array([-4.0, 4.5]))["near_focus_abs_error_q95_um"])


def test_contrast_jitter_scales_each_crops_contrast_channels_by_one_gain() -> None:
    """Every channel but the spectrum (6) of crop i is multiplied by the same gain exp(sigma n_i); the
    spectrum channel is left as it is; the gains' log spread is sigma. 7- and 10-channel inputs."""
    pytest.importorskip("torch")
    import torch

    from export.calibrate import jitter_contrast
    from runtime.ml.preprocess import SPECTRUM_CHANNEL

    for channels in (7, 10):
        x = torch.rand(400, channels, 8, 8) + 0.5
        y = jitter_contrast(x, 0.2, torch.Generator().manual_seed(1))
        ratio = (y / x).reshape(400, channels, -1)
        torch.testing.assert_close(ratio[:, SPECTRUM_CHANNEL], torch.ones(400, 64))
        contrast = [c for c in range(channels) if c != SPECTRUM_CHANNEL]
        gain = ratio[:, contrast[0], :1]
        torch.testing.assert_close(ratio[:, contrast], gain.unsqueeze(1).expand(400, len(contrast), 64))
        assert 0.17 < float(gain.log().std()) < 0.23, float(gain.log().std())
        torch.testing.assert_close(jitter_contrast(x, 0.0, torch.Generator().manual_seed(1)), x)


def test_contrast_jitter_changes_the_fine_tune_and_is_recorded(recording: Path, tmp_path: Path) -> None:
    """``contrast_jitter`` 0.2 (``--contrast-jitter``) and 0 (off) train different models from the default (0.1)
    on the same crops and steps, and model.json's method records which."""
    pytest.importorskip("torch")
    from export.calibrate import CONTRAST_JITTER, calibrate

    init, tiny = MODELS_DIR / "autofocus", {"epochs": 1, "crops": 2, "holdout": 0.0}
    default = calibrate([recording], init, tmp_path / "af-default", **tiny)
    jitter = calibrate([recording], init, tmp_path / "af-jitter", contrast_jitter=CONTRAST_JITTER, **tiny)
    off = calibrate([recording], init, tmp_path / "af-off", contrast_jitter=0.0, **tiny)
    assert default["method"]["contrast_jitter"] == 0.1 and "contrast" in default["method"]["augment"]
    assert jitter["method"]["contrast_jitter"] == 0.2 and "contrast" in jitter["method"]["augment"]
    assert off["method"]["contrast_jitter"] == 0.0 and "contrast" not in off["method"]["augment"]
    assert default["output_line"] == jitter["output_line"]  # same init, fields and crops: only the fine-tune differs
    w_default, w_jitter = _onnx_weights(tmp_path / "af-default"), _onnx_weights(tmp_path / "af-jitter")
    w_off = _onnx_weights(tmp_path / "af-off")
    assert any(not np.array_equal(w, w_default[name]) for name, w in w_jitter.items())
    assert any(not np.array_equal(w, w_default[name]) for name, w in w_off.items())
    meta = load_model_folder(tmp_path / "af-jitter", "autofocus").meta
    assert meta["calibration"]["method"]["contrast_jitter"] == 0.2


def test_l2sp_keeps_the_fine_tuned_weights_near_where_they_started(recording: Path) -> None:
    """L2-SP (``--l2sp``): the same steps on the same crops end closer to the starting weights with
    the term than without it."""
    pytest.importorskip("torch")
    import torch

    from export.calibrate import fine_tune, recover_autofocus

    init = load_model_folder(MODELS_DIR / "autofocus", "autofocus")
    rec = Recording.open(recording)
    pre = init.autofocus_preprocess()
    x = np.concatenate([pre.inputs(rec.plane(f, k)) for f in (0, 3) for k in (2, 10, 18)]).astype(np.float16)
    y = np.repeat(np.asarray([-4.0, 0.0, 4.0, -4.0, 0.0, 4.0], np.float32), len(x) // 6)
    content = np.ones(len(x), np.float32)

    def distance(l2sp: float) -> float:
        model = recover_autofocus(init)
        start = [p.detach().clone() for p in model.parameters()]
        fine_tune(model, x, y, content, epochs=2, lr=1e-3, seed=0, batch=8, l2sp=l2sp)
        with torch.no_grad():
            return float(sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), start, strict=True)))

    free, held = distance(0.0), distance(10.0)
    assert 0 < held < 0.5 * free, (held, free)


def test_dihedral_mean_averages_every_output_over_its_transforms() -> None:
    """``DihedralMean`` (``--tta``): each output of a crop is the mean of the plain model's outputs on that
    crop's flips/turns -- per crop, not mixed across the batch."""
    pytest.importorskip("torch")
    import torch

    from export.calibrate import TTA_TRANSFORMS, DihedralMean, recover_autofocus, torch_dihedral, with_tta

    folder = load_model_folder(MODELS_DIR / "autofocus", "autofocus")
    model = recover_autofocus(folder)
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(5, *folder.input_shape)).astype(np.float32))
    assert with_tta(model, 1) is model
    for k in (2, 4, 8):
        tta = with_tta(model, k)
        assert isinstance(tta, DihedralMean) and tta.transforms == TTA_TRANSFORMS[k]
        with torch.no_grad():
            got = tta(x)
            per = [model(torch_dihedral(x, d)) for d in TTA_TRANSFORMS[k]]
        assert len(got) == len(per[0])
        for i, out in enumerate(got):
            want = torch.stack([p[i] for p in per]).mean(0)
            assert out.shape == (5,)
            np.testing.assert_allclose(out.numpy(), want.numpy(), atol=1e-5)
        assert not np.allclose(got[0].numpy(), model(x)[0].detach().numpy(), atol=1e-4)  # the crops are not symmetric


def test_tta_exports_the_same_weights_in_a_graph_that_averages_the_transforms(recording: Path, tmp_path: Path) -> None:
    """``tta`` 4 (the default) trains exactly what ``tta`` 1 trains (same ONNX weights) and exports a graph whose
    outputs are the plain graph's averaged over the four quarter turns of each crop; model.json records it, and
    the folder recalibrates (its recovered weights reproduce it through the same averaging)."""
    pytest.importorskip("torch")
    import onnxruntime as ort

    from export.calibrate import TTA_TRANSFORMS, calibrate, recover_autofocus
    from runtime.ml.tasks import dihedral

    init, tiny = MODELS_DIR / "autofocus", {"epochs": 1, "crops": 2, "holdout": 0.0}
    default = calibrate([recording], init, tmp_path / "af-default", tta=1, **tiny)
    tta = calibrate([recording], init, tmp_path / "af-tta", **tiny)
    assert default["method"]["tta"] == 1 and tta["method"]["tta"] == 4
    assert tta["method"]["tta_transforms"] == list(TTA_TRANSFORMS[4])
    folder = load_model_folder(tmp_path / "af-tta", "autofocus")
    w_default = recover_autofocus(load_model_folder(tmp_path / "af-default", "autofocus")).state_dict()
    w_tta = recover_autofocus(folder).state_dict()  # the same 7 convolutions and head in the averaging graph
    for name, w in w_default.items():
        np.testing.assert_array_equal(w_tta[name].numpy(), w.numpy())
    assert folder.meta["calibration"]["method"]["tta"] == 4
    rec = Recording.open(recording)
    x = folder.autofocus_preprocess().inputs(rec.plane(1, 12)).astype(np.float32)
    plain = ort.InferenceSession(str(tmp_path / "af-default" / "model.onnx"), providers=["CPUExecutionProvider"])
    avg = ort.InferenceSession(str(folder.onnx_path), providers=["CPUExecutionProvider"])
    names = list(folder.output_names)
    got = avg.run(names, {folder.input_name: x})
    per = [plain.run(names, {folder.input_name: dihedral(x, d)}) for d in TTA_TRANSFORMS[4]]
    for i, out in enumerate(got):
        np.testing.assert_allclose(out, np.mean([p[i] for p in per], axis=0), atol=1e-4)
    assert not np.allclose(got[0], plain.run(names, {folder.input_name: x})[0], atol=1e-3)
    again = calibrate([recording], tmp_path / "af-tta", tmp_path / "af-again", tta=1, **tiny)  # recovery check passes
    assert again["method"]["tta"] == 1 and max(again["init_model"]["recovery_max_abs_diff"].values()) <= 1e-3


def test_calibrate_cli_rejects_threads_below_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export.__main__ import main as export_main

    with pytest.raises(SystemExit) as exc:
        export_main(["calibrate", str(tmp_path), "--init", "builtin", "--out", str(tmp_path / "o"), "--threads", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--threads must be >= 1, got 0" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- content targets from the stack


def _half_glass(recording: Path, out: Path) -> Path:
    """A one-field recording of 512 px frames: the left half tissue (a field of ``recording``, twice),
    the right half the same out-of-focus tissue in every plane (the stack's farthest frame, mirrored,
    with fresh camera-like noise per plane): what a pale shape under the cover glass shows, content to
    the eye and to the init model, with no sharpness peak: the labeller's right regions are flat."""
    from dataclasses import replace

    from runtime.devices.recording import RecordingWriter

    rec = Recording.open(recording)
    f = next(f for f in range(rec.meta.n_fields) if label_stack(f, rec.z_um[f], _stack(rec, f)).status == "ok")
    rng = np.random.default_rng(5)
    stack = np.empty((rec.meta.n_z, 512, 512, 3), np.uint8)
    far = rec.plane(f, 0)[:, ::-1].astype(np.float64)
    for k in range(rec.meta.n_z):
        tissue = rec.plane(f, k)
        stack[k, :, :256] = np.concatenate([tissue, tissue])
        shape = np.concatenate([far, far]) + rng.normal(0.0, 1.0, (512, 256, 3))
        stack[k, :, 256:] = np.clip(shape, 0, 255).astype(np.uint8)
    px = rec.meta.pixel_size_um
    meta = replace(
        rec.meta,
        tile_height=512,
        tile_width=512,
        n_fields=1,
        rows=1,
        cols=1,
        field_width_um=512 * px,
        field_height_um=512 * px,
    )
    w = RecordingWriter(out, meta)
    w.write_field(0, stack, rec.z_um[f], (0.0, 0.0), (0, 0))
    return out


def test_each_crop_carries_its_region_s_stack_verdict(recording: Path, tmp_path: Path) -> None:
    """``field_inputs`` marks every crop with the verdict of the labeller's region under its centre: 1 on
    the tissue half (regions with a peak), 0 on the glass half (flat); ``content_targets`` takes them over
    the init model's probabilities, which it keeps where a region has no verdict."""
    pytest.importorskip("torch")
    from export.calibrate import content_targets, field_inputs

    rec = Recording.open(_half_glass(recording, tmp_path / "half.zarr"))
    lab = label_stack(0, rec.z_um[0], _stack(rec, 0))
    assert lab.status == "ok" and len(lab.region_status) == 16
    status = np.asarray(lab.region_status).reshape(4, 4)
    assert (status[:, 2:] == "flat").all() and (status[:, :2] == "ok").sum() >= 6, status
    assert lab.to_dict()["region_status"] == list(lab.region_status)
    pre = load_model_folder(MODELS_DIR / "autofocus", "autofocus").autofocus_preprocess()
    fd = field_inputs(rec, 0, lab, pre, 12.0)
    per_plane = len(fd.x) // len(np.unique(fd.plane))
    assert per_plane == 16 and len(fd.stack_content) == len(fd.x)
    _, at = pre.inputs_at(rec.plane(0, 0))
    on_glass = np.asarray([cx + 32 >= 256 for _, _, _, cx in at])
    assert on_glass.sum() == 8  # the right windows' crops
    first = fd.stack_content[fd.plane == fd.plane[0]]
    assert (first[on_glass] == 0).all() and np.isin(first[~on_glass], [1.0]).sum() >= 6
    init = np.full(4, 0.7, np.float32)
    got = content_targets(init, np.asarray([0.0, 1.0, np.nan, 0.0], np.float32))
    assert got.tolist() == pytest.approx([0.0, 1.0, 0.7, 0.0])


def test_stack_content_targets_teach_the_content_head_the_flat_regions(recording: Path, tmp_path: Path) -> None:
    """Calibrated with ``content_from_stack`` the content head reads the glass half's crops as less content
    than a calibration on the init model's own targets does, and model.json records which targets it used."""
    pytest.importorskip("torch")
    from export.calibrate import calibrate, field_inputs, predict, recover_autofocus

    half = _half_glass(recording, tmp_path / "half.zarr")
    tiny = {"epochs": 3, "crops": 8, "holdout": 0.0, "tta": 1}
    stack = calibrate([half], MODELS_DIR / "autofocus", tmp_path / "af-stack", content_from_stack=True, **tiny)
    init = calibrate([half], MODELS_DIR / "autofocus", tmp_path / "af-init", **tiny)
    assert stack["method"]["content_targets"] == "stack_region_verdicts"
    assert init["method"]["content_targets"] == "init_model"
    rec = Recording.open(half)
    lab = label_stack(0, rec.z_um[0], _stack(rec, 0))
    folder = load_model_folder(tmp_path / "af-stack", "autofocus")
    fd = field_inputs(rec, 0, lab, folder.autofocus_preprocess(), 12.0)
    flat = fd.stack_content == 0
    x = fd.x.astype(np.float32)
    c_stack = predict(recover_autofocus(folder), x)[1]
    c_init = predict(recover_autofocus(load_model_folder(tmp_path / "af-init", "autofocus")), x)[1]
    print(float(c_init[flat].mean()), float(c_stack[flat].mean()), float(c_stack[~flat].mean()))
    assert c_stack[flat].mean() < c_init[flat].mean() - 0.1
    assert c_stack[~flat].mean() > 0.5


def test_tta_wrap_averages_the_folders_own_outputs_over_quarter_turns(tmp_path: Path) -> None:
    """``export tta`` puts a folder's weights, unchanged, in a graph whose outputs are the plain graph's
    averaged over the quarter turns of each crop; the folder says what it wraps, stays uncalibrated to
    the scan (no held-out error recorded), and a folder that already averages is refused."""
    pytest.importorskip("torch")
    import onnxruntime as ort

    from export.__main__ import main
    from export.calibrate import TTA_TRANSFORMS, CalibrationError, folder_tta
    from runtime.ml.model_folder import calibrated_near_focus_error_um
    from runtime.ml.tasks import dihedral

    init = MODELS_DIR / "autofocus_v3"
    assert main(["tta", str(init), "--out", str(tmp_path / "v3-tta")]) == 0
    folder = load_model_folder(tmp_path / "v3-tta", "autofocus")
    assert folder_tta(folder) == 4 and folder.meta["test_time_averaging"]["tta_transforms"] == list(TTA_TRANSFORMS[4])
    plain_folder = load_model_folder(init, "autofocus")
    assert folder.meta["test_time_averaging"]["init_model"]["onnx_sha256"] == plain_folder.sha256
    assert calibrated_near_focus_error_um(folder.path) is None
    x = np.random.default_rng(3).normal(0.0, 1.0, (5, *folder.input_shape[-3:])).astype(np.float32)
    names = list(folder.output_names)
    plain = ort.InferenceSession(str(plain_folder.onnx_path), providers=["CPUExecutionProvider"])
    avg = ort.InferenceSession(str(folder.onnx_path), providers=["CPUExecutionProvider"])
    got = avg.run(names, {folder.input_name: x})
    per = [plain.run(names, {plain_folder.input_name: dihedral(x, d)}) for d in TTA_TRANSFORMS[4]]
    for i, out in enumerate(got):
        np.testing.assert_allclose(out, np.mean([p[i] for p in per], axis=0), atol=1e-4)
    assert not np.allclose(got[0], plain.run(names, {plain_folder.input_name: x})[0], atol=1e-3)
    with pytest.raises(CalibrationError, match="already averages 4 transforms"):  # run_cli prints it, no traceback
        main(["tta", str(tmp_path / "v3-tta"), "--out", str(tmp_path / "again")])
    assert not (tmp_path / "again").exists()
