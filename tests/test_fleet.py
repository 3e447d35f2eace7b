"""``python -m runtime batch``: export and restitch over several slides on real dask clusters.

Every batch runs on a real ``distributed`` cluster and writes real files: the default
LocalCluster of worker processes (through the command line, as a user runs it), and a threaded
cluster reached with ``--scheduler`` (fast, for the rest). The inputs are tiny synthetic
recordings, the mosaics a restitch keeps, and a recording with one corrupt chunk.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hw_sim.synth import SynthParams, synthesize
from runtime.__main__ import main as runtime_main
from runtime.fleet import batch as fleet_batch
from runtime.fleet.batch import slide_name
from runtime.fleet.slides import DONE_MARKER, LOG_NAME, STARTED_MARKER
from runtime.output.mosaic_store import MosaicStore

distributed = pytest.importorskip("distributed", reason="the fleet extra (dask.distributed) is not installed")

TINY = SynthParams(fields_x=2, fields_y=2, tile=256, z_planes=5, z_step_um=0.5)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two good recordings and one whose last field's stack has a truncated chunk."""
    root = tmp_path_factory.mktemp("fleet-inputs")
    recs = {}
    for name, seed in (("slide-a", 21), ("slide-b", 22)):
        recs[name] = root / f"{name}.zarr"
        synthesize(recs[name], SynthParams(**{**TINY.__dict__, "seed": seed}), progress=False)
    broken = root / "broken.zarr"
    shutil.copytree(recs["slide-a"], broken)
    chunks = sorted(p for p in (broken / "stacks" / "c").rglob("*") if p.is_file())
    chunks[-1].write_bytes(chunks[-1].read_bytes()[:20])  # a disk error or a copy cut short
    recs["broken"] = broken
    return recs


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """An existing cluster to join with --scheduler (threads: quick to start, tcp like a real one)."""
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        protocol="tcp",
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    ) as cluster:
        yield cluster.scheduler_address


def _keep_mosaics(tmp_path: Path) -> Path:
    cfg = tmp_path / "keep.toml"
    cfg.write_text("[mosaic]\nkeep_after_export = true\n[fleet]\nworkers = 2\nmemory_limit_mib = 2048\n")
    return cfg


def _levels(tif: Path) -> list[tuple[int, int]]:
    with tifffile.TiffFile(tif) as t:
        return [tuple(level.shape[:2]) for level in t.series[0].levels]


def test_restitch_on_worker_processes_then_export_the_kept_mosaics(
    tmp_path: Path, inputs: dict[str, Path], scheduler: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "restitched"
    cmd = [sys.executable, "-m", "runtime", "batch", "restitch", *map(str, inputs.values())]
    cmd += ["--out", str(out), "--config", str(_keep_mosaics(tmp_path)), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    # The corrupt recording fails alone, in one line naming the array and field; the others finish.
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    failure = [line for line in proc.stderr.splitlines() if line.startswith("broken: failed:")]
    assert len(failure) == 1 and "RecordingError" in failure[0] and "field 3" in failure[0], proc.stderr
    assert "3 slides: 2 done, 0 skipped, 1 failed" in proc.stdout
    assert "Traceback" in (out / "broken" / LOG_NAME).read_text()  # kept for whoever debugs it
    assert not (out / "broken" / DONE_MARKER).exists()

    for name in ("slide-a", "slide-b"):
        folder = out / name
        marker = json.loads((folder / DONE_MARKER).read_text())
        assert marker["settings"]["job"] == "restitch"
        assert marker["details"] == {"fields": 4, "captures": 40}  # 9-plane sweep + the capture, per field
        with MosaicStore.open(folder / "mosaic.zarr") as mosaic:
            assert mosaic.complete
            assert _levels(folder / "slide.ome.tif") == mosaic.level_shapes
            level0 = mosaic.level(0)[:]
        with tifffile.TiffFile(folder / "slide.ome.tif") as t:
            assert t.series[0].levels[0].asarray().mean() == pytest.approx(level0.mean(), abs=3)  # JPEG
        report = json.loads((folder / "report.json").read_text())
        assert len(report["fields"]) == 4 and len(report["stitch"]["positions"]) == 4
        assert report["stitch"]["pairs"].get("ok", 0) >= 1  # registered, not just placed at the stage positions
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:5]}
    assert rows["slide-a"][1] == "done" and float(rows["slide-a"][3]) > 50  # the worker's peak MiB

    # Export the kept mosaics (a mosaic.zarr, and a scan folder holding one) on the existing cluster,
    # with export options the batch forwards; the recording among them is refused by name.
    exported = tmp_path / "exported"
    argv = ["batch", "export", str(out / "slide-a" / "mosaic.zarr"), str(out / "slide-b"), str(inputs["broken"])]
    argv += ["--out", str(exported), "--scheduler", scheduler, "--no-progress"]
    argv += ["--compression", "zstd", "--ome-zarr", "slide.ome.zarr"]
    assert runtime_main(argv) == 1
    captured = capsys.readouterr()
    assert "broken: failed:" in captured.err and "is a recording, not a mosaic" in captured.err
    for name in ("slide-a", "slide-b"):
        tif = exported / name / "slide.ome.tif"
        with tifffile.TiffFile(tif) as t:
            assert t.pages[0].compression == tifffile.COMPRESSION.ZSTD
            np.testing.assert_array_equal(
                t.series[0].levels[0].asarray(), MosaicStore.open(out / name / "mosaic.zarr").level(0)[:]
            )
        assert "multiscales" in json.loads((exported / name / "slide.ome.zarr" / ".zattrs").read_text())
        assert json.loads((exported / name / DONE_MARKER).read_text())["outputs"] == ["slide.ome.tif", "slide.ome.zarr"]


