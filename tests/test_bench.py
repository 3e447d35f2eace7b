"""``python -m bench writer``: runs end to end and reports well-formed figures (no timing assertions)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.e2e import Timeline, covered, split_cores, steady_rate
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
    assert r["recording_frames"] == "raw", "bench e2e synthesises raw frames (no decoding on replay)"
    assert r["megapixels"] == pytest.approx(r["mosaic_shape"][0] * r["mosaic_shape"][1] / 1e6)
    assert 0 < r["start_to_first_field_s"] <= r["start_to_last_field_s"] < r["start_to_closed_s"]
    assert 0 < r["last_tile_to_closed_s"] < r["start_to_closed_s"] and r["mpx_per_s"] > 0
    assert set(r["peak_rss_mib"]) >= {"supervisor", "acquisition", "stitcher", "writer"}
    q = r["quality"]
    # Compression alone costs little; against the truth, aligned windows must match closely.
    assert q["psnr_jpeg_vs_mosaic_db"] > 35 and q["psnr_aligned_db"] > 33
    # CPU seconds of every process, from the report; acquisition split into driver and runtime.
    cpu, per_gpx = r["cpu_seconds"], r["cpu_seconds_per_gpx"]
    assert set(cpu) >= {"supervisor", "acquisition", "stitcher", "writer", "acquisition.driver", "acquisition.runtime"}
    assert all(v > 0 for v in cpu.values()), cpu
    assert cpu["acquisition.driver"] + cpu["acquisition.runtime"] == pytest.approx(cpu["acquisition"], abs=2e-3)
    assert per_gpx["stitcher"] == pytest.approx(cpu["stitcher"] / (r["megapixels"] / 1000), rel=1e-2)
    daemon = cpu["supervisor"] + cpu["stitcher"] + cpu["writer"]
    assert r["daemon_cpu_seconds"] == pytest.approx(daemon, abs=2e-3)
    assert set(r["start_cpu_seconds_estimate"]) == {"acquisition", "stitcher", "writer"}
    assert all(v > 0 for v in r["start_cpu_seconds_estimate"].values())
    # How the workers started (the default: forked from the fork server, whose own CPU is apart).
    assert r["worker_start"] == "forkserver" and r["worker_server"]["cpu_seconds"] > 0
    # The timeline: one time per tile at each stage, in pipeline order. Times are when the bench
    # saw the journal record (one poll late, or the last ones at scan_finished, after the close).
    tl = r["timeline"]
    assert len(tl["captured_s"]) == len(tl["placed_s"]) == len(tl["in_mosaic_s"]) == 9
    finished_s = r["start_to_last_field_s"] + r["last_tile_to_scan_finished_s"]
    assert max(tl["captured_s"]) <= max(tl["in_mosaic_s"]) <= finished_s + 1e-3
    assert tl["slide_bytes"] and tl["slide_bytes"][-1][1] <= r["slide_bytes"]
    assert r["cores"] is None and r["affinity"]["supervisor"] == r["affinity"]["bench"]
    assert list(tmp_path.iterdir()) == [], "without --keep the bench cleans up"


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="--cores 1 keeps the daemon off the bench's core: needs 2 cores"
)
def test_e2e_bench_pins_the_daemon_and_draws_the_timeline(tmp_path: Path) -> None:
    """--cores 1: the daemon and every worker run on the last core, the bench on the others."""
    charts = tmp_path / "charts"
    cmd = [sys.executable, "-m", "bench", "e2e", "--fields", "3", "2", "--tile", "256", "--samples", "0"]
    cmd += ["--cores", "1", "--json", "--workdir", str(tmp_path / "w"), "--plot", str(charts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    last = max(os.sched_getaffinity(0))
    affinity = r["affinity"]
    assert set(affinity) >= {"bench", "supervisor", "acquisition", "stitcher", "writer"}
    for name, cores in affinity.items():
        if name == "bench":
            assert last not in cores, affinity
        else:
            assert cores == [last], f"{name} may run on {cores}, not only on core {last}"
    assert r["cores"] == 1 and r["fields"] == 6 and r["quality"] is None
    assert r["cpu_seconds"]["stitcher"] > 0 and r["daemon_cpu_seconds_per_gpx"] > 0
    for png in ("e2e.png", "e2e-timeline.png"):
        assert f"chart: {charts / png}" in proc.stderr
        assert (charts / png).stat().st_size > 10_000


def test_e2e_psnr_leaves_out_what_no_tile_covers() -> None:
    """A field placed 17.4 px down leaves the area's top rows white: they are not compared with the truth."""
    positions = [{"y_px": 17.4, "x_px": -3.2}, {"y_px": 921.6, "x_px": 0.0}]
    top = covered(positions, (1024, 1024), 0, 0, 512)
    assert not top[:20].any() and top[20:].all()  # ceil(17.4) + the 2 px inset
    assert covered(positions, (1024, 1024), 512, 0, 512).all()
    right = covered(positions, (1024, 1024), 512, 512, 512)
    # The first tile ends at floor(-3.2) + 1024 - 2 = 1018, the one below it (from row 924) at 1022.
    assert right[:400, :506].all() and not right[:400, 506:].any()
    assert right[420:, :510].all() and not right[:, 510:].any()


