"""One scan: the worker processes, the shared-memory ring and the queues between them.

The supervisor owns a ScanJob while a scan runs. The job starts the workers
(forked from the daemon's fork server, which never holds a CUDA context, or spawned:
``daemon.worker_start``, runtime/daemon/process.py) -- acquisition,
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
        STARTING --> ACQUIRING: ScanPrepared (plan, ring; the stitcher gets its job)
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

The scan journal (:mod:`runtime.output.journal`, ``journal.jsonl`` beside the mosaic) is
created here once the plan is known (its header: the request, the plan, the models), with
the ``INCOMPLETE`` marker; the stitcher appends each field as it makes it durable; the job
appends ``stopped`` or ``completed`` at the end (a completed scan loses the marker). A job
made with ``resume`` (the journal read back) continues that scan in its folder: acquisition
starts after the journaled fields with the journaled focus state, the stitcher replays the
journal. Before the first field, the job estimates the disk the scan needs (mosaic, slide,
spill) and fails with ``disk full`` when the data root cannot hold it; an ENOSPC in any
worker later fails the scan the same way, resumable once space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import queue
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, assert_never

from runtime.analysis.artifact_regions import ARTIFACTS_NAME, FieldArtifacts, write_artifact_regions
from runtime.config import RuntimeConfig
from runtime.control.events import AnalysisReadyEvent, JobKind
from runtime.daemon.analysis_service import AnalysisOutcome, AnalysisPort
from runtime.daemon.job import JobQueue, Publish, WorkerJob
from runtime.daemon.state import FinishReason, ScanPhase
from runtime.devices.protocols import ScanArea
from runtime.errors import log_failure, one_line
from runtime.focus.field import calibrated_start, capture_cost_report, near_focus_report
from runtime.ipc.inference_channel import ReplyQueue, RequestQueue
from runtime.ipc.messages import (
    AcquisitionDone,
    AnalysisDone,
    AnalysisLoading,
    AnalysisReady,
    ControlQueue,
    EndOfStream,
    FieldDone,
    FieldRecord,
    Heartbeat,
    InferenceDone,
    InferenceReady,
    MosaicDone,
    MosaicRows,
    ScanPrepared,
    SlotQueue,
    TeeQueue,
    TileQueue,
    WorkerEvent,
    WorkerFailed,
    WriterDone,
    WriterQueue,
)
from runtime.ipc.ring import SlotRing
from runtime.ml.artifact_context import FieldClass, context_report
from runtime.output.journal import JOURNAL_NAME, JournalState, ScanJournal, mark_complete
from runtime.output.mosaic_store import mosaic_bytes_bound
from runtime.output.ome_tiff import partial_path
from runtime.stitching.accumulator import MosaicGeometry
from runtime.workers.acquisition import AcquisitionJob, AcquisitionResume, acquisition_main
from runtime.workers.inference import inference_main
from runtime.workers.stitcher import StitchJob, StitchJobQueue, stitcher_main
from runtime.workers.writer import dicom_path, writer_main

log = logging.getLogger("wsi.scan_job")

SLIDE_NAME = "slide.ome.tif"
MOSAIC_NAME = "mosaic.zarr"

# The disk a scan needs. The mosaic: its exact worst case (every chunk stored, padded, incompressible;
# runtime.output.mosaic_store.mosaic_bytes_bound), which is what the default codec "none" stores for a
# slide without glass; a codec's typical ratio on tissue is no bound. The slide, as a fraction of its raw
# pixels (level 0, RGB) times 4/3 (the pyramid): a JPEG slide about 1/10 of raw at quality 90, a lossless
# one about half.
SLIDE_FRACTION = {"jpeg": 0.12}
LOSSLESS_SLIDE_FRACTION = 0.6
DISK_MARGIN_BYTES = 8 * 2**20


def disk_needed(cfg: RuntimeConfig, geometry: MosaicGeometry, done_fraction: float = 0.0) -> dict[str, int]:
    """Bytes a scan still needs on the data root: ``mosaic``, ``slide``, ``spill``, ``total``."""
    h, w = geometry.shape
    raw = h * w * 3 * 4 / 3
    bound = mosaic_bytes_bound(
        h, w, chunk=cfg.mosaic.chunk, min_level_size=cfg.writer.min_level_size, compressor=cfg.mosaic.compressor
    )
    mosaic = bound * (1.0 - done_fraction)
    slide = raw * SLIDE_FRACTION.get(cfg.writer.compression, LOSSLESS_SLIDE_FRACTION)
    # The spill holds the tiles whose rows are not written yet: about a scan row and a half.
    spill = (geometry.plan.cols * 2 + 2) * geometry.tile_height * geometry.tile_width * 3
    parts = {"mosaic": math.ceil(mosaic), "slide": math.ceil(slide), "spill": spill}
    parts["total"] = sum(parts.values()) + DISK_MARGIN_BYTES
    return parts


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


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
        request: dict[str, Any] | None = None,
        resume: JournalState | None = None,
        analysis: AnalysisPort | None = None,
    ) -> None:
        """``request``: the start_scan parameters (journaled, so that a resume repeats them).
        ``resume``: the journal of the interrupted scan in ``output_dir`` to continue.
        ``analysis``: the daemon's analysis worker (runtime/daemon/analysis_service.py), used when
        ``[analysis] enabled``."""
        super().__init__(cfg, scan_id, output_dir, publish)
        self.request = request or {}
        self.resumed = resume
        self.journal: ScanJournal | None = None
        self.report_written = True
        # One message union per queue (runtime/ipc/messages.py, runtime/ipc/inference_channel.py).
        self.tiles: TileQueue = self.ctx.Queue()
        self.to_stitcher: StitchJobQueue = self.ctx.Queue()  # its StitchJob, once the plan is known
        self._stitch_job_sent = False
        self.free_slots: SlotQueue = self.ctx.Queue()
        self.to_acquisition: ControlQueue = self.ctx.Queue()
        # [analysis] enabled: the analysis worker sees every row announcement the writer sees:
        # the stitcher's to_writer is a tee, and the job relays what reaches to_analysis to the
        # daemon's analysis worker (which outlives the scan, so it cannot inherit this scan's
        # queues). Disabled, the writer's queue is a plain one, as before.
        self.analysis_port = analysis if cfg.analysis.enabled else None
        self.analysis_enabled = self.analysis_port is not None
        self.to_analysis: WriterQueue = self.ctx.Queue()
        self.to_writer: WriterQueue = (
            TeeQueue(self.ctx, self.to_analysis) if self.analysis_enabled else self.ctx.Queue()
        )
        self.analysis: dict[str, Any] | None = None  # report.json's "analysis" (summary, or error)
        self._analysis_pending = False  # the analysis worker runs: the job ends once it reports
        self._analysis_deadline: float | None = None  # set when the slide is written
        self._writer_done: WriterDone | None = None  # held while the analysis finishes
        self.ring: SlotRing | None = None
        self.levels: tuple[tuple[int, int], ...] = ()
        self.slide_path: str | None = None
        self.mosaic: MosaicDone | None = None  # the stitcher's last word (complete?, summary)
        self.geometry: MosaicGeometry | None = None  # where each field lies on the slide (once planned)
        self.artifact_regions: int | None = None  # regions in artifacts.geojson (None: not written)
        self._early_writer_done: WriterDone | None = None  # arrived before MosaicDone (see _handle)
        # single_shot with models.worker = "process": an inference worker owns the models (and the
        # GPU); acquisition sends it ring slot ids. The queues exist either way (one code path).
        self.uses_inference = cfg.focus.strategy == "single_shot" and cfg.models.worker == "process"
        self.to_inference: RequestQueue = self.ctx.Queue()
        self.inference_replies: ReplyQueue = self.ctx.Queue()
        self.inference: dict[str, Any] = {}  # backend, load time, what it served (for the report)
        self.driver_cpu_s: float | None = None  # of acquisition's CPU, in the camera's captures
        self._loading: set[str] = set()  # workers still loading models: start timeout, not heartbeat timeout
        self._record_semaphores()
        if self.analysis_port is not None:
            self._analysis_pending = True
            try:
                self.analysis_port.begin(scan_id, output_dir, self.mosaic_path, cfg.analysis)
            except Exception as err:  # a supervisor-side analysis bug: the scan goes on without it
                self._analysis_failed(f"analysis service error: {log_failure(log, 'analysis service', err)}")

        # single_shot with a calibrated model that holds near focus on this instrument: trusted from
        # the first field (runtime.focus.field.calibrated_start; the inference worker loads the model).
        self.focus = calibrated_start(cfg.focus, cfg.models) if cfg.focus.strategy == "single_shot" else cfg.focus
        # Workers get the config sections themselves (frozen, picklable) beside what is per scan.
        job = AcquisitionJob(area=area, driver_options=driver_options, resume=self._acquisition_resume())
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
                self.focus,
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

        # The writer and the stitcher are forked now, while acquisition opens the devices, not once it has
        # planned (ScanPrepared): the first tiles then wait for neither fork. The writer needs nothing the
        # plan decides (it opens the mosaic at the stitcher's first rows); the stitcher waits for its
        # StitchJob (the plan's geometry, the ring) on to_stitcher. Every ending reaches both: the
        # stitcher's MosaicDone or EndOfStream, or the EndOfStream a failed scan sends them (_finish).
        self._spawn("writer", writer_main, (str(self.output_dir / SLIDE_NAME), cfg.writer, self.to_writer, self.events))
        self._spawn(
            "stitcher",
            stitcher_main,
            (
                self.to_stitcher,
                cfg.mosaic,
                cfg.stitch,
                cfg.writer,
                self.tiles,
                self.free_slots,
                self.to_writer,
                self.events,
            ),
        )

    def _acquisition_resume(self) -> AcquisitionResume | None:
        """Where acquisition starts again, and with which focus state (from the journal)."""
        state = self.resumed
        if state is None:
            return None
        surface: list[tuple[float, float, float]] = []
        last_z: float | None = None
        sign = (1, 0, 0)
        for n, entry in enumerate(state.fields):
            if entry.index != n:
                raise ValueError(f"journal: field {entry.index} at position {n}; fields must be a prefix of the plan")
            rec = dict(entry.record)
            rec["z_um"] = math.nan if rec.get("z_um") is None else rec["z_um"]
            self.records.append(FieldRecord(**rec))
            surface += [(float(p[0]), float(p[1]), float(p[2])) for p in entry.focus.get("surface", [])]
            if entry.focus.get("last_z_um") is not None:
                last_z = float(entry.focus["last_z_um"])
            if "sign" in entry.focus:
                sg = entry.focus["sign"]
                sign = (int(sg[0]), int(sg[1]), int(sg[2]))
        return AcquisitionResume(len(state.fields), last_z, tuple(surface), sign, state.fields_total)

    @property
    def journal_path(self) -> Path:
        return self.output_dir / JOURNAL_NAME

    def _journal_header(self, msg: ScanPrepared) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "scan_id": self.scan_id,
            "started_at": self.started,
            "request": self.request,
            "fields": len(msg.plan.fields),
            "rows": msg.plan.rows,
            "cols": msg.plan.cols,
            "frame_shape": list(msg.frame_shape),
            "pixel_size_um": msg.pixel_size_um,
            "models": {
                "autofocus_dir": str(cfg.models.autofocus_dir),
                "classifier_dir": str(cfg.models.classifier_dir),
                "backend": cfg.models.backend,
            },
            "config": {
                "focus": cfg.focus.model_dump(mode="json"),
                "stitch": cfg.stitch.model_dump(mode="json"),
                "mosaic": cfg.mosaic.model_dump(mode="json"),
            },
        }

    def _check_resumable(self, msg: ScanPrepared) -> None:
        state = self.resumed
        assert state is not None and state.header is not None
        hd = state.header
        now = (len(msg.plan.fields), msg.plan.rows, msg.plan.cols, list(msg.frame_shape))
        was = (hd["fields"], hd["rows"], hd["cols"], list(hd["frame_shape"]))
        if now != was:
            raise ValueError(
                f"cannot resume {self.scan_id}: the journal's plan is fields/rows/cols/frame {was}, "
                f"the devices now plan {now}"
            )

    def _preflight(self, geometry: MosaicGeometry) -> str | None:
        """None when the data root can hold what the scan still needs; else the error."""
        done = len(self.records) / max(1, len(geometry.plan.fields))
        need = disk_needed(self.cfg, geometry, done)
        try:
            free = shutil.disk_usage(self.output_dir).free
        except OSError as err:
            return f"disk: cannot read the free space of {self.output_dir}: {err.strerror or err}"
        if free >= need["total"]:
            return None
        return (
            f"disk full: the scan needs about {_mib(need['total'])} (mosaic {_mib(need['mosaic'])}, "
            f"slide {_mib(need['slide'])}, spill {_mib(need['spill'])}), the data root has {_mib(free)} free"
        )

    # -- processes ---------------------------------------------------------------------------
    def _queues(self) -> tuple[JobQueue, ...]:
        queues = (self.events, self.tiles, self.free_slots, self.to_acquisition, self.to_writer)
        return (*queues, self.to_inference, self.inference_replies, self.to_analysis, self.to_stitcher)

    @property
    def stitch(self) -> dict[str, Any] | None:
        """The stitcher's summary (positions, pairs, timings), once the mosaic is finished."""
        return self.mosaic.stitch if self.mosaic is not None else None

    @property
    def mosaic_path(self) -> Path:
        return self.output_dir / MOSAIC_NAME

    def _on_prepared(self, msg: ScanPrepared) -> None:
        h, w = msg.frame_shape
        geometry = MosaicGeometry(msg.plan, h, w, msg.pixel_size_um)
        self.geometry = geometry
        self.fields_total = len(msg.plan.fields)
        try:
            if self.resumed is not None:
                self._check_resumable(msg)
        except ValueError as err:
            self._fail(str(err))
            return
        refused = self._preflight(geometry)
        if refused is not None:
            self._fail(refused)
            return
        try:
            if self.resumed is None:
                self.journal = ScanJournal.create(self.output_dir, self._journal_header(msg))
            else:
                self.journal = ScanJournal.open(self.output_dir)
                self.journal.append("resumed", at=time.time(), fields=len(self.resumed.fields))
        except OSError as err:
            self._fail(f"{'disk full: ' if _enospc(err) else ''}cannot write the scan journal: {err}")
            return
        if self.phase is ScanPhase.STARTING:  # (a cancel may have come first: it stays cancelling,
            self._to(ScanPhase.ACQUIRING)  # and the stitcher and writer still flush what there is)
        self.ring = SlotRing(self.cfg.scan.ring_slots, h, w)
        for i in range(self.ring.spec.slots):
            self.free_slots.put(i)
        # Acquisition captures the first fields while the stitcher creates the mosaic (the tiles wait in
        # the ring and on its queue).
        self.to_acquisition.put(self.ring.spec)
        if self.uses_inference:
            self.to_inference.put(self.ring.spec)
        self.to_stitcher.put(
            StitchJob(
                geometry,
                self.ring.spec,
                str(self.mosaic_path),
                folder=str(self.output_dir),
                resume=self.resumed is not None,
                memory_budget_mib=self.cfg.daemon.memory_budget_mib,
            )
        )
        self._stitch_job_sent = True
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
                self.cpu_s["acquisition"] = round(msg.cpu_s, 3)
                self.driver_cpu_s = msg.driver_cpu_s
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
                self.cpu_s["stitcher"] = round(msg.cpu_s, 3)
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
            case WriterDone() if self._analysis_pending and msg.path is not None:
                # The slide is written; the analysis finishes its last rows (bounded wait).
                self._writer_done = msg
                self._analysis_deadline = time.monotonic() + self.cfg.analysis.finish_timeout_s
            case AnalysisDone() | AnalysisReady() | AnalysisLoading():
                pass  # the daemon's analysis worker reports to its service, not on this queue
            case WriterDone():
                self.peak_rss["writer"] = msg.peak_rss
                self.cpu_s["writer"] = round(msg.cpu_s, 3)
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

    def _may_be_slowed(self, name: str) -> bool:
        # A model load's start timeout is a hard limit (a load uses CPU all along: never stretched).
        return name not in self._loading

    # -- analysis: never fails the scan ------------------------------------------------------
    def _pump_analysis(self) -> None:
        try:
            self._relay_analysis()
        except Exception as err:  # a supervisor-side analysis bug must not fail the scan
            self._analysis_failed(f"analysis service error: {log_failure(log, 'analysis service', err)}")

    def _relay_analysis(self) -> None:
        """Relay the stitcher's row announcements to the analysis worker, take its outcome, and
        give up on it ``analysis.finish_timeout_s`` after the slide."""
        port = self.analysis_port
        if port is None or self.done:
            return
        # Drained even once the analysis is over: a full pipe would keep the stitcher from exiting.
        with contextlib.suppress(queue.Empty, ValueError, OSError):
            for _ in range(1000):
                msg = self.to_analysis.get_nowait()
                if self._analysis_pending and isinstance(msg, MosaicRows | MosaicDone):
                    port.relay(self.scan_id, msg)
        if not self._analysis_pending:
            return
        outcome = port.outcome(self.scan_id)
        if outcome is not None:
            self._on_analysis_done(outcome)
        elif self._analysis_deadline is not None and time.monotonic() > self._analysis_deadline:
            why = f"analysis not finished {self.cfg.analysis.finish_timeout_s:.0f} s after the slide (killed)"
            port.abandon(self.scan_id, why, kill=True)
            self._analysis_failed(why)

    def _on_analysis_done(self, outcome: AnalysisOutcome) -> None:
        msg = outcome.done
        if msg is None:
            self._analysis_failed(outcome.error or "analysis failed")
            return
        self.peak_rss["analysis"] = msg.peak_rss
        self.cpu_s["analysis"] = round(msg.cpu_s, 3)  # this scan's share of the warm worker's CPU
        self._analysis_pending = False
        # No deadline yet: the analysis finished before the slide was written (0 s after it).
        after = 0.0 if self._analysis_deadline is None else self.cfg.analysis.finish_timeout_s - (
            self._analysis_deadline - time.monotonic()
        )
        if msg.summary is not None:
            self.analysis = {
                **msg.summary,
                "error": None,
                "seconds": round(msg.seconds, 3),
                "ready_after_slide_s": round(after, 3),
            }
        else:
            self.analysis = {"error": msg.error or "analysis failed", "seconds": round(msg.seconds, 3)}
        self._analysis_worker_starts()
        self._publish_analysis()
        self._resume_writer_done()

    def _analysis_worker_starts(self) -> None:
        """How many analysis workers the daemon has started so far (1: every scan used the first)."""
        if self.analysis is not None and self.analysis_port is not None:
            worker = self.analysis.setdefault("worker", {})
            if isinstance(worker, dict):
                worker["starts"] = self.analysis_port.starts

    def _analysis_failed(self, error: str) -> None:
        """The analysis worker died, hung or ran out of time: report it; the slide is not affected."""
        if self._analysis_pending:
            self._analysis_pending = False
            self.analysis = {"error": error}
            self._analysis_worker_starts()
            log.warning("scan %s: %s", self.scan_id, error)
            self._publish_analysis()
        self._resume_writer_done()

    def _resume_writer_done(self) -> None:
        held, self._writer_done = self._writer_done, None
        if held is not None and not self.done:
            self._handle(held)

    def _publish_analysis(self) -> None:
        a = self.analysis or {}
        files = a.get("files") or {}

        def path(key: str) -> str | None:
            name = files.get(key)
            return str(self.output_dir / name) if name else None

        self.publish(
            AnalysisReadyEvent(
                scan_id=self.scan_id,
                error=a.get("error"),
                slide_score=a.get("slide_score"),
                tumour_burden_mm2=a.get("tumour_burden_mm2"),
                tumour_burden_pct=a.get("tumour_burden_pct"),
                lesion_count=a.get("lesion_count"),
                largest_lesion_diameter_mm=a.get("largest_lesion_diameter_mm"),
                tissue_mm2=a.get("tissue_mm2"),
                nuclei_count=a.get("nuclei_count"),
                nuclei_density_in_lesions_per_mm2=a.get("nuclei_density_in_lesions_per_mm2"),
                nuclei_density_outside_per_mm2=a.get("nuclei_density_outside_per_mm2"),
                annotations=path("annotations"),
                heatmap=path("heatmap"),
                job=self.KIND,
            )
        )

    def _check_workers(self) -> None:
        self._pump_analysis()
        super()._check_workers()

    def _drop_analysis(self, why: str) -> None:
        """The scan ended without waiting for its analysis (cancelled, failed): the worker drops it."""
        if self._analysis_pending and self.analysis_port is not None:
            self._analysis_pending = False
            self.analysis_port.abandon(self.scan_id, why)
            self.analysis = {"error": f"the scan did not complete ({why})"}

    def close(self) -> None:
        self._drop_analysis("the daemon let go of the scan")
        super().close()

    def _stop_inference(self) -> None:
        if "inference" in self.procs:
            self.to_inference.put(EndOfStream("acquisition is done, or the scan ended"))

    def _on_inference_done(self, msg: InferenceDone) -> None:
        self.peak_rss["inference"] = msg.peak_rss
        self.cpu_s["inference"] = round(msg.cpu_s, 3)
        self.inference.update(msg.stats)

    # -- ending ------------------------------------------------------------------------------
    def _fail(self, error: str) -> None:
        # An ENOSPC anywhere (the skeleton says "disk full") fails the scan as "disk full".
        if "disk full" in error and not error.startswith("disk full"):
            error = f"disk full: {error}"
        super()._fail(error)

    def _finish(self, reason: FinishReason) -> None:
        self._to(ScanPhase.DONE)
        self.finish_reason = reason
        self.cancel_event.set()
        self._drop_analysis(f"the scan {reason.value}")
        if reason is FinishReason.FAILED:
            # A worker died or hung. Whatever was captured is still in the ring
            # and the tile queue: end the stream so the stitcher flushes it into
            # the Zarr mosaic (nothing captured is lost), and release the writer.
            self.tiles.put(EndOfStream("the scan failed"))
            self.to_writer.put(EndOfStream("the scan failed"))
        if not self._stitch_job_sent:  # ended before the plan: the waiting stitcher has nothing to do
            self.to_stitcher.put(EndOfStream(f"the scan {reason.value} before its plan"))
        self._stop_inference()
        # Without blocking the daemon: the supervisor keeps serving while the workers flush and exit.
        self.stop_workers_then(10.0, lambda: self._settle(reason))

    def _settle(self, reason: FinishReason) -> None:
        """The workers are gone: free the ring, settle the folder, close the journal, report."""
        self._release()
        if reason is not FinishReason.COMPLETED:
            # A writer that was killed cannot remove its own partial slide; the
            # kept mosaic is what an export (python -m runtime export) starts from.
            partial_path(self.output_dir / SLIDE_NAME).unlink(missing_ok=True)
        self._close_journal(reason)
        self._write_artifact_regions()
        if reason is FinishReason.COMPLETED and not self.cfg.mosaic.keep_after_export:
            shutil.rmtree(self.mosaic_path, ignore_errors=True)
            self.journal_path.unlink(missing_ok=True)  # it describes the mosaic: both go
        try:
            self.write_report()
        except OSError as err:
            # A full disk must not keep the failure from being told (the event says no report).
            self.report_written = False
            log.error("could not write the report of %s: %s", self.scan_id, err)

    def _close_journal(self, reason: FinishReason) -> None:
        """``completed`` (and the INCOMPLETE marker and spill go), or ``stopped`` with the reason."""
        journal = self.journal
        if journal is None:
            return
        try:
            if reason is FinishReason.COMPLETED:
                journal.append("completed", at=time.time())
                mark_complete(self.output_dir)
            else:
                journal.append("stopped", reason=reason.value, error=self.error, at=time.time())
        except OSError as err:  # disk full: the journal stays as it was (a resume reads it the same)
            log.error("could not close the journal of %s: %s", self.scan_id, err)
        finally:
            journal.close()
            self.journal = None

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
        fields, artifact_context = self._field_reports()
        if artifact_context is not None:
            # The regions written to artifacts.geojson (None: not written; 0: none, no file).
            regions = self.artifact_regions
            geojson = str(self.output_dir / ARTIFACTS_NAME) if regions else None
            artifact_context = {**artifact_context, "regions": regions, "geojson": geojson}
        return {
            **self.common_report(),
            "slide": self.slide_path,
            "dicom": self._dicom_series(),
            "mosaic": self.outputs()["mosaic"],
            "levels": [list(lv) for lv in self.levels],
            "captures_total": captures,
            "captures_per_field": captures / len(self.records) if self.records else None,
            # Of cpu_seconds.acquisition, what the camera driver's captures took (a replayed
            # recording: reading and decompressing it; a real frame grabber: close to nothing).
            "driver_cpu_seconds": None if self.driver_cpu_s is None else round(self.driver_cpu_s, 3),
            "fields": fields,
            "artifact_context": artifact_context,
            "near_focus": near_focus_report(self.focus, [r.near_focus for r in self.records]),
            # The captures by cause summed over the fields (each field's: fields[].capture_cost).
            "capture_cost": capture_cost_report([r.capture_cost for r in self.records]),
            "inference": self.inference or None,
            "stitch": self.stitch,
            # An incomplete scan says so (its folder also carries INCOMPLETE): resume it or export it.
            "complete": self.finish_reason is FinishReason.COMPLETED,
            "resumable": self.finish_reason is not FinishReason.COMPLETED and self.journal_path.exists(),
            "journal": str(self.journal_path) if self.journal_path.exists() else None,
            "resumed": 0 if self.resumed is None else self.resumed.resumes + 1,
            # Slide analysis ([analysis] enabled): the summary and the files it wrote, or {"error": ...}.
            "analysis": self.analysis,
        }

    def _field_reports(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """Each field's record, with ``artifact_in_context`` (the model flagged it, or the scan-end
        context pass did) and ``artifact_windows_in_context``, and the pass's summary (its rule and
        counts; None: no field was classified)."""
        per, summary = self._artifact_context()
        fields = [{**asdict(r), **per[(r.row, r.col)]} for r in sorted(self.records, key=lambda r: r.index)]
        return fields, summary

    def _artifact_context(self) -> tuple[dict[tuple[int, int], dict[str, Any]], dict[str, Any] | None]:
        """The scan-end context pass over the fields' classifier windows:
        :func:`runtime.ml.artifact_context.context_report`."""
        return context_report(
            [
                FieldClass(r.row, r.col, r.artifact, r.artifact_probability, r.window_p_artifact, r.window_artifact)
                for r in self.records
            ]
        )

    def _write_artifact_regions(self) -> None:
        """``artifacts.geojson``: the fields' artifact windows after the scan-end context, placed on
        the slide and merged into QuPath annotations (:mod:`runtime.analysis.artifact_regions`). A
        failure is logged, never the scan's."""
        geometry = self.geometry
        if geometry is None or not self.records:
            return
        per, summary = self._artifact_context()
        if summary is None:
            return  # nothing was classified
        try:
            plan = {f.index: f for f in geometry.plan.fields}
            tile = (geometry.tile_height, geometry.tile_width)
            fields = [
                FieldArtifacts.in_context(
                    geometry.commanded_top_left(plan[r.index]),
                    tile,
                    per[(r.row, r.col)],
                    r.window_artifact,
                    r.window_p_artifact,
                )
                for r in self.records
                if r.index in plan and per[(r.row, r.col)]["artifact_in_context"]
            ]
            self.artifact_regions = write_artifact_regions(self.output_dir, fields, geometry.pixel_size_um)
        except Exception as err:  # QC annotations must not cost the report
            log_failure(log, "artifact regions", err)

    def _dicom_series(self) -> str | None:
        """The DICOM WSI series the writer put beside the slide (``writer.dicom``), once written."""
        if self.slide_path is None:
            return None
        folder = dicom_path(Path(self.slide_path))
        return str(folder) if folder.is_dir() else None

    def outputs(self) -> dict[str, str | None]:
        mosaic = str(self.mosaic_path) if self.mosaic_path.exists() else None
        return {"slide": self.slide_path, "mosaic": mosaic, "recording": None}


def _enospc(err: OSError) -> bool:
    return err.errno == errno.ENOSPC
