"""``python -m bench <name> [options]``: run one benchmark.

Each bench is a module exposing ``DESCRIPTION``, ``add_arguments(parser)`` and
``run(args) -> int``; register it in :data:`BENCHES`. Every bench also takes ``--plot DIR``:
the tables it prints are drawn as PNG charts there (:mod:`bench.plots`). Modules are imported
only when chosen, so one bench's dependencies never slow down another.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import plots
from runtime.errors import run_cli

BENCHES = {
    "writer": "bench.writer",
    "e2e": "bench.e2e",
    "autofocus": "bench.autofocus",
    "calibration": "bench.calibration",
    "classifier": "bench.classifier",
    "stitch": "bench.stitch",
    "stitch-gpu": "bench.stitch_gpu",
    "batch": "bench.batch",
    "resume": "bench.resume",
    "analysis": "bench.analysis",
    "lesion-head": "bench.lesion_head",
    "inference": "bench.inference",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    # Only the chosen bench is imported; the others are listed by name.
    chosen = argv[0] if argv and argv[0] in BENCHES else None
    for name, module_name in BENCHES.items():
        if name == chosen:
            module = importlib.import_module(module_name)
            p = sub.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION)
            module.add_arguments(p)
            p.add_argument("--plot", type=Path, default=None, metavar="DIR", help="also draw its figures as PNG charts")
            p.set_defaults(_run=module.run)
        else:
            sub.add_parser(name, help=f"see python -m bench {name} --help")
    args = parser.parse_args(argv)
    if args.plot is not None:
        try:
            plots.start(args.plot, args.bench)
        except plots.PlotError as err:
            parser.error(str(err))
    rc: int = args._run(args)
    for chart in plots.written():  # stderr: --json keeps stdout one JSON object
        print(f"chart: {chart}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
