"""The daemon: the main process that owns the control server and, per scan, the worker processes.

Modules:

* ``supervisor``: ``Supervisor``, the main process: control plane, scan lifecycle, systemd integration;
* ``job``: ``WorkerJob``, what every job shares: worker processes, heartbeats, phases, cancel, the report;
* ``scan_job``: ``ScanJob``, one scan: the worker processes, the shared-memory ring, the queues;
* ``analysis_service``: ``AnalysisService``, the analysis worker kept warm across scans
  (``[analysis] enabled``): started with the daemon, supervised, restarted when it dies;
* ``zstack_job``: ``ZstackJob``, one ``record_zstacks``: the recorder worker, writing a recording;
* ``model_request``: ``requested_model_dir``, where a model folder named in a request may be;
* ``state``: the scan job's phases (``ScanPhase``, ``TRANSITIONS``, ``check_transition``), the run
  state derived from them (``RunState``, ``run_state``), ``FinishReason`` and ``ScanStatus``;
* ``sdnotify``: the systemd notify protocol without libsystemd (used as a module:
  ``from runtime.daemon import sdnotify``; its functions are not re-exported);
* ``process``: ``run_daemon`` in this process (systemd's ExecStart), or ``start_daemon_process`` /
  ``stop_daemon_process`` in a child (hw_sim, tests, bench).

May import: every layer below (base, devices, ml, output, stitching, ipc, focus, workers, control).

Re-exports are lazy (PEP 562 ``__getattr__`` imports a name's module on its first access; type
checkers and IDEs read the imports under ``TYPE_CHECKING``): ``supervisor`` and ``scan_job`` import
every worker and the control server, while ``process`` (starting a daemon) and ``state`` need
none of it; ``process`` imports the supervisor only in the daemon's own process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.daemon.analysis_service import AnalysisService
    from runtime.daemon.job import WorkerJob
    from runtime.daemon.model_request import requested_model_dir
    from runtime.daemon.process import run_daemon, start_daemon_process, stop_daemon_process
    from runtime.daemon.scan_job import ScanJob
    from runtime.daemon.state import (
        TRANSITIONS,
        FinishReason,
        IllegalTransition,
        RunState,
        ScanPhase,
        ScanStatus,
        check_transition,
        run_state,
    )
    from runtime.daemon.supervisor import Supervisor
    from runtime.daemon.zstack_job import ZstackJob
else:
    from runtime.lazy import lazy_exports

    _MODULES = {  # module -> the names it gives this package
        "analysis_service": ("AnalysisService",),
        "job": ("WorkerJob",),
        "model_request": ("requested_model_dir",),
        "process": ("run_daemon", "start_daemon_process", "stop_daemon_process"),
        "scan_job": ("ScanJob",),
        "state": (
            "TRANSITIONS",
            "FinishReason",
            "IllegalTransition",
            "RunState",
            "ScanPhase",
            "ScanStatus",
            "check_transition",
            "run_state",
        ),
        "supervisor": ("Supervisor",),
        "zstack_job": ("ZstackJob",),
    }

    __getattr__, __dir__ = lazy_exports(__name__, _MODULES, globals())


__all__ = [
    "TRANSITIONS",
    "AnalysisService",
    "FinishReason",
    "IllegalTransition",
    "RunState",
    "ScanJob",
    "ScanPhase",
    "ScanStatus",
    "Supervisor",
    "WorkerJob",
    "ZstackJob",
    "check_transition",
    "requested_model_dir",
    "run_daemon",
    "run_state",
    "start_daemon_process",
    "stop_daemon_process",
]
