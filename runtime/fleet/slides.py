"""One slide of a batch, as a dask worker runs it: the jobs, the slide's folder, its markers.

A task carries paths and the (small, frozen) config, never pixels: the worker opens the input
itself, so nothing large passes through the client or the scheduler. Each job writes into its
own sub-folder of the batch's ``--out``:

* ``export``: a kept mosaic (``mosaic.zarr``, or the scan folder holding it) re-written by
  ``python -m runtime export``'s own code (:func:`runtime.output.cli.run_export`) with the
  batch's export options -- every format and flag the export command offers;
* ``restitch``: a recording replayed without a daemon: the configured replay driver, each field
  focused by :class:`~runtime.focus.field.FieldFocuser` (the strategy of ``[focus]``), stitched
  by :class:`~runtime.stitching.accumulator.DequeAccumulator` into ``mosaic.zarr`` -- the
  acquisition and stitcher workers' components, in one process -- then written like ``export``.

The folder's life: ``.batch-started`` first (the folder is the batch's to clear on a re-run),
the job's files and ``batch.log`` (what the job printed, and a failure's traceback), and
``batch-done.json`` last: a re-run skips a slide whose marker is there with the same job,
input and options, and redoes one without it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, TextIO, cast

from runtime.config import RuntimeConfig
from runtime.errors import describe
from runtime.ipc.messages import peak_rss_bytes
from runtime.output.cli import add_export_arguments, run_export

Job = Literal["export", "restitch"]
Status = Literal["done", "skipped", "failed"]

SLIDE_NAME = "slide.ome.tif"
MOSAIC_NAME = "mosaic.zarr"
RECORDING_NAME = "recording.zarr"
STARTED_MARKER = ".batch-started"
DONE_MARKER = "batch-done.json"
LOG_NAME = "batch.log"
_OURS = {STARTED_MARKER, DONE_MARKER, LOG_NAME}


class SlideError(Exception):
    """A slide cannot be done; the message says why, in one line, without the exception's type."""


@dataclass(frozen=True)
class SlideTask:
    """Everything a worker needs for one slide: paths and settings, no pixels."""

    job: Job
    name: str  # the sub-folder of --out
    source: Path  # absolute: the worker may run in another working directory (or machine)
    folder: Path
    config: RuntimeConfig
    config_path: Path | None  # run_export reads [writer] from the file itself
    export_options: tuple[tuple[str, Any], ...] = ()  # (dest, value) of the export options given

    def settings(self) -> dict[str, Any]:
        """What makes a finished folder this task's: a re-run with other settings does not skip it."""
        options = {dest: str(v) if isinstance(v, Path) else v for dest, v in self.export_options}
        return {"job": self.job, "source": str(self.source), "export_options": options}


@dataclass(frozen=True)
class SlideResult:
    name: str
    source: str
    status: Status
    seconds: float = 0.0
    outputs: tuple[str, ...] = ()
    error: str | None = None
    worker: str | None = None  # the dask worker's address
    worker_peak_rss_mib: float | None = None  # that worker process's high-water mark so far
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- output of the jobs ------------------------------------------------------------------------
# run_export reports by printing ("export: <reason>"), and a worker process's stdout and stderr
# are the terminal of whoever started the cluster. Each slide's thread writes into its own
# buffer instead (a worker may run several slides on threads, and the in-process cluster of
# the tests runs them in the batch command's own process), which becomes the slide's log.
_local = threading.local()
_install_lock = threading.Lock()


class _ThreadRouter(io.TextIOBase):
    """A ``sys.stdout``/``sys.stderr`` stand-in: a capturing thread's text goes to its buffer, the
    others' to the stream that was there."""

    def __init__(self, fallback: TextIO) -> None:
        self.fallback = fallback

    def _target(self) -> TextIO:
        buffer: io.StringIO | None = getattr(_local, "buffer", None)
        return buffer if buffer is not None else self.fallback

    def write(self, s: str) -> int:
        return self._target().write(s)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return self._target().isatty()


@contextmanager
def captured_output() -> Iterator[io.StringIO]:
    """Route this thread's ``print`` and ``sys.stderr`` output (and log records that reach the
    last-resort handler) into the yielded buffer."""
    with _install_lock:
        if not isinstance(sys.stdout, _ThreadRouter):
            sys.stdout = cast(TextIO, _ThreadRouter(sys.stdout))
        if not isinstance(sys.stderr, _ThreadRouter):
            sys.stderr = cast(TextIO, _ThreadRouter(sys.stderr))
    buffer = io.StringIO()
    _local.buffer = buffer
    try:
        yield buffer
    finally:
        _local.buffer = None


