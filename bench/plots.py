"""``python -m bench <name> --plot DIR``: PNG charts of a bench's main figures.

Every bench hands its table to :func:`bench.report.emit`; with ``--plot`` that table is also
drawn: one horizontal bar chart per numeric column, a bar per row, labelled by the row's first
column (and the second, when it is a name too) (the figures a person compares across rows: throughput per
size, error per objective, slides per hour per worker count). The charts come from the very
rows the table prints, so a chart never disagrees with the table. matplotlib is imported only
when ``--plot`` is given (the ``bench`` extra); the figures are drawn on an Agg canvas without
pyplot, so no display or global state is involved.

A bench with figures over time (``bench e2e``: tiles captured, placed and written during a scan)
also draws them with :func:`timeline`, as ``<bench>-<name>.png``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.report import Column


class PlotError(RuntimeError):
    """Charts cannot be drawn (matplotlib missing, the folder not writable)."""


@dataclass
class _Session:
    folder: Path
    bench: str
    written: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)  # of written, the table charts


_session: _Session | None = None


def start(folder: Path, bench: str) -> None:
    """Draw the charts of the tables emitted from now on into ``folder`` (created), as ``<bench>*.png``.
    Fails at once (PlotError), before a long bench runs, if they could not be drawn."""
    global _session
    try:
        import matplotlib  # noqa: F401  (checked now rather than after the bench)
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install -e '.[bench]'") from None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PlotError(f"--plot {folder}: {err.strerror or err}") from None
    _session = _Session(folder, bench)


def written() -> list[Path]:
    """The charts drawn since :func:`start`."""
    return list(_session.written) if _session is not None else []


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _label(row: dict[str, Any], columns: Sequence[Column]) -> str:
    """The row's name: its first column (with the header when it is a bare number: "workers 2"),
    and the second when that is text too (benches keyed by two names: objective and content)."""
    first = columns[0]
    value = row.get(first.key)
    label = "-" if value is None else format(value, first.fmt)
    if _number(value):
        label = f"{first.header} {label}"
    if len(columns) > 1 and isinstance(row.get(columns[1].key), str):
        label += f" {row[columns[1].key]}"
    return label


def table_chart(rows: Sequence[dict[str, Any]], columns: Sequence[Column], title: str, out: Path) -> Path | None:
    """Bars of every numeric column but the first (the row's name); None when there is none."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    numeric = [c for c in columns[1:] if any(_number(r.get(c.key)) for r in rows)]
    if not rows or not numeric:
        return None
    labels = [_label(r, columns) for r in rows]
    ncols = min(3, len(numeric))
    nrows = math.ceil(len(numeric) / ncols)
    height = max(1.8, 0.32 * len(rows) + 1.0)
    fig = Figure(figsize=(4.6 * ncols + 1.5, height * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, column in zip(axes.flat, numeric, strict=False):
        values = [float(r[column.key]) if _number(r.get(column.key)) else 0.0 for r in rows]
        y = list(range(len(rows)))
        bars = ax.barh(y, values, color="#4C72B0")
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()  # first row on top, as in the table
        ax.set_title(column.header, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        shown = [format(r[column.key], column.fmt) if _number(r.get(column.key)) else "-" for r in rows]
        ax.bar_label(bars, shown, fontsize=7, padding=2)
        ax.margins(x=0.18)
    for ax in list(axes.flat)[len(numeric) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(out, dpi=110)
    return out


Series = Sequence[tuple[float, float]]
"""(x, y) points of one line of a :func:`timeline_chart`."""


def timeline_chart(
    series: Mapping[str, Series],
    out: Path,
    *,
    ylabel: str,
    title: str = "",
    xlabel: str = "seconds since start",
    secondary: tuple[str, Series] | None = None,
    marks: Mapping[str, float] | None = None,
) -> Path:
    """Step lines of ``series`` against time (counts that grow: tiles captured, placed, written),
    ``secondary`` dashed on a right-hand axis of its own, ``marks`` as labelled vertical lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.step(xs, ys, where="post", label=name, linewidth=1.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if secondary is not None and secondary[1]:
        right = ax.twinx()
        xs, ys = zip(*secondary[1], strict=True)
        right.plot(xs, ys, color="0.4", linestyle="--", linewidth=1.2, label=secondary[0])
        right.set_ylabel(secondary[0])
        more_h, more_l = right.get_legend_handles_labels()
        handles, labels = handles + more_h, labels + more_l
    for name, x in (marks or {}).items():
        ax.axvline(x, color="0.2", linewidth=0.8, linestyle=":")
        ax.annotate(f"{name} {x:.1f} s", (x, 1.0), xycoords=("data", "axes fraction"), fontsize=8, ha="right", va="top")
    ax.legend(handles, labels, loc="upper left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.savefig(out, dpi=110)
    return out


def timeline(name: str, series: Mapping[str, Series], **kw: Any) -> None:
    """Called by a bench with series over time: drawn as ``<bench>-<name>.png`` when ``--plot`` was
    given (:func:`timeline_chart`; ``kw`` are its keyword arguments)."""
    if _session is None:
        return
    path = timeline_chart(series, _session.folder / f"{_session.bench}-{name}.png", **kw)
    _session.written.append(path)


def from_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], title: str) -> None:
    """Called by :func:`bench.report.emit` for every table: draws it when ``--plot`` was given."""
    if _session is None:
        return
    n = len(_session.tables)  # a bench that prints several tables gets <bench>-2.png, -3 ...
    name = f"{_session.bench}.png" if n == 0 else f"{_session.bench}-{n + 1}.png"
    path = table_chart(rows, columns, title, _session.folder / name)
    if path is not None:
        _session.written.append(path)
        _session.tables.append(path)
