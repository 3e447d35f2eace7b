"""Resume after SIGKILL: the daemon and every worker killed mid-scan, a new daemon lists the scan as
interrupted and resumes it; the slide equals an uninterrupted scan's. Real processes, shared memory,
sockets and Zarr stores throughout."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import tifffile

from runtime.config import RuntimeConfig
from runtime.control.client import ControlClient, RequestFailed
from runtime.daemon.process import daemon_running, wait_finished
from runtime.output.journal import INCOMPLETE_NAME, JOURNAL_NAME, TILES_DIR, TileSpill, read_journal
from runtime.output.mosaic_store import MosaicStore
from tests.conftest import daemon_config

# Small chunks so that mosaic rows become durable while the 3 x 3 scan runs (ghost fields on replay).
SECTIONS: dict[str, dict[str, Any]] = {
    "mosaic": {"chunk": 64, "keep_after_export": True},  # the journal goes with the mosaic otherwise
    "writer": {"tile": 64, "min_level_size": 128},
}


def scan_once(cfg: RuntimeConfig, name: str) -> Path:
    with daemon_running(cfg) as (_, client):
        scan_id = client.request("start_scan", output_name=name)["scan_id"]
        st = wait_finished(client, scan_id)
        assert st["last_finish"] == "completed", st
        assert (st["fields_done"], st["fields_total"]) == (9, 9)  # status keeps the finished scan's counts
    return cfg.daemon.data_root / name


def power_cut(daemon_pid: int) -> list[int]:
    """Stop, then kill, the daemon and every process under it at once (as a power cut would leave
    them); returns their pids."""
    everyone = [daemon_pid, *(c.pid for c in psutil.Process(daemon_pid).children(recursive=True))]
    for pid in everyone:
        os.kill(pid, signal.SIGSTOP)
    for pid in everyone:
        os.kill(pid, signal.SIGKILL)
    return everyone


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def positions(report: dict[str, Any]) -> dict[int, tuple[float, float]]:
    return {p["index"]: (p["y_px"], p["x_px"]) for p in report["stitch"]["positions"]}


def segments_of(pids: list[int]) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if any(n.startswith(f"wsirt_{p}_") for p in pids)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, small_recording: Path) -> Path:
    root = tmp_path_factory.mktemp("ref")
    cfg = daemon_config(root / "data", Path("/tmp") / f"wsirt-ref-{os.getpid()}", small_recording, **SECTIONS)
    return scan_once(cfg, "ref")


def test_journal_of_a_completed_scan(reference: Path) -> None:
    state = read_journal(reference / JOURNAL_NAME)
    assert state.completed and state.stopped is None and not state.torn_tail
    assert state.header is not None and state.header["fields"] == 9
    assert [f.index for f in state.fields] == list(range(9))
    assert all(f.record["z_um"] is not None and f.focus for f in state.fields)
    assert sorted(state.placements) == list(range(9))
    assert state.flatfield_after is not None
    assert any(f.links for f in state.fields)  # registration measured and journaled
    report = json.loads((reference / "report.json").read_text())
    assert report["complete"] is True and report["resumable"] is False
    assert state.rows_written == report["levels"][0][0]
    # A complete scan loses its marker and its spill.
    assert not (reference / INCOMPLETE_NAME).exists() and not (reference / TILES_DIR).exists()
    assert not (reference / "flatfield.npz").exists()


def test_cancelled_scan_resumes_to_the_same_slide(tmp_path: Path, small_recording: Path, reference: Path) -> None:
    """A cancel flushes every band into the mosaic (for an export), final or not; the resume rewinds
    the mosaic to the journal's rows and rewrites them."""
    cfg = daemon_config(
        tmp_path / "data",
        Path("/tmp") / f"wsirt-cancel-{os.getpid()}",
        None,
        driver={"options": {"recording": str(small_recording), "pace": 2.0}},
        **SECTIONS,
    )
    folder = cfg.daemon.data_root / "cancelled"
    with daemon_running(cfg) as (_, client):
        scan_id = client.request("start_scan", output_name="cancelled")["scan_id"]
        deadline = time.monotonic() + 60
        while (st := client.request("status"))["fields_done"] < 5:
            assert time.monotonic() < deadline, st
            time.sleep(0.02)
        client.request("cancel")
        assert wait_finished(client, scan_id)["last_finish"] == "cancelled"
        report = json.loads((folder / "report.json").read_text())
        assert report["complete"] is False and report["resumable"] is True
        state = read_journal(folder / JOURNAL_NAME)
        assert state.stopped == {"reason": "cancelled", "error": None}
        store = MosaicStore.open(folder / "mosaic.zarr")
        assert store.rows_written > state.rows_written  # the cancel's flush went past what is final
        client.request("start_scan", resume=scan_id)
        assert wait_finished(client, scan_id)["last_finish"] == "completed"
    a = tifffile.imread(folder / "slide.ome.tif", level=0)
    b = tifffile.imread(reference / "slide.ome.tif", level=0)
    assert psnr(a, b) >= 45.0


