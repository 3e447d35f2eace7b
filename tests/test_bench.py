"""``python -m bench writer``: runs end to end and reports well-formed figures (no timing assertions)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import Column, format_table


def test_writer_bench_json(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench", "writer", "--size", "2048", "--json", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["bench"] == "writer"
    assert result["config"]["compression"] == "jpeg" and result["host"]["cpus"] >= 1
    # Quality 85: libvips writes 4:2:0 there, and we match it.
    assert result["config"]["jpeg_quality"] == 85 and result["config"]["jpeg_subsampling"] == 2
    (r,) = result["results"]
    assert r["size"] == 2048 and r["megapixels"] == 2048 * 2048 / 1e6
    # Pyramid floor = the tile (512), libvips' depth: 2048 -> 1024 -> 512.
    assert r["levels"] == [[2048, 2048], [1024, 1024], [512, 512]]
    assert r["tiff_bytes"] > 0 and r["mosaic_bytes"] > 0
    for phase in ("ingest", "tiff", "writer"):
        p = r[phase]
        assert p["seconds"] > 0 and p["mpx_per_s"] > 0
        assert 0 < p["baseline_rss_mib"] <= p["peak_rss_mib"] < 4096
        assert p["sampled_peak_rss_mib"] > 0 and p["ru_maxrss_mib"] > 0
    assert r["writer"]["jpeg"] == "YCBCR 4:2:0" and r["writer"]["psnr_db"] > 25
    if shutil.which("vips") is None:
        assert r["vips"] is None and "libvips comparison skipped" in result["vips_note"]
    else:
        v = r["vips"]
        assert v["levels"] == r["levels"] and v["jpeg"] == "YCBCR 4:2:0"
        assert v["seconds"] > 0 and v["peak_rss_mib"] > 0 and v["tiff_bytes"] > 0
        # Same quality settings: the two files decode to nearly the same fidelity.
        assert abs(v["psnr_db"] - r["writer"]["psnr_db"]) < 1.0
        assert r["throughput_vs_vips"] == pytest.approx(v["seconds"] / r["writer"]["seconds"])
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


def test_e2e_bench_json(tmp_path: Path) -> None:
    """A tiny replayed scan: the figures are there and plausible (no timing assertions)."""
    cmd = [sys.executable, "-m", "bench", "e2e", "--fields", "3", "3", "--tile", "512", "--samples", "4"]
    proc = subprocess.run([*cmd, "--json", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["bench"] == "e2e" and r["fields"] == 9 and r["synth_seconds"] > 0
    assert r["megapixels"] == pytest.approx(r["mosaic_shape"][0] * r["mosaic_shape"][1] / 1e6)
    assert 0 < r["start_to_first_field_s"] <= r["start_to_last_field_s"] < r["start_to_closed_s"]
    assert 0 < r["last_tile_to_closed_s"] < r["start_to_closed_s"] and r["mpx_per_s"] > 0
    assert set(r["peak_rss_mib"]) >= {"supervisor", "acquisition", "stitcher", "writer"}
    q = r["quality"]
    # Compression alone costs little; against the truth, aligned windows must match closely.
    assert q["psnr_jpeg_vs_mosaic_db"] > 35 and q["psnr_aligned_db"] > 33
    assert list(tmp_path.iterdir()) == [], "without --keep the bench cleans up"
