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
import logging
import queue
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, assert_never

from runtime.config import RuntimeConfig
from runtime.control.events import JobKind
from runtime.daemon.job import JobQueue, Publish, WorkerJob
from runtime.daemon.state import FinishReason, ScanPhase
from runtime.devices.protocols import ScanArea
from runtime.errors import one_line
from runtime.ipc.inference_channel import ReplyQueue, RequestQueue
from runtime.ipc.messages import (
    AcquisitionDone,
    ControlQueue,
    EndOfStream,
    FieldDone,
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
)
from runtime.ipc.ring import SlotRing
from runtime.output.ome_tiff import partial_path
from runtime.stitching.accumulator import MosaicGeometry
from runtime.workers.acquisition import AcquisitionJob, acquisition_main
from runtime.workers.inference import inference_main
from runtime.workers.stitcher import StitchJob, stitcher_main
from runtime.workers.writer import writer_main

log = logging.getLogger("wsi.scan_job")

SLIDE_NAME = "slide.ome.tif"
MOSAIC_NAME = "mosaic.zarr"


class ScanJob(WorkerJob):
    KIND: ClassVar[JobKind] = "scan"

    def __init__(
        self,
        cfg: RuntimeConfig,
        scan_id: str,
        output_dir: Path,
        area: ScanArea | None,
        driver_options: dict[str, Any],
        publish: Publish,
    ) -> None:
        super().__init__(cfg, scan_id, output_dir, publish)
        # One message union per queue (runtime/ipc/messages.py, runtime/ipc/inference_channel.py).
        self.tiles: TileQueue = self.ctx.Queue()
        self.free_slots: SlotQueue = self.ctx.Queue()
        self.to_acquisition: ControlQueue = self.ctx.Queue()
        self.to_writer: WriterQueue = self.ctx.Queue()
        self.ring: SlotRing | None = None
        self.levels: tuple[tuple[int, int], ...] = ()
        self.slide_path: str | None = None
        self.mosaic: MosaicDone | None = None  # the stitcher's last word (complete?, summary)
        self._early_writer_done: WriterDone | None = None  # arrived before MosaicDone (see _handle)
        # single_shot with models.worker = "process": an inference worker owns the models (and the
        # GPU); acquisition sends it ring slot ids. The queues exist either way (one code path).
        self.uses_inference = cfg.focus.strategy == "single_shot" and cfg.models.worker == "process"
        self.to_inference: RequestQueue = self.ctx.Queue()
        self.inference_replies: ReplyQueue = self.ctx.Queue()
        self.inference: dict[str, Any] = {}  # backend, load time, what it served (for the report)
        self._loading: set[str] = set()  # workers still loading models: start timeout, not heartbeat timeout
        self._record_semaphores()

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
    def _queues(self) -> tuple[JobQueue, ...]:
        queues = (self.events, self.tiles, self.free_slots, self.to_acquisition, self.to_writer)
        return (*queues, self.to_inference, self.inference_replies)

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
        self._started(msg, geometry.shape)

    # -- message pump ------------------------------------------------------------------------
    def _handle(self, msg: WorkerEvent) -> None:
        """Turn one worker message into job state and events; mypy checks every kind is handled."""
        match msg:
            case Heartbeat():
                self.heartbeats[msg.worker] = time.monotonic()
            case ScanPrepared():
                self._on_prepared(msg)
            case FieldDone():
                self._field_done(msg.record)
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

    def _silent(self, name: str) -> str:
        return "did not load its models" if name in self._loading else "sent no heartbeat"

    def _stop_inference(self) -> None:
        if "inference" in self.procs:
            self.to_inference.put(EndOfStream("acquisition is done, or the scan ended"))

    def _on_inference_done(self, msg: InferenceDone) -> None:
        self.peak_rss["inference"] = msg.peak_rss
        self.inference.update(msg.stats)

    # -- ending ------------------------------------------------------------------------------
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
        self._release()
        if reason is not FinishReason.COMPLETED:
            # A writer that was killed cannot remove its own partial slide; the
            # kept mosaic is what an export (python -m runtime export) starts from.
            partial_path(self.output_dir / SLIDE_NAME).unlink(missing_ok=True)
        if reason is FinishReason.COMPLETED and not self.cfg.mosaic.keep_after_export:
            shutil.rmtree(self.mosaic_path, ignore_errors=True)
        self.write_report()

    def _after_workers_stopped(self) -> None:
        self._drain_late_stats()

    def _drain_late_stats(self) -> None:
        """The inference worker stops when acquisition ends and its last message can still be
        queued behind the writer's when the job ends: keep its figures for the report."""
        with contextlib.suppress(queue.Empty, ValueError, OSError):  # empty, or already closed
            while True:
                msg = self.events.get_nowait()
                if isinstance(msg, InferenceDone):
                    self._on_inference_done(msg)

    def _release(self) -> None:
        if self.ring is not None:
            self.ring.unlink()
            self.ring = None

    # -- report ------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        captures = sum(r.captures for r in self.records)
        return {
            **self.common_report(),
            "slide": self.slide_path,
            "mosaic": self.outputs()["mosaic"],
            "levels": [list(lv) for lv in self.levels],
            "captures_total": captures,
            "captures_per_field": captures / len(self.records) if self.records else None,
            "fields": [asdict(r) for r in sorted(self.records, key=lambda r: r.index)],
            "inference": self.inference or None,
            "stitch": self.stitch,
        }

    def outputs(self) -> dict[str, str | None]:
        mosaic = str(self.mosaic_path) if self.mosaic_path.exists() else None
        return {"slide": self.slide_path, "mosaic": mosaic, "recording": None}
