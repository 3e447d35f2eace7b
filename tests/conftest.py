"""Shared fixtures: small synthetic recordings (made once per test session) and a live daemon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hw_sim.synth import SynthParams, synthesize
from runtime.config import RuntimeConfig, with_overrides
from runtime.control.client import ControlClient
from runtime.daemon.process import start_daemon_process, stop_daemon_process

SMALL = SynthParams(fields_x=3, fields_y=3, seed=5, tile=256, z_planes=9, z_step_um=0.5)


@pytest.fixture(scope="session")
def small_recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 x 3 fields of 256 px, 9 planes: scans in a few seconds."""
    root = tmp_path_factory.mktemp("recordings")
    return synthesize(root / "small.zarr", SMALL)


def daemon_config(data_root: Path, runtime_dir: Path, recording: Path | None, **sections: dict) -> RuntimeConfig:
    overrides: dict = {
        "daemon": {"data_root": str(data_root), "runtime_dir": str(runtime_dir), "heartbeat_timeout_s": 10.0},
        "driver": {"options": {"recording": str(recording)} if recording else {}},
    }
    overrides.update(sections)
    return with_overrides(RuntimeConfig(), overrides)


@pytest.fixture()
def daemon(tmp_path: Path, small_recording: Path) -> Iterator[tuple[RuntimeConfig, ControlClient]]:
    """A daemon child process with the replay driver on the small recording; shut down afterwards."""
    runtime_dir = Path("/tmp") / f"wsirt-test-{tmp_path.name}"  # ipc paths must stay short
    cfg = daemon_config(tmp_path / "data", runtime_dir, small_recording)
    proc = start_daemon_process(cfg)
    client = ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=15)
    try:
        client.request("ping")
        yield cfg, client
    finally:
        client.close()
        exitcode = stop_daemon_process(proc, cfg)
        assert exitcode == 0, f"daemon exited with {exitcode}"