def test_sigkill_everything_mid_scan_then_resume(tmp_path: Path, small_recording: Path, reference: Path) -> None:
    runtime_dir = Path("/tmp") / f"wsirt-resume-{os.getpid()}"
    slow = daemon_config(
        tmp_path / "data",
        runtime_dir,
        None,
        driver={"options": {"recording": str(small_recording), "pace": 3.0}},
        **SECTIONS,
    )
    with daemon_running(slow) as (proc, client):
        scan_id = client.request("start_scan", output_name="killed")["scan_id"]
        deadline = time.monotonic() + 60
        folder = slow.daemon.data_root / "killed"

        def some_rows_durable() -> bool:
            # The stitcher journals in a background thread: wait until it has vouched for some rows
            # (and dropped their tiles), so that the resume replays fields without pixels too.
            if not (folder / JOURNAL_NAME).exists():
                return False
            state = read_journal(folder / JOURNAL_NAME)
            return state.rows_written > 0 and len(TileSpill(folder).indices()) < len(state.fields)

        while client.request("status")["fields_done"] < 8 or not some_rows_durable():
            assert time.monotonic() < deadline, "the scan did not get to field 8 with rows on disk"
            time.sleep(0.02)
        everyone = power_cut(proc.pid)
        proc.join(10)
    assert (folder / INCOMPLETE_NAME).exists()
    killed = read_journal(folder / JOURNAL_NAME)
    assert 1 <= len(killed.fields) < 9 and not killed.completed
    # Some fields were in the mosaic already, their spill gone: they are replayed without pixels.
    assert killed.rows_written > 0 and len(TileSpill(folder).indices()) < len(killed.fields)

    fast = daemon_config(tmp_path / "data", runtime_dir, small_recording, **SECTIONS)
    with daemon_running(fast) as (proc2, client2):
        assert segments_of(everyone) == []  # the new daemon swept the killed one's ring
        listed = client2.request("status")["interrupted"]
        assert listed == [
            {
                "scan_id": scan_id,
                "output_dir": str(folder),
                "fields_durable": len(killed.fields),
                "fields_total": 9,
                "reason": listed[0]["reason"],
            }
        ]
        assert "interrupted" in listed[0]["reason"]
        with pytest.raises(RequestFailed, match="no interrupted scan 'scan-nope'") as refused:
            client2.request("start_scan", resume="scan-nope")
        assert refused.value.code == "invalid_params"
        resumed = client2.request("start_scan", resume=scan_id)
        assert resumed == {"scan_id": scan_id, "output_dir": str(folder)}
        st = wait_finished(client2, scan_id)
        assert st["last_finish"] == "completed", st
        assert client2.request("status")["interrupted"] == []
        workers = [c.pid for c in psutil.Process(proc2.pid).children(recursive=True)]
    assert segments_of([proc2.pid, *workers]) == []

    report = json.loads((folder / "report.json").read_text())
    ref_report = json.loads((reference / "report.json").read_text())
    assert report["complete"] and report["resumed"] == 1 and report["fields_done"] == 9
    # Journaled fields were not captured again: the resumed acquisition began after them.
    state = read_journal(folder / JOURNAL_NAME)
    assert [f.index for f in state.fields] == list(range(9)) and state.resumes == 1
    got, want = positions(report), positions(ref_report)
    assert got.keys() == want.keys() == set(range(9))
    err = max(max(abs(got[i][0] - want[i][0]), abs(got[i][1] - want[i][1])) for i in want)
    assert err <= 0.05, f"tile positions differ by up to {err:.4f} px"
    a = tifffile.imread(folder / "slide.ome.tif", level=0)
    b = tifffile.imread(reference / "slide.ome.tif", level=0)
    assert a.shape == b.shape
    assert psnr(a, b) >= 45.0
    assert not (folder / INCOMPLETE_NAME).exists() and not (folder / TILES_DIR).exists()


@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A small filesystem of its own for the data root; skips the test where mounting is not permitted."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot mount a tmpfs here: {err}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=20)


def _fill(path: Path) -> int:
    """Write ``path`` until the filesystem is full; returns the bytes written."""
    block = b"\0" * 2**16
    n = 0
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                n += f.write(block)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return n


