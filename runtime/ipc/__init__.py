"""What crosses a process boundary: the messages, the queues that carry them, and the tile ring.

Modules:

* ``messages``: one message union per queue between the workers and the supervisor (``TileQueue``,
  ``WriterQueue``, ``EventQueue``, ...), ``HeartbeatSender``, ``peak_rss_bytes``;
* ``ring``: ``SlotRing``/``AttachedRing``, fixed-size tile slots in one shared-memory segment,
  and the sweep of segments a killed daemon left (``remove_stale_segments``);
* ``inference_channel``: the inference worker's requests and replies, and ``InferenceChannel``,
  the caller's side of them;
* ``lifetime``: workers die with their supervisor (``bind_to_parent``), and the bookkeeping that
  sweeps a killed daemon's semaphores.

May import: the base modules and ``runtime.devices`` (the scan plan's field records travel in messages).

Re-exports are eager: the four modules need only the standard library, numpy and
``runtime.devices``, and every worker imports ``messages``, which imports ``ring`` and ``lifetime``.
"""

from runtime.ipc.inference_channel import (
    AutofocusReply,
    AutofocusRequest,
    ClassifyReply,
    ClassifyRequest,
    InferenceChannel,
    InferenceRequest,
    InferenceStopped,
    ReplyQueue,
    RequestQueue,
    WorkerError,
    WorkerReady,
)
from runtime.ipc.lifetime import (
    bind_to_parent,
    forget_semaphores,
    orphaned,
    record_semaphores,
    remove_stale_semaphores,
    semaphore_names,
)
from runtime.ipc.messages import (
    AcquisitionDone,
    ControlQueue,
    EndOfStream,
    EventQueue,
    FieldDone,
    FieldRecord,
    Heartbeat,
    HeartbeatSender,
    InferenceDone,
    InferenceReady,
    MosaicBlocks,
    MosaicDone,
    MosaicRows,
    ScanPrepared,
    SlotQueue,
    TileQueue,
    TileReady,
    WorkerEvent,
    WorkerFailed,
    WriterDone,
    WriterQueue,
    peak_rss_bytes,
)
from runtime.ipc.ring import AttachedRing, RingSpec, SlotRing, remove_stale_segments, segments_of

__all__ = [
    "AcquisitionDone",
    "AttachedRing",
    "AutofocusReply",
    "AutofocusRequest",
    "ClassifyReply",
    "ClassifyRequest",
    "ControlQueue",
    "EndOfStream",
    "EventQueue",
    "FieldDone",
    "FieldRecord",
    "Heartbeat",
    "HeartbeatSender",
    "InferenceChannel",
    "InferenceDone",
    "InferenceReady",
    "InferenceRequest",
    "InferenceStopped",
    "MosaicBlocks",
    "MosaicDone",
    "MosaicRows",
    "ReplyQueue",
    "RequestQueue",
    "RingSpec",
    "ScanPrepared",
    "SlotQueue",
    "SlotRing",
    "TileQueue",
    "TileReady",
    "WorkerError",
    "WorkerEvent",
    "WorkerFailed",
    "WorkerReady",
    "WriterDone",
    "WriterQueue",
    "bind_to_parent",
    "forget_semaphores",
    "orphaned",
    "peak_rss_bytes",
    "record_semaphores",
    "remove_stale_segments",
    "remove_stale_semaphores",
    "segments_of",
    "semaphore_names",
]
