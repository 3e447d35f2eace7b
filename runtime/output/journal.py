"""The scan journal: an append-only, fsynced record of what a scan has made durable.

It lives in the scan's folder, next to the mosaic, and is the single source of truth
for a restart::

    <scan folder>/
        journal.jsonl     one JSON object per line, appended and fsynced (this module)
        INCOMPLETE        present from the first field until the slide is complete
        tiles/NNNNNN.npy  captured tiles whose mosaic rows are not all on disk yet (the spill)
        flatfield.npz     the stitcher's flat-field, once estimated
        mosaic.zarr/      the Zarr mosaic (runtime.output.mosaic_store)

Records (``kind`` first; every record is one line, written with one ``write`` and fsynced):

``scan``
    the header: ``version``, ``scan_id``, ``request`` (the start_scan parameters),
    ``fields``/``rows``/``cols`` of the plan, ``frame_shape``, ``pixel_size_um``, ``models``
    (the model folders the scan focuses and classifies with) and ``config`` (the sections
    that decide pixels: focus, stitch, mosaic).
``field``
    one field captured, focused and registered: ``index``, ``row``, ``col``, ``record`` (what
    acquisition did: z, captures, focus method ...), ``focus`` (the focus state after it:
    ``last_z_um``, the ``surface`` points it added, the learnt ``sign`` convention), and the
    stitcher's view: ``links`` (accepted pair measurements ``a``, ``b``, ``shift``, ``sigma``),
    ``pairs`` (every pair's outcome), ``ncc``, ``content`` (its trailing and bottom strips have
    texture). Written once the tile is in the spill, so a journaled field is never lost.
``flatfield``
    the flat-field became known at arrival ``after`` (1-based); its arrays are ``flatfield.npz``.
``placed``
    a field's final position: ``index``, ``y``, ``x`` (subpixel, mosaic px), ``iy``, ``ix``.
``written``
    rows ``[0, rows)`` of mosaic level ``level`` (0 when absent) are on disk, fsynced: for level 0,
    every placed field whose tile ends above ``rows`` is in the mosaic, and its spill file may go;
    a resume trusts no level beyond what these records say (a power cut may lose what the kernel
    had not written yet).
``models``
    what the inference worker loaded (``autofocus_model``, ``backend``).
``stopped``
    the scan ended without completing: ``reason`` (cancelled, failed) and ``error``.
``resumed``
    a restarted daemon continued the scan (``fields`` journaled at that point).
``completed``
    the slide is complete.

A field is *durable* once its ``field`` record is on disk: its pixels are then either in the
spill or in mosaic rows that a ``written`` record covers. A crash can tear the last line
(a power cut in the middle of a write): :func:`read_journal` ignores a last line without its
newline, and :meth:`ScanJournal.open` cuts it off before appending. Any other malformed line
is an error naming the line.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "FLATFIELD_NAME",
    "INCOMPLETE_NAME",
    "JOURNAL_NAME",
    "JOURNAL_VERSION",
    "TILES_DIR",
    "FieldEntry",
    "InterruptedScan",
    "JournalError",
    "JournalState",
    "LinkEntry",
    "Placement",
    "ScanJournal",
    "TileSpill",
    "find_interrupted",
    "interrupted_scan",
    "read_journal",
]

JOURNAL_NAME = "journal.jsonl"
INCOMPLETE_NAME = "INCOMPLETE"
TILES_DIR = "tiles"
FLATFIELD_NAME = "flatfield.npz"
JOURNAL_VERSION = 1

_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


class JournalError(ValueError):
    """A journal that cannot be read (not a scan journal, a malformed line, a wrong version)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview | mmap.mmap) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# ---------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class LinkEntry:
    """An accepted pair measurement ``p_b - p_a`` (the stitcher's ``Link``), keys as (row, col)."""

    a: tuple[int, int]
    b: tuple[int, int]
    shift: tuple[float, float]
    sigma: tuple[float, float]

    def to_json(self) -> dict[str, Any]:
        return {"a": list(self.a), "b": list(self.b), "shift": list(self.shift), "sigma": list(self.sigma)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LinkEntry:
        return cls(
            (int(d["a"][0]), int(d["a"][1])),
            (int(d["b"][0]), int(d["b"][1])),
            (float(d["shift"][0]), float(d["shift"][1])),
            (float(d["sigma"][0]), float(d["sigma"][1])),
        )


@dataclass(frozen=True)
class FieldEntry:
    """One journaled field: captured, focused, registered (see the module docstring)."""

    index: int
    row: int
    col: int
    record: dict[str, Any]
    focus: dict[str, Any]
    links: tuple[LinkEntry, ...]
    pairs: tuple[str, ...]
    ncc: tuple[float, ...]
    content: tuple[bool, bool]

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "row": self.row,
            "col": self.col,
            "record": self.record,
            "focus": self.focus,
            "links": [lk.to_json() for lk in self.links],
            "pairs": list(self.pairs),
            "ncc": list(self.ncc),
            "content": list(self.content),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FieldEntry:
        return cls(
            int(d["index"]),
            int(d["row"]),
            int(d["col"]),
            dict(d["record"]),
            dict(d["focus"]),
            tuple(LinkEntry.from_json(x) for x in d["links"]),
            tuple(str(x) for x in d["pairs"]),
            tuple(float(x) for x in d["ncc"]),
            (bool(d["content"][0]), bool(d["content"][1])),
        )


@dataclass(frozen=True)
class Placement:
    """A field's final position in the mosaic (level 0 px): subpixel and the integer top-left."""

    index: int
    y: float
    x: float
    iy: int
    ix: int


@dataclass
class JournalState:
    """What a journal says, read back (:func:`read_journal`)."""

    header: dict[str, Any] | None = None
    fields: list[FieldEntry] = field(default_factory=list)  # in arrival (= plan) order
    placements: dict[int, Placement] = field(default_factory=dict)
    flatfield_after: int | None = None
    rows_written: int = 0  # level 0
    level_rows: dict[int, int] = field(default_factory=dict)  # levels >= 1
    models: dict[str, Any] = field(default_factory=dict)
    stopped: dict[str, Any] | None = None  # the last "stopped" record after the last "resumed"
    resumes: int = 0
    completed: bool = False
    torn_tail: bool = False  # the last line was cut off (and ignored)

    @property
    def scan_id(self) -> str | None:
        return None if self.header is None else str(self.header["scan_id"])

    @property
    def fields_total(self) -> int:
        return 0 if self.header is None else int(self.header["fields"])


def _apply(state: JournalState, rec: dict[str, Any]) -> None:
    kind = rec.get("kind")
    if kind == "scan":
        if rec.get("version") != JOURNAL_VERSION:
            raise JournalError(f"journal version {rec.get('version')!r}, this runtime reads {JOURNAL_VERSION}")
        state.header = rec
    elif state.header is None:
        raise JournalError(f"a {kind!r} record before the scan header")
    elif kind == "field":
        entry = FieldEntry.from_json(rec)
        if state.fields and entry.index <= state.fields[-1].index:
            raise JournalError(f"field {entry.index} journaled after field {state.fields[-1].index}")
        state.fields.append(entry)
    elif kind == "placed":
        p = Placement(int(rec["index"]), float(rec["y"]), float(rec["x"]), int(rec["iy"]), int(rec["ix"]))
        state.placements[p.index] = p
    elif kind == "flatfield":
        state.flatfield_after = int(rec["after"])
    elif kind == "written":
        level = int(rec.get("level", 0))
        if level == 0:
            state.rows_written = max(state.rows_written, int(rec["rows"]))
        else:
            state.level_rows[level] = max(state.level_rows.get(level, 0), int(rec["rows"]))
    elif kind == "models":
        state.models.update({k: v for k, v in rec.items() if k != "kind"})
    elif kind == "stopped":
        state.stopped = {"reason": rec.get("reason"), "error": rec.get("error")}
    elif kind == "resumed":
        state.resumes += 1
        state.stopped = None
    elif kind == "completed":
        state.completed = True
    else:
        raise JournalError(f"unknown record kind {kind!r}")


def read_journal(path: str | os.PathLike[str]) -> JournalState:
    """Read a journal; a torn last line is ignored, any other bad line raises :class:`JournalError`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise JournalError(f"{path}: cannot read the journal: {err.strerror or err}") from None
    state = JournalState()
    lines = data.split(b"\n")
    if lines and lines[-1] != b"":
        state.torn_tail = True  # no newline after it: the write did not finish
    for n, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise TypeError("not an object")
            _apply(state, rec)
        except JournalError as err:
            raise JournalError(f"{path}: line {n}: {err}") from None
        except (ValueError, TypeError, KeyError, IndexError) as err:
            raise JournalError(f"{path}: line {n} is not a valid journal record ({err})") from None
    if state.header is None:
        raise JournalError(f"{path}: no scan header")
    return state


class ScanJournal:
    """Appends records to ``folder/journal.jsonl``; each record is fsynced before append() returns."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def create(cls, folder: str | os.PathLike[str], header: dict[str, Any]) -> ScanJournal:
        """A new journal with its header (``kind: scan`` is added), and the INCOMPLETE marker."""
        folder = Path(folder)
        path = folder / JOURNAL_NAME
        fd = os.open(path, _OPEN_FLAGS | os.O_EXCL, 0o644)
        journal = cls(fd, path)
        journal.append("scan", version=JOURNAL_VERSION, **header)
        mark_incomplete(folder)
        _fsync_dir(folder)
        return journal

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> ScanJournal:
        """Reopen a journal to append to it; a torn last line is cut off first."""
        path = Path(folder) / JOURNAL_NAME
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20))) if size else b""
            if data and not data.endswith(b"\n"):
                cut = data.rfind(b"\n")
                keep = size - len(data) + cut + 1 if cut >= 0 else 0
                os.ftruncate(fd, keep)
                os.fsync(fd)
        finally:
            os.close(fd)
        return cls(os.open(path, _OPEN_FLAGS, 0o644), path)

    def append(self, kind: str, **data: Any) -> None:
        line = json.dumps({"kind": kind, **data}, separators=(",", ":"), allow_nan=False) + "\n"
        _write_all(self._fd, line.encode("utf-8"))
        os.fsync(self._fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def __enter__(self) -> ScanJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mark_incomplete(folder: str | os.PathLike[str]) -> None:
    """The marker an interrupted scan's folder carries until its slide is complete."""
    path = Path(folder) / INCOMPLETE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        _write_all(
            fd,
            b"This scan is not complete: the slide is missing or partial. journal.jsonl says what is\n"
            b'durable; resume it with start_scan {"resume": "<scan_id>"}, or export what was captured\n'
            b"with python -m runtime export mosaic.zarr OUT.ome.tif.\n",
        )
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(folder: str | os.PathLike[str]) -> None:
    """Remove the INCOMPLETE marker (the slide is complete), the spill and the saved flat-field
    (only a resume needs them; the journal stays, the scan's record)."""
    folder = Path(folder)
    TileSpill(folder).clear()
    (folder / FLATFIELD_NAME).unlink(missing_ok=True)
    (folder / INCOMPLETE_NAME).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        _fsync_dir(folder)


# ---------------------------------------------------------------------------------- spill


DIRECT_ALIGN = 4096  # O_DIRECT: memory, file offsets and lengths in multiples of the block size (<= a page)


def npy_header(arr: npt.NDArray[Any], size: int) -> bytes:
    """A ``.npy`` (version 1.0) header for ``arr``, padded with spaces to ``size`` bytes (np.load reads it)."""
    d = {"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": arr.shape}
    text = repr(d).encode("latin1")
    body = size - 10  # magic (6), version (2), header length (2)
    if len(text) + 1 > body or body > 0xFFFF:
        raise ValueError(f"a .npy header of {size} bytes cannot hold {text!r}")
    return b"\x93NUMPY\x01\x00" + body.to_bytes(2, "little") + text + b" " * (body - len(text) - 1) + b"\n"


def _save_direct(path: Path, data: npt.NDArray[Any]) -> bool:
    """Write ``data`` (C-contiguous) as a .npy at ``path`` with ``O_DIRECT`` and fsync it; False (nothing
    left behind) where the file system or the memory's alignment does not allow it."""
    flat = data.reshape(-1).view(np.uint8)
    if flat.ctypes.data % DIRECT_ALIGN:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        with mmap.mmap(-1, DIRECT_ALIGN) as head:  # page-aligned memory for the header block
            head.write(npy_header(data, DIRECT_ALIGN))
            _write_all(fd, head)
        n = flat.nbytes // DIRECT_ALIGN * DIRECT_ALIGN
        _write_all(fd, memoryview(flat[:n].data))  # the tile's memory itself: no copy
        if n < flat.nbytes:  # the last partial block from a padded aligned copy, then cut to size
            with mmap.mmap(-1, DIRECT_ALIGN) as tail:
                tail.write(flat[n:].tobytes())
                _write_all(fd, tail)
            os.ftruncate(fd, DIRECT_ALIGN + flat.nbytes)
        os.fsync(fd)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        return False
    os.close(fd)
    return True


class TileSpill:
    """Captured tiles kept on disk until their mosaic rows are: ``folder/tiles/NNNNNN.npy``."""

    def __init__(self, folder: str | os.PathLike[str], *, direct: bool = True) -> None:
        self.dir = Path(folder) / TILES_DIR
        self.direct = direct and hasattr(os, "O_DIRECT")  # try O_DIRECT writes (see save)

    def path(self, index: int) -> Path:
        return self.dir / f"{index:06d}.npy"

    def save(self, index: int, tile: npt.NDArray[np.uint8]) -> None:
        """Write the tile durably (temporary name, fsync, rename, fsync the folder).

        Where the file system takes it (``O_DIRECT``: ext4, xfs; not tmpfs) the pixels go from the
        tile's memory (a ring slot) to the disk without a copy into the page cache: the spill is
        written once and read only by a resume, and the copy (and writing back the cached pages)
        was most of the journal thread's CPU (perf in ``bench e2e``: 0.62 of its 1.36 s). Elsewhere,
        or where the tile's memory is not aligned for it, an ordinary write. The file is a ``.npy``
        either way (its header padded to :data:`DIRECT_ALIGN` bytes for the direct write)."""
        if not self.dir.exists():
            self.dir.mkdir(exist_ok=True)
            _fsync_dir(self.dir.parent)
        final = self.path(index)
        tmp = final.with_suffix(".tmp")
        data = np.ascontiguousarray(tile)
        if not (self.direct and _save_direct(tmp, data)):
            with open(tmp, "wb") as f:
                np.save(f, data, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.dir)

    def load(self, index: int) -> npt.NDArray[np.uint8] | None:
        try:
            arr = np.load(self.path(index), allow_pickle=False)
        except FileNotFoundError:
            return None
        return np.asarray(arr, dtype=np.uint8)

    def drop(self, index: int) -> None:
        self.path(index).unlink(missing_ok=True)

    def indices(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.stem) for p in self.dir.glob("*.npy") if p.stem.isdigit())

    def clear(self) -> None:
        if not self.dir.is_dir():
            return
        for p in self.dir.iterdir():
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()


