"""Fleet mode: one job over many slides on a dask.distributed cluster (``python -m runtime batch``).

Modules:

* ``slides``: one slide as a worker runs it -- the ``export`` and ``restitch`` jobs, the slide's
  folder and its completion marker (``SlideTask``, ``SlideResult``, ``run_slide``);
* ``batch``: the client -- a LocalCluster from ``[fleet]`` or an existing scheduler, one task per
  slide, progress and the summary (``connect``, ``plan_tasks``, ``run_batch``, ``summary_table``);
* ``cli``: the ``batch`` subcommand (``add_batch_parser``, ``run_batch_command``).

May import: base, devices, ml (through focus), output, stitching, ipc (peak memory), focus. Not
workers or daemon: a restitch runs the scan's components in one process, without either.
``distributed`` is imported only when a batch runs (the ``fleet`` extra).

Re-exports are lazy (PEP 562): ``python -m runtime`` builds the ``batch`` parser on every call and
must not load the stitching and focus stack for ``ctl`` or ``export``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.fleet.batch import BatchError, BatchOutcome, connect, plan_tasks, run_batch, summary_table
    from runtime.fleet.cli import add_batch_parser, run_batch_command
    from runtime.fleet.slides import SlideResult, SlideTask, run_slide
else:
    from runtime.lazy import lazy_exports

    _MODULES = {  # module -> the names it gives this package
        "batch": ("BatchError", "BatchOutcome", "connect", "plan_tasks", "run_batch", "summary_table"),
        "cli": ("add_batch_parser", "run_batch_command"),
        "slides": ("SlideResult", "SlideTask", "run_slide"),
    }

    __getattr__, __dir__ = lazy_exports(__name__, _MODULES, globals())


__all__ = [
    "BatchError",
    "BatchOutcome",
    "SlideResult",
    "SlideTask",
    "add_batch_parser",
    "connect",
    "plan_tasks",
    "run_batch",
    "run_batch_command",
    "run_slide",
    "summary_table",
]