def test_e2e_cores_are_split_between_the_daemon_and_the_bench() -> None:
    assert split_cores(1, {0, 1}) == ({1}, {0})
    assert split_cores(2, {0, 1}) == ({0, 1}, {0, 1}), "no core left: the bench shares them"
    assert split_cores(2, {2, 5, 7}) == ({5, 7}, {2})
    for bad in (0, 3):
        with pytest.raises(ValueError, match=f"--cores {bad}: this process may use 2 cores"):
            split_cores(bad, {0, 1})


def test_e2e_timeline_reads_the_journal_as_it_grows(tmp_path: Path) -> None:
    """Tiles are placed, then in the mosaic once a ``written`` record covers their rows; a torn
    last line waits for the next poll; the slide's growth is sampled."""
    journal = tmp_path / "journal.jsonl"
    tl = Timeline(tmp_path, t0=100.0)
    lines = [
        {"kind": "scan", "frame_shape": [256, 256]},
        {"kind": "placed", "index": 0, "y": 0.4, "x": 0.0, "iy": 0, "ix": 0},
        {"kind": "placed", "index": 1, "y": 200.2, "x": 0.0, "iy": 200, "ix": 0},
        {"kind": "written", "rows": 300},  # covers tile 0 (rows 0-255), not tile 1 (200-455)
        {"kind": "written", "rows": 200, "level": 1},  # a lower level: not level 0's rows
    ]
    text = "".join(json.dumps(x) + "\n" for x in lines)
    journal.write_text(text + '{"kind": "written", "ro')  # the stitcher is writing the next line
    (tmp_path / "slide.ome.tif.partial").write_bytes(b"x" * 10)
    tl.poll(101.0)
    assert tl.placed == [1.0, 1.0] and tl.in_mosaic == [1.0]
    assert tl.slide_bytes == [(1.0, 10)]
    journal.write_text(text + '{"kind": "written", "rows": 456}\n')
    tl.poll(102.5)
    assert tl.in_mosaic == [1.0, 2.5]
    tl.close(closed=103.0)
    assert tl.in_mosaic == [1.0, 2.5], "nothing was left out of the mosaic"


def test_steady_rate_is_the_middle_of_the_scan() -> None:
    # 10 tiles of 2 Mpx: the 2nd (20%) at 1 s, the 8th (80%) at 4 s -> 6 tiles x 2 Mpx / 3 s.
    times = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 9.0, 9.5]
    assert steady_rate(times, 10, 2.0) == pytest.approx(4.0)
    assert steady_rate(times[:5], 10, 2.0) is None, "fewer tiles than the 80% mark"
    assert steady_rate([1.0] * 10, 10, 2.0) is None, "all at once: no rate"


def test_e2e_profile_summaries_from_py_spy_and_perf_output() -> None:
    """``bench e2e --profile``: py-spy's collapsed stacks and perf's samples become per-thread and per-function
    seconds (at the sampling rate) and shares."""
    from bench.e2e import perf_summary, thread_names, top_functions

    collapsed = (
        "thread (101): MainThread;run (a/worker.py:3);add (a/acc.py:9);highpass (a/reg.py:5) 30\n"
        "thread (101): MainThread;run (a/worker.py:3);add (a/acc.py:9) 10\n"
        "thread (102): journal_0;save (a/journal.py:7) 20\n"
    )
    prof = top_functions(collapsed, rate=10)
    assert prof["seconds"] == 6.0
    assert prof["threads"][0] == ["MainThread", 4.0, round(40 / 60, 3)] and prof["threads"][1][0] == "journal"
    assert prof["self"][0] == ["highpass (reg.py)", 3.0, 0.5]
    assert ["add (acc.py)", 4.0, round(40 / 60, 3)] in prof["total"]
    tids = thread_names(collapsed)
    assert tids == {"101": "MainThread", "102": "journal_0"}
    script = (
        "101 7f00 sepFilter2D (/x/cv2.abi3.so)\n"
        "101 7f01 clear_page_erms ([kernel.kallsyms])\n"
        "103 7f02 [unknown] (/x/cv2.abi3.so)\n"
    )
    perf = perf_summary(script, tids, hz=2)
    assert perf["seconds"] == 1.5
    assert perf["threads"] == [["MainThread", 1.0, 0.667], ["native/other", 0.5, 0.333]]
    assert perf["libraries"][0] == ["cv2.abi3.so", 1.0, 0.667]
    assert ["clear_page_erms ([kernel.kallsyms])", 0.5, 0.333] in perf["symbols"]