def _last_line(text: str, prefix: str) -> str | None:
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(prefix)]
    return lines[-1] if lines else None


# -- inputs --------------------------------------------------------------------------------------
def _zarr_format(path: Path) -> str | None:
    """The ``format`` attribute of a Zarr v3 group (mosaic or recording), None if there is none."""
    try:
        meta = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
        fmt = meta.get("attributes", {}).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return fmt if isinstance(fmt, str) else None


def _inner(source: Path, name: str) -> Path:
    """A scan or recording folder stands for the group inside it (``run1/`` -> ``run1/mosaic.zarr``)."""
    nested = source / name
    return nested if (nested / "zarr.json").is_file() else source


def _wrong_kind(source: Path, job: Job) -> SlideError | None:
    fmt = _zarr_format(source)
    if job == "export" and fmt == "wsi-recording":
        return SlideError(f"{source} is a recording, not a mosaic: `batch restitch` stitches it")
    if job == "restitch" and fmt == "wsi-runtime-mosaic":
        return SlideError(f"{source} is a mosaic, not a recording: `batch export` re-writes it")
    return None


# -- the jobs --------------------------------------------------------------------------------------
class _ExportParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # a worker must not print usage and exit
        raise SlideError(f"export options: {message}")


def export_parser() -> argparse.ArgumentParser:
    """``python -m runtime export``'s own arguments (:func:`runtime.output.cli.add_export_arguments`)."""
    p = _ExportParser(prog="python -m runtime export", add_help=False)
    add_export_arguments(p)
    return p


_NOT_FORWARDED = {"mosaic", "out", "force", "quiet"}  # the batch names the files and owns the folder


def export_option_actions() -> list[argparse.Action]:
    """The export command's options that a batch forwards to each slide's export: its formats,
    codecs and tiling, whatever ``add_export_arguments`` offers now. An option with a path
    (``--ome-zarr OUT``) is a name inside each slide's folder."""
    return [a for a in export_parser()._actions if a.option_strings and a.dest not in _NOT_FORWARDED]


def _export(task: SlideTask, mosaic: Path, log: io.StringIO) -> None:
    args = export_parser().parse_args([str(mosaic), str(task.folder / SLIDE_NAME), "--quiet"])
    args.config = task.config_path
    for dest, value in task.export_options:
        setattr(args, dest, task.folder / value if isinstance(value, Path) else value)
    if run_export(args) != 0:
        reason = _last_line(log.getvalue(), "export:") or "the export failed (see batch.log)"
        raise SlideError(reason.removeprefix("export:").strip())


def export_job(task: SlideTask, log: io.StringIO) -> dict[str, Any]:
    mosaic = _inner(task.source, MOSAIC_NAME)
    wrong = _wrong_kind(mosaic, "export")
    if wrong is not None:
        raise wrong
    _export(task, mosaic, log)
    return {}


def restitch_job(task: SlideTask, log: io.StringIO) -> dict[str, Any]:
    """Replay the recording through focus and stitching in this process, then export the mosaic."""
    # Imported here: the batch command's parser (built on every `python -m runtime` call) needs
    # this module's export helpers, not the focus and stitching stack.
    from runtime.devices.loading import open_driver
    from runtime.devices.scan_plan import serpentine_plan
    from runtime.focus.field import FieldFocuser
    from runtime.output.mosaic_store import MosaicStore
    from runtime.stitching.accumulator import DequeAccumulator, MosaicGeometry

    cfg = task.config
    recording = _inner(task.source, RECORDING_NAME)
    wrong = _wrong_kind(recording, "restitch")
    if wrong is not None:
        raise wrong
    drv = open_driver(cfg.fleet.replay_driver, {"recording": str(recording)})
    mosaic_path = task.folder / MOSAIC_NAME
    fields: list[dict[str, Any]] = []
    try:
        area = drv.default_scan_area()
        if area is None:
            raise SlideError(f"{recording}: the replay driver knows no scan area")
        camera, stage = drv.camera, drv.stage
        h, w = camera.frame_shape
        px = camera.pixel_size_um
        # The plan a scan of this recording gets (runtime.workers.planning.open_and_plan).
        grid = serpentine_plan(area, w * px, h * px, cfg.scan.overlap, max_fields=cfg.scan.max_fields)
        geometry = MosaicGeometry(grid, h, w, px)
        store = MosaicStore.create(
            mosaic_path,
            *geometry.shape,
            chunk=cfg.mosaic.chunk,
            pixel_size_um=px,
            compressor=cfg.mosaic.compressor,
            min_level_size=cfg.writer.min_level_size,
        )
        with store:
            acc = DequeAccumulator(geometry, store, cfg.stitch)
            focuser = FieldFocuser(cfg.focus, cfg.models, camera, stage)
            for plan in grid.fields:
                stage.move_xy(plan.x_um, plan.y_um)
                focused = focuser.focus_field(plan, lambda: False)
                acc.add(plan, focused.frame.pixels)
                fields.append(
                    {"index": plan.index, "z_um": focused.z_um, "captures": focused.captures, "method": focused.method}
                )
            if not acc.finish():
                raise SlideError(f"{recording}: the stitcher did not receive every field")
            store.finish()
            stitch = acc.summary()
    finally:
        drv.close()
    _export(task, mosaic_path, log)
    if not cfg.mosaic.keep_after_export:
        shutil.rmtree(mosaic_path)
    report = {"recording": str(recording), "fields": fields, "stitch": stitch}
    (task.folder / "report.json").write_text(json.dumps(report, indent=2, default=float), encoding="utf-8")
    captures = sum(f["captures"] for f in fields)
    return {"fields": len(fields), "captures": captures}


