"""``python -m bench writer``: runs end to end and reports well-formed figures (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.report import Column, format_table


def test_writer_bench_json(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench", "writer", "--size", "2048", "--json", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["bench"] == "writer"
    assert result["config"]["compression"] == "jpeg" and result["host"]["cpus"] >= 1
    (r,) = result["results"]
    assert r["size"] == 2048 and r["megapixels"] == 2048 * 2048 / 1e6
    # min_level_size 1024 (the default): 2048 -> 1024, two levels.
    assert r["levels"] == [[2048, 2048], [1024, 1024]]
    assert r["tiff_bytes"] > 0 and r["mosaic_bytes"] > 0
    for phase in ("ingest", "writer"):
        p = r[phase]
        assert p["seconds"] > 0 and p["mpx_per_s"] > 0
        assert 0 < p["baseline_rss_mib"] <= p["peak_rss_mib"] < 4096
        assert p["sampled_peak_rss_mib"] > 0 and p["ru_maxrss_mib"] > 0
    phases = r["writer"]["phases"]
    assert set(phases) == {"levels", "tiff"}
    assert r["writer"]["seconds"] == sum(p["seconds"] for p in phases.values())
    assert r["writer"]["peak_rss_mib"] >= max(p["peak_rss_mib"] for p in phases.values())
    assert list(tmp_path.iterdir()) == [], "without --keep the bench cleans up"


def test_writer_bench_table_lists_every_size() -> None:
    table = format_table(
        [{"size": 8192, "s": 1.234}, {"size": 16384, "s": None}],
        [Column("size", "size px"), Column("s", "seconds", ".2f")],
    )
    lines = table.splitlines()
    assert lines[0].split() == ["size", "px", "seconds"]
    assert lines[2].split() == ["8192", "1.23"] and lines[3].split() == ["16384", "-"]
    assert len({len(line) for line in lines}) == 1, "columns are aligned"


def test_bench_lists_benches_and_rejects_unknown() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "nope"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "writer" in proc.stderr
