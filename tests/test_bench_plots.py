"""``python -m bench <name> --plot DIR`` (PNG charts of the tables) and ``python -m bench batch``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import plots
from bench.__main__ import BENCHES
from bench.__main__ import main as bench_main
from bench.report import Column

matplotlib_image = pytest.importorskip("matplotlib.image", reason="matplotlib (the bench extra) is not installed")

BAR = np.array([0x4C, 0x72, 0xB0]) / 255  # the bars' colour in bench/plots.py


def _bar_pixels(png: Path) -> int:
    image = matplotlib_image.imread(png)[..., :3]
    return int(np.all(np.abs(image - BAR) < 0.02, axis=-1).sum())


def test_a_table_becomes_one_bar_chart_per_numeric_column(tmp_path: Path) -> None:
    rows = [
        {"name": "small", "mpx_s": 12.5, "peak": 100, "note": "warm", "empty": None},
        {"name": "large", "mpx_s": 25.0, "peak": 300, "note": None, "empty": None},
    ]
    columns = [Column("name", "size"), Column("mpx_s", "Mpx/s", ".1f"), Column("peak", "peak MiB")]
    columns += [Column("note", "page cache"), Column("empty", "never measured")]
    png = plots.table_chart(rows, columns, "writer", tmp_path / "t.png")
    assert png is not None
    width = matplotlib_image.imread(png).shape[1]
    assert width == round((4.6 * 2 + 1.5) * 110)  # two numeric columns: two panels side by side
    two = _bar_pixels(png)
    assert two > 1000

    # The longest bar spans its panel whatever the scale: twice the values, the same picture.
    doubled = [{**r, "mpx_s": 2 * r["mpx_s"]} for r in rows]
    assert _bar_pixels(plots.table_chart(doubled, columns, "writer", tmp_path / "d.png")) == pytest.approx(
        two, rel=0.05
    )
    # A row without a value draws no bar (its label says "-"), and the chart is still drawn.
    blank = [rows[0], {**rows[1], "mpx_s": None, "peak": None}]
    zero = [rows[0], {**rows[1], "mpx_s": 0.0, "peak": 0}]
    no_bar = _bar_pixels(plots.table_chart(zero, columns, "writer", tmp_path / "z.png"))
    assert _bar_pixels(plots.table_chart(blank, columns, "writer", tmp_path / "b.png")) == no_bar
    assert plots.table_chart(rows, [columns[0], columns[3]], "", tmp_path / "n.png") is None  # nothing to draw
    assert plots._label(rows[0], columns) == "small"
    assert plots._label({"w": 2}, [Column("w", "workers")]) == "workers 2"


def test_a_timeline_draws_each_series_and_its_second_axis(tmp_path: Path) -> None:
    """bench e2e's timeline: step lines of counts over time, the slide's MiB dashed on the right."""
    series = {"captured": [(0.0, 0.0), (1.0, 1.0), (2.0, 2.0)], "placed": [(0.0, 0.0), (1.5, 1.0), (2.5, 2.0)]}
    out = plots.timeline_chart(
        series, tmp_path / "t.png", ylabel="tiles", secondary=("MiB", [(1.0, 0.5), (3.0, 2.0)]), marks={"closed": 3.0}
    )
    image = matplotlib_image.imread(out)[..., :3]
    blue, orange = np.array([0x1F, 0x77, 0xB4]) / 255, np.array([0xFF, 0x7F, 0x0E]) / 255  # matplotlib's C0, C1
    for colour in (blue, orange):
        assert np.all(np.abs(image - colour) < 0.02, axis=-1).sum() > 100, "a series is missing"
    # Outside a --plot session a bench's timeline call draws nothing.
    assert plots.timeline("timeline", series, ylabel="tiles") is None and not plots.written()


def test_every_bench_takes_plot(capsys: pytest.CaptureFixture[str]) -> None:
    for name in BENCHES:
        with pytest.raises(SystemExit) as exc:
            bench_main([name, "--help"])
        assert exc.value.code == 0
        assert "--plot DIR" in capsys.readouterr().out, name


def test_plot_into_a_folder_that_cannot_exist_is_refused_before_the_bench(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exc:
        bench_main(["batch", "--plot", str(tmp_path / "file" / "charts")])
    assert exc.value.code == 2
    assert "error: --plot" in capsys.readouterr().err


def test_batch_bench_isolates_the_injected_failure_and_draws_it(tmp_path: Path) -> None:
    charts = tmp_path / "charts"
    cmd = [sys.executable, "-m", "bench", "batch", "--recordings", "2", "--fields", "2", "2", "--tile", "256"]
    cmd += ["--z-planes", "5", "--workers", "1", "--json", "--workdir", str(tmp_path / "w"), "--plot", str(charts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["injected_failure_isolated"] is True
    (row,) = result["results"]
    assert row["workers"] == 1 and row["done"] == 2 and row["failed"] == 1
    assert list(row["failures"]) == ["corrupt"] and "RecordingError" in row["failures"]["corrupt"]
    assert row["slides_per_hour"] > 0 and row["s_per_slide"] > 0
    assert 50 < row["peak_mib_per_worker"] < 4096 and len(row["peak_mib_by_worker"]) == 1
    assert row["rerun_skipped"] == 2
    assert f"chart: {charts / 'batch.png'}" in proc.stderr
    assert _bar_pixels(charts / "batch.png") > 1000