JOBS: dict[str, Callable[[SlideTask, io.StringIO], dict[str, Any]]] = {
    "export": export_job,
    "restitch": restitch_job,
}


# -- the slide's folder ----------------------------------------------------------------------------
def _done_before(task: SlideTask) -> dict[str, Any] | None:
    """The marker of an earlier run with the same settings; SlideError if the folder holds
    something else (another job's result, or files the batch did not write)."""
    marker = task.folder / DONE_MARKER
    if marker.is_file():
        try:
            done: dict[str, Any] = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            done = {}
        if done.get("settings") == task.settings():
            return done
        raise SlideError(
            f"{task.folder} holds a result made with other settings ({done.get('settings')}); "
            "choose another --out or remove it"
        )
    if task.folder.is_dir() and any(task.folder.iterdir()) and not (task.folder / STARTED_MARKER).exists():
        raise SlideError(f"{task.folder} exists and was not written by batch; choose another --out or remove it")
    return None


def _fresh_folder(folder: Path) -> None:
    """An earlier attempt that did not finish is cleared (the started marker says it is ours)."""
    if folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / STARTED_MARKER).touch()


def _write_done(task: SlideTask, outputs: list[str], seconds: float, details: dict[str, Any]) -> None:
    marker = {"settings": task.settings(), "outputs": outputs, "seconds": round(seconds, 3), "details": details}
    tmp = task.folder / (DONE_MARKER + ".partial")
    tmp.write_text(json.dumps(marker, indent=2), encoding="utf-8")
    os.replace(tmp, task.folder / DONE_MARKER)  # last, and whole: a crash before this redoes the slide


def _worker() -> tuple[str | None, float]:
    """This dask worker's address and its process's peak RSS (MiB)."""
    try:
        from distributed import get_worker

        address: str | None = get_worker().address
    except (ImportError, ValueError):  # not inside a dask worker (called directly)
        address = None
    return address, peak_rss_bytes() / 2**20


def run_slide(task: SlideTask) -> SlideResult:
    """Run ``task`` on this worker. Never raises: a failure is a result with a one-line error,
    so one bad slide does not stop the batch (its traceback goes to the slide's batch.log)."""
    t0 = time.perf_counter()

    def result(status: Status, **kw: Any) -> SlideResult:
        address, rss = _worker()
        return SlideResult(
            task.name, str(task.source), status, time.perf_counter() - t0, worker=address, worker_peak_rss_mib=rss, **kw
        )

    try:
        done = _done_before(task)
        if done is not None:
            return result("skipped", outputs=tuple(done.get("outputs", ())))
        _fresh_folder(task.folder)
        with captured_output() as log:
            try:
                details = JOBS[task.job](task, log)
            except Exception:
                log.write(traceback.format_exc())
                raise
            finally:
                (task.folder / LOG_NAME).write_text(log.getvalue(), encoding="utf-8")
        outputs = sorted(p.name for p in task.folder.iterdir() if p.name not in _OURS)
        _write_done(task, outputs, time.perf_counter() - t0, details)
        return result("done", outputs=tuple(outputs), details=details)
    except Exception as err:
        return result("failed", error=str(err) if isinstance(err, SlideError) else describe(err))