def test_disk_refused_before_the_scan_then_full_mid_scan_then_resumed(
    tmp_path: Path, small_recording: Path, reference: Path
) -> None:
    runtime_dir = Path("/tmp") / f"wsirt-disk-{os.getpid()}"
    with _tmpfs(tmp_path / "tiny", "1m") as tiny:
        cfg = daemon_config(tiny / "data", runtime_dir, small_recording, **SECTIONS)
        with daemon_running(cfg) as (_, client):
            scan_id = client.request("start_scan", output_name="nope")["scan_id"]
            st = wait_finished(client, scan_id)
            assert st["last_finish"] == "failed" and st["fields_done"] == 0
            assert st["last_error"].startswith("disk full: the scan needs about "), st["last_error"]
            assert "free" in st["last_error"] and st["interrupted"] == []  # nothing captured, nothing to resume
            assert client.request("ping")["pong"]
    with _tmpfs(tmp_path / "small", "24m") as small:
        slow = daemon_config(
            small / "data",
            runtime_dir,
            None,
            driver={"options": {"recording": str(small_recording), "pace": 3.0}},
            **SECTIONS,
        )
        folder = small / "data" / "full"
        with daemon_running(slow) as (_, client):
            scan_id = client.request("start_scan", output_name="full")["scan_id"]
            deadline = time.monotonic() + 60
            while not (folder / JOURNAL_NAME).exists() or len(read_journal(folder / JOURNAL_NAME).fields) < 3:
                assert time.monotonic() < deadline, "three fields were not journaled"
                time.sleep(0.05)
            ballast = small / "ballast"
            _fill(ballast)
            st = wait_finished(client, scan_id)
            assert st["last_finish"] == "failed", st
            assert st["last_error"].startswith("disk full: "), st["last_error"]
            # The daemon keeps serving, and lists the scan as resumable with the reason.
            listed = client.request("status")["interrupted"]
            assert [s["scan_id"] for s in listed] == [scan_id]
            assert listed[0]["reason"].startswith("failed: disk full") or "interrupted" in listed[0]["reason"]
            assert listed[0]["fields_durable"] >= 3
            ballast.unlink()  # space freed: the same daemon resumes it
            client.request("start_scan", resume=scan_id)
            st = wait_finished(client, scan_id)
            assert st["last_finish"] == "completed", st
        report = json.loads((folder / "report.json").read_text())
        assert report["complete"] and report["fields_done"] == 9
        a = tifffile.imread(folder / "slide.ome.tif", level=0)
        b = tifffile.imread(reference / "slide.ome.tif", level=0)
        assert psnr(a, b) >= 45.0
        got, want = positions(report), positions(json.loads((reference / "report.json").read_text()))
        assert max(abs(got[i][k] - want[i][k]) for i in want for k in (0, 1)) <= 0.05


def test_a_hung_worker_is_killed_the_daemon_keeps_answering_and_the_scan_resumes(
    tmp_path: Path, small_recording: Path, reference: Path
) -> None:
    runtime_dir = Path("/tmp") / f"wsirt-hang-{os.getpid()}"
    cfg = daemon_config(
        tmp_path / "data",
        runtime_dir,
        None,
        daemon={"data_root": str(tmp_path / "data"), "runtime_dir": str(runtime_dir), "heartbeat_timeout_s": 5.0},
        driver={"options": {"recording": str(small_recording), "pace": 3.0}},
        **SECTIONS,
    )
    folder = cfg.daemon.data_root / "hung"
    with daemon_running(cfg) as (_, client):
        scan_id = client.request("start_scan", output_name="hung")["scan_id"]
        deadline = time.monotonic() + 60
        while not (folder / JOURNAL_NAME).exists() or len(read_journal(folder / JOURNAL_NAME).fields) < 3:
            assert time.monotonic() < deadline, client.request("status")
            time.sleep(0.05)
        stitcher = client.request("status")["workers"]["stitcher"]
        os.kill(stitcher, signal.SIGSTOP)  # a deadlocked native call looks like this from outside
        # Every request is answered while the job notices, kills the hung worker and stops the rest.
        latencies: list[float] = []
        with ControlClient(cfg.endpoint("command"), timeout_s=2.0, retries=1) as strict:
            while True:
                t_ask = time.monotonic()
                st = strict.request("status")
                latencies.append(time.monotonic() - t_ask)
                if st["last_finish"] and st["scan_id"] == scan_id:
                    break
                assert time.monotonic() < deadline + 60, st
                time.sleep(0.05)
        print(f"\nhung worker: {len(latencies)} status requests, slowest reply {max(latencies) * 1000:.0f} ms")
        assert st["last_finish"] == "failed"
        # The stitcher, or the writer: a stitcher stopped in the middle of putting a message on the
        # writer's queue leaves the writer blocked reading the rest of it; whichever went silent first
        # is named (and killed at once), the other is stopped with the job.
        assert re.search(r"(stitcher|writer) worker sent no heartbeat for 5 s \(killed\)", st["last_error"]), st
        assert not psutil.pid_exists(stitcher) or psutil.Process(stitcher).status() == psutil.STATUS_ZOMBIE
        assert [s["scan_id"] for s in st["interrupted"]] == [scan_id]
        client.request("start_scan", resume=scan_id)
        assert wait_finished(client, scan_id)["last_finish"] == "completed"
    a = tifffile.imread(folder / "slide.ome.tif", level=0)
    b = tifffile.imread(reference / "slide.ome.tif", level=0)
    assert psnr(a, b) >= 45.0


