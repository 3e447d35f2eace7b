"""Shared output for benches: one aligned table for people, one JSON object for machines.

A bench builds a JSON-able result dict and a list of table rows; it never
prints figures itself, so the table and ``--json`` always show the same numbers.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from bench import plots


@dataclass(frozen=True)
class Column:
    key: str  # key in each row dict
    header: str
    fmt: str = ""  # format spec for the value, e.g. ".1f"


def percent(share: float | None) -> float | None:
    """A share (0..1) as a percentage for a table cell; None stays None (no data)."""
    return None if share is None else 100 * share


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Right-aligned columns (numbers read best that way); missing values print as '-'."""
    cells = [[c.header for c in columns]]
    for row in rows:
        line = []
        for c in columns:
            v = row.get(c.key)
            line.append("-" if v is None else format(v, c.fmt))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def emit(
    result: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    columns: Sequence[Column],
    *,
    as_json: bool,
    title: str = "",
    notes: Sequence[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Print ``result`` as one JSON object, or ``title``, the table and ``notes``; with ``--plot``,
    draw the table's figures too (:mod:`bench.plots`)."""
    plots.from_table(rows, columns, title)
    out = stream or sys.stdout
    if as_json:
        json.dump(result, out, indent=None, sort_keys=False)
        out.write("\n")
        return
    if title:
        out.write(title + "\n\n")
    out.write(format_table(rows, columns) + "\n")
    for note in notes:
        out.write(note + "\n")
    out.flush()