def test_rerun_skips_done_slides_and_redoes_unfinished_ones(
    tmp_path: Path, inputs: dict[str, Path], scheduler: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["batch", "restitch", str(inputs["slide-a"]), str(inputs["slide-b"]), "--out", str(out)]
    argv += ["--scheduler", scheduler, "--no-progress"]
    assert runtime_main(argv) == 0
    capsys.readouterr()
    first = {n: (out / n / "slide.ome.tif").stat().st_mtime_ns for n in ("slide-a", "slide-b")}

    # slide-b as a run killed mid-slide leaves it: started, some files, no completion marker.
    (out / "slide-b" / DONE_MARKER).unlink()
    (out / "slide-b" / "slide.ome.tif").write_bytes(b"half a file")
    assert runtime_main(argv) == 0
    table = capsys.readouterr().out
    assert "2 slides: 1 done, 1 skipped, 0 failed" in table
    assert (out / "slide-a" / "slide.ome.tif").stat().st_mtime_ns == first["slide-a"]  # not touched
    assert _levels(out / "slide-b" / "slide.ome.tif")  # rewritten whole
    assert (out / "slide-b" / DONE_MARKER).is_file()

    # Other settings into the same folders: refused per slide, nothing overwritten.
    assert runtime_main([*argv, "--compression", "deflate"]) == 1
    err = capsys.readouterr().err
    assert err.count("holds a result made with other settings") == 2
    assert (out / "slide-a" / "slide.ome.tif").stat().st_mtime_ns == first["slide-a"]


def test_a_folder_the_batch_did_not_write_is_left_alone(
    tmp_path: Path, inputs: dict[str, Path], scheduler: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    (out / "slide-a").mkdir(parents=True)
    (out / "slide-a" / "notes.txt").write_text("mine")
    argv = ["batch", "restitch", str(inputs["slide-a"]), "--out", str(out), "--scheduler", scheduler]
    assert runtime_main([*argv, "--no-progress"]) == 1
    assert "was not written by batch" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "slide-a").iterdir()) == ["notes.txt"]
    assert not (out / "slide-a" / STARTED_MARKER).exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["batch", "analyse", "x.zarr", "--out", "o"], "argument JOB: invalid choice: 'analyse'"),
        (["batch", "export", "x.zarr"], "the following arguments are required: --out"),
        (["batch", "export", "--out", "o"], "the following arguments are required: INPUT"),
        (["batch", "export", "x.zarr", "--out", "o", "--workers", "0"], "argument --workers: must be at least 1"),
        (["batch", "export", "x.zarr", "--out", "o", "--scheduler", "host:8786"], "expected tcp://HOST:PORT"),
        (["batch", "export", "x.zarr", "--out", "o", "--scheduler", "tcp://a:1", "--workers", "2"], "not allowed"),
        (["batch", "export", "x.zarr", "--out", "o", "--quality", "high"], "argument --quality: invalid int"),
        (["batch", "export", "x.zarr", "--out", "o", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_arguments_are_refused_by_name(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        runtime_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err, err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["a/slide.zarr", "b/slide.zarr"], "would both write"),
        (["x.zarr", "--ome-zarr", "/elsewhere/copy.ome.zarr"], "--ome-zarr /elsewhere/copy.ome.zarr: in a batch"),
        (["x.zarr", "--scheduler", "tcp://127.0.0.1:9"], "cannot reach the scheduler at tcp://127.0.0.1:9"),
    ],
)
def test_batch_errors_are_one_line_with_status_2(
    tmp_path: Path,
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fleet_batch, "CONNECT_TIMEOUT_S", 1.0)  # nothing listens on port 9
    monkeypatch.chdir(tmp_path)
    assert runtime_main(["batch", "export", *extra, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_slide_names() -> None:
    assert slide_name(Path("/data/rec-7.zarr")) == "rec-7"
    assert slide_name(Path("/scans/run1/mosaic.zarr")) == "run1"
    assert slide_name(Path("/cal/site3/recording.zarr")) == "site3"
    assert slide_name(Path("/scans/run2")) == "run2"
