"""Model folders: ``model.onnx`` + ``model.json``, loaded and checked before anything runs.

A folder is rejected with a :class:`ModelFolderError` that names the file and
the key when: a file is missing, the JSON is malformed or lacks a key, the
ONNX file's sha256 is not the one recorded, the task is not the expected one,
or the ONNX graph's input/outputs disagree with ``model.json`` (shape, names,
a batch axis that is not dynamic). Metadata lives in the sidecar, not glued to
the engine, so ``trtexec`` and Netron still open the ONNX as it is.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.ml.preprocess import AutofocusPreprocess, ClassifierPreprocess

MODELS_DIR = Path(__file__).resolve().parent / "builtin"
TASKS = ("autofocus", "classifier", "tumour", "nuclei", "slide_mil", "lesion_head")
# Slide-analysis models (issue 13, runtime.analysis): their preprocess kinds and the input each implies.
ANALYSIS_PREPROCESS = {
    "tumour": "rgb_patch_v1",
    "nuclei": "rgb_window_v1",
    "slide_mil": "mil_v1",
    "lesion_head": "rgb_window_v1",  # 1 µm window around a small lesion -> per-4 µm tumour probability
}


class ModelFolderError(ValueError):
    """A model folder is missing, incomplete, corrupt or inconsistent; the message says which file/key."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    meta: dict[str, Any]
    onnx_path: Path
    sha256: str
    task: str
    input_name: str
    input_shape: tuple[int, ...]  # without the batch axis
    output_names: tuple[str, ...]
    pixel_size_um: float

    def autofocus_preprocess(self) -> AutofocusPreprocess:
        return AutofocusPreprocess.from_dict(self.meta["preprocess"])

    def classifier_preprocess(self) -> ClassifierPreprocess:
        return ClassifierPreprocess.from_dict(self.meta["preprocess"])


def write_model_json(folder: Path | str, meta: dict[str, Any]) -> Path:
    """Write ``folder/model.json`` whole or not at all (a temporary file renamed over it), in the one
    form every exporter writes: indented, non-ASCII (µ) kept as it is, a newline at the end. Returns
    its path. Callers that change a few keys read the file, change them and pass the whole dict."""
    path = Path(folder) / "model.json"
    tmp = path.with_name("model.json.partial")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def default_model_dir(task: str) -> Path:
    """The committed model for ``task`` (runtime/ml/builtin/<task>)."""
    if task not in TASKS:
        raise ModelFolderError(f"unknown model task {task!r}; expected one of {TASKS}")
    return MODELS_DIR / task


# The committed autofocus models, best first: the builtin choice is the first whose input fits
# the camera's frame. The wide window (v3, v2) needs 512 px; on smaller frames it is mirror-padded
# and noisier near focus than v1 (bench autofocus, "centre 256 px" row), so v1 serves those. v3
# (wider training content, magnitude head) replaces v2 where it fits: on real tissue and on
# objectives outside the training draws it reads defocus 3-4x better (README, issue 11); v2 stays
# as a folder for comparison.
BUILTIN_AUTOFOCUS = ("autofocus_v3", "autofocus")


def builtin_autofocus_dir(frame_shape: tuple[int, int] | None) -> Path:
    """The committed autofocus model for a camera with frames of ``frame_shape`` (h, w) px;
    None (frame unknown): the v1 folder, which works on any frame of at least 256 px."""
    if frame_shape is None:
        return default_model_dir("autofocus")
    for name in BUILTIN_AUTOFOCUS:
        pre = AutofocusPreprocess.from_dict(json.loads((MODELS_DIR / name / "model.json").read_text())["preprocess"])
        if min(frame_shape) >= max(pre.wide, pre.context):
            return MODELS_DIR / name
    return default_model_dir("autofocus")


