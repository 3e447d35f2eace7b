"""What the daemon and its workers import: every scan starts its workers afresh, and each pays its imports.

Spawned workers import their modules on every scan (runtime/daemon/job.py), so an optional
feature's library is imported only where the feature is used: pydicom when a DICOM series is
written (runtime/output/dicom_wsi.py; ~0.35 CPU-s per scan otherwise). No GPU library is
imported with a module either: ONNX Runtime and TensorRT are loaded by the backend that makes a
session, inside the inference worker (runtime/ml/backends.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

# The daemon (it imports every job and so every worker's main) and each worker's module.
DAEMON_MODULES = (
    "runtime.daemon.supervisor",
    "runtime.workers.acquisition",
    "runtime.workers.analysis",
    "runtime.workers.inference",
    "runtime.workers.recorder",
    "runtime.workers.stitcher",
    "runtime.workers.writer",
)


def _imported_roots(modules: tuple[str, ...], *, then: str = "") -> set[str]:
    """Top-level packages in ``sys.modules`` of a fresh interpreter after importing ``modules``
    (and running ``then``)."""
    code = (
        "import importlib, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        f"{then}\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(proc.stdout.split())


@pytest.fixture(scope="module")
def daemon_imports() -> set[str]:
    return _imported_roots(DAEMON_MODULES)


def test_the_daemon_and_its_workers_do_not_import_pydicom(daemon_imports: set[str]) -> None:
    # writer.py imports dicom_wsi for DicomIdentifiers on every scan; pydicom is for writer.dicom only.
    assert "runtime" in daemon_imports  # the check itself ran
    assert "pydicom" not in daemon_imports


@pytest.mark.parametrize("lib", ["onnxruntime", "tensorrt", "torch"])
def test_no_gpu_or_training_library_is_imported_with_a_module(daemon_imports: set[str], lib: str) -> None:
    assert lib not in daemon_imports


def test_a_dicom_series_still_imports_pydicom_where_it_is_made() -> None:
    # The other side of the lazy import: the writer does load pydicom when it writes DICOM.
    then = (
        "import tempfile, pathlib\n"
        "from runtime.output.dicom_wsi import DicomWsiWriter\n"
        "d = pathlib.Path(tempfile.mkdtemp())\n"
        "DicomWsiWriter(d / 'slide.dicom', [(256, 256)], 256, 0.25).abort()\n"
    )
    assert "pydicom" in _imported_roots(("runtime.workers.writer",), then=then)
