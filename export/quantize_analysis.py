"""Int8 copies of the slide-analysis CNNs (nuclei detector, tumour patch classifier) for ONNX Runtime CPU.

Static quantization (``onnxruntime.quantization.quantize_static``, QDQ format, int8 weights per
output channel, uint8 activations, min-max ranges) calibrated on the windows and patches the
runtime's own analyzer (:class:`runtime.analysis.pipeline.SlideAnalyzer`) sends to the float model
on bench-style slides of training-range seeds (never a held-out one). The folder keeps the float
folder's ``model.json`` (preprocess, figures, fits) with the new sha256, a ``quantized`` record
(command, calibration seeds and counts, the float model's sha256) and a ``parity`` block: the
int8 graph against the float one on other slides' inputs (max |difference| per output, and for
the nuclei model how many detections agree within 1 µm, also on scikit-image's IHC image, content
the simulator never drew); the tumour model's ``unseen_content`` is measured again on the int8 graph.
Only convolutions (with their ReLU, and the nuclei model's upsampling and skip additions) are
quantized: the tumour model's pooling and Gemm head and the nuclei model's 1 x 1 output convolution
stay float (see :data:`QUANTIZED_OPS`, :func:`head_nodes`).

    python -m export.quantize_analysis runtime/ml/builtin/nuclei runtime/ml/builtin/nuclei_int8
    python -m export.quantize_analysis runtime/ml/builtin/tumour runtime/ml/builtin/tumour_int8

The float folder stays: the int8 one is for ONNX Runtime CPU (TensorRT and CUDA take the float model;
:mod:`runtime.analysis.models` says which int8 copy the runtime takes by default).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import run_cli
from runtime.ml.model_folder import write_model_json

# Training-range seeds (the nuclei model's; below the held-out 900000+). Slide i is bench.analysis.slide_kind(i):
# tumour, benign, small, benign, ...: three slides of large lesions, whose most confident patches set the
# range of the tumour model's last features (a range from benign tissue alone clips the embedding there).
CALIBRATION_SEEDS = tuple(range(200_000, 200_008))
PARITY_SEEDS = (200_010, 200_011)
SLIDE_UM = 1000.0
MAX_NUCLEI_WINDOWS = 128
MAX_TUMOUR_PATCHES = 4096
QUANTIZED_OPS = ["Conv", "Relu", "Add", "Resize"]  # the nuclei model's Resize/Add stay int8 between its convs
PARITY_ATOL = {"heatmap": 0.15, "probability": 0.1, "embedding": 0.5}  # int8 rounding, not a float parity


class _Recorder:
    """A backend that runs the float model and keeps every input it was given."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name = inner, inner.name
        self.inputs: list[np.ndarray] = []

    def run(self, x: np.ndarray) -> dict[str, Any]:
        self.inputs.append(np.array(x, np.float32, copy=True))
        out: dict[str, Any] = self.inner.run(x)
        return out

    def close(self) -> None:
        self.inner.close()


