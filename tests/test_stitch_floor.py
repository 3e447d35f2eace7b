"""``python -m bench stitch --floor``: the per-step CPU floor is measured and adds up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main


def test_the_floor_bench_times_every_step_and_sums_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["stitch", "--floor", "--fields", "4", "3", "--tile", "256", "--workdir", str(tmp_path), "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    steps = ("resample", "register", "blend", "downsample", "zstd")
    assert all(r[s] > 0 for s in (*steps, "zstd_decode", "jpeg", "lz4"))
    assert r["stitcher_floor"] == pytest.approx(sum(r[s] for s in steps))
    assert r["daemon_floor"] == pytest.approx(r["stitcher_floor"] + r["zstd_decode"] + r["jpeg"])
    assert r["best_mpx_per_s_2_cores"] == pytest.approx(2000 / r["daemon_floor"])
    assert sum(r["pairs"].values()) > 0 and r["register_pair_ms"] > 0 and r["register_pair_near_ms"] > 0
    # The daemon as configured: no zstd (codec none), but the gain, the strips' test, raw chunk files, the spill.
    extras = ("flatfield", "strip_texture", "chunk_write", "tile_spill")
    assert all(r[s] > 0 for s in extras)
    assert r["stitcher_as_configured"] == pytest.approx(r["stitcher_floor"] - r["zstd"] + sum(r[s] for s in extras))
    assert r["chunk_read"] > 0 and r["writer_as_configured"] == pytest.approx(r["chunk_read"] + r["jpeg"])
    assert r["daemon_as_configured"] == pytest.approx(r["stitcher_as_configured"] + r["writer_as_configured"])


def test_the_resample_bench_scores_every_kernel_against_truth(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("skimage.data")
    assert main(["stitch", "--resample", "--json"]) == 0
    rows = {r["kernel"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(rows) == {"cubic", "lanczos3", "opencv cubic"}
    for r in rows.values():
        assert r["ms_per_tile"] > 0
        # Sub-DN on noiseless simulator frames; a kernel moving the wrong way is several DN off.
        assert 0 < r["simulator_dn"] < 1.0 and r["simulator_noisy_dn"] > r["simulator_dn"]
        assert 0 < r["photo_dn"] < r["photo_noisy_dn"] < 6.0
    # The default kernel's reason (deterministic: seeded noise): closer to the truth on noisy frames.
    assert rows["cubic"]["simulator_noisy_dn"] < rows["lanczos3"]["simulator_noisy_dn"]
