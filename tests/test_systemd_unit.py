"""The systemd unit and the example config that ship in systemd/."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from runtime.config import RuntimeConfig, load_config

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD / "wsi-runtime.service"
EXAMPLE = SYSTEMD / "wsi-runtime.toml"
VENV_PYTHON = "/opt/wsi-runtime/venv/bin/python"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # unit keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_service_settings() -> None:
    svc = unit()["Service"]
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "main"
    assert svc["Restart"] == "on-failure"
    assert int(svc["WatchdogSec"]) == 30
    assert int(svc["RestartSec"]) > 0
    assert svc["KillSignal"] == "SIGTERM"
    assert svc["KillMode"] == "mixed"  # the supervisor stops its own workers
    assert int(svc["TimeoutStopSec"]) >= 60  # room to close the slide file
    assert svc["ExecStart"] == f"{VENV_PYTHON} -m runtime daemon --config /etc/wsi-runtime/runtime.toml"
    assert "wsirt_" in svc["ExecStopPost"]
    # Stale segments and semaphores of a SIGKILLed daemon (runtime/ipc/lifetime.py), then the find as a fallback.
    sweep = f"-{VENV_PYTHON} -m runtime sweep --config /etc/wsi-runtime/runtime.toml ; "
    assert svc["ExecStopPost"].startswith(sweep)
    assert svc["RuntimeDirectory"] == svc["StateDirectory"] == "wsi-runtime"
    assert svc["User"] == svc["Group"] == "wsi-runtime"
    assert svc["ProtectSystem"] == "strict"
    assert "/var/lib/wsi-runtime" in svc["ReadWritePaths"].split()
    assert svc["PrivateTmp"] == svc["NoNewPrivileges"] == "yes"
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_unit_keeps_gpu_device_nodes_reachable() -> None:
    # Each of these hides /dev/nvhost-*, /dev/nvmap on Jetson and CUDA fails to start.
    svc = unit()["Service"]
    assert svc.get("PrivateDevices", "no") == "no"
    assert "DeviceAllow" not in svc
    assert svc.get("DevicePolicy", "auto") == "auto"
    assert svc.get("ProtectClock", "no") == "no"  # implies DeviceAllow=char-rtc r
    assert "video" in svc["SupplementaryGroups"].split()


def test_unit_paths_match_the_config_defaults() -> None:
    cfg = RuntimeConfig()
    assert str(cfg.daemon.data_root) == "/var/lib/wsi-runtime"  # StateDirectory=wsi-runtime
    assert str(cfg.daemon.runtime_dir) == "/run/wsi-runtime"  # RuntimeDirectory=wsi-runtime


def _verify(path: Path) -> str:
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=30, cwd=path.parent
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return out or f"systemd-analyze exited {proc.returncode}"
    # verify exits 0 even for many unit problems ("Failed to parse ..., ignoring"),
    # so any output naming the unit counts as a failure.
    return "\n".join(line for line in out.splitlines() if path.name in line)


def _copy_for_verify(tmp_path: Path, text: str) -> Path:
    # verify refuses an ExecStart= binary that does not exist, and
    # /opt/wsi-runtime/venv exists only on an installed scanner: point it at
    # the Python running this test instead. Everything else is verified as shipped.
    assert VENV_PYTHON in text
    path = tmp_path / UNIT.name
    path.write_text(text.replace(VENV_PYTHON, sys.executable))
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    assert _verify(_copy_for_verify(tmp_path, UNIT.read_text())) == ""


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_catches_mistakes(tmp_path: Path) -> None:
    # The check above must be able to fail: a typo in a value is reported.
    broken = UNIT.read_text().replace("Type=notify", "Type=notfy")
    assert "notfy" in _verify(_copy_for_verify(tmp_path, broken))


def test_example_config_is_exactly_the_defaults() -> None:
    assert load_config(EXAMPLE) == RuntimeConfig()


def test_example_config_lists_every_key() -> None:
    # A key added to runtime/config.py must be documented here too.
    data = tomllib.loads(EXAMPLE.read_text())
    for section, field in RuntimeConfig.model_fields.items():
        assert section in data, f"[{section}] missing from {EXAMPLE.name}"
        model = field.annotation
        assert model is not None
        for key in model.model_fields:
            assert key in data[section], f"{section}.{key} missing from {EXAMPLE.name}"
