"""The client side of a batch: one dask task per slide, their progress, the summary.

``python -m runtime batch JOB INPUT... --out DIR`` starts a :class:`distributed.LocalCluster`
sized by the config's ``[fleet]`` section, or joins an existing cluster (``--scheduler``:
its workers need this package installed and the inputs and ``DIR`` at the same paths, e.g. on
shared storage). Each input becomes one task, :func:`runtime.fleet.slides.run_slide`, which
opens the input on the worker and writes ``DIR/<name>/``; the client sends paths and settings
and receives a small :class:`~runtime.fleet.slides.SlideResult` back. A slide that fails is a
result with one line of error; the others go on.

``distributed`` is an optional dependency (the ``fleet`` extra): it is imported only here,
only when a batch runs.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from runtime.config import FleetConfig, RuntimeConfig
from runtime.errors import describe
from runtime.fleet.slides import Job, SlideResult, SlideTask, run_slide

if TYPE_CHECKING:
    from distributed import Client

CONNECT_TIMEOUT_S = 10.0
"""How long joining an existing cluster (``--scheduler``) may take before the batch gives up."""

_SCHEDULER = re.compile(r"^(tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):\d{1,5}$")
_GENERIC = {"mosaic", "recording", "scan"}  # names every scan or recording folder uses


class BatchError(ValueError):
    """The batch cannot start (bad arguments, no cluster); the message says what is wrong."""


def check_scheduler(address: str) -> str:
    if not _SCHEDULER.match(address):
        raise BatchError(f"--scheduler {address!r}: expected tcp://HOST:PORT (or tls://HOST:PORT)")
    return address


def slide_name(source: Path) -> str:
    """The sub-folder an input gets: its name without ``.zarr``, or its folder's name for the
    names every scan uses (``run1/mosaic.zarr`` -> ``run1``)."""
    path = Path(source).absolute()
    stem = path.name.removesuffix(".zarr")
    if stem in _GENERIC and path.parent.name:
        return path.parent.name
    return stem


def plan_tasks(
    job: Job,
    inputs: Sequence[Path],
    out: Path,
    cfg: RuntimeConfig,
    config_path: Path | None = None,
    export_options: dict[str, Any] | None = None,
) -> list[SlideTask]:
    """One task per input; BatchError if two inputs would share a sub-folder or an extra output
    is not a plain name (it goes inside each slide's folder)."""
    options = dict(export_options or {})
    for dest, value in options.items():
        if isinstance(value, Path) and (value.name != str(value) or value.name in ("", ".", "..")):
            flag = "--" + dest.replace("_", "-")
            raise BatchError(f"{flag} {value}: in a batch it is a file name inside each slide's folder, not a path")
    out = Path(out).absolute()
    seen: dict[str, Path] = {}
    tasks = []
    for source in inputs:
        source = Path(source).absolute()
        name = slide_name(source)
        if name in seen:
            raise BatchError(f"{seen[name]} and {source} would both write {out / name}; rename one of them")
        seen[name] = source
        tasks.append(
            SlideTask(
                job=job,
                name=name,
                source=source,
                folder=out / name,
                config=cfg,
                config_path=Path(config_path).absolute() if config_path is not None else None,
                export_options=tuple(sorted(options.items())),
            )
        )
    return tasks


@contextlib.contextmanager
def connect(fleet: FleetConfig, scheduler: str | None = None, workers: int | None = None) -> Iterator[Client]:
    """A client of the cluster at ``scheduler``, or of a LocalCluster sized by ``fleet`` (``workers``
    overrides ``fleet.workers``); both closed on exit."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise BatchError(
            "batch needs dask.distributed: pip install 'wsi-edge-runtime[fleet]' (or pip install distributed)"
        ) from None
    if scheduler is not None:
        try:
            client = Client(check_scheduler(scheduler), timeout=CONNECT_TIMEOUT_S)  # type: ignore[no-untyped-call]
        except OSError as err:
            raise BatchError(f"cannot reach the scheduler at {scheduler}: {describe(err)}") from None
        with client:
            yield client
        return
    cluster = LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=workers or fleet.workers,
        threads_per_worker=fleet.threads_per_worker,
        processes=fleet.processes,
        memory_limit=fleet.memory_limit_mib * 2**20 if fleet.memory_limit_mib else "auto",
        dashboard_address=None,  # no dashboard (it needs bokeh) ...
        # ... but the scheduler's HTTP routes (health, metrics) still listen: on a free port of the
        # loopback rather than on 8787, which another cluster may hold (dask then warns).
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        silence_logs=logging.ERROR,
    )
    with cluster, Client(cluster) as client:  # type: ignore[no-untyped-call]
        yield client


@dataclass(frozen=True)
class BatchOutcome:
    results: list[SlideResult]
    seconds: float  # from the first task submitted to the last result

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "failed"]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)


def run_batch(
    client: Client, tasks: Sequence[SlideTask], *, progress: bool = True, quiet: bool = False
) -> BatchOutcome:
    """Submit one task per slide and collect the results as they come (a bar unless not ``progress``,
    one line per failure on stderr unless ``quiet``); every slide gets a result, whatever happens
    to the others."""
    from distributed import as_completed

    # Keys unique per run: dask would otherwise hand back a result it still holds for the same key.
    run = uuid.uuid4().hex[:8]
    t0 = time.perf_counter()
    futures = {client.submit(run_slide, task, key=f"slide-{task.name}-{run}", pure=False): task for task in tasks}
    results: dict[str, SlideResult] = {}
    job = tasks[0].job if tasks else "batch"
    with tqdm(total=len(tasks), unit="slide", desc=job, disable=not progress or quiet) as bar:
        for future in as_completed(futures):  # type: ignore[no-untyped-call]
            task = futures[future]
            try:
                result: SlideResult = future.result()
            except Exception as err:  # run_slide never raises: the worker itself died (memory limit, a crash)
                result = SlideResult(task.name, str(task.source), "failed", error=f"its worker died: {describe(err)}")
            results[task.name] = result
            if result.status == "failed" and not quiet:
                bar.write(f"{result.name}: failed: {result.error}", file=sys.stderr)
            bar.update(1)
    return BatchOutcome([results[t.name] for t in tasks], time.perf_counter() - t0)


def summary_table(outcome: BatchOutcome) -> str:
    """One line per slide (status, time, the worker's peak memory, the files or the error), then totals."""
    rows = [("slide", "status", "seconds", "worker peak MiB", "outputs / error")]
    for r in outcome.results:
        what = r.error if r.status == "failed" else ", ".join(r.outputs)
        rss = f"{r.worker_peak_rss_mib:.0f}" if r.worker_peak_rss_mib is not None else "-"
        rows.append((r.name, r.status, f"{r.seconds:.1f}", rss, what or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    n = len(outcome.results)
    lines.append(
        f"{n} slides: {outcome.count('done')} done, {outcome.count('skipped')} skipped, "
        f"{outcome.count('failed')} failed, in {outcome.seconds:.1f} s"
    )
    return "\n".join(lines)
