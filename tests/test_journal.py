"""The scan journal's file format: append-only, fsynced lines, a torn last line tolerated, anything
else malformed refused with the line named; the spill and the INCOMPLETE marker."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from runtime.control.protocol import StartScanParams
from runtime.output.journal import (
    INCOMPLETE_NAME,
    JOURNAL_NAME,
    FieldEntry,
    JournalError,
    LinkEntry,
    ScanJournal,
    TileSpill,
    find_interrupted,
    mark_complete,
    read_journal,
)
from runtime.output.mosaic_store import MosaicStore

HEADER = {"scan_id": "scan-1", "request": {"output_name": "s"}, "fields": 4, "rows": 2, "cols": 2}


def _field(i: int) -> FieldEntry:
    link = LinkEntry((0, 0), (0, 1), (0.5, 230.25), (0.01, 0.01))
    focus = {"last_z_um": 1.5}
    return FieldEntry(i, i // 2, i % 2, {"z_um": 1.5}, focus, (link,), ("accepted",), (0.9,), (True, False))


def test_records_round_trip_and_status(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    with ScanJournal.create(folder, HEADER) as j:
        for i in range(3):
            j.append("field", **_field(i).to_json())
        j.append("placed", index=0, y=0.25, x=-0.5, iy=0, ix=0)
        j.append("written", rows=64)
        j.append("stopped", reason="failed", error="disk full: writer failed")
    state = read_journal(folder / JOURNAL_NAME)
    assert state.fields == [_field(i) for i in range(3)]
    assert state.rows_written == 64 and state.placements[0].x == -0.5
    assert (folder / INCOMPLETE_NAME).exists()
    found, problems = find_interrupted(tmp_path)
    assert problems == []
    assert [s.to_json() for s in found] == [
        {
            "scan_id": "scan-1",
            "output_dir": str(folder),
            "fields_durable": 3,
            "fields_total": 4,
            "reason": "failed: disk full: writer failed",
        }
    ]
    mark_complete(folder)  # the marker goes: no longer listed
    assert find_interrupted(tmp_path) == ([], [])


def test_a_torn_last_line_is_ignored_and_cut_before_appending(tmp_path: Path) -> None:
    with ScanJournal.create(tmp_path, HEADER) as j:
        j.append("field", **_field(0).to_json())
    path = tmp_path / JOURNAL_NAME
    whole = path.read_bytes()
    line = json.dumps({"kind": "field", **_field(1).to_json()}).encode()
    path.write_bytes(whole + line[: len(line) // 2])  # a power cut in the middle of a write
    state = read_journal(path)
    assert state.torn_tail and [f.index for f in state.fields] == [0]
    with ScanJournal.open(tmp_path) as j:
        assert path.read_bytes() == whole
        j.append("field", **_field(1).to_json())
    state = read_journal(path)
    assert not state.torn_tail and [f.index for f in state.fields] == [0, 1]


def test_a_malformed_line_is_an_error_naming_it(tmp_path: Path) -> None:
    with ScanJournal.create(tmp_path, HEADER) as j:
        j.append("field", **_field(0).to_json())
    path = tmp_path / JOURNAL_NAME
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[0], b"{not json", lines[1], b""]))
    with pytest.raises(JournalError, match="line 2 is not a valid journal record"):
        read_journal(path)
    path.write_bytes(b'{"kind": "field"}\n')
    with pytest.raises(JournalError, match="line 1: a 'field' record before the scan header"):
        read_journal(path)
    (tmp_path / "x").mkdir()
    with ScanJournal.create(tmp_path / "x", HEADER) as j:
        j.append("field", **_field(2).to_json())
        j.append("field", **_field(1).to_json())
    with pytest.raises(JournalError, match="field 1 journaled after field 2"):
        read_journal(tmp_path / "x" / JOURNAL_NAME)
    with pytest.raises(JournalError, match="cannot read the journal"):
        read_journal(tmp_path / "nowhere" / JOURNAL_NAME)


def test_the_spill_keeps_tiles_until_dropped(tmp_path: Path) -> None:
    spill = TileSpill(tmp_path)
    tile = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    spill.save(7, tile)
    assert spill.indices() == [7] and np.array_equal(spill.load(7), tile)
    spill.drop(7)
    assert spill.load(7) is None and spill.indices() == []


@pytest.mark.parametrize("shape", [(64, 64, 3), (21, 13, 3)])  # a whole number of 4 KiB blocks, and not
@pytest.mark.parametrize("aligned", [True, False])
def test_spilled_tiles_read_back_the_same_written_direct_or_not(
    tmp_path: Path, shape: tuple[int, ...], aligned: bool
) -> None:
    import mmap

    import runtime.output.journal as journal_module

    n = int(np.prod(shape))
    memory = mmap.mmap(-1, n + 4096)  # page-aligned, like a ring slot
    tile = np.frombuffer(memory, np.uint8, count=n, offset=0 if aligned else 1).reshape(shape)
    tile[...] = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    direct = journal_module._save_direct(tmp_path / "probe.npy", np.ascontiguousarray(tile))
    assert direct == aligned  # O_DIRECT from aligned memory (this test's file system takes it); never unaligned
    if direct:
        # the .npy's header is a whole block, so that the pixels start block-aligned
        assert (tmp_path / "probe.npy").stat().st_size == journal_module.DIRECT_ALIGN + n
        assert np.array_equal(np.load(tmp_path / "probe.npy"), tile)
    for use_direct in (True, False):
        (tmp_path / str(use_direct)).mkdir()
        spill = TileSpill(tmp_path / str(use_direct), direct=use_direct)
        spill.save(5, tile)
        assert np.array_equal(spill.load(5), tile) and spill.indices() == [5]
    del tile


def test_resume_takes_no_other_parameter() -> None:
    assert StartScanParams.model_validate({"resume": "scan-20260101-000000"}).resume == "scan-20260101-000000"
    with pytest.raises(ValidationError, match="remove output_name"):
        StartScanParams.model_validate({"resume": "scan-1", "output_name": "x"})
    with pytest.raises(ValidationError, match="resume"):
        StartScanParams.model_validate({"resume": "../etc"})


# -- the stitcher's journal replayed in process: real Zarr, real journal and spill, no workers ------


@pytest.fixture(scope="module")
def stitch_recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hw_sim.synth import SynthParams, synthesize

    params = SynthParams(fields_x=4, fields_y=3, tile=256, seed=3, z_planes=1, coarse_focus_error_um=0.0)
    return synthesize(tmp_path_factory.mktemp("journal-rec") / "rec.zarr", params)


def _stitch_journaled(
    rec_path: Path, folder: Path, stop_after: int | None, resume: bool = False, flush_at_kill: bool = True
) -> MosaicStore:
    """Stitch the recording's tiles with the journal in ``folder`` (as the stitcher worker does),
    up to ``stop_after`` tiles (then drop everything, as a SIGKILL would), or resume from it."""
    from hw_sim.synth import SynthParams, grid_for
    from runtime.config import StitchConfig
    from runtime.devices.recording import Recording
    from runtime.ipc.messages import FieldRecord, TileReady
    from runtime.stitching.accumulator import DequeAccumulator, MosaicGeometry
    from runtime.workers.stitcher import JournalObserver, reopen_mosaic
    from runtime.workers.stitcher import resume as resume_journal

    rec = Recording.open(rec_path)
    m = rec.meta
    plan = grid_for(SynthParams(fields_x=m.cols, fields_y=m.rows, tile=m.tile_width, overlap=m.overlap))
    geometry = MosaicGeometry(plan, m.tile_height, m.tile_width, m.pixel_size_um)
    observer: JournalObserver | None = None

    def on_rows(level: int, rows: int) -> None:
        if observer is not None:
            observer.rows(level, rows)

    path = folder / "mosaic.zarr"
    h, w = geometry.shape

    def create() -> MosaicStore:
        px = m.pixel_size_um
        return MosaicStore.create(
            path, h, w, chunk=64, pixel_size_um=px, min_level_size=64, on_rows=on_rows, overwrite=True
        )

    if resume:
        store = reopen_mosaic(path, read_journal(folder / JOURNAL_NAME), create, on_rows)
        journal = ScanJournal.open(folder)
    else:
        store = create()
        journal = ScanJournal.create(folder, {**HEADER, "fields": len(plan.fields)})
    acc = DequeAccumulator(geometry, store, StitchConfig(stage_sigma_um=2.0, max_stage_error_um=6.0))
    observer = JournalObserver(journal, folder, geometry, store)
    acc.observer = observer
    start = 0
    if resume:
        state = read_journal(folder / JOURNAL_NAME)
        resume_journal(acc, store, state, observer)
        start = len(state.fields)
    for n, f in enumerate(plan.fields[start:], start=start):
        if stop_after is not None and n == stop_after:
            observer.close(flush=flush_at_kill)  # False: the disk work still queued is lost
            return store
        tile = rec.plane(rec.field_index(f.row, f.col), 0)
        observer.save_tile(f.index, tile)
        observer.current = TileReady(0, FieldRecord(f.index, f.row, f.col, f.x_um, f.y_um, 0.0, 1, "test"), f)
        acc.add(f, tile)  # type: ignore[arg-type]
        observer.wait_tile(f.index)
    assert acc.finish()
    store.finish()
    observer.close()
    return store


def test_a_crash_before_the_journal_thread_caught_up_resumes_the_same_mosaic(
    stitch_recording: Path, tmp_path: Path
) -> None:
    """The journal's disk work runs behind the tiles (JournalObserver's thread): a crash loses what it
    had not done yet, and the resumed scan still makes the same mosaic (it captures those fields again)."""
    (tmp_path / "ref").mkdir()
    ref = _stitch_journaled(stitch_recording, tmp_path / "ref", None)
    folder = tmp_path / "killed"
    folder.mkdir()
    _stitch_journaled(stitch_recording, folder, 10, flush_at_kill=False)
    killed = read_journal(folder / JOURNAL_NAME)
    assert len(killed.fields) <= 10
    spilled = set(TileSpill(folder).indices())
    # Never a field record without its tile, unless its rows are written (then the tile may be gone).
    for entry in killed.fields:
        assert entry.index in spilled or killed.rows_written > 0
    resumed = _stitch_journaled(stitch_recording, folder, None, resume=True)
    for k in range(ref.n_levels):
        assert np.array_equal(np.asarray(resumed.level(k)[:]), np.asarray(ref.level(k)[:])), f"level {k}"


@pytest.mark.parametrize("killed_at", [0, 3, 6, 9])
def test_a_replayed_journal_stitches_the_same_mosaic(stitch_recording: Path, tmp_path: Path, killed_at: int) -> None:
    (tmp_path / "ref").mkdir()
    ref = _stitch_journaled(stitch_recording, tmp_path / "ref", None)
    folder = tmp_path / "killed"
    folder.mkdir()
    _stitch_journaled(stitch_recording, folder, killed_at)
    if killed_at == 0:  # killed before the stitcher had made the mosaic
        shutil.rmtree(folder / "mosaic.zarr")
    killed = read_journal(folder / JOURNAL_NAME)
    assert len(killed.fields) == killed_at
    ghosts = [f.index for f in killed.fields if f.index not in TileSpill(folder).indices()]
    resumed = _stitch_journaled(stitch_recording, folder, None, resume=True)
    assert np.array_equal(np.asarray(resumed.level(0)[:]), np.asarray(ref.level(0)[:]))
    for k in range(1, ref.n_levels):
        assert np.array_equal(np.asarray(resumed.level(k)[:]), np.asarray(ref.level(k)[:]))
    if killed_at >= 9:
        assert ghosts, "no field was replayed without its pixels"