def model_inputs(task: str, folder: Path, seeds: Sequence[int], size_um: float) -> np.ndarray:
    """The float model's inputs (N, C, H, W) on the slides of ``seeds`` as the analyzer cuts them."""
    from bench.analysis import ArraySource, render_slide
    from runtime.analysis.models import load_nuclei_model, load_tumour_model
    from runtime.analysis.pipeline import ModelSet, analyze_source

    tumour = load_tumour_model(folder if task == "tumour" else None, "ort_cpu")
    nuclei = load_nuclei_model(folder if task == "nuclei" else None, "ort_cpu")
    rec = _Recorder(tumour.backend if task == "tumour" else nuclei.backend)
    (tumour if task == "tumour" else nuclei).backend = rec
    for i, seed in enumerate(seeds):
        slide = render_slide(seed, i, size_um, held_out=False)
        analyze_source(
            ArraySource(slide.levels, 0.5), ModelSet(tumour, nuclei if task == "nuclei" else None, None), subdivide=2
        )
    return np.concatenate(rec.inputs) if rec.inputs else np.zeros((0,), np.float32)


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over an array of inputs, ``batch`` at a time."""

    def __init__(self, name: str, x: np.ndarray, batch: int) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(
            [{name: np.ascontiguousarray(x[i : i + batch])} for i in range(0, len(x), batch)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _run(path: Path, name: str, x: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    got = [sess.run(outs, {name: x[i : i + batch]}) for i in range(0, len(x), batch)]
    return {o: np.concatenate([g[k] for g in got]) for k, o in enumerate(outs)}


def _peaks_agree(a: np.ndarray, b: np.ndarray, pre: dict[str, Any]) -> dict[str, Any]:
    """Detections of two heatmap stacks (N, 1, h, w) and how many agree one-to-one within 1 µm."""
    from scipy.spatial import cKDTree

    from runtime.analysis.nuclei import find_peaks

    na = nb = both = 0
    radius = 1.0 / (float(pre["stride"]) * 0.5)  # 1 µm in heat cells (stride px of 0.5 µm)
    for ha, hb in zip(a[:, 0], b[:, 0], strict=True):
        pa = find_peaks(ha, float(pre["threshold"]), int(pre["min_distance"]))
        pb = find_peaks(hb, float(pre["threshold"]), int(pre["min_distance"]))
        na, nb = na + len(pa), nb + len(pb)
        if len(pa) and len(pb):
            d, j = cKDTree(pb).query(pa, distance_upper_bound=radius)
            ok = np.isfinite(d)
            both += len(set(j[ok].tolist()))
    return {"float": na, "int8": nb, "agree_within_1um": both}


def ihc_detections(float_dir: Path, int8_dir: Path) -> dict[str, Any]:
    """Both nuclei models on content the simulator never drew (scikit-image's immunohistochemistry
    image, haematoxylin + DAB, read as 0.5 µm/px): detections, and the float ones with an int8 one within 1 µm."""
    from scipy.spatial import cKDTree

    from hw_sim.content import load_content
    from runtime.analysis.nuclei import NucleiDetector
    from runtime.ml.backends import OrtBackend
    from runtime.ml.model_folder import load_model_folder

    ihc = load_content("ihc")
    found = []
    for d in (float_dir, int8_dir):
        mf = load_model_folder(d, "nuclei")
        found.append(NucleiDetector(mf, OrtBackend(mf, cuda=False, threads=1)).detect(ihc))
    a, b = found
    near = float((cKDTree(b).query(a)[0] <= 1.0 / 0.5).mean()) if len(a) and len(b) else 0.0
    return {"image": "skimage.data.ihc at 0.5 um/px", "float": len(a), "int8": len(b), "float_matched_within_1um": near}


def head_nodes(path: Path) -> list[str]:
    """The convolutions that write a graph output or the Sigmoid before one (the nuclei model's 1 x 1
    head): left float, so the heatmap keeps its continuous values -- from an int8 head it takes ~200
    levels, and the ties make :func:`runtime.analysis.nuclei.find_peaks` resolve plateaus (2-3x its CPU)."""
    import onnx

    g = onnx.load(str(path)).graph
    outs = {o.name for o in g.output}
    feeds = {i for n in g.node if n.op_type == "Sigmoid" and set(n.output) & outs for i in n.input}
    return [n.name for n in g.node if n.op_type == "Conv" and set(n.output) & (outs | feeds)]


def quantize_folder(
    src: Path,
    out: Path,
    *,
    seeds: Sequence[int] = CALIBRATION_SEEDS,
    parity_seeds: Sequence[int] = PARITY_SEEDS,
    size_um: float = SLIDE_UM,
    command: str | None = None,
) -> dict[str, Any]:
    """Write ``out``: the int8 copy of ``src`` (a nuclei or tumour folder); return its model.json."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from runtime.ml.model_folder import load_model_folder

    folder = load_model_folder(src)
    task = folder.task
    if task not in ("nuclei", "tumour"):
        raise ValueError(f"{src}: a {task!r} model; only the nuclei and tumour CNNs are quantized")
    if any(s >= 900_000 for s in (*seeds, *parity_seeds)):
        raise ValueError("calibration and parity use training-range seeds (below 900000), never held-out ones")
    cal = model_inputs(task, src, seeds, size_um)
    par = model_inputs(task, src, parity_seeds, size_um)
    cap = MAX_NUCLEI_WINDOWS if task == "nuclei" else MAX_TUMOUR_PATCHES
    rng = np.random.default_rng(0)
    if len(cal) > cap:
        cal = cal[np.sort(rng.choice(len(cal), cap, replace=False))]
    if len(par) > cap:
        par = par[np.sort(rng.choice(len(par), cap, replace=False))]
    batch = 8 if task == "nuclei" else 64
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        pre_path, staged = Path(tmp) / "pre.onnx", Path(tmp) / "model"
        staged.mkdir()
        quant_pre_process(str(folder.onnx_path), str(pre_path), skip_symbolic_shape=True)
        quantize_static(
            str(pre_path),
            str(staged / "model.onnx"),
            _Reader(folder.input_name, cal, batch),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            # The convolutions carry the cost; the tumour model's head (pooling, two small Gemm) stays
            # float, so its embedding is not clipped to the largest one calibration happened to see.
            op_types_to_quantize=QUANTIZED_OPS,
            nodes_to_exclude=head_nodes(pre_path),
        )
        a = _run(folder.onnx_path, folder.input_name, par, batch)
        b = _run(staged / "model.onnx", folder.input_name, par, batch)
        diff = {k: float(np.abs(a[k] - b[k]).max()) for k in a}
        mean = {k: float(np.abs(a[k] - b[k]).mean()) for k in a}
        bad = {k: v for k, v in diff.items() if v > PARITY_ATOL.get(k, 0.5)}
        if bad:
            raise RuntimeError(f"the int8 graph differs from {src} by {bad} (atol {PARITY_ATOL})")
        meta = dict(folder.meta)
        meta["onnx_sha256"] = hashlib.sha256((staged / "model.onnx").read_bytes()).hexdigest()
        parity: dict[str, Any] = {
            "samples": len(par),
            "against": "the float folder's graph on the inputs the analyzer sends it (slides of parity_seeds)",
            "atol": {k: PARITY_ATOL[k] for k in a},
            "max_abs_diff": diff,
            "mean_abs_diff": mean,
        }
        if task == "nuclei":
            parity["detections"] = _peaks_agree(a["heatmap"], b["heatmap"], meta["preprocess"])
        meta["parity"] = parity
        meta["quantized"] = {
            "from": {"path": src.as_posix(), "onnx_sha256": folder.sha256, "parity": folder.meta.get("parity")},
            "method": "onnxruntime.quantization.quantize_static: QDQ, int8 weights per output channel, uint8 "
            "activations, MinMax ranges (after quant_pre_process); op types " + ", ".join(QUANTIZED_OPS)
            + "; float: the pooling and Gemm head, and a convolution that writes the output (head_nodes)",
            "calibration": {
                "inputs": len(cal),
                "slide_seeds": list(seeds),
                "parity_seeds": list(parity_seeds),
                "slide_um": size_um,
                "what": "the inputs runtime.analysis.pipeline.SlideAnalyzer sends the float model (subdivide 2) "
                "on bench-style slides (bench.analysis.render_slide, training-range seeds)",
            },
            "onnxruntime": onnxruntime.__version__,
            "command": command
            or f"python -m export.quantize_analysis {src.as_posix()} {out.as_posix()}"
            + (f" --seeds {' '.join(map(str, seeds))}" if tuple(seeds) != CALIBRATION_SEEDS else ""),
            "use": "ONNX Runtime CPU; TensorRT and ONNX Runtime CUDA take the float folder",
        }
        write_model_json(staged, meta)
        if task == "nuclei":  # content the simulator never drew
            meta["parity"]["ihc"] = ihc_detections(folder.onnx_path.parent, staged)
            write_model_json(staged, meta)
        if task == "tumour" and "unseen_content" in meta:  # the int8 model's own figures on content never drawn
            from export.analysis_unseen import record_unseen

            record_unseen(staged)
            meta = json.loads((staged / "model.json").read_text(encoding="utf-8"))
        load_model_folder(staged, task)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staged, out)
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.quantize_analysis", description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="nuclei or tumour model folder (float)")
    p.add_argument("out", type=Path, help="the int8 model folder (replaced)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(CALIBRATION_SEEDS), help="calibration slide seeds")
    p.add_argument("--size-um", type=float, default=SLIDE_UM, help="side of each calibration slide (µm)")
    args = p.parse_args(argv)

    def go(_: object) -> int:
        meta = quantize_folder(args.src, args.out, seeds=args.seeds, size_um=args.size_um)
        print(json.dumps({"out": str(args.out), "parity": meta["parity"], "quantized": meta["quantized"]}, indent=2))
        return 0

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
