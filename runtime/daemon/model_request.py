"""A model folder named in a request (``start_scan``'s ``models.autofocus_dir``, ``analysis.tumour_dir``, ...):
where it may be.

A model folder is code-like input: the inference worker hands its ONNX graph to ONNX Runtime or
TensorRT (native parsers and, for TensorRT, an engine built and cached from it), and the model
decides where the scanner focuses. So a request may name only:

* ``"builtin"``: the committed folders;
* a folder under ``daemon.data_root``, relative to it (or absolute inside it);
* an absolute folder inside one of ``models.allowed_dirs`` (the operator's choice in the config).

Inside those roots the rules of :mod:`runtime.paths` hold (no ``..`` or link leads out: the whole
folder is walked), and, as for ``sshd``'s key files, the folder and every file in it must belong
to the daemon's user or root and be writable by their owner only, with no symbolic links inside:
someone who may hand over recordings cannot plant a model. Then the folder must load as a model folder of
its task (autofocus, tumour, ...: ``model.json``, the ONNX and its sha256; the graph itself is checked
when the worker loads it).
Errors are :class:`~runtime.paths.UnsafePath` or ``RequestError("invalid_params")`` naming
the parameter (``models.autofocus_dir`` unless told).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

from runtime import paths
from runtime.config import RuntimeConfig
from runtime.control.protocol import RequestError
from runtime.ml.model_folder import ModelFolderError, load_model_folder

PARAM: Final = "models.autofocus_dir"
MAX_MODEL_ENTRIES: Final = 1000
"""Most files and folders a requested model folder may hold (one holds two or three)."""


def _owned_and_closed(top: Path, param: str = PARAM) -> None:
    """The folder and everything in it belong to this user or root and are writable by the owner only;
    no symbolic links in it (a model folder is a few plain files; a link could lead to a loop or to
    files whose owner is not checked)."""
    todo = [top]
    while todo:
        path = todo.pop()
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise paths.UnsafePath(f"{param}: {path} is a symbolic link; a model folder holds plain files only")
        if st.st_uid not in (os.geteuid(), 0):
            raise paths.UnsafePath(
                f"{param}: {path} belongs to another user (uid {st.st_uid}); a model folder must not"
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise paths.UnsafePath(f"{param}: {path} is writable by group or others; a model folder must not be")
        if stat.S_ISDIR(st.st_mode):
            todo.extend(path / name for name in os.listdir(path))


def requested_model_dir(cfg: RuntimeConfig, value: str, param: str = PARAM, task: str = "autofocus") -> str:
    """The model folder ``value`` names, resolved and checked (see the module docstring); ``param``
    names the request's parameter in errors, ``task`` the model folder's task (``model.json``)."""
    if value == "builtin":
        return value
    root = Path(os.path.realpath(cfg.daemon.data_root))
    if os.path.isabs(value):
        folder = Path(os.path.realpath(value))
        roots = [root, *(Path(os.path.realpath(d)) for d in cfg.models.allowed_dirs)]
        base = next((r for r in roots if paths.is_within(folder, r)), None)
        if base is None:
            raise paths.UnsafePath(
                f"{param}: {value!r} is neither under the data root {root} nor in models.allowed_dirs"
            )
    else:
        folder, base = paths.resolve_under(root, value, param), root
    if not folder.is_dir():
        raise RequestError("invalid_params", f"{param}: {folder} is not a folder")
    paths.check_tree_within(folder, base, param, max_entries=MAX_MODEL_ENTRIES)
    _owned_and_closed(folder, param)
    try:
        load_model_folder(folder, task, check_graph=False)
    except ModelFolderError as err:
        raise RequestError("invalid_params", f"{param}: {err}") from None
    return str(folder)