def test_fuzz_during_a_scan_leaves_the_slide_unchanged(tmp_path: Path, small_recording: Path, reference: Path) -> None:
    """10,000 hostile messages (tests/test_hostile_clients.py's mix: random bytes, deep nesting,
    thousands of frames, wrong types, invalid start_scan, oversized) from 4 sockets while a scan
    runs: every readable request answered, no traceback, memory flat, the slide the reference's."""
    import random

    import zmq

    from tests.test_hostile_clients import _hostile_messages

    cfg = daemon_config(
        tmp_path / "data",
        Path("/tmp") / f"wsirt-fuzz-{os.getpid()}",
        None,
        # Outlasts the fuzz (16: forked workers start the scan 1-3 s sooner than spawned ones did; 24
        # since the daemon queues at most COMMAND_RCVHWM messages per client: a daemon that falls behind
        # now holds the senders back, so the fuzz lasts as long as the daemon takes to read it).
        driver={"options": {"recording": str(small_recording), "pace": 24.0}},
        **SECTIONS,
    )
    folder = cfg.daemon.data_root / "fuzzed"
    with daemon_running(cfg) as (proc, client):
        daemon = psutil.Process(proc.pid)
        rss_before = daemon.memory_info().rss
        scan_id = client.request("start_scan", output_name="fuzzed")["scan_id"]
        t0 = time.monotonic()
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sockets = [ctx.socket(zmq.DEALER) for _ in range(4)]
        poller = zmq.Poller()
        for s in sockets:
            s.setsockopt(zmq.LINGER, 0)
            s.connect(cfg.endpoint("command"))
            poller.register(s, zmq.POLLIN)
        sent = replies = 0

        def read(timeout_ms: int) -> int:
            n = 0
            for s, _ in poller.poll(timeout_ms):
                while s.poll(0):
                    assert b"Traceback" not in s.recv_multipart()[-1]
                    n += 1
            return n

        try:
            for i, frames in enumerate(_hostile_messages(random.Random(12), 10_000)):
                sockets[i % len(sockets)].send_multipart([b"", *frames])
                sent += 1
                replies += read(0)
            still_scanning = client.request("status")["state"] != "idle"
            fuzz_s = time.monotonic() - t0
            quiet = time.monotonic()
            while time.monotonic() - quiet < 2.0:
                if got := read(200):
                    replies += got
                    quiet = time.monotonic()
        finally:
            for s in sockets:
                s.close()
        st = wait_finished(client, scan_id)
        scan_s = time.monotonic() - t0
        rss_after = daemon.memory_info().rss
    mib = f"RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"
    print(f"fuzz during a scan: sent {sent}, replies {replies} in {fuzz_s:.1f} s, scan {scan_s:.1f} s, {mib}")
    assert still_scanning, "the scan ended before the fuzz did (raise the pace)"
    assert st["last_finish"] == "completed" and st["fields_done"] == 9, st
    assert sent == 10_000 and replies >= sent * 0.9
    assert rss_after - rss_before < 64 * 2**20, (rss_before, rss_after)
    a = tifffile.imread(folder / "slide.ome.tif", level=0)
    b = tifffile.imread(reference / "slide.ome.tif", level=0)
    assert psnr(a, b) >= 45.0
    report, ref_report = (
        json.loads((folder / "report.json").read_text()),
        json.loads((reference / "report.json").read_text()),
    )
    got, want = positions(report), positions(ref_report)
    assert max(abs(got[i][k] - want[i][k]) for i in want for k in (0, 1)) <= 0.05
