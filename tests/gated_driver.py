"""A replay driver whose opening waits for a file (``gate``): a test can look at a scan while its
acquisition worker is still opening the devices (tests/test_scan_start.py)."""

from __future__ import annotations

import time
from pathlib import Path

from hw_sim.replay import ReplayDriver, open_replay_driver


def open_gated(recording: str, gate: str, timeout_s: float = 60.0) -> ReplayDriver:
    deadline = time.monotonic() + timeout_s
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return open_replay_driver(recording)


def open_missing() -> ReplayDriver:
    """A driver that cannot open (for a scan that fails before its plan)."""
    from runtime.devices.protocols import DriverError

    raise DriverError("no recording here")
