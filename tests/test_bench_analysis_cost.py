"""bench analysis --scan-cost keeps each process's CPU seconds per scan and their medians per setting."""

from __future__ import annotations

from typing import Any

from bench.analysis import _scan_record, cpu_by_process


def _report(wall: float, **secs: float) -> dict[str, Any]:
    return {"_wall_s": wall, "cpu_seconds": secs}


def test_cpu_per_process_per_scan_and_median_per_setting() -> None:
    scans = [
        _scan_record(0, "off", 1.0, _report(2.0, stitcher=1.0, writer=0.3)),
        _scan_record(0, "on", 1.0, _report(2.2, stitcher=1.1, writer=0.3, analysis=0.5)),
        _scan_record(1, "off", 1.0, _report(2.1, stitcher=1.2, writer=0.2)),
        _scan_record(1, "on", 1.0, _report(2.3, stitcher=0.9, writer=0.4, analysis=0.7)),
        _scan_record(2, "off", 1.0, _report(2.0, stitcher=0.8, writer=0.1)),
        _scan_record(2, "on", 1.0, _report(2.4, stitcher=1.0, writer=0.2, analysis=0.4)),
    ]
    assert scans[1]["cpu_s_by_process"] == {"stitcher": 1.1, "writer": 0.3, "analysis": 0.5}
    assert scans[1]["cpu_s"] == 1.9
    by = cpu_by_process(scans)
    assert by == {
        "off": {"stitcher": 1.0, "writer": 0.2},
        "on": {"analysis": 0.5, "stitcher": 1.0, "writer": 0.3},
    }
