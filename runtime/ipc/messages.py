"""Small messages between worker processes and the supervisor, and the queues that carry them.

They travel through ``multiprocessing`` queues inside one machine (pixels do
not: they stay in the shared-memory ring and only the slot id travels).
Everything here is a frozen dataclass of plain values.

Each queue carries one union of message types, named below with the queue's
alias (``EventQueue = Queue[WorkerEvent]`` ...), so that mypy checks what is
put on a queue and, with ``match`` and ``assert_never`` in the receiving loop,
that every kind of message is handled. A stream that ends says so with
:class:`EndOfStream`, one sentinel type for every queue, not ``None``.

* ``events`` (every worker -> scan job): :data:`WorkerEvent`
* ``tiles`` (acquisition -> stitcher): :data:`TileMessage`
* ``to_writer`` (stitcher -> writer): :data:`WriterMessage`
* ``to_acquisition`` (scan job -> acquisition): :data:`AcquisitionControl`
* ``free_slots`` (scan job, stitcher, acquisition's focus loop -> acquisition): ring slot ids
* the analysis worker's input (supervisor -> analysis worker, across scans): :data:`AnalysisMessage`;
  its events queue carries :data:`WorkerEvent` like a scan's

The inference worker's two queues are in :mod:`runtime.ipc.inference_channel`.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.queues import Queue
from typing import TYPE_CHECKING, Any, TypeAlias

from runtime.config import AnalysisConfig
from runtime.devices.scan_plan import FieldPlan, GridPlan
from runtime.ipc import lifetime
from runtime.ipc.ring import RingSpec


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Reads VmHWM, the high-water mark of this process image: ``ru_maxrss`` is
    not used because Linux carries it across fork+exec, so a worker spawned by
    a large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """CPU time this process has used so far, user + system, all its threads (getrusage).

    The done messages (AcquisitionDone, MosaicDone, WriterDone, InferenceDone, AnalysisDone) carry it as
    ``cpu_s``, taken when the message is made (a default factory: each worker makes its done
    message as its last act, and none has to remember to fill it in), so the report says what
    each process of a scan cost, independent of how many cores it shared (``python -m bench
    e2e``). It includes the worker's start (the interpreter and its imports): a real cost of a
    process per scan.
    """
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass(frozen=True)
class FieldRecord:
    """What acquisition did at one field."""

    index: int
    row: int
    col: int
    x_um: float  # commanded
    y_um: float  # commanded
    z_um: float  # chosen focus
    captures: int
    focus_method: str
    predicted_defocus_um: float | None = None  # single_shot: the model's estimate at the surface's z
    tile_class: str | None = None  # background / tissue / artifact (when the classifier ran)
    artifact: bool = False  # flagged for the report: ink, bubble, dust or fold on this field
    # The classifier's p(artifact) for the field (its strongest window; None: not classified): the
    # scan-end context (runtime.ml.artifact_context) uses it for each window when the record carries
    # no window values (a journal written before them), and over the field grid when none does.
    artifact_probability: float | None = None
    # How the side of focus was decided: "model" (the model's sign), "second_shot" (a second
    # capture at a known offset, runtime.focus.single_shot), "fit" (the near-focus sharpness fit
    # moved the frame, runtime.focus.near_focus), "sweep" (the contrast sweep); None: nothing to
    # focus on (glass). sign_flipped: the scan's learnt sign convention was flipped.
    sign_resolution: str | None = None
    sign_flipped: bool = False
    # single_shot near focus (runtime.focus.near_focus): "verified" (a sharpness fit agreed with the
    # model), "fit" (the fit chose the plane), "failed" (no peak: the sweep), "surface" (kept at the
    # focus surface's prediction while the model is distrusted); None: not checked.
    near_focus: str | None = None
    # The captures by cause (runtime.focus.single_shot.CaptureCost as a dict: first, moves,
    # second_shots, start_probes, probes, sweep; they sum to ``captures``); None: not counted.
    capture_cost: dict[str, int] | None = None
    # Per classifier window, row by row of the field's window grid (runtime.ml.tasks.TileClass):
    # p(artifact) and the model's artifact flag; the scan's end grows the flags over the slide's
    # windows (runtime.ml.artifact_context). None: not classified, or a journal written before them.
    window_p_artifact: tuple[tuple[float, ...], ...] | None = None
    window_artifact: tuple[tuple[bool, ...], ...] | None = None


@dataclass(frozen=True)
class FocusState:
    """The acquisition's focus state after a field, for the scan journal (a resumed scan starts
    from it): the last focus z, the focus-surface points this field added (x, y, z µm), the learnt
    sign convention (sign, score, flips)."""

    last_z_um: float
    surface: tuple[tuple[float, float, float], ...] = ()
    sign: tuple[int, int, int] = (1, 0, 0)


@dataclass(frozen=True)
class TileReady:
    """A captured in-focus frame waiting in ring slot ``slot``."""

    slot: int
    field: FieldRecord
    plan: FieldPlan
    focus: FocusState | None = None


@dataclass(frozen=True)
class ScanPrepared:
    """Acquisition opened the devices and planned the scan."""

    plan: GridPlan
    frame_shape: tuple[int, int]
    pixel_size_um: float


@dataclass(frozen=True)
class Heartbeat:
    worker: str
    time: float


@dataclass(frozen=True)
class FieldDone:
    record: FieldRecord


@dataclass(frozen=True)
class AcquisitionDone:
    fields: int
    cancelled: bool
    simulated_time_s: float | None
    peak_rss: int
    cpu_s: float = dataclasses.field(default_factory=cpu_seconds)  # when made
    # Of cpu_s, the CPU seconds spent in the camera driver's capture calls (a replayed
    # recording's decompression; a frame grabber's DMA needs next to none): the runtime's own
    # acquisition cost is cpu_s - driver_cpu_s.
    driver_cpu_s: float | None = None


@dataclass(frozen=True)
class MosaicRows:
    """Rows [0, rows) of mosaic level ``level`` are final on disk (stitcher -> writer, per band)."""

    path: str
    level: int
    rows: int


@dataclass(frozen=True)
class MosaicBlocks:
    """Chunks ``blocks`` ((row, col) in chunks) of mosaic level ``level`` are final on disk, ahead of
    the rows a :class:`MosaicRows` has vouched for (stitcher -> writer, as the block path writes
    them): the writer may encode them now rather than when their row is final. Not journaled: a
    resumed scan announces again only what it writes again."""

    path: str
    level: int
    blocks: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class MosaicDone:
    path: str
    shape: tuple[int, int]
    complete: bool
    peak_rss: int
    stitch: dict[str, Any] | None = None  # DequeAccumulator.summary(): pairs, timings, positions
    cpu_s: float = dataclasses.field(default_factory=cpu_seconds)  # when made


@dataclass(frozen=True)
class WriterDone:
    path: str | None
    levels: tuple[tuple[int, int], ...]
    seconds: float
    peak_rss: int
    cpu_s: float = dataclasses.field(default_factory=cpu_seconds)  # when made


@dataclass(frozen=True)
class WorkerFailed:
    worker: str
    message: str


@dataclass(frozen=True)
class InferenceReady:
    """The inference worker loaded its models (from now on the normal heartbeat timeout applies)."""

    backend: str
    refused: dict[str, str]
    load_s: float
    autofocus_model: str = ""  # folder and ONNX sha256 prefix (the builtin choice depends on the frame)


@dataclass(frozen=True)
class InferenceDone:
    """The inference worker stopped: what it served, and its peak RSS."""

    backend: str
    stats: dict[str, Any]
    peak_rss: int
    cpu_s: float = dataclasses.field(default_factory=cpu_seconds)  # when made


@dataclass(frozen=True)
class AnalysisDone:
    """The analysis worker finished scan ``scan_id``: the summary (``report.json``'s ``analysis``)
    or the error that stopped it (the slide is complete either way). The worker outlives the scan
    (runtime/daemon/analysis_service.py), so ``seconds`` and ``cpu_s`` are this scan's share:
    from its :class:`AnalysisBegin` to this message."""

    scan_id: str
    summary: dict[str, Any] | None
    error: str | None
    seconds: float
    peak_rss: int
    cpu_s: float


@dataclass(frozen=True)
class AnalysisReady:
    """The analysis worker loaded its models (``error``: it could not; each scan's analysis then
    names it), at its start or for a scan that asked for other ones: it serves scans without a start."""

    pid: int
    load_s: float
    error: str | None


@dataclass(frozen=True)
class AnalysisLoading:
    """The analysis worker re-loads its models for scan ``scan_id``: it cannot beat until its next
    :class:`AnalysisReady` (a TensorRT engine build is one long native call)."""

    scan_id: str


@dataclass(frozen=True)
class AnalysisBegin:
    """Supervisor -> analysis worker: analyse scan ``scan_id``'s mosaic (``mosaic_path``, made by the
    stitcher later) into ``out_dir`` with ``cfg`` (its models are re-loaded only if they changed)."""

    scan_id: str
    out_dir: str
    mosaic_path: str
    cfg: AnalysisConfig


@dataclass(frozen=True)
class AnalysisCancel:
    """Supervisor -> analysis worker: scan ``scan_id`` ended without a complete mosaic: drop it."""

    scan_id: str


@dataclass(frozen=True)
class EndOfStream:
    """The last message on a stream queue (tiles, to_writer, the inference requests): nothing follows.

    One type for every queue instead of ``None``: the type checker sees it in each queue's
    union, and ``reason`` says in the log who ended the stream and why.
    """

    reason: str


WorkerEvent: TypeAlias = (
    Heartbeat
    | ScanPrepared
    | FieldDone
    | AcquisitionDone
    | InferenceReady
    | InferenceDone
    | MosaicDone
    | WriterDone
    | WorkerFailed
    | AnalysisDone
    | AnalysisReady
    | AnalysisLoading
)
"""What the workers tell the scan job (the events queue)."""

TileMessage: TypeAlias = TileReady | EndOfStream
"""Acquisition -> stitcher: each kept frame's slot, then the end (after the last field, a cancel or
a failure; the scan job ends the stream itself when a worker fails)."""

WriterMessage: TypeAlias = MosaicRows | MosaicBlocks | MosaicDone | EndOfStream
"""Stitcher -> writer: rows (and blocks ahead of them) that became final, then MosaicDone (or the end without one: the
stitcher failed, or the scan job gave up on it)."""

AnalysisMessage: TypeAlias = AnalysisBegin | MosaicRows | MosaicDone | AnalysisCancel | EndOfStream
"""Supervisor -> the analysis worker, which outlives scans: a scan begins, its rows become final
(relayed from the stitcher by the scan job), its mosaic is done or the scan is dropped; EndOfStream
stops the worker."""

AcquisitionControl: TypeAlias = RingSpec
"""Scan job -> acquisition: the ring, once the scan job has created it for the planned frame size
(acquisition is stopped through the cancel event, not this queue)."""

# multiprocessing.queues.Queue is generic only to the type checker (not subscriptable at run time
# before Python 3.12), hence the quotes.
EventQueue: TypeAlias = "Queue[WorkerEvent]"
TileQueue: TypeAlias = "Queue[TileMessage]"
WriterQueue: TypeAlias = "Queue[WriterMessage]"
ControlQueue: TypeAlias = "Queue[AcquisitionControl]"
SlotQueue: TypeAlias = "Queue[int]"
AnalysisQueue: TypeAlias = "Queue[AnalysisMessage]"


if TYPE_CHECKING:
    _WriterQueueBase = Queue[WriterMessage]
else:  # not subscriptable at run time before Python 3.12
    _WriterQueueBase = Queue


class TeeQueue(_WriterQueueBase):
    """A ``to_writer`` queue whose every ``put`` also goes to a second queue (the analysis worker's).

    The stitcher announces final rows on its ``to_writer``; with a TeeQueue there, the writer
    and the analysis worker (``[analysis] enabled``) both see every announcement, without the
    stitcher knowing about analysis. ``get`` reads this queue only (the writer's).
    """

    def __init__(self, ctx: SpawnContext | ForkServerContext, also: WriterQueue) -> None:
        super().__init__(ctx=ctx)
        self._also = also

    def put(self, obj: WriterMessage, block: bool = True, timeout: float | None = None) -> None:
        super().put(obj, block, timeout)
        self._also.put(obj, block, timeout)

    # The pickled state (sent to a spawned worker) is the queue's plus the second queue, as
    # typeshed's own JoinableQueue extends it: hence the overrides' different state type.
    def __getstate__(self) -> tuple[Any, WriterQueue]:  # type: ignore[override]
        return (super().__getstate__(), self._also)

    def __setstate__(self, state: tuple[Any, WriterQueue]) -> None:  # type: ignore[override]
        base, self._also = state
        super().__setstate__(base)


class HeartbeatSender:
    """Rate-limited heartbeats from a worker's main loop (at most one per ``interval_s``).

    Beats come from the loop that does the work, not a side thread, so a
    worker stuck in its loop stops beating and the supervisor notices.

    Each beat it sends also checks that the process that spawned this worker
    (recorded at construction) is still its parent, and raises ``SystemExit``
    if not: a worker whose loop runs outlives a SIGKILLed supervisor by about one
    interval, also where there is no parent-death signal (:mod:`runtime.ipc.lifetime`).
    """

    def __init__(self, worker: str, events: EventQueue, interval_s: float = 0.5) -> None:
        self.worker = worker
        self._events = events
        self._interval = interval_s
        self._last = 0.0
        self._parent = lifetime.parent_pid()

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            lifetime.exit_if_orphaned(self._parent)
            self._events.put(Heartbeat(self.worker, time.time()))
