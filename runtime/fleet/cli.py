"""``python -m runtime batch JOB INPUT... --out DIR``: a job over many slides on a dask cluster.

JOB is ``export`` (kept mosaics re-written as slides) or ``restitch`` (recordings replayed
through focus and stitching, without a daemon, then written the same way). The export
command's options (``--compression``, ``--quality``, ``--ome-zarr NAME`` ...) apply to each
slide's output. Slides already done (``DIR/<name>/batch-done.json`` with the same settings)
are skipped; a failed slide is reported in one line and the rest go on. Exit status: 0 when
every slide is done or skipped, 1 when any failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, get_args

from runtime.config import ConfigError, load_config
from runtime.fleet.batch import BatchError, check_scheduler, connect, plan_tasks, run_batch, summary_table
from runtime.fleet.slides import Job, export_option_actions

__all__ = ["add_batch_parser", "run_batch_command"]


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _scheduler(text: str) -> str:
    try:
        return check_scheduler(text)
    except BatchError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--scheduler {text!r}: ")) from None


def add_batch_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``batch`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "batch",
        help="run export or restitch over many slides on a dask cluster (a local one by default)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("job", choices=get_args(Job), metavar="JOB", help="export or restitch")
    p.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help="export: a kept mosaic.zarr (or the scan folder holding it); restitch: a recording",
    )
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="each input writes the sub-folder DIR/<its name>/"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--workers", type=_at_least_one, default=None, help="local cluster: worker processes (default: fleet.workers)"
    )
    where.add_argument(
        "--scheduler",
        type=_scheduler,
        default=None,
        metavar="tcp://HOST:PORT",
        help="run on this existing cluster instead of a local one",
    )
    p.add_argument("--config", type=Path, default=None, help="TOML config ([fleet], [writer], [focus] ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # The export command's own options, so a batch offers whatever it offers (argparse's
    # ``parents=`` does the same, but would bring its positional MOSAIC and OUT too).
    export = p.add_argument_group("export options (those of python -m runtime export; per slide)")
    for action in export_option_actions():
        export._add_action(action)
    return p


def run_batch_command(args: argparse.Namespace) -> int:
    """Run the batch described by ``args`` (from :func:`add_batch_parser`)."""
    options = {a.dest: getattr(args, a.dest) for a in export_option_actions() if getattr(args, a.dest) != a.default}
    try:
        cfg = load_config(args.config)
        tasks = plan_tasks(args.job, args.inputs, args.out, cfg, args.config, options)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise BatchError(f"--out {args.out}: {err.strerror or err}") from None
        with connect(cfg.fleet, args.scheduler, args.workers) as client:
            outcome = run_batch(client, tasks, progress=not args.no_progress)
    except (BatchError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_table(outcome))
    return 1 if outcome.failed else 0
