"""``stitch.backend`` as the daemon sees it: a forced ``cupy`` that cannot be found is refused when the daemon
starts (exit 2, the key named, no traceback); ``auto`` starts; a CuPy that is found but cannot run fails the scan
in the stitcher with its one-line reason, and no traceback in the workers' log."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.control.client import ControlClient
from runtime.daemon.process import start_daemon_process, stop_daemon_process
from tests.conftest import daemon_config

NO_CUPY = pytest.mark.skipif(
    importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here: a forced cupy is not refused"
)


@NO_CUPY
def test_daemon_start_refuses_a_forced_cupy_it_cannot_find(tmp_path: Path) -> None:
    config = tmp_path / "cupy.toml"
    lines = ["[daemon]", f'data_root = "{tmp_path / "data"}"', f'runtime_dir = "/tmp/wsirt-cupy-{tmp_path.name}"']
    config.write_text("\n".join([*lines, "[stitch]", 'backend = "cupy"']) + "\n")
    run = subprocess.run(
        [sys.executable, "-m", "runtime", "daemon", "--config", str(config), "--log-level", "ERROR"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr  # like every other config error
    assert "Traceback" not in run.stderr, run.stderr
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "stitch.backend = 'cupy' was forced" in errors[0] and "cupy not installed" in errors[0]


@NO_CUPY
def test_auto_starts_without_cupy(tmp_path: Path) -> None:
    runtime_dir = Path("/tmp") / f"wsirt-auto-{os.getpid()}"
    cfg = daemon_config(tmp_path / "data", runtime_dir, None, stitch={"backend": "auto"})
    proc = start_daemon_process(cfg)
    try:
        with ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=15) as client:
            assert client.request("ping")["pong"] is True
    finally:
        assert stop_daemon_process(proc, cfg) == 0


def test_a_cupy_that_cannot_run_fails_the_scan_without_a_traceback(
    tmp_path: Path, small_recording: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # A CuPy the supervisor's lookup finds but that fails to import, as one built for another CUDA does:
    # the daemon and its workers get this folder first on their path. sys.path reaches spawned processes,
    # but not every Python passes it to the fork server's preload (on the lent GPU host's Python 3.12 the
    # workers imported the real, working CuPy), so PYTHONPATH puts it first for every interpreter.
    broken = tmp_path / "site" / "cupy"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("libcudart.so.12: cannot open shared object file")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = [str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    runtime_dir = Path("/tmp") / f"wsirt-bcupy-{os.getpid()}"
    cfg = daemon_config(tmp_path / "data", runtime_dir, small_recording, stitch={"backend": "cupy"})
    proc = start_daemon_process(cfg)
    try:
        with ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=15) as client:
            client.request("start_scan", output_name="bcupy")
            deadline = time.monotonic() + 60
            while (st := client.request("status"))["last_finish"] is None or st["state"] != "idle":
                assert time.monotonic() < deadline, st
                time.sleep(0.1)
    finally:
        assert stop_daemon_process(proc, cfg, timeout_s=60) == 0
    reason = "stitch.backend = 'cupy' was forced but cannot run here: ImportError: libcudart.so.12"
    assert st["last_finish"] == "failed" and reason in st["last_error"], st["last_error"]
    report = json.loads((tmp_path / "data" / "bcupy" / "report.json").read_text())
    assert report["finish_reason"] == "failed" and reason in report["error"]
    err = capfd.readouterr().err
    assert f"stitcher worker failed: StitchBackendError: {reason}" in err, err
    assert "Traceback" not in err, err
