"""The data root cannot be escaped by links: recordings that lead outside it are refused, outputs
are written only into new (or empty) folders, exclusively and never through a link.

The daemon tests share one daemon (module scope) and its data root; each test uses its own names.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hw_sim.replay_job import run_demo, run_replay
from runtime.control.client import ControlClient, RequestFailed
from runtime.daemon.process import start_daemon_process, stop_daemon_process
from runtime.output.tiff_stream import COMPRESSION_NONE, TiffPage, TiffStreamWriter
from runtime.paths import (
    UnsafePath,
    check_output_folder,
    check_tree_within,
    create_exclusive,
    folder_identity,
    is_within,
    make_output_folder,
    resolve_under,
    write_file_exclusive,
)
from tests.conftest import daemon_config
from tests.test_daemon import _wait_idle

SECRET = b"not the daemon's to read or write\n"


def _outside(tmp: Path, name: str = "victim.bin") -> Path:
    """A file outside the data root that no request may touch."""
    folder = tmp / "outside"
    folder.mkdir(exist_ok=True)
    victim = folder / name
    victim.write_bytes(SECRET)
    return victim


def _snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry below ``folder`` (links not followed): file bytes, or a link's target."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = "dir"
    return out


# ----------------------------------------------------------------------------- helpers, no daemon


def test_is_within_is_by_component_not_by_prefix() -> None:
    assert is_within("/data", "/data") and is_within("/data/a/b", "/data") and is_within("/data/a", "/data/")
    assert not is_within("/database", "/data") and not is_within("/", "/data")
    assert is_within("/anything", "/")


def test_resolve_under_refuses_names_and_links_out(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "rec").mkdir(parents=True)
    assert resolve_under(root, "rec", "recording") == (root / "rec").resolve()
    (root / "escape").symlink_to(tmp_path)
    for bad in ("../x", "/etc", "escape/x"):
        with pytest.raises(UnsafePath, match=r"^recording: .* is outside the data root"):
            resolve_under(root, bad, "recording")


def _tree(root: Path) -> Path:
    rec = root / "rec.zarr"
    (rec / "stacks" / "c" / "0").mkdir(parents=True)
    (rec / "zarr.json").write_text("{}")
    (rec / "stacks" / "c" / "0" / "0").write_bytes(b"chunk")
    return rec


def test_check_tree_within_accepts_files_and_links_inside(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rec = _tree(root)
    (root / "shared").mkdir()
    (root / "shared" / "z_um.bin").write_bytes(b"z")
    (rec / "z_um").symlink_to(root / "shared")  # a folder link inside the data root: walked too
    (rec / "again").symlink_to("stacks")  # a second way into a folder already walked
    assert check_tree_within(rec, root, "recording") == 8
    (rec / "up").symlink_to("..")  # a link back up the tree is no loop: the data root, walked once
    assert check_tree_within(rec, root, "recording") == 8 + 1 + 2  # "up", then rec.zarr and shared


@pytest.mark.parametrize("where", ["stacks", "stacks/c/0/1", "zarr.json.lnk"])
def test_check_tree_within_refuses_a_link_out_and_names_it(tmp_path: Path, where: str) -> None:
    root = tmp_path / "data"
    rec = _tree(root)
    victim = _outside(tmp_path)
    target = victim.parent if where == "stacks" else victim
    if where == "stacks":
        shutil.rmtree(rec / "stacks")
    (rec / where).symlink_to(target)
    with pytest.raises(UnsafePath) as info:
        check_tree_within(rec, root, "recording")
    msg = str(info.value)
    assert msg.startswith("recording: ") and "outside the data root" in msg
    assert str(rec.resolve() / where) in msg and str(target) in msg


def test_check_tree_within_follows_links_inside_to_links_out(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rec = _tree(root)
    (root / "hop").mkdir()
    (root / "hop" / "out").symlink_to(_outside(tmp_path).parent)
    (rec / "extra").symlink_to(root / "hop")  # inside, but what it holds leads out
    with pytest.raises(UnsafePath, match=r"hop/out is a symbolic link to .*outside, outside the data root"):
        check_tree_within(rec, root, "recording")


def test_check_tree_within_refuses_broken_looping_and_special_entries(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rec = _tree(root)
    (rec / "loop").symlink_to("loop")
    with pytest.raises(UnsafePath, match="loop is a broken or looping symbolic link"):
        check_tree_within(rec, root, "recording")
    (rec / "loop").unlink()
    (rec / "gone").symlink_to(root / "nowhere")
    with pytest.raises(UnsafePath, match="gone is a broken or looping symbolic link"):
        check_tree_within(rec, root, "recording")
    (rec / "gone").unlink()
    os.mkfifo(rec / "pipe")
    with pytest.raises(UnsafePath, match="pipe is neither a file nor a folder"):
        check_tree_within(rec, root, "recording")


def test_check_tree_within_is_bounded(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rec = _tree(root)
    with pytest.raises(UnsafePath, match="more than 3 files and folders"):
        check_tree_within(rec, root, "recording", max_entries=3)
    with pytest.raises(UnsafePath, match="nested more than 2 folders deep"):
        check_tree_within(rec, root, "recording", max_depth=2)
    with pytest.raises(UnsafePath, match="leads outside the data root"):
        check_tree_within(tmp_path, root, "recording")


def test_output_folder_must_be_new_or_empty(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    made = make_output_folder(root, "new", "output_name")
    assert made == root.resolve() / "new" and made.is_dir() and not made.is_symlink()
    assert check_output_folder(root / "absent", "output_name") is False
    assert check_output_folder(made, "output_name") is True
    shared = root / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert make_output_folder(root, "shared", "output_name") == shared.resolve()
    assert stat.S_IMODE(shared.stat().st_mode) & 0o022 == 0, "an accepted folder is closed to others"
    _tree(root)
    (root / "scan").mkdir()
    (root / "scan" / "report.json").write_text("{}")
    (root / "seeded").mkdir()
    (root / "seeded" / "report.json.partial").symlink_to(_outside(tmp_path))
    (root / "link").symlink_to(tmp_path / "outside")
    (root / "file").write_bytes(b"x")
    cases = {
        "rec.zarr": "holds a recording",
        "scan": "already holds a scan",
        "seeded": "is not empty (report.json.partial)",
        "link": "is a symbolic link",
        "file": "exists and is not a folder",
    }
    for name, what in cases.items():
        with pytest.raises(UnsafePath) as info:
            make_output_folder(root, name, "output_name")
        assert str(info.value).startswith(f"output_name: {root.resolve() / name} {what}")
        assert "new or empty folder" in str(info.value)
    for bad in ("", ".", "..", "a/b"):
        with pytest.raises(UnsafePath, match="not a plain folder name"):
            make_output_folder(root, bad, "output_name")


def test_create_exclusive_never_writes_through_a_link(tmp_path: Path) -> None:
    victim = _outside(tmp_path)
    planted = tmp_path / "slide.ome.tif.partial"
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        os.close(create_exclusive(planted))
    fd = create_exclusive(planted, replace_stale=True)
    with os.fdopen(fd, "wb") as f:
        f.write(b"new")
    assert victim.read_bytes() == SECRET
    assert not planted.is_symlink() and planted.read_bytes() == b"new"


def test_write_file_exclusive_replaces_links_not_their_targets(tmp_path: Path) -> None:
    out = tmp_path / "scan"
    out.mkdir()
    victims = [_outside(tmp_path, "a"), _outside(tmp_path, "b")]
    (out / "report.json.partial").symlink_to(victims[0])
    (out / "report.json").symlink_to(victims[1])
    assert write_file_exclusive(out, "report.json", b"{}") == out / "report.json"
    assert [v.read_bytes() for v in victims] == [SECRET, SECRET]
    assert not (out / "report.json").is_symlink() and (out / "report.json").read_bytes() == b"{}"
    assert sorted(os.listdir(out)) == ["report.json"]
    ident = folder_identity(out)
    swapped = tmp_path / "swapped"
    out.rename(swapped)
    out.mkdir()
    with pytest.raises(UnsafePath, match="was replaced by another folder"):
        write_file_exclusive(out, "report.json", b"{}", folder_id=ident)
    out.rmdir()
    out.symlink_to(tmp_path / "outside")
    with pytest.raises(OSError) as info:
        write_file_exclusive(out, "report.json", b"{}")
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert sorted(os.listdir(tmp_path / "outside")) == ["a", "b"]


def test_tiff_stream_writer_replaces_a_planted_link(tmp_path: Path) -> None:
    victim = _outside(tmp_path)
    partial = tmp_path / "slide.ome.tif.partial"
    partial.symlink_to(victim)
    page = TiffPage(height=16, width=16, tile=16, compression=COMPRESSION_NONE)
    with TiffStreamWriter(partial, [page]) as w:
        w.write_tile(0, 0, 0, bytes(16 * 16 * 3))
    assert victim.read_bytes() == SECRET
    assert not partial.is_symlink() and partial.stat().st_size > 16 * 16 * 3


# ----------------------------------------------------------------------------- a real daemon


@pytest.fixture(scope="module")
def data_daemon(
    tmp_path_factory: pytest.TempPathFactory, small_recording: Path
) -> Iterator[tuple[Path, Path, ControlClient]]:
    """(data root, a folder outside it, client) of a daemon with the replay driver."""
    tmp = tmp_path_factory.mktemp("dataroot")
    data = tmp / "data"
    runtime_dir = Path("/tmp") / f"wsirt-dr-{os.getpid()}"  # ipc paths must stay short
    cfg = daemon_config(data, runtime_dir, small_recording)
    proc = start_daemon_process(cfg)
    client = ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=15)
    try:
        client.request("ping")
        yield data, tmp / "outside", client
    finally:
        client.close()
        exitcode = stop_daemon_process(proc, cfg)
        assert exitcode == 0, f"daemon exited with {exitcode}"


def _refused(client: ControlClient, **params: Any) -> str:
    with pytest.raises(RequestFailed) as info:
        client.request("start_scan", **params)
    assert info.value.code == "invalid_params", info.value
    assert client.request("status")["state"] == "idle"
    return info.value.message


def test_recording_whose_stacks_link_out_is_refused(
    data_daemon: tuple[Path, Path, ControlClient], small_recording: Path
) -> None:
    data, outside, client = data_daemon
    outside.mkdir(exist_ok=True)
    shutil.copytree(small_recording / "stacks", outside / "stacks")  # someone else's data
    before = _snapshot(outside)
    rec = data / "evil.zarr"
    shutil.copytree(small_recording, rec, ignore=shutil.ignore_patterns("stacks"))
    (rec / "stacks").symlink_to(outside / "stacks")
    msg = _refused(client, recording="evil.zarr", output_name="evil-scan")
    target = os.path.realpath(outside / "stacks")
    assert msg.startswith(
        f"recording: {rec.resolve() / 'stacks'} is a symbolic link to {target}, outside the data root"
    )
    assert not (data / "evil-scan").exists(), "a refused request leaves nothing behind"
    # One chunk linked out, deep in a recording that is otherwise a copy: refused as well.
    deep = data / "deep.zarr"
    shutil.copytree(small_recording, deep)
    chunk = next(p for p in sorted((deep / "stacks").rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.unlink()
    chunk.symlink_to(next(p for p in sorted((outside / "stacks").rglob("*")) if p.is_file()))
    msg = _refused(client, recording=str(deep), output_name="deep-scan")
    assert str(chunk.parent.resolve() / chunk.name) in msg and "outside the data root" in msg
    assert _snapshot(outside) == before


def test_pre_seeded_output_folder_is_refused(data_daemon: tuple[Path, Path, ControlClient]) -> None:
    data, outside, client = data_daemon
    victims = [_outside(outside.parent, "slide-victim"), _outside(outside.parent, "report-victim")]
    seeded = data / "seeded"
    seeded.mkdir()
    (seeded / "slide.ome.tif.partial").symlink_to(victims[0])
    (seeded / "report.json.partial").symlink_to(victims[1])
    before = _snapshot(seeded)
    msg = _refused(client, output_name="seeded")
    assert msg == (
        f"output_name: {seeded.resolve()} is not empty (report.json.partial, slide.ome.tif.partial); "
        "scans are written only into a new or empty folder"
    )
    assert [v.read_bytes() for v in victims] == [SECRET, SECRET]
    assert _snapshot(seeded) == before, "the planted links are left as they were, not replaced by outputs"
    assert not (seeded / "slide.ome.tif").exists() and not (seeded / "report.json").exists()


def test_output_folder_that_is_a_link_is_refused(data_daemon: tuple[Path, Path, ControlClient]) -> None:
    data, outside, client = data_daemon
    target = outside / "empty-target"
    target.mkdir(parents=True)
    (data / "linked").symlink_to(target)
    msg = _refused(client, output_name="linked")
    assert msg.startswith(f"output_name: {data.resolve() / 'linked'} is a symbolic link")
    assert os.listdir(target) == []


def test_output_name_naming_a_recording_is_refused(
    data_daemon: tuple[Path, Path, ControlClient], small_recording: Path
) -> None:
    data, _, client = data_daemon
    rec = data / "kept.zarr"
    shutil.copytree(small_recording, rec)
    before = _snapshot(rec)
    msg = _refused(client, recording="kept.zarr", output_name="kept.zarr")
    assert msg.startswith(f"output_name: {rec.resolve()} holds a recording (zarr.json)")
    assert _snapshot(rec) == before


def test_normal_scan_still_works_and_is_not_rescanned_into(
    data_daemon: tuple[Path, Path, ControlClient], small_recording: Path
) -> None:
    data, _, client = data_daemon
    # A recording whose stacks live elsewhere *inside* the data root: that is allowed.
    store = data / "store"
    store.mkdir()
    shutil.copytree(small_recording / "stacks", store / "stacks")
    rec = data / "good.zarr"
    shutil.copytree(small_recording, rec, ignore=shutil.ignore_patterns("stacks"))
    (rec / "stacks").symlink_to(store / "stacks")
    out = data / "good-scan"
    out.mkdir()
    out.chmod(0o775)  # an existing empty folder of the daemon's user is fine; it is closed to others
    started = client.request("start_scan", recording="good.zarr", output_name="good-scan")
    assert started["output_dir"] == str(out.resolve())
    st = _wait_idle(client)
    assert st["last_finish"] == "completed", st
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    names = sorted(os.listdir(out))
    assert names == ["report.json", "slide.ome.tif"], names
    for name in names:
        assert stat.S_ISREG(os.lstat(out / name).st_mode)
    report = json.loads((out / "report.json").read_text())
    assert report["finish_reason"] == "completed" and report["fields_done"] == 9
    msg = _refused(client, output_name="good-scan")
    assert "already holds a scan (report.json)" in msg


# ----------------------------------------------------------------------------- hw_sim


def test_replay_refuses_a_non_empty_out_before_starting_a_daemon(tmp_path: Path, small_recording: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"--out: .*busy is not empty \(notes.txt\)"):
        run_replay(small_recording, out, progress=False)
    assert os.listdir(out) == ["notes.txt"]


def test_demo_keeps_recording_and_scan_apart(tmp_path: Path, small_recording: Path) -> None:
    out = tmp_path / "demo"
    shutil.copytree(small_recording, out / "recording.zarr")  # the demo reuses a recording it finds
    rec_before = _snapshot(out / "recording.zarr")
    for _ in range(2):  # a re-run replaces the demo's own scan folder
        report = run_demo(out)
        assert sorted(os.listdir(out)) == ["recording.zarr", "scan"]
        # The demo scans with the slide analysis on: its outputs beside the slide, none in ``out``.
        analysis = ["analysis.json", "annotations.geojson", "attention.png", "heatmap.ome.tif", "heatmap.png"]
        assert sorted(os.listdir(out / "scan")) == sorted([*analysis, "nuclei.geojson", "report.json", "slide.ome.tif"])
        assert report["finish_reason"] == "completed" and "focus_truth" in report
        assert report["analysis"].get("error") is None, report["analysis"]
    assert _snapshot(out / "recording.zarr") == rec_before


def test_replay_out_may_not_exist_yet(tmp_path: Path, small_recording: Path) -> None:
    out = tmp_path / "scans" / "run1"
    report = run_replay(small_recording, out, progress=False)
    assert report["finish_reason"] == "completed"
    assert sorted(os.listdir(out)) == ["report.json", "slide.ome.tif"]
    assert json.loads((out / "report.json").read_text())["focus_truth"] == report["focus_truth"]
