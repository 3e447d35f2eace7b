"""The working mosaic: a Zarr v3 group on disk holding level 0 and its 2x pyramid.

Layout (one directory)::

    mosaic.zarr/            group; attrs below
        0/                  (h, w, 3) uint8, chunks (chunk, chunk, 3)
        1/                  (ceil(h/2), ceil(w/2), 3)
        ...                 down to the first level with max(h, w) <= min_level_size

Group attributes: ``format``/``version`` (so :meth:`MosaicStore.open` can
refuse foreign groups), ``pixel_size_um`` (level 0), ``chunk``, ``levels``
(list of ``[h, w]``), ``min_level_size``, ``complete``, ``rows_written`` (per
level: rows on disk that are valid for the level-0 rows written so far) and
``attrs``, a free dict for callers (scan id, objective, ...).

Level 0 arrives in one of two ways. Block by block (the stitcher): each final
chunk goes out with :meth:`MosaicStore.write_block` as soon as it is final,
in any order, and :meth:`MosaicStore.complete_rows` then vouches for whole
chunk rows and builds the lower levels a chunk row at a time -- memory is a
few chunks per I/O thread, whatever the width. Each output chunk is made of
four quarter-size *pieces*, the 2x reductions of the chunks above it: with a
:class:`PieceCache` (:meth:`MosaicStore.keep_pieces`, the stitcher's spill
cache) a piece is made when its chunk is written and waits there, so level 0
is never read back; a piece the cache does not have (none given, or a resumed
store whose pieces were lost with the process) is read back from the level
above on disk instead -- the same pixels, since the chunks are stored
losslessly. With kept pieces, a lower-level chunk is also built as soon as its four sources are
final -- on their rows or written ahead -- rather than with its chunk row, and ``on_blocks``
announces every chunk that is final on disk ahead of its rows (level 0 once its I/O thread has
written it), so that the OME-TIFF writer can encode it before the row is complete: on a scan two
fields high, every chunk row but the first is complete only with the last tile, but its chunks
are final one by one as the bottom row of fields goes by. Or as full-width bands of ``chunk`` rows, top
to bottom (:meth:`MosaicStore.write_band`, for writers that have whole rows):
each band is written as whole chunks and fed to a
:class:`~runtime.output.pyramid.PyramidBuilder`, whose buffers are a chunk row
of every level.

An interrupted scan leaves a valid store: ``rows_written`` is only advanced
after the data it covers is on disk. :meth:`MosaicStore.open` on such a store
can continue with :meth:`write_block` (nothing to rebuild) or :meth:`write_band` (the builder's
buffers are rebuilt from disk, < 2 chunk rows per level) or :meth:`finish` with ``partial=True`` to
make the lower levels reflect what was scanned, e.g. before an export.
Unscanned pixels read as the fill value 255 (white, like glass in brightfield,
and like the accumulator's unfilled pixels); chunks that are entirely fill are
not stored at all (Zarr's default), which saves the disk for blank glass.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

from runtime.output.chunk_files import FILL, ChunkFiles, MosaicError
from runtime.output.pyramid import PyramidBuilder, downsample2x, level_shapes

__all__ = [
    "FILL",
    "FORMAT",
    "BlocksFinal",
    "Compressor",
    "MosaicError",
    "MosaicStore",
    "PieceCache",
    "RowsFinal",
    "mosaic_bytes_bound",
]

FORMAT = "wsi-runtime-mosaic"
VERSION = 1
Compressor = Literal["zstd", "lz4", "none"]
# (level, rows): rows [0, rows) of the level are final and on disk. Lets a
# consumer (the OME-TIFF writer) work on the pyramid while it is being built.
RowsFinal = Callable[[int, int], None]
# (level, [(i, j), ...]): those chunks of the level are final on disk ahead of its rows_written (the
# block path). Lets the OME-TIFF writer encode them before their chunk row is complete.
BlocksFinal = Callable[[int, list[tuple[int, int]]], None]
PieceKey = tuple[Any, ...]
# A chunk's 2x reduction waiting for the chunk of the level below it: ("piece", k, i, j) is chunk
# (i, j) of level k - 1 reduced to level k (a quarter of output chunk (i // 2, j // 2)).
_Piece = tuple[int, int, int, np.ndarray]


class PieceCache(Protocol):
    """Where the block path keeps pieces until their output chunk is built (only ever called from
    the thread that calls :meth:`MosaicStore.write_block` and :meth:`MosaicStore.complete_rows`).
    ``runtime.stitching.spill.SpillCache`` is one: pieces then share the stitcher's memory budget
    and spill to its folder like its blocks."""

    def put(self, *items: tuple[PieceKey, np.ndarray]) -> None: ...

    def pop(self, key: PieceKey) -> np.ndarray: ...

    def discard(self, key: PieceKey) -> None: ...

    def __contains__(self, key: PieceKey) -> bool: ...


def _codecs(compressor: str) -> list[Any] | None:
    # The mosaic is a working copy, rewritten once and read once or twice:
    # zstd level 1 is ~2x faster to write than the default level 3 and within
    # a few percent of its size on image data; lz4 is faster still, larger.
    if compressor == "zstd":
        return [ZstdCodec(level=1)]
    if compressor == "lz4":
        # typesize 1 (uint8): byte shuffling would be a no-op, so don't pay for it.
        return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.noshuffle, typesize=1)]
    if compressor == "none":
        return None
    raise ValueError(f"compressor must be one of zstd, lz4, none; got {compressor!r}")


# Bytes a compressed chunk may add to its raw size (codec frame headers; zstd's bound for
# incompressible data is raw + raw / 256 + a few bytes): ChunkFiles sizes its buffer the same way.
CHUNK_OVERHEAD_BYTES = 4096


def mosaic_bytes_bound(height: int, width: int, *, chunk: int, min_level_size: int, compressor: str) -> int:
    """The most bytes a mosaic of ``height`` x ``width`` can hold on disk, every level included.

    Every chunk stored (no glass), edge chunks padded to a full chunk as Zarr stores them, and
    incompressible content: the real worst case of any codec, and exactly what ``"none"`` stores
    for a slide without glass. For a disk-space check before a scan (a codec's typical ratio on
    tissue is no bound: zstd stored 0.72 of this on the e2e recording, lz4 0.93)."""
    _codecs(compressor)  # the same error as create() for an unknown codec
    raw = chunk * chunk * 3
    per_chunk = raw if compressor == "none" else raw + CHUNK_OVERHEAD_BYTES
    return sum(-(-h // chunk) * -(-w // chunk) * per_chunk for h, w in level_shapes(height, width, min_level_size))


def _attrs(group: zarr.Group) -> dict[str, Any]:
    # Typed as Any: the values are JSON whose shape open() validates.
    return dict(group.attrs.asdict())


class MosaicStore:
    """A mosaic on disk. Make one with :meth:`create`, reopen with :meth:`open`."""

    def __init__(
        self,
        group: zarr.Group,
        path: Path,
        io_workers: int = 2,
        on_rows: RowsFinal | None = None,
        on_blocks: BlocksFinal | None = None,
    ) -> None:
        # Use create()/open(); this only wires up an already validated group.
        self._group = group
        self.path = path
        attrs = _attrs(group)
        self._chunk = int(attrs["chunk"])
        self._shapes = [(int(h), int(w)) for h, w in attrs["levels"]]
        self._rows = [int(r) for r in attrs["rows_written"]]
        self._complete = bool(attrs["complete"])
        self._arrays: list[Any] = [group[str(k)] for k in range(len(self._shapes))]
        self._builder: PyramidBuilder | None = None
        self._files = [ChunkFiles.for_array(a, self._chunk) for a in self._arrays]
        self._io_workers = max(1, io_workers)  # threads encoding + writing a band's chunks
        self._pool: ThreadPoolExecutor | None = None
        self._scratch = threading.local()
        self._on_rows = on_rows
        self._previewing = False  # finish(partial=True) is writing preview rows: not final
        self._ahead: set[tuple[int, int]] = set()  # level-0 chunks write_block wrote below rows_written
        # Per level, the chunks below rows_written that are on disk and final (level 0: write_block's,
        # once its I/O thread is done; lower levels: built as soon as their sources were final).
        self._final: list[set[tuple[int, int]]] = [set() for _ in self._shapes]
        self._on_blocks = on_blocks
        self._news: dict[int, list[tuple[int, int]]] = {}  # final blocks not yet announced, per level
        self._writes: deque[Future[tuple[int, int, _Piece | None]]] = deque()  # write_block's chunks in the I/O threads
        self._pieces: PieceCache | None = None  # keep_pieces(): the block path never reads level 0 back
        self._piece_keys: set[PieceKey] = set()  # what this store put there

    # ----------------------------------------------------------------- create/open

    @classmethod
    def create(
        cls,
        path: str | Path,
        height: int,
        width: int,
        *,
        chunk: int = 512,
        pixel_size_um: float,
        compressor: Compressor | str = "zstd",
        min_level_size: int = 1024,
        attrs: dict[str, Any] | None = None,
        overwrite: bool = False,
        io_workers: int = 2,
        on_rows: RowsFinal | None = None,
        on_blocks: BlocksFinal | None = None,
    ) -> MosaicStore:
        """Create an empty mosaic of ``height`` x ``width`` RGB pixels with all its levels.

        ``io_workers`` threads compress and write the chunks of each band.
        ``on_rows(level, rows)`` is called (in the writing thread) each time
        more rows of a level are final on disk -- level 0 per band, the lower
        levels as the pyramid completes their bands -- never for the previews
        of ``finish(partial=True)``. ``on_blocks(level, [(i, j), ...])`` (in the caller's thread)
        announces chunks the block path has made final on disk ahead of those rows.
        """
        if chunk < 16 or chunk % 2:
            raise ValueError(f"chunk must be an even number >= 16, got {chunk}")
        if not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
            raise ValueError(f"pixel_size_um must be > 0, got {pixel_size_um}")
        shapes = level_shapes(height, width, min_level_size)
        codecs = _codecs(compressor)
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
        if path.exists():
            shutil.rmtree(path)
        group = zarr.open_group(zarr.storage.LocalStore(path), mode="w-", zarr_format=3)
        for k, (h, w) in enumerate(shapes):
            group.create_array(
                str(k),
                shape=(h, w, 3),
                chunks=(chunk, chunk, 3),
                dtype="uint8",
                compressors=codecs,
                fill_value=FILL,
                dimension_names=("y", "x", "c"),
            )
        # Attributes last: a group with attrs is a fully created mosaic. One write of the group's zarr.json
        # (the same bytes as attrs.update's, which rewrote it once per key: 10 writes, ~40% of create()).
        group.update_attributes(
            {
                "format": FORMAT,
                "version": VERSION,
                "pixel_size_um": float(pixel_size_um),
                "chunk": chunk,
                "levels": [[h, w] for h, w in shapes],
                "min_level_size": min_level_size,
                "compressor": compressor,
                "complete": False,
                "rows_written": [0] * len(shapes),
                "attrs": dict(attrs or {}),
            }
        )
        return cls(group, path, io_workers, on_rows, on_blocks)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        io_workers: int = 2,
        on_rows: RowsFinal | None = None,
        on_blocks: BlocksFinal | None = None,
    ) -> MosaicStore:
        """Open an existing mosaic; :class:`MosaicError` if it is not one or is inconsistent.

        ``on_rows`` and ``on_blocks`` as for :meth:`create` (for a resumed scan: only the blocks
        this store writes are announced).
        """
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise MosaicError(f"{path}: not a Zarr v3 group (no zarr.json)")
        try:
            group = zarr.open_group(zarr.storage.LocalStore(path), mode="r+", zarr_format=3)
        except Exception as err:  # zarr raises several types for a broken group
            raise MosaicError(f"{path}: cannot open as a Zarr v3 group: {err}") from err
        a = _attrs(group)
        if a.get("format") != FORMAT:
            raise MosaicError(f"{path}: not a {FORMAT} group (format={a.get('format')!r})")
        if a.get("version") != VERSION:
            raise MosaicError(f"{path}: unsupported mosaic version {a.get('version')!r}")
        try:
            chunk = int(a["chunk"])
            shapes = [(int(h), int(w)) for h, w in a["levels"]]
            rows = [int(r) for r in a["rows_written"]]
            pixel = float(a["pixel_size_um"])
        except (KeyError, TypeError, ValueError) as err:
            raise MosaicError(f"{path}: missing or malformed attribute: {err}") from err
        if not shapes or len(rows) != len(shapes) or not pixel > 0:
            raise MosaicError(f"{path}: inconsistent levels/rows_written/pixel_size_um attributes")
        expected = level_shapes(shapes[0][0], shapes[0][1], max(shapes[-1]))
        if shapes != expected[: len(shapes)] or len(expected) != len(shapes):
            raise MosaicError(f"{path}: level shapes {shapes} are not a 2x pyramid")
        for k, (h, w) in enumerate(shapes):
            try:
                arr = group[str(k)]
            except KeyError:
                raise MosaicError(f"{path}: level {k} array missing") from None
            if not isinstance(arr, zarr.Array):
                raise MosaicError(f"{path}: level {k} is not an array")
            if arr.shape != (h, w, 3) or arr.dtype != np.uint8 or arr.chunks != (chunk, chunk, 3):
                raise MosaicError(
                    f"{path}: level {k} is {arr.shape} {arr.dtype} chunks {arr.chunks}, "
                    f"expected {(h, w, 3)} uint8 chunks {(chunk, chunk, 3)}"
                )
            if not 0 <= rows[k] <= h:
                raise MosaicError(f"{path}: rows_written[{k}]={rows[k]} outside 0..{h}")
        return cls(group, path, io_workers, on_rows, on_blocks)

    def close(self) -> None:
        """Stop the I/O threads (the store stays readable and writable; they restart on demand)."""
        self._drain()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def keep_pieces(self, cache: PieceCache | None) -> None:
        """Make each chunk's 2x reduction as the block path writes it and keep it in ``cache`` until
        its chunk of the level below is built (None: read the level above back from disk, the
        default). A piece costs a quarter of its chunk: about half a chunk row of each lower level
        waits at a time, which is why it goes to a cache with a budget rather than a dict."""
        self._drop_pieces()
        self._pieces = cache

    def _drop_pieces(self) -> None:
        if self._pieces is not None:
            for key in self._piece_keys:
                self._pieces.discard(key)
        self._piece_keys.clear()

    def _keep(self, piece: _Piece | None) -> None:
        if piece is None or self._pieces is None:
            return
        k, i, j, pixels = piece
        key = ("piece", k, i, j)
        self._pieces.put((key, pixels))
        self._piece_keys.add(key)

    def _take(self, k: int, i: int, j: int) -> np.ndarray | None:
        """Piece (i, j) for level k (chunk (i, j) of level k - 1 reduced), removed; None: not kept."""
        key = ("piece", k, i, j)
        if self._pieces is None or key not in self._piece_keys:
            return None
        self._piece_keys.discard(key)
        return self._pieces.pop(key)

    def __enter__(self) -> MosaicStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- properties

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of level 0 in pixels (the arrays have a third axis of 3 samples)."""
        return self._shapes[0]

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        return list(self._shapes)

    @property
    def n_levels(self) -> int:
        return len(self._shapes)

    @property
    def chunk(self) -> int:
        return self._chunk

    @property
    def pixel_size_um(self) -> float:
        return float(_attrs(self._group)["pixel_size_um"])

    @property
    def complete(self) -> bool:
        """All level-0 rows were written and every level was built from them."""
        return self._complete

    @property
    def rows_written(self) -> int:
        """Level-0 rows on disk (the next :meth:`write_band` starts here)."""
        return self._rows[0]

    def rewind(self, rows: int, lower: Sequence[int] | None = None) -> None:
        """Forget level-0 rows from ``rows`` on, and the lower levels' rows derived from them (and,
        with ``lower``, level k's rows from ``lower[k - 1]`` on): a resumed scan writes them again
        (an interrupted scan's last flush wrote rows that were not final; a power cut may lose
        rows the journal does not vouch for). ``rows`` must be a band boundary."""
        h = self._shapes[0][0]
        if not 0 <= rows <= self._rows[0] or (rows % self._chunk and rows != h):
            raise ValueError(f"cannot rewind to row {rows}: {self._rows[0]} rows written, chunk {self._chunk}")
        new = [rows] + [min(self._rows[k], rows // 2**k) for k in range(1, self.n_levels)]
        if lower is not None:
            new[1:] = [min(r, int(limit)) for r, limit in zip(new[1:], lower, strict=True)]
        if new == self._rows:
            return
        self._drain()
        self._builder = None
        self._ahead.clear()
        for final in self._final:
            final.clear()
        self._news.clear()
        self._drop_pieces()
        self._rows = new
        self._complete = False
        self._group.attrs["rows_written"] = list(self._rows)
        self._group.attrs["complete"] = self._complete

    def level_rows_written(self, k: int) -> int:
        """Rows of level ``k`` on disk and final."""
        return self._rows[k]

    def sync_rows(self, k: int, y0: int, y1: int) -> None:
        """fsync the chunk files of level ``k`` rows [y0, y1) and the group's attributes: a journal
        may then say these rows are on disk (runtime/output/journal.py). Chunks of blank glass
        are not stored and need nothing."""
        files = self._files[k]
        c = self._chunk
        paths: list[Path] = [self.path / "zarr.json"]
        if files is not None:
            w = self._shapes[k][1]
            paths += [files.path(i, j) for i in range(y0 // c, -(-y1 // c)) for j in range(-(-w // c))]
        dirs: set[Path] = set()
        for p in paths:
            try:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.add(p.parent)
        for d in dirs:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @property
    def pyramid_current(self) -> bool:
        """Every lower level reflects all level-0 rows written so far (safe to export)."""
        return all(self._rows[k] == -(-self._rows[0] // 2**k) for k in range(1, self.n_levels))

    @property
    def attrs(self) -> dict[str, Any]:
        """A copy of the callers' free attribute dict; change it with :meth:`update_attrs`."""
        return dict(_attrs(self._group).get("attrs", {}))

    def update_attrs(self, values: dict[str, Any]) -> None:
        """Merge ``values`` (JSON-serialisable) into the free attribute dict."""
        self._group.attrs["attrs"] = {**self.attrs, **values}

    def level(self, k: int) -> Any:
        """The zarr.Array of level k ((h, w, 3) uint8)."""
        if not 0 <= k < self.n_levels:
            raise IndexError(f"level {k} out of range 0..{self.n_levels - 1}")
        return self._arrays[k]

    def read_chunk(self, k: int, i: int, j: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk (i, j) of level k, clipped to the level: (<= chunk, <= chunk, 3) uint8.

        Reads the chunk file and decodes it directly when the layout is the
        one :meth:`create` makes (see ``ChunkFiles``); anything else goes
        through Zarr. ``out``, a C-contiguous (chunk, chunk, 3) uint8 buffer,
        is filled and a view of it returned (on the direct path), so a
        caller looping over chunks can reuse one buffer.
        """
        data = self.read_chunk_if_stored(k, i, j, out=out)
        if data is None:
            c = self._chunk
            h, w = self._shapes[k]
            ch, cw = min(c, h - i * c), min(c, w - j * c)
            if out is None:
                return np.full((ch, cw, 3), FILL, dtype=np.uint8)
            out[:ch, :cw] = FILL
            return out[:ch, :cw]
        return data

    def read_chunk_if_stored(self, k: int, i: int, j: int, *, out: np.ndarray | None = None) -> np.ndarray | None:
        """Like :meth:`read_chunk`, but None for a chunk that is not stored (all fill, e.g. glass).

        Lets a reader skip decoding (and re-encoding) blank chunks. On a
        layout read through Zarr (not ``create``'s) it never returns None.
        """
        c = self._chunk
        h, w = self._shapes[k]
        y, x = i * c, j * c
        if not (0 <= y < h and 0 <= x < w):
            raise IndexError(f"chunk ({i}, {j}) outside level {k} ({h} x {w})")
        ch, cw = min(c, h - y), min(c, w - x)
        files = self._files[k]
        if files is None:
            return np.asarray(self._arrays[k][y : y + ch, x : x + cw])
        data = files.read(i, j, out)
        if data is None:
            return None
        # Edge chunks are stored at full chunk size: cut them to the level.
        return data[:ch, :cw]

    def prefetch(self, k: int, i: int, j: int) -> None:
        """Ask the kernel to start reading chunk (i, j) of level k into the page cache; returns at once.

        A mosaic is thousands of small chunk files: the kernel's read-ahead
        works within a file, so a cold reader would wait for the disk on
        every chunk. Hinting a few chunks ahead overlaps that wait with
        decoding and encoding. A no-op for chunks not stored or not in
        ``create``'s layout, and where posix_fadvise does not exist.
        """
        files = self._files[k]
        if files is None or not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(files.path(i, j), os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def scratch_buffer(self) -> np.ndarray:
        """A (chunk, chunk, 3) uint8 buffer owned by the calling thread, for ``read_chunk(out=...)``."""
        buf: np.ndarray | None = getattr(self._scratch, "buf", None)
        if buf is None:
            buf = self._scratch.buf = np.empty((self._chunk, self._chunk, 3), dtype=np.uint8)
        return buf

    # ----------------------------------------------------------------- writing

    def write_band(self, y0: int, band: np.ndarray) -> None:
        """Write level-0 rows [y0, y0 + chunk) (or the bottom remainder) and extend the pyramid."""
        h, w = self._shapes[0]
        if self._complete:
            raise ValueError("mosaic is complete; no more bands")
        if y0 != self._rows[0]:
            raise ValueError(f"bands must arrive top to bottom: expected y0={self._rows[0]}, got {y0}")
        n = min(self._chunk, h - y0)
        if band.shape != (n, w, 3) or band.dtype != np.uint8:
            raise ValueError(f"band at y0={y0} must be ({n}, {w}, 3) uint8, got {band.shape} {band.dtype}")
        builder = self._ensure_builder()
        # y0 is chunk-aligned and the band spans full chunk rows: whole
        # chunks, no read-modify-write.
        self._write_rows(0, y0, band)
        self._set_rows(0, y0 + n)
        builder.push(band)

    def write_block(self, i: int, j: int, pixels: np.ndarray) -> None:
        """Write level-0 chunk (i, j) ahead of :meth:`complete_rows`: the block-wise path.

        For a writer that finalises the mosaic block by block (the stitcher): chunk row ``i`` must
        not be complete yet. The block is final, but not vouched for: ``rows_written`` (and so a
        resume, and a reader) only covers it once :meth:`complete_rows` includes its row. A block
        of pure fill removes the chunk file (blank glass is not stored). The chunk is encoded and
        written by the I/O threads while the caller goes on: the store keeps ``pixels`` until then
        (do not change them), at most two blocks per thread."""
        c = self._chunk
        h, w = self._shapes[0]
        if self._complete:
            raise ValueError("mosaic is complete; no more blocks")
        if not (0 <= i * c < h and 0 <= j * c < w) or i * c < self._rows[0]:
            raise ValueError(f"block ({i}, {j}) is outside the mosaic or in rows already written ({self._rows[0]})")
        shape = (min(c, h - i * c), min(c, w - j * c), 3)
        if pixels.shape != shape or pixels.dtype != np.uint8:
            raise ValueError(f"block ({i}, {j}) must be {shape} uint8, got {pixels.shape} {pixels.dtype}")
        self._ahead.add((i, j))
        if self._files[0] is None or self._io_workers <= 1:
            self._landed(self._write_block_now(i, j, pixels))
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._io_workers, thread_name_prefix="mosaic-io")
            self._writes.append(self._pool.submit(self._write_block_now, i, j, pixels))
            # Blocks already written are announced now, not only when the queue is full.
            while self._writes and (len(self._writes) > 2 * self._io_workers or self._writes[0].done()):
                self._landed(self._writes.popleft().result())
        self._announce()

    def _write_block_now(self, i: int, j: int, pixels: np.ndarray) -> tuple[int, int, _Piece | None]:
        """Store level-0 chunk (i, j) and, when pieces are kept, return its piece (an I/O thread)."""
        c = self._chunk
        files = self._files[0]
        if files is None:
            self._arrays[0][i * c : i * c + pixels.shape[0], j * c : j * c + pixels.shape[1]] = pixels
        else:
            files.write(i, j, pixels)
        piece = (1, i, j, downsample2x(pixels)) if self._pieces is not None and self.n_levels > 1 else None
        return i, j, piece

    def _drain(self) -> None:
        """Wait for the blocks being written (and raise the first error), and announce them."""
        while self._writes:
            self._landed(self._writes.popleft().result())
        self._announce()

    def _landed(self, written: tuple[int, int, _Piece | None]) -> None:
        """Level-0 chunk (i, j) is on disk (write_block's, ahead of rows_written): keep its piece,
        announce it and build the lower chunks it completes."""
        i, j, piece = written
        self._keep(piece)
        if (i, j) in self._ahead:  # not since vouched for by complete_rows or forgotten by rewind
            self._now_final(0, i, j)

    def _now_final(self, k: int, i: int, j: int) -> None:
        """Chunk (i, j) of level k is final on disk below rows_written[k]: note and announce it, and
        build the chunk of level k + 1 it belongs to if its other sources are final too. That is how
        the pyramid of the chunk rows only the last tile completes is mostly built (and encoded by
        the writer) while the scan goes on: on a 2-field-row scan, every level-0 chunk row but the
        first is final only at the end by rows, but block by block as the bottom row is scanned."""
        self._final[k].add((i, j))
        self._news.setdefault(k, []).append((i, j))
        if k + 1 < self.n_levels:
            self._try_ahead(k + 1, i // 2, j // 2)

    def _try_ahead(self, k: int, i: int, j: int) -> None:
        """Build chunk (i, j) of level k now if it is below rows_written[k], not built yet, and its
        (up to four) source chunks of level k - 1 are all final (on rows or ahead)."""
        c = self._chunk
        # Only with kept pieces (the stitcher's case): without them, building ahead would read the
        # level above back from disk in the caller's thread, chunk by chunk; rows do it in the pool.
        if self._pieces is None or i * c < self._rows[k] or (i, j) in self._final[k]:
            return
        h_in, w_in = self._shapes[k - 1]
        rows_in, final_in = self._rows[k - 1], self._final[k - 1]
        for si in (2 * i, 2 * i + 1):
            for sj in (2 * j, 2 * j + 1):
                if si * c < h_in and sj * c < w_in and min((si + 1) * c, h_in) > rows_in and (si, sj) not in final_in:
                    return
        self._keep(self._rebuild_chunk(k, i, j, self._quads(k, i, j)))
        self._now_final(k, i, j)

    def _announce(self) -> None:
        news, self._news = self._news, {}
        if self._on_blocks is not None:
            for k in sorted(news):
                self._on_blocks(k, news[k])

    def complete_rows(self, rows: int) -> None:
        """Level-0 rows [0, rows) are final: announce them and build the lower levels they complete.

        The block-wise counterpart of :meth:`write_band`. Chunks of those rows that
        :meth:`write_block` did not write are fill (a stale chunk from an interrupted run is
        removed). Each lower level is built a chunk row at a time from the level above as it is on
        disk (four chunks in, one out), so memory does not depend on the mosaic's width; a
        reopened store continues from the rows its levels have."""
        c = self._chunk
        h, w = self._shapes[0]
        if rows == self._rows[0]:
            return
        self._drain()
        if not self._rows[0] < rows <= h or (rows % c and rows != h):
            raise ValueError(f"cannot complete rows up to {rows}: {self._rows[0]} written, chunk {c}, height {h}")
        files = self._files[0]
        for i in range(self._rows[0] // c, -(-rows // c)):
            for j in range(-(-w // c)):
                if (i, j) not in self._ahead and files is not None:
                    files.path(i, j).unlink(missing_ok=True)
                self._ahead.discard((i, j))
                self._final[0].discard((i, j))
        self._builder = None  # write_band would rebuild its buffers from disk
        self._set_rows(0, rows)
        self._rows_final(0, -(-rows // c) - 1)
        self._build_levels()
        self._announce()

    def _build_levels(self) -> None:
        """Every lower level's chunk rows whose four source chunk rows are final, top to bottom."""
        c = self._chunk
        for k in range(1, self.n_levels):
            hk, wk = self._shapes[k]
            h_in = self._shapes[k - 1][0]
            while self._rows[k] < hk:
                i = self._rows[k] // c  # a preview may have left a partial chunk row: rebuild it whole
                if self._rows[k - 1] < min(2 * (i + 1) * c, h_in):
                    break
                # A few output chunks at a time: their pieces leave the cache only for the batch.
                # Chunks built ahead (their sources were final block by block) are done already.
                todo = [j for j in range(-(-wk // c)) if (i, j) not in self._final[k]]
                batch = 2 * self._io_workers
                for j0 in range(0, len(todo), batch):
                    jobs = [(k, i, j, self._quads(k, i, j)) for j in todo[j0 : j0 + batch]]
                    if self._io_workers <= 1 or len(jobs) == 1:
                        made = [self._rebuild_chunk(*job) for job in jobs]
                    else:
                        if self._pool is None:
                            self._pool = ThreadPoolExecutor(self._io_workers, thread_name_prefix="mosaic-io")
                        made = list(self._pool.map(lambda job: self._rebuild_chunk(*job), jobs))
                    for piece in made:
                        self._keep(piece)
                self._final[k] = {ij for ij in self._final[k] if ij[0] != i}
                self._set_rows(k, min((i + 1) * c, hk))
                self._rows_final(k, i)

    def _rows_final(self, k: int, i: int) -> None:
        """Chunk row i of level k is now final by rows: the chunks of level k + 1 it feeds whose
        other sources are final ahead can be built now, unless rows are about to build that row."""
        if k + 1 >= self.n_levels or self._pieces is None:
            return
        c = self._chunk
        out_i = i // 2
        if self._rows[k] >= min(2 * (out_i + 1) * c, self._shapes[k][0]):
            return  # the whole output row is final by rows: _build_levels builds it, in parallel
        for j in range(-(-self._shapes[k + 1][1] // c)):
            self._try_ahead(k + 1, out_i, j)

    def finish(self, *, partial: bool = False) -> None:
        """Complete the pyramid and mark the mosaic complete.

        With ``partial=True`` on a mosaic whose level 0 is not fully written
        (an interrupted scan), build the lower levels from the rows written so
        far instead of failing; ``complete`` stays False and scanning can
        still continue later.
        """
        if self._complete:
            return
        self._drain()
        h = self._shapes[0][0]
        if self._rows[0] < h and not partial:
            raise ValueError(
                f"mosaic has {self._rows[0]} of {h} rows; pass partial=True to build the pyramid from what was written"
            )
        if self._rows == [s[0] for s in self._shapes]:
            # Every level is built (complete_rows): no builder, whose buffers are a chunk row wide.
            self._complete = True
            self._group.attrs["complete"] = True
            return
        builder = self._ensure_builder()
        self._previewing = True
        try:
            builder.flush()
        finally:
            self._previewing = False
        if self._rows[0] == h:
            if self._rows != [s[0] for s in self._shapes]:
                raise RuntimeError(f"pyramid incomplete after the last band: rows {self._rows}")
            self._complete = True
            self._group.attrs["complete"] = True

    def rebuild_levels(self, *, max_workers: int = 2) -> None:
        """Recompute every lower level from level 0 as it is on disk, chunk by chunk.

        For a level 0 written or modified outside :meth:`write_band`. Works
        level by level, one output chunk (four input chunks) per task, so
        memory does not depend on the mosaic size. Does not change
        ``complete``; it sets every level's rows as derived from all of level 0.
        """
        self._builder = None
        c = self._chunk
        with ThreadPoolExecutor(max(1, max_workers)) as pool:
            for k in range(1, self.n_levels):
                hk, wk = self._shapes[k]
                # One chunk row at a time: bounds the queue (and memory) to a row of tasks.
                for i in range(-(-hk // c)):
                    list(pool.map(lambda ij, k=k: self._rebuild_chunk(k, *ij), [(i, j) for j in range(-(-wk // c))]))
        # Lower levels now derive from all of level 0 as stored; rows below
        # rows_written[0] are fill, so report the rows derived from written ones.
        for k in range(1, self.n_levels):
            self._rows[k] = -(-self._rows[0] // 2**k)
        self._group.attrs["rows_written"] = list(self._rows)

    # ----------------------------------------------------------------- internals

    def _quads(self, k: int, i: int, j: int) -> list[np.ndarray | None]:
        """The kept pieces of output chunk (i, j) of level k, top-left first (None: read back)."""
        return [self._take(k, 2 * i + di, 2 * j + dj) for di in range(2) for dj in range(2)]

    def _rebuild_chunk(
        self, k: int, i: int, j: int, quads: Sequence[np.ndarray | None] = (None, None, None, None)
    ) -> _Piece | None:
        """Chunk (i, j) of level k from the (up to) four chunks of level k-1 above it: their kept
        pieces (``quads``, top-left first) or, where None, the chunks read back from disk. Returns
        its own piece for level k + 1 when pieces are kept."""
        c, half = self._chunk, self._chunk // 2
        h_in, w_in = self._shapes[k - 1]
        hk, wk = self._shapes[k]
        y, x = i * c, j * c
        out = np.empty((min(c, hk - y), min(c, wk - x), 3), dtype=np.uint8)
        # Each source chunk fills one quadrant: no assembled 2c x 2c copy.
        # Chunks are even-sized except at the level's last row/column, where
        # downsample2x's edge replication is exactly what the whole level needs.
        for di in range(2):
            for dj in range(2):
                si, sj = 2 * i + di, 2 * j + dj
                if si * c < h_in and sj * c < w_in:
                    q = quads[2 * di + dj]
                    if q is None:
                        q = downsample2x(self.read_chunk(k - 1, si, sj, out=self.scratch_buffer()))
                    out[di * half : di * half + q.shape[0], dj * half : dj * half + q.shape[1]] = q
        files = self._files[k]
        if files is None:
            self._arrays[k][y : y + out.shape[0], x : x + out.shape[1]] = out
        else:
            files.write(i, j, out)
        return (k + 1, i, j, downsample2x(out)) if self._pieces is not None and k + 1 < self.n_levels else None

    def _set_rows(self, k: int, rows: int) -> None:
        self._rows[k] = rows
        # Written after the data it covers: a crash leaves rows_written conservative.
        self._group.attrs["rows_written"] = list(self._rows)
        if self._on_rows is not None and not self._previewing:
            self._on_rows(k, rows)

    def _emit(self, k: int, y0: int, rows: np.ndarray) -> None:
        self._write_rows(k, y0, rows)
        self._set_rows(k, y0 + rows.shape[0])

    def _write_rows(self, k: int, y0: int, rows: np.ndarray) -> None:
        """Write full-width rows of level k; whole chunks go straight to their files, in parallel."""
        c = self._chunk
        h, w = self._shapes[k]
        n = rows.shape[0]
        files = self._files[k]
        if files is None or y0 % c or (n % c and y0 + n != h):
            # Not whole chunk rows (a preview from finish(partial=True)) or not our layout.
            self._arrays[k][y0 : y0 + n] = rows
            return
        jobs = [
            (y // c, j, rows[y - y0 : y - y0 + c, j * c : (j + 1) * c])
            for y in range(y0, y0 + n, c)
            for j in range(-(-w // c))
        ]
        if self._io_workers <= 1 or len(jobs) == 1:
            for i, j, data in jobs:
                files.write(i, j, data)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._io_workers, thread_name_prefix="mosaic-io")
        # list(): wait for every chunk (and re-raise the first error) before returning.
        list(self._pool.map(lambda job: files.write(*job), jobs))

    def _ensure_builder(self) -> PyramidBuilder:
        """The pyramid builder, restored from disk for a reopened store."""
        if self._builder is not None:
            return self._builder
        c = self._chunk
        # Rows of each level known final: level 0's written rows; level k's can
        # only be derived from final rows of level k-1 (rows_written may be
        # ahead after a partial finish, or lag after a crash).
        starts = [self._rows[0]]
        for k in range(1, self.n_levels):
            starts.append(min(self._rows[k], starts[-1] // 2) // c * c)
        builder = PyramidBuilder(self._shapes, c, self._emit, start_rows=starts[1:])
        # Refill each level's buffer from the rows of the level above that it
        # had consumed but not yet emitted (< 2 chunks normally). Deepest level
        # first, so that a band re-emitted during the refill cascades into an
        # already restored level.
        for k in range(self.n_levels - 1, 0, -1):
            for y in range(2 * starts[k], starts[k - 1], c):
                builder.push_level(k, np.asarray(self._arrays[k - 1][y : min(y + c, starts[k - 1])]))
        self._builder = builder
        return builder
