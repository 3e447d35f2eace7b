"""One scan: the worker processes, the shared-memory ring and the queues between them.

The supervisor owns a ScanJob while a scan runs. The job spawns the workers
(``spawn`` context: a CUDA context does not survive ``fork``) -- acquisition,
stitcher, writer, and for ``single_shot`` focus the inference worker that owns
the models -- owns the ring, turns worker messages into its phase and events, and
on every exit path -- completion, cancel, a worker crash or hang -- stops the
workers and unlinks the ring. The Zarr mosaic of a scan that did not complete
is kept.

The job's phase (:class:`~runtime.daemon.state.ScanPhase`) moves only along
:data:`~runtime.daemon.state.TRANSITIONS`; the supervisor's run state is derived
from it::

    ```mermaid
    stateDiagram-v2
        [*] --> STARTING: start_scan (workers spawned)
        STARTING --> ACQUIRING: ScanPrepared (plan, ring; stitcher and writer spawned)
        ACQUIRING --> FLUSHING: AcquisitionDone
        ACQUIRING --> WRITING: MosaicDone(complete) overtook AcquisitionDone
        FLUSHING --> WRITING: MosaicDone(complete)
        STARTING --> CANCELLING: cancel
        ACQUIRING --> CANCELLING: cancel
        FLUSHING --> CANCELLING: cancel
        WRITING --> CANCELLING: cancel
        WRITING --> DONE: WriterDone (completed)
        FLUSHING --> DONE: WriterDone after an incomplete mosaic (cancelled)
        CANCELLING --> DONE: WriterDone (cancelled)
        STARTING --> DONE: worker failed / hung (failed)
        ACQUIRING --> DONE: worker failed / hung (failed)
        FLUSHING --> DONE: worker failed / hung (failed)
        WRITING --> DONE: worker failed / hung (failed)
        CANCELLING --> DONE: worker failed / hung (failed)
        DONE --> [*]: report written, workers stopped, ring unlinked
    ```

One tile, camera to file (the message type at each hop): the acquisition worker
captures into a free ring slot (slot ids arrive on ``free_slots``), focuses it (with
the inference worker over :mod:`runtime.ipc.inference_channel` for ``single_shot``),
and sends ``TileReady(slot, FieldRecord, FieldPlan)`` on ``tiles`` and ``FieldDone``
on ``events``; the stitcher registers and blends it into the Zarr mosaic, returns
the slot on ``free_slots`` and announces each final band as ``MosaicRows`` on
``to_writer``; the writer appends the band's tiles to ``slide.ome.tif.partial``.
``EndOfStream`` ends ``tiles`` (after the last field) and ``to_writer``;
``MosaicDone`` and ``WriterDone`` on ``events`` finish the job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import queue
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any, assert_never

from runtime.config import RuntimeConfig
from runtime.control.events import Event, FieldDoneEvent, ScanStartedEvent
from runtime.daemon.state import FinishReason, ScanPhase, check_transition
from runtime.devices.protocols import ScanArea
from runtime.errors import one_line
from runtime.ipc.inference_channel import ReplyQueue, RequestQueue
from runtime.ipc.lifetime import record_semaphores, semaphore_names
from runtime.ipc.messages import (
    AcquisitionDone,
    ControlQueue,
    EndOfStream,
    EventQueue,
    FieldDone,
    FieldRecord,
    Heartbeat,
    InferenceDone,
    InferenceReady,
    MosaicDone,
    ScanPrepared,
    SlotQueue,
    TileQueue,
    WorkerEvent,
    WorkerFailed,
    WriterDone,
    WriterQueue,
    peak_rss_bytes,
)
from runtime.ipc.ring import SlotRing
from runtime.output.ome_tiff import partial_path
from runtime.paths import folder_identity, write_file_exclusive
from runtime.stitching.accumulator import MosaicGeometry
from runtime.workers.acquisition import AcquisitionJob, acquisition_main
from runtime.workers.inference import inference_main
from runtime.workers.stitcher import StitchJob, stitcher_main
from runtime.workers.writer import writer_main

log = logging.getLogger("wsi.scan_job")

Publish = Callable[[Event], None]
SLIDE_NAME = "slide.ome.tif"
REPORT_NAME = "report.json"
MOSAIC_NAME = "mosaic.zarr"


class ScanJob:
    def __init__(
        self,
        cfg: RuntimeConfig,
        scan_id: str,
        output_dir: Path,
        area: ScanArea | None,
        driver_options: dict[str, Any],
        publish: Publish,
    ) -> None:
        self.cfg = cfg
        self.scan_id = scan_id
        self.output_dir = output_dir
        self.publish = publish
        self.started = time.time()
        self._t0 = time.monotonic()
        self.ctx = mp.get_context("spawn")
        # One message union per queue (runtime/ipc/messages.py, runtime/ipc/inference_channel.py).
        self.events: EventQueue = self.ctx.Queue()
        self.tiles: TileQueue = self.ctx.Queue()
        self.free_slots: SlotQueue = self.ctx.Queue()
        self.to_acquisition: ControlQueue = self.ctx.Queue()
        self.to_writer: WriterQueue = self.ctx.Queue()
        self.cancel_event = self.ctx.Event()
        self.ring: SlotRing | None = None
        self.procs: dict[str, SpawnProcess] = {}
        self.heartbeats: dict[str, float] = {}
        self.records: list[FieldRecord] = []
        self.fields_total = 0
        self.peak_rss: dict[str, int] = {}
        self.simulated_time_s: float | None = None
        self.levels: tuple[tuple[int, int], ...] = ()
        self.slide_path: str | None = None
        self.phase = ScanPhase.STARTING
        self.mosaic: MosaicDone | None = None  # the stitcher's last word (complete?, summary)
        self._early_writer_done: WriterDone | None = None  # arrived before MosaicDone (see _handle)
        self.finish_reason: FinishReason | None = None  # set with ScanPhase.DONE
        self.error: str | None = None
        # single_shot with models.worker = "process": an inference worker owns the models (and the
        # GPU); acquisition sends it ring slot ids. The queues exist either way (one code path).
        self.uses_inference = cfg.focus.strategy == "single_shot" and cfg.models.worker == "process"
        self.to_inference: RequestQueue = self.ctx.Queue()
        self.inference_replies: ReplyQueue = self.ctx.Queue()
        self.inference: dict[str, Any] = {}  # backend, load time, what it served (for the report)
        self._loading: set[str] = set()  # workers still loading models: start timeout, not heartbeat timeout
        self._record_semaphores()

        # The supervisor made (or claimed) the folder (runtime.paths.make_output_folder); remember
        # which one, so the report is never written into a folder swapped in for it.
        self._output_id = folder_identity(output_dir)
        # Workers get the config sections themselves (frozen, picklable) beside what is per scan.
        job = AcquisitionJob(area=area, driver_options=driver_options)
        if self.uses_inference:
            # Spawned first so that model loading (minutes for a first TensorRT engine build)
            # overlaps opening the devices; it gets the ring, like acquisition, in _on_prepared.
            self._spawn(
                "inference",
                inference_main,
                (cfg.models, self.to_inference, self.inference_replies, self.events),
            )
            self._loading.add("inference")
            self.inference = {"worker": "process"}
        elif cfg.focus.strategy == "single_shot":
            self.inference = {"worker": "in_acquisition"}
        self._spawn(
            "acquisition",
            acquisition_main,
            (
                job,
                cfg.driver,
                cfg.scan,
                cfg.focus,
                cfg.models,
                self.to_acquisition,
                self.free_slots,
                self.tiles,
                self.events,
                self.cancel_event,
                self.to_inference,
                self.inference_replies,
            ),
        )

    # -- processes ---------------------------------------------------------------------------
    def _record_semaphores(self) -> None:
        """Name this job's POSIX semaphores (inside the queues and the event) in the supervisor's
        registry, so that they are swept if the whole daemon is SIGKILLed (runtime/ipc/lifetime.py)."""
        queues = (self.events, self.tiles, self.free_slots, self.to_acquisition, self.to_writer)
        objs = (*queues, self.to_inference, self.inference_replies, self.cancel_event)
        try:
            record_semaphores(self.cfg.daemon.runtime_dir, semaphore_names(*objs))
        except OSError as err:  # not worth failing a scan over: RemoveIPC= and a reboot still clean up
            log.warning("could not record the scan's semaphores: %s", err)

    def _spawn(self, name: str, target: Callable[..., None], args: tuple[Any, ...]) -> None:
        proc = self.ctx.Process(target=target, args=args, name=f"wsi-{name}", daemon=True)
        proc.start()
        self.procs[name] = proc
        self.heartbeats[name] = time.monotonic()

    @property
    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items() if p.pid is not None}

    def _to(self, phase: ScanPhase) -> None:
        self.phase = check_transition(self.phase, phase)

    @property
    def done(self) -> bool:
        return self.phase is ScanPhase.DONE

    @property
    def stitch(self) -> dict[str, Any] | None:
        """The stitcher's summary (positions, pairs, timings), once the mosaic is finished."""
        return self.mosaic.stitch if self.mosaic is not None else None

    @property
    def mosaic_path(self) -> Path:
        return self.output_dir / MOSAIC_NAME

    def _on_prepared(self, msg: ScanPrepared) -> None:
        h, w = msg.frame_shape
        if self.phase is ScanPhase.STARTING:  # (a cancel may have come first: it stays cancelling,
            self._to(ScanPhase.ACQUIRING)  # and the stitcher and writer still flush what there is)
        self.fields_total = len(msg.plan.fields)
        self.ring = SlotRing(self.cfg.scan.ring_slots, h, w)
        for i in range(self.ring.spec.slots):
            self.free_slots.put(i)
        geometry = MosaicGeometry(msg.plan, h, w, msg.pixel_size_um)
        cfg = self.cfg
        self._spawn(
            "stitcher",
            stitcher_main,
            (
                StitchJob(geometry, self.ring.spec, str(self.mosaic_path)),
                cfg.mosaic,
                cfg.stitch,
                cfg.writer,
                self.tiles,
                self.free_slots,
                self.to_writer,
                self.events,
            ),
        )
        slide = str(self.output_dir / SLIDE_NAME)
        self._spawn("writer", writer_main, (slide, cfg.writer, self.to_writer, self.events))
        self.to_acquisition.put(self.ring.spec)
        if self.uses_inference:
            self.to_inference.put(self.ring.spec)
        self.publish(
            ScanStartedEvent(
                scan_id=self.scan_id,
                fields=self.fields_total,
                rows=msg.plan.rows,
                cols=msg.plan.cols,
                mosaic_shape=geometry.shape,
                pixel_size_um=msg.pixel_size_um,
            )
        )

    # -- message pump ------------------------------------------------------------------------
    def pump(self, max_messages: int = 1000) -> None:
        """Handle pending worker messages, then check the workers are alive and beating."""
        for _ in range(max_messages):
            if self.done:  # queues are closed once the job has ended
                return
            try:
                msg = self.events.get_nowait()
            except queue.Empty:
                break
            self._handle(msg)
        self._check_workers()

    def _handle(self, msg: WorkerEvent) -> None:
        """Turn one worker message into job state and events; mypy checks every kind is handled."""
        match msg:
            case Heartbeat():
                self.heartbeats[msg.worker] = time.monotonic()
            case ScanPrepared():
                self._on_prepared(msg)
            case FieldDone():
                self.records.append(msg.record)
                r = msg.record
                self.publish(
                    FieldDoneEvent(
                        index=r.index,
                        done=len(self.records),
                        total=self.fields_total,
                        row=r.row,
                        col=r.col,
                        z_um=r.z_um,
                        captures=r.captures,
                    )
                )
            case AcquisitionDone():
                self.peak_rss["acquisition"] = msg.peak_rss
                self.simulated_time_s = msg.simulated_time_s
                self._stop_inference()  # its only client is done: free the GPU while the mosaic finishes
                if self.phase is ScanPhase.ACQUIRING:
                    self._to(ScanPhase.FLUSHING)
            case InferenceReady():
                self._loading.discard("inference")
                self.heartbeats["inference"] = time.monotonic()
                self.inference.update(
                    backend=msg.backend,
                    load_s=round(msg.load_s, 3),
                    refused=msg.refused,
                    autofocus_model=msg.autofocus_model,
                )
            case InferenceDone():
                self._on_inference_done(msg)
            case MosaicDone():
                self.peak_rss["stitcher"] = msg.peak_rss
                self.mosaic = msg
                if msg.complete and self.phase in (ScanPhase.ACQUIRING, ScanPhase.FLUSHING):
                    self._to(ScanPhase.WRITING)
                if self._early_writer_done is not None:
                    self._handle(self._early_writer_done)
            case WriterDone() if self.mosaic is None:
                # The writer streams during the scan and may finish within moments of
                # MosaicDone; its message can overtake the stitcher's on the events
                # queue (two processes, two feeder threads). Finish once both are in.
                self._early_writer_done = msg
            case WriterDone():
                self.peak_rss["writer"] = msg.peak_rss
                self.levels = msg.levels
                self.slide_path = msg.path
                completed = self.phase is ScanPhase.WRITING and self.mosaic is not None and self.mosaic.complete
                self._finish(FinishReason.COMPLETED if completed else FinishReason.CANCELLED)
            case WorkerFailed():
                self._fail(f"{msg.worker} failed: {one_line(msg.message)}")
            case _:
                assert_never(msg)

    def _heartbeat_limit(self, name: str) -> float:
        # Loading models cannot beat (a TensorRT engine build is one native call that can take
        # minutes on a new device): until the worker reports ready, the start timeout applies.
        if name in self._loading:
            return self.cfg.models.worker_start_timeout_s
        return self.cfg.daemon.heartbeat_timeout_s

    def _check_workers(self) -> None:
        if self.done:
            return
        now = time.monotonic()
        for name, proc in self.procs.items():
            if proc.exitcode not in (None, 0):
                # A worker that failed put its WorkerFailed (the reason) on the queue before
                # exiting; it may sit behind messages not yet handled. Read them first, so the
                # scan fails with the reason rather than with the bare exit code.
                self._drain_events()
                self._fail(f"{name} worker exited with code {proc.exitcode}")
                return
            limit = self._heartbeat_limit(name)
            if proc.exitcode is None and now - self.heartbeats[name] > limit:
                what = "did not load its models" if name in self._loading else "sent no heartbeat"
                self._fail(f"{name} worker {what} for {limit:.0f} s")
                return

    def _drain_events(self) -> None:
        with contextlib.suppress(queue.Empty, ValueError, OSError):
            while not self.done:
                self._handle(self.events.get(timeout=0.05))

    def heartbeats_fresh(self) -> bool:
        now = time.monotonic()
        return all(
            p.exitcode is not None or now - self.heartbeats[n] <= self._heartbeat_limit(n)
            for n, p in self.procs.items()
        )

    def _stop_inference(self) -> None:
        if "inference" in self.procs:
            self.to_inference.put(EndOfStream("acquisition is done, or the scan ended"))

    def _on_inference_done(self, msg: InferenceDone) -> None:
        self.peak_rss["inference"] = msg.peak_rss
        self.inference.update(msg.stats)

    # -- ending ------------------------------------------------------------------------------
    def cancel(self, why: str | None = None) -> None:
        """Stop after the current field; the captured tiles still reach the mosaic."""
        if self.phase in (ScanPhase.CANCELLING, ScanPhase.DONE):
            return
        self._to(ScanPhase.CANCELLING)
        if why and self.error is None:
            self.error = why
        self.cancel_event.set()

    def _fail(self, error: str) -> None:
        if self.done:
            return
        self.error = error
        self._finish(FinishReason.FAILED)

    def _finish(self, reason: FinishReason) -> None:
        self._to(ScanPhase.DONE)
        self.finish_reason = reason
        self.cancel_event.set()
        if reason is FinishReason.FAILED:
            # A worker died or hung. Whatever was captured is still in the ring
            # and the tile queue: end the stream so the stitcher flushes it into
            # the Zarr mosaic (nothing captured is lost), and release the writer.
            self.tiles.put(EndOfStream("the scan failed"))
            self.to_writer.put(EndOfStream("the scan failed"))
        self._stop_inference()
        self.stop_workers(grace_s=10.0)
        self._release_ring()
        if reason is not FinishReason.COMPLETED:
            # A writer that was killed cannot remove its own partial slide; the
            # kept mosaic is what an export (python -m runtime export) starts from.
            partial_path(self.output_dir / SLIDE_NAME).unlink(missing_ok=True)
        if reason is FinishReason.COMPLETED and not self.cfg.mosaic.keep_after_export:
            shutil.rmtree(self.mosaic_path, ignore_errors=True)
        self.write_report()

    def stop_workers(self, grace_s: float) -> None:
        """Join workers; terminate, then kill, those that do not exit in time."""
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        self._drain_late_stats()
        queues = (self.events, self.tiles, self.free_slots, self.to_acquisition, self.to_writer)
        for q in (*queues, self.to_inference, self.inference_replies):
            q.cancel_join_thread()
            q.close()

    def _drain_late_stats(self) -> None:
        """The inference worker stops when acquisition ends and its last message can still be
        queued behind the writer's when the job ends: keep its figures for the report."""
        with contextlib.suppress(queue.Empty, ValueError, OSError):  # empty, or already closed
            while True:
                msg = self.events.get_nowait()
                if isinstance(msg, InferenceDone):
                    self._on_inference_done(msg)

    def _release_ring(self) -> None:
        if self.ring is not None:
            self.ring.unlink()
            self.ring = None

    def abort(self, error: str) -> None:
        """An unexpected supervisor error, or a stop that could not wait: end now, keep the Zarr."""
        self._fail(error)

    # -- report ------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        captures = sum(r.captures for r in self.records)
        rss = {"supervisor": peak_rss_bytes(), **self.peak_rss}
        mosaic = str(self.mosaic_path) if self.mosaic_path.exists() else None
        return {
            "scan_id": self.scan_id,
            "finish_reason": self.finish_reason.value if self.finish_reason else None,
            "phase": self.phase.value,
            "error": self.error,
            "slide": self.slide_path,
            "mosaic": mosaic,
            "levels": [list(lv) for lv in self.levels],
            "fields_total": self.fields_total,
            "fields_done": len(self.records),
            "captures_total": captures,
            "captures_per_field": captures / len(self.records) if self.records else None,
            "simulated_scan_time_s": self.simulated_time_s,
            "wall_time_s": time.monotonic() - self._t0,
            "started_at": self.started,
            "peak_rss_bytes": rss,
            "peak_rss_mib": {k: round(v / 2**20, 1) for k, v in rss.items()},
            "fields": [asdict(r) for r in sorted(self.records, key=lambda r: r.index)],
            "inference": self.inference or None,
            "stitch": self.stitch,
        }

    def write_report(self) -> Path:
        """``report.json`` via ``report.json.partial``, created exclusively, never through a link."""
        data = json.dumps(self.report(), indent=2).encode("utf-8")
        return write_file_exclusive(self.output_dir, REPORT_NAME, data, folder_id=self._output_id)

    def close(self) -> None:
        """Last resort on every path: no worker and no segment outlives the job."""
        with contextlib.suppress(Exception):
            self.stop_workers(grace_s=0.0)
        self._release_ring()