def analysis_input_shape(task: str, pre: dict[str, Any]) -> tuple[int, ...]:
    """The input (without the batch axis) that a slide-analysis model's ``preprocess`` implies:
    ``rgb_patch_v1`` / ``rgb_window_v1``: (3, size, size) RGB scaled as ``(x / 255 - mean) / std``;
    ``mil_v1``: (embedding_dim + 2,), a patch's embedding followed by its centre (y, x) in µm
    (the batch axis is the bag: one slide's patches). KeyError/ValueError name what is wrong."""
    want = ANALYSIS_PREPROCESS[task]
    if pre.get("kind") != want:
        raise ValueError(f"kind must be {want!r} for a {task!r} model, got {pre.get('kind')!r}")
    if want == "mil_v1":
        dim = pre["embedding_dim"]
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"embedding_dim must be a positive int, got {dim!r}")
        return (dim + 2,)
    size = pre["size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    for k in ("mean", "std"):
        if not isinstance(pre[k], int | float) or isinstance(pre[k], bool):
            raise ValueError(f"{k} must be a number, got {pre[k]!r}")
    if not pre["std"] > 0:
        raise ValueError(f"std must be positive, got {pre['std']!r}")
    return (3, size, size)


def _key(meta: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    if key not in meta:
        raise ModelFolderError(f"{where}: missing key {key!r}")
    v = meta[key]
    if not isinstance(v, kind) or isinstance(v, bool):
        raise ModelFolderError(f"{where}: key {key!r} has the wrong type ({type(v).__name__})")
    return v


def _heldout_after(path: Path | str, key: str) -> float | None:
    """``calibration.heldout_metrics_after[key]`` of a folder's model.json when it is a finite number, else None."""
    try:
        meta = json.loads((Path(path) / "model.json").read_text(encoding="utf-8"))
        value = meta["calibration"]["heldout_metrics_after"][key]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def calibrated_near_focus_error_um(path: Path | str) -> float | None:
    """The near-focus error (µm) a calibrated autofocus folder's model.json records on the instrument's own
    held-out fields for the scan to spend out of its tolerance
    (:meth:`runtime.focus.near_focus.NearFocusTrust.keeps_unchecked`): the 95th percentile of the held-out
    near-focus tiles' |error| (``near_focus_abs_error_q95_um``, written by ``python -m export calibrate`` since
    stop 29), or for a folder calibrated before that its near-focus MAE (:func:`calibrated_near_focus_mae_um`);
    None where neither is recorded."""
    q = _heldout_after(path, "near_focus_abs_error_q95_um")
    return q if q is not None else calibrated_near_focus_mae_um(path)


def calibrated_near_focus_mae_um(path: Path | str) -> float | None:
    """The near-focus MAE (µm) that a calibrated autofocus folder's model.json records on the
    instrument's own held-out fields (``calibration.heldout_metrics_after.mae_near_focus_um``,
    written by ``python -m export calibrate``; with its default estimate-then-refit procedure that
    is the hold-out pass's model, trained on fewer fields than the exported refit -- the
    procedure's held-out estimate, ``calibration.procedure.heldout_metrics_model``); None for a
    folder that was not calibrated (or calibrated with nothing held out), or
    one whose model.json cannot be read (loading the folder reports that). Reads model.json only:
    the scan decides with it whether single_shot trusts the model near focus from the first field."""
    return _heldout_after(path, "mae_near_focus_um")


def load_model_folder(path: Path | str, task: str | None = None, check_graph: bool = True) -> ModelFolder:
    """Load and validate a model folder. ``check_graph``: also open the ONNX with ONNX Runtime and
    compare its input/output signature with ``model.json`` (cheap for these small models)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist")
    jpath = folder / "model.json"
    if not jpath.is_file():
        raise ModelFolderError(f"{jpath}: missing (a model folder holds model.onnx and model.json)")
    try:
        meta = json.loads(jpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{jpath}: not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise ModelFolderError(f"{jpath}: expected a JSON object")
    if meta.get("format") != "wsi-model":
        raise ModelFolderError(f"{jpath}: key 'format' must be 'wsi-model', got {meta.get('format')!r}")
    got_task = _key(meta, "task", str, jpath)
    if got_task not in TASKS:
        raise ModelFolderError(f"{jpath}: key 'task' must be one of {TASKS}, got {got_task!r}")
    if task is not None and got_task != task:
        raise ModelFolderError(f"{jpath}: this is a {got_task!r} model, expected a {task!r} model")
    onnx_name = _key(meta, "onnx", str, jpath)
    if Path(onnx_name).name != onnx_name:
        raise ModelFolderError(f"{jpath}: key 'onnx' must be a file name inside the folder, got {onnx_name!r}")
    onnx_path = folder / onnx_name
    if not onnx_path.is_file():
        raise ModelFolderError(f"{onnx_path}: missing (named by {jpath.name} key 'onnx')")
    want = _key(meta, "onnx_sha256", str, jpath).lower()
    digest = sha256_file(onnx_path)
    if digest != want:
        raise ModelFolderError(
            f"{onnx_path}: sha256 {digest} does not match {jpath.name} key 'onnx_sha256' {want} "
            "(the ONNX was changed or truncated; re-export the folder)"
        )
    inp = _key(meta, "input", dict, jpath)
    shape = inp.get("shape")
    if not (isinstance(shape, list) and len(shape) >= 2 and all(isinstance(d, int) and d > 0 for d in shape[1:])):
        raise ModelFolderError(f"{jpath}: key 'input.shape' must be ['batch', positive ints...], got {shape!r}")
    input_shape = tuple(int(d) for d in shape[1:])
    outputs = _key(meta, "outputs", list, jpath)
    names = tuple(str(o.get("name")) for o in outputs if isinstance(o, dict))
    if len(names) != len(outputs) or not names:
        raise ModelFolderError(f"{jpath}: key 'outputs' must be a list of objects with a 'name'")
    pixel = _key(meta, "pixel_size_um", (int, float), jpath)
    _key(meta, "preprocess", dict, jpath)
    mf = ModelFolder(
        folder, meta, onnx_path, digest, got_task, str(inp.get("name", "input")), input_shape, names, float(pixel)
    )
    try:
        if got_task in ANALYSIS_PREPROCESS:
            pre_shape = analysis_input_shape(got_task, meta["preprocess"])
        else:
            pre = mf.autofocus_preprocess() if got_task == "autofocus" else mf.classifier_preprocess()
            pre_shape = pre.input_shape
    except (KeyError, ValueError, TypeError) as err:
        raise ModelFolderError(f"{jpath}: key 'preprocess' is invalid: {err}") from None
    if pre_shape != input_shape:
        raise ModelFolderError(
            f"{jpath}: 'input.shape' {list(input_shape)} disagrees with 'preprocess' {list(pre_shape)}"
        )
    if check_graph:
        _check_graph(mf)
    return mf


def _check_graph(mf: ModelFolder) -> None:
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(mf.onnx_path), providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own exception types for unreadable graphs
        raise ModelFolderError(f"{mf.onnx_path}: ONNX Runtime cannot load it: {err}") from None
    ins = sess.get_inputs()
    if len(ins) != 1 or ins[0].name != mf.input_name:
        raise ModelFolderError(
            f"{mf.onnx_path}: graph inputs {[i.name for i in ins]} != model.json input {mf.input_name!r}"
        )
    gshape = ins[0].shape
    if isinstance(gshape[0], int):
        raise ModelFolderError(f"{mf.onnx_path}: the batch axis is fixed ({gshape[0]}); export it as dynamic")
    if tuple(gshape[1:]) != mf.input_shape:
        raise ModelFolderError(
            f"{mf.onnx_path}: graph input shape {gshape} != model.json key 'input.shape' "
            f"['batch', {', '.join(map(str, mf.input_shape))}]"
        )
    gout = tuple(o.name for o in sess.get_outputs())
    if gout != mf.output_names:
        raise ModelFolderError(
            f"{mf.onnx_path}: graph outputs {list(gout)} != model.json 'outputs' {list(mf.output_names)}"
        )
