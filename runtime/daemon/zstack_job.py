"""One ``record_zstacks`` job: the recorder worker, its events, the report.

The supervisor owns a ZstackJob as it owns a scan's :class:`~runtime.daemon.scan_job.ScanJob`
(one job at a time: a second request is ``busy``), and the two share
:class:`~runtime.daemon.job.WorkerJob`: heartbeats, a worker that dies or hangs fails the job
with a one-line error, ``cancel``, stopping the workers on every exit path, ``report.json``. One
worker, :func:`~runtime.workers.recorder.recorder_main`, opens the driver, captures and writes
``recording.zarr``; there is no ring, mosaic or slide. Its phases are a subset of the scan's
table (:data:`~runtime.daemon.state.TRANSITIONS`)::

    ```mermaid
    stateDiagram-v2
        [*] --> STARTING: record_zstacks (recorder spawned)
        STARTING --> ACQUIRING: ScanPrepared (the chosen fields)
        ACQUIRING --> DONE: AcquisitionDone (completed; cancelled if a cancel came first)
        STARTING --> CANCELLING: cancel
        ACQUIRING --> CANCELLING: cancel
        CANCELLING --> DONE: AcquisitionDone (cancelled: the fields so far are the recording)
        STARTING --> DONE: recorder failed / hung (failed)
        ACQUIRING --> DONE: recorder failed / hung (failed)
        CANCELLING --> DONE: recorder failed / hung (failed)
    ```

The events are the scan's, with ``job: "zstacks"``: ``scan_started`` (the chosen fields; the grid
of the whole plan), ``field_done`` per stack (``captures``: planes, ``z_um``: the centre),
``scan_failed`` and ``scan_finished`` (``recording``: the path, once written).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, assert_never

from runtime.config import RuntimeConfig
from runtime.control.events import JobKind
from runtime.daemon.job import Publish, WorkerJob
from runtime.daemon.state import FinishReason, ScanPhase
from runtime.errors import one_line
from runtime.ipc.messages import (
    AcquisitionDone,
    AnalysisDone,
    AnalysisLoading,
    AnalysisReady,
    FieldDone,
    Heartbeat,
    InferenceDone,
    InferenceReady,
    MosaicDone,
    ScanPrepared,
    WorkerEvent,
    WorkerFailed,
    WriterDone,
)
from runtime.stitching.accumulator import MosaicGeometry
from runtime.workers.recorder import ZstackRecordJob, recorder_main


class ZstackJob(WorkerJob):
    KIND: ClassVar[JobKind] = "zstacks"

    def __init__(self, cfg: RuntimeConfig, scan_id: str, record: ZstackRecordJob, publish: Publish) -> None:
        super().__init__(cfg, scan_id, Path(record.output_dir), publish)
        self.record = record
        self._record_semaphores()
        self._spawn("recorder", recorder_main, (record, cfg.driver, cfg.scan, self.events, self.cancel_event))

    def _handle(self, msg: WorkerEvent) -> None:
        match msg:
            case Heartbeat():
                self.heartbeats[msg.worker] = time.monotonic()
            case ScanPrepared():
                if self.phase is ScanPhase.STARTING:  # (a cancel may have come first)
                    self._to(ScanPhase.ACQUIRING)
                h, w = msg.frame_shape  # the area the stacks cover, as a scan's mosaic would
                self._started(msg, MosaicGeometry(msg.plan, h, w, msg.pixel_size_um).shape)
            case FieldDone():
                self._field_done(msg.record)
            case AcquisitionDone():
                self.peak_rss["recorder"] = msg.peak_rss
                self.cpu_s["recorder"] = round(msg.cpu_s, 3)
                self.simulated_time_s = msg.simulated_time_s
                cancelled = msg.cancelled or self.phase is ScanPhase.CANCELLING
                self._finish(FinishReason.CANCELLED if cancelled else FinishReason.COMPLETED)
            case WorkerFailed():
                self._fail(f"{msg.worker} failed: {one_line(msg.message)}")
            case InferenceReady() | InferenceDone() | MosaicDone() | WriterDone():
                pass  # a scan's workers only; the recorder never sends them
            case AnalysisDone() | AnalysisReady() | AnalysisLoading():
                pass  # the daemon's analysis worker reports to its service, not on a job's queue
            case _:
                assert_never(msg)

    def _finish(self, reason: FinishReason) -> None:
        self._to(ScanPhase.DONE)
        self.finish_reason = reason
        self.cancel_event.set()
        self.stop_workers_then(10.0, self.write_report)

    def outputs(self) -> dict[str, str | None]:
        path = self.record.path
        return {"slide": None, "mosaic": None, "recording": str(path) if path.is_dir() else None}

    def report(self) -> dict[str, Any]:
        partial = self.record.partial_path
        return {
            **self.common_report(),
            "recording": self.outputs()["recording"],
            "partial_recording": str(partial) if partial.exists() else None,
            "planes": len(self.record.offsets_um),
            "z_center_um": self.record.z_center_um,
            "z_offsets_um": list(self.record.offsets_um),
            "captures_total": sum(r.captures for r in self.records),
            "fields": [asdict(r) for r in sorted(self.records, key=lambda r: r.index)],
        }