def save_arrays(folder: str | os.PathLike[str], name: str, **arrays: npt.NDArray[Any]) -> None:
    """``folder/name`` (.npz), written durably under a temporary name."""
    final = Path(folder) / name
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, allow_pickle=False, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def load_arrays(folder: str | os.PathLike[str], name: str) -> dict[str, npt.NDArray[Any]]:
    with np.load(Path(folder) / name, allow_pickle=False) as z:
        return {k: np.asarray(z[k]) for k in z.files}


# ---------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class InterruptedScan:
    """A scan folder whose slide is not complete, as ``status`` lists it."""

    scan_id: str
    output_dir: str
    fields_durable: int
    fields_total: int
    reason: str  # why it stopped

    def to_json(self) -> dict[str, Any]:
        return {
            "scan_id": self.scan_id,
            "output_dir": self.output_dir,
            "fields_durable": self.fields_durable,
            "fields_total": self.fields_total,
            "reason": self.reason,
        }


def interrupted_scan(folder: Path) -> InterruptedScan | None:
    """The folder's interrupted scan, or None (no journal, completed, or unreadable: logged by callers)."""
    if not (folder / JOURNAL_NAME).is_file() or not (folder / INCOMPLETE_NAME).is_file():
        return None
    state = read_journal(folder / JOURNAL_NAME)
    if state.completed or state.scan_id is None:
        return None
    if state.stopped is not None:
        reason = str(state.stopped.get("reason") or "stopped")
        if state.stopped.get("error"):
            reason += f": {state.stopped['error']}"
    else:
        reason = "interrupted: the daemon or its workers stopped without ending the scan (killed, power loss)"
    return InterruptedScan(state.scan_id, str(folder), len(state.fields), state.fields_total, reason)


def find_interrupted(data_root: Path) -> tuple[list[InterruptedScan], list[str]]:
    """Every interrupted scan in the data root's folders (one level down, links not followed),
    and a one-line problem for each journal that could not be read."""
    found: list[InterruptedScan] = []
    problems: list[str] = []
    for entry in _scan_dirs(data_root):
        try:
            scan = interrupted_scan(Path(entry))
        except (JournalError, OSError) as err:
            problems.append(str(err))
            continue
        if scan is not None:
            found.append(scan)
    found.sort(key=lambda s: s.scan_id)
    return found, problems


def _scan_dirs(root: Path) -> Iterator[str]:
    try:
        with os.scandir(root) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    yield e.path
    except OSError:
        return


def finite_or_none(v: float | None) -> float | None:
    """JSON has no NaN: a non-finite z goes into the journal as null."""
    return v if v is not None and math.isfinite(v) else None
