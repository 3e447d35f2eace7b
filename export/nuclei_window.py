"""Re-window a nuclei model folder: the same network and weights, run on larger windows.

The nuclei detector (:mod:`export.train_nuclei`) is fully convolutional, trained on 96-px crops and
exported for 128-px windows. The runtime covers a region with windows that overlap by twice the
halo (16 px), so a 128-px window answers for its 96-px core only: (128/96)² = 1.78 model pixels per
slide pixel. One 320-px window answers for a 288-px core (the pipeline's nuclei region) at 1.23:
the same weights on ~30 % fewer pixels, and one model call instead of nine (measured on ONNX Runtime
CPU, one thread: 7.1 vs 9.6 ms per 288-px region).

Every detection still has at least ``halo`` px of context. The answers are the 128-px model's
exactly where that one saw its whole receptive field (more than 2 halo from its window's edges);
nearer its edges the old windows' zero padding weighed in (up to 0.04 of heatmap at 16 px), and
the larger window sees real pixels there instead; the folder's held-out F1 is measured again
(``heldout_metrics``, as :func:`export.train_nuclei.train_nuclei` measures it) and the parity check
compares the new graph with the old one on the cores both answer for.

    python -m export.nuclei_window runtime/ml/builtin/nuclei OUT --size 320 [--data out/analysis-data]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import run_cli
from runtime.ml.model_folder import write_model_json

DEFAULT_SIZE = 320
PARITY_ATOL = 1e-3


def rewindow_onnx(model: Any, size: int, stride: int) -> Any:
    """The ONNX ``model`` with its input's spatial size set to ``size`` (output ``size / stride``)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]  # intermediate shapes inferred for the old size (ORT infers them again)
    for value, side in ((m.graph.input[0], size), (m.graph.output[0], size // stride)):
        dims = value.type.tensor_type.shape.dim
        for d in (dims[2], dims[3]):
            d.ClearField("dim_param")
            d.dim_value = side
    onnx.checker.check_model(m)
    return m


def _heat(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0][:, 0], np.float32)


def parity(old: Path, new: Path, size: int, old_size: int, halo: int, stride: int, seed: int = 0) -> float:
    """Max |difference| of the two graphs' heatmaps on the smaller window placed inside the larger,
    twice the halo away from the smaller window's edges: the network's receptive field (~55 px) is
    wider than the halo, so within 2 halo of its edges a window's answers still feel its zero
    padding (0.04 at 16 px here); beyond, both see the same pixels and must agree exactly."""
    (large, large_side), (small, small_side) = sorted([(new, size), (old, old_size)], key=lambda t: -t[1])
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2.0, 2.0, (2, 3, large_side, large_side)).astype(np.float32)
    o = (large_side - small_side) // 2 // 8 * 8  # the networks' coarsest stride: the same grid alignment
    a = _heat(large, x)
    b = _heat(small, np.ascontiguousarray(x[:, :, o : o + small_side, o : o + small_side]))
    h, c = 2 * halo // stride, o // stride
    n = small_side // stride
    return float(np.abs(a[:, c + h : c + n - h, c + h : c + n - h] - b[:, h : n - h, h : n - h]).max())


def rewindow_folder(src: Path, out: Path, size: int, held: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out``: ``src``'s nuclei model for ``size``-px windows; return its model.json."""
    import onnx

    from export.train_nuclei import heldout_f1
    from runtime.analysis.nuclei import NucleiDetector
    from runtime.ml.backends import OrtBackend
    from runtime.ml.model_folder import load_model_folder

    folder = load_model_folder(src, "nuclei")
    pre = dict(folder.meta["preprocess"])
    stride, halo, old_size = int(pre["stride"]), int(pre["halo"]), int(pre["size"])
    if size % 8 or size <= 4 * halo or size % stride:
        raise ValueError(
            f"--size must be a multiple of 8 and of the stride {stride}, above 4 x the halo {halo} (the parity check)"
        )
    model = rewindow_onnx(onnx.load(str(folder.onnx_path)), size, stride)
    with tempfile.TemporaryDirectory(prefix="nuclei-window-") as tmp:
        staged = Path(tmp) / "model"
        staged.mkdir()
        onnx.save(model, str(staged / "model.onnx"))
        diff = parity(folder.onnx_path, staged / "model.onnx", size, old_size, halo, stride)
        if diff > PARITY_ATOL:
            raise RuntimeError(f"the re-windowed graph differs from {src} by {diff:.2e} on their common cores")
        meta = dict(folder.meta)
        meta["onnx_sha256"] = hashlib.sha256((staged / "model.onnx").read_bytes()).hexdigest()
        meta["input"] = dict(meta["input"], shape=["batch", 3, size, size])
        meta["outputs"] = [dict(meta["outputs"][0], shape=["batch", 1, size // stride, size // stride])]
        meta["preprocess"] = dict(pre, size=size)
        meta["rewindowed"] = {
            "from": {
                "size": old_size,
                "onnx_sha256": folder.sha256,
                "heldout_metrics": folder.meta.get("heldout_metrics"),
            },
            "parity_max_abs_diff": diff,
            "command": f"python -m export.nuclei_window {src.as_posix()} {out.as_posix()} --size {size}",
        }
        write_model_json(staged, meta)
        if held is None:  # the source's figures stay, saying which window they were measured with
            meta["heldout_metrics"] = dict(folder.meta.get("heldout_metrics") or {}, window=old_size)
        else:
            new = load_model_folder(staged, "nuclei")
            metrics = heldout_f1(NucleiDetector(new, OrtBackend(new, cuda=False, threads=1)), held)
            metrics["heldout_slide_seeds"] = folder.meta.get("heldout_metrics", {}).get("heldout_slide_seeds")
            metrics["window"] = size
            meta["heldout_metrics"] = metrics
            write_model_json(staged, meta)
        load_model_folder(staged, "nuclei")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staged, out)
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.nuclei_window", description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="nuclei model folder")
    p.add_argument("out", type=Path, help="the re-windowed model folder (replaced)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"window side in px (default {DEFAULT_SIZE})")
    p.add_argument("--data", type=Path, default=Path("out/analysis-data"), help="analysis data cache (held-out F1)")
    p.add_argument("--heldout-slides", type=int, default=20)
    p.add_argument("--heldout-per-slide", type=int, default=10)
    p.add_argument("--no-heldout", action="store_true", help="skip the held-out F1 (keeps the source's figures)")
    args = p.parse_args(argv)

    def go(_: object) -> int:
        from export.train_nuclei import load_regions

        held = (
            None if args.no_heldout else load_regions(args.data, "heldout", args.heldout_slides, args.heldout_per_slide)
        )
        meta = rewindow_folder(args.src, args.out, args.size, held)
        print(
            json.dumps({"out": str(args.out), "rewindowed": meta["rewindowed"], "heldout": meta.get("heldout_metrics")})
        )
        return 0

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
