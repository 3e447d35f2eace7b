"""Pyramidal OME-TIFF from a :class:`~runtime.output.mosaic_store.MosaicStore`, streamed while the mosaic grows.

The file follows the OME-TIFF pyramid rules (what Bio-Formats/QuPath read):

- BigTIFF, tiled ``tile`` x ``tile``, RGB interleaved (PlanarConfiguration 1);
- the full resolution is the only top-level IFD; the lower levels are its
  SubIFDs, largest to smallest, each with NewSubFileType = 1 (reduced image),
  integer factor 2 between levels (sizes rounded up, as the mosaic has them);
- OME-XML in the first IFD with PhysicalSizeX/Y in µm (made by tifffile's
  ``OmeXml``, as tifffile would write it); the TIFF resolution tags say the
  same per level (pixels per cm).

JPEG colour: like Aperio scanners (and tifffile's default for RGB JPEG),
tiles are stored as YCbCr JPEG with 2x2 chroma subsampling
(PhotometricInterpretation YCbCr, YCbCrSubSampling, ReferenceBlackWhite):
~1.5-2x smaller than full chroma at the same quality, read natively by
Bio-Formats and OpenSlide. ``subsampling=(1, 1)`` keeps full chroma (still
YCbCr). The lossless codecs store plain RGB with a horizontal predictor.

Streaming: :class:`OmeTiffStream` is told, level by level, how many rows of
the mosaic are final on disk (:meth:`OmeTiffStream.rows_final`); every tile
row they complete is read from its chunk files, encoded by ``max_workers``
threads (imagecodecs releases the GIL) and appended to the file at once,
whatever its level -- see :mod:`runtime.output.tiff_stream` for why the file is laid
out by our own writer rather than tifffile's. During a scan level 0 and the
lower levels are thus written as the scan moves down, and the file is
complete as soon as the last bands are encoded. :func:`write_ome_tiff`
(the export of a finished mosaic) is the same stream with every row final
from the start.

Tiles are encoded with the very codec functions and arguments tifffile's
``write`` would use (the tests check the bytes are identical), so the tags
mean what they say. Blank tiles (chunks never stored: all glass-white) are
encoded once per file and their bytes reused.

Memory: ``max_workers`` raw tiles plus at most ``buffer_mib`` of tiles in
flight, plus 12 bytes of bookkeeping per tile, whatever the mosaic size. The
file is written under a temporary name and renamed when complete; on any
error or :meth:`OmeTiffStream.abort` the temporary file is removed.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tifffile

from runtime.output.mosaic_store import FILL, MosaicStore
from runtime.output.ome_zarr import NgffWriter
from runtime.output.pyramid import downsample2x
from runtime.output.tiff_stream import (
    COMPRESSION_DEFLATE,
    COMPRESSION_JPEG,
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    PHOTOMETRIC_RGB,
    PHOTOMETRIC_YCBCR,
    TiffPage,
    TiffStreamWriter,
)

__all__ = [
    "Compression",
    "OmeTiffStream",
    "OmeTiffSummary",
    "partial_path",
    "pyramid_pages",
    "tile_encoder",
    "write_ome_tiff",
    "write_ome_tiff_from_level0",
]

Compression = Literal["jpeg", "deflate", "zstd", "none"]
Progress = Callable[[int, int], None]

# TIFF Compression tag values; "deflate" is the Adobe variant (8) every reader knows.
_TIFF_COMPRESSION: dict[str, int] = {
    "jpeg": COMPRESSION_JPEG,
    "deflate": COMPRESSION_DEFLATE,
    "zstd": COMPRESSION_ZSTD,
    "none": COMPRESSION_NONE,
}
_HORIZONTAL_PREDICTOR = 2
SOFTWARE = "wsi-edge-runtime"
SUBSAMPLINGS = ((1, 1), (2, 1), (2, 2), (4, 1))


@dataclass(frozen=True)
class OmeTiffSummary:
    path: Path
    levels: tuple[tuple[int, int], ...]  # (height, width) per level, full resolution first
    bytes: int
    seconds: float  # from the stream's creation to the rename


def partial_path(out: Path) -> Path:
    """Where the writer writes before the final rename."""
    return out.with_name(out.name + ".partial")


def tile_encoder(
    compression: Compression, *, jpeg_quality: int = 90, subsampling: tuple[int, int] = (2, 2)
) -> Callable[[np.ndarray], bytes]:
    """Encode one full (tile, tile, 3) uint8 tile exactly as tifffile's ``write`` would.

    Same codec functions (``tifffile.TIFF.COMPRESSORS``/``PREDICTORS``) and
    the arguments tifffile derives from ``photometric='rgb'``, so the tags
    written for ``compression``/``subsampling``/``predictor`` match.
    """
    if compression == "none":
        return lambda t: t.tobytes()
    code = _TIFF_COMPRESSION[compression]
    encode: Any = tifffile.TIFF.COMPRESSORS[code]
    if compression == "jpeg":
        # tifffile: colorspace from photometric (RGB), outcolorspace YCbCr with subsampling.
        args = {"level": jpeg_quality, "subsampling": tuple(subsampling), "colorspace": "RGB"}
        args["outcolorspace"] = "YCBCR"
        return lambda t: encode(t, **args)
    predict: Any = tifffile.TIFF.PREDICTORS[_HORIZONTAL_PREDICTOR]
    # axis -2: along x for interleaved (contiguous-sample) tiles, as tifffile does.
    return lambda t: encode(predict(t, axis=-2))


def ome_xml(name: str, height: int, width: int, pixel_size_um: float) -> str:
    """The OME-XML of one interleaved RGB image, exactly as tifffile's writer builds it."""
    ome = tifffile.OmeXml()
    ome.addimage(
        np.uint8,
        (height, width, 3),
        (1, 1, 1, height, width, 3),  # tifffile's storedshape: pages, separate, depth, length, width, contig
        axes="YXS",
        Name=name,
        PhysicalSizeX=pixel_size_um,
        PhysicalSizeXUnit="µm",
        PhysicalSizeY=pixel_size_um,
        PhysicalSizeYUnit="µm",
    )
    return str(ome.tostring(declaration=True))


def _check_options(compression: str, tile: int, jpeg_quality: int, subsampling: tuple[int, int]) -> None:
    if compression not in _TIFF_COMPRESSION:
        raise ValueError(f"compression must be one of {sorted(_TIFF_COMPRESSION)}, got {compression!r}")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be 1..100, got {jpeg_quality}")
    if tuple(subsampling) not in SUBSAMPLINGS:
        raise ValueError(f"subsampling must be one of {SUBSAMPLINGS}, got {subsampling}")


def pyramid_pages(
    shapes: Sequence[tuple[int, int]],
    tile: int,
    compression: Compression,
    subsampling: tuple[int, int],
    pixel_size_um: float,
    name: str,
) -> list[TiffPage]:
    """The TIFF pages of an OME-TIFF pyramid: level 0 (with the OME-XML) first, then its SubIFDs."""
    jpeg = compression == "jpeg"
    return [
        TiffPage(
            height=h,
            width=w,
            tile=tile,
            compression=_TIFF_COMPRESSION[compression],
            photometric=PHOTOMETRIC_YCBCR if jpeg else PHOTOMETRIC_RGB,
            subsampling=(subsampling[0], subsampling[1]) if jpeg else None,
            predictor=_HORIZONTAL_PREDICTOR if compression in ("deflate", "zstd") else None,
            # Pixels per cm at this level; a level-k pixel spans 2**k level-0 pixels.
            pixels_per_cm=1e4 / (pixel_size_um * 2**k),
            subfiletype=1 if k else 0,
            description=ome_xml(name, h, w, pixel_size_um) if k == 0 else None,
            software=SOFTWARE,
        )
        for k, (h, w) in enumerate(shapes)
    ]


def _padded(data: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """``data`` as a full C-contiguous tile: itself if it is one, else copied into ``buf``.

    Edge tiles are padded by edge replication, so JPEG blocks that straddle the
    image edge don't ring against a black border.
    """
    t = buf.shape[0]
    h, w = data.shape[:2]
    if (h, w) == (t, t) and data.flags.c_contiguous:
        return data
    buf[:h, :w] = data
    if w < t:
        buf[:h, w:] = buf[:h, w - 1 : w]
    if h < t:
        buf[h:] = buf[h - 1 : h]
    return buf


class OmeTiffStream:
    """An OME-TIFF of ``mosaic``'s pyramid, written while the mosaic's rows become final.

    Call :meth:`rows_final` whenever more rows of a level are final on disk
    (any level, any order between levels; rows only grow), :meth:`pump` now
    and then to write finished tiles without waiting, and :meth:`finish` once
    every level is final. :meth:`abort` (or any error) removes the partial
    file. ``progress(done, total)`` is called per tile written. With
    ``ngff_out``, each tile read is also written to an OME-Zarr (NGFF 0.4)
    pyramid there (:mod:`runtime.output.ome_zarr`), finished and renamed with the TIFF.
    """

    def __init__(
        self,
        mosaic: MosaicStore,
        out: str | Path,
        *,
        tile: int = 512,
        compression: Compression = "jpeg",
        jpeg_quality: int = 90,
        subsampling: tuple[int, int] = (2, 2),
        max_workers: int = 2,
        buffer_mib: int = 16,
        progress: Progress | None = None,
        ngff_out: str | Path | None = None,
    ) -> None:
        _check_options(compression, tile, jpeg_quality, subsampling)
        if max_workers < 1 or buffer_mib < 1:
            raise ValueError("max_workers and buffer_mib must be >= 1")
        self._t0 = time.perf_counter()
        self.mosaic = mosaic
        self.out = Path(out)
        self.tmp = partial_path(self.out)
        self.tile = tile
        self.shapes = mosaic.level_shapes
        self._progress = progress
        self._encode = tile_encoder(compression, jpeg_quality=jpeg_quality, subsampling=subsampling)
        self._direct = tile == mosaic.chunk  # a tile is a chunk: read its file straight into a buffer
        self._local = threading.local()
        self._blank: bytes | None = None
        self._blank_lock = threading.Lock()
        pages = pyramid_pages(
            self.shapes, tile, compression, subsampling, mosaic.pixel_size_um, self.out.name.split(".")[0]
        )
        self.total = sum(p.n_tiles for p in pages)
        self.written = 0
        self._final = [0] * len(self.shapes)  # rows of each level known final
        self._next_row = [0] * len(self.shapes)  # first tile row of each level not yet queued
        # Tile rows ready to encode, oldest first: (level, tile row, next column). A band
        # is one entry however wide, so a backlog costs nothing while the scan outruns us.
        self._queue: deque[list[int]] = deque()
        self._inflight: deque[tuple[tuple[int, int, int], Future[bytes]]] = deque()
        # Encoded tiles are at most a raw tile's size (JPEG ~1/10 of it): bounded by buffer_mib.
        self._window = max(2 * max_workers, buffer_mib * 2**20 // (tile * tile * 3))
        self._pool: ThreadPoolExecutor | None = None
        self._tiff: TiffStreamWriter | None = None
        self._ngff: NgffWriter | None = None
        try:
            self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="ome-tiff")
            self._tiff = TiffStreamWriter(self.tmp, pages)
            if ngff_out is not None:
                name = self.out.name.split(".")[0]
                self._ngff = NgffWriter(ngff_out, self.shapes, tile, mosaic.pixel_size_um, name)
        except BaseException:
            self.abort()
            raise

    # ------------------------------------------------------------------ public

    @property
    def busy(self) -> bool:
        """Tiles are queued or being encoded."""
        return bool(self._queue or self._inflight)

    def rows_final(self, level: int, rows: int) -> None:
        """Rows [0, rows) of ``level`` are final on disk: queue every tile row they complete."""
        h = self.shapes[level][0]
        if not 0 <= rows <= h:
            raise ValueError(f"level {level} has {h} rows, got rows_final={rows}")
        self._final[level] = max(self._final[level], rows)
        t = self.tile
        while self._next_row[level] * t < h and min((self._next_row[level] + 1) * t, h) <= self._final[level]:
            self._queue.append([level, self._next_row[level], 0])
            self._next_row[level] += 1
        self.pump()

    def pump(self, wait_s: float = 0.0) -> None:
        """Write finished tiles (oldest first) and keep the encoders busy.

        Waits up to ``wait_s`` for the oldest tile in flight; 0 never blocks.
        """
        self._submit()
        if wait_s > 0 and self._inflight and not self._inflight[0][1].done():
            wait_futures([self._inflight[0][1]], timeout=wait_s)
        while self._inflight and self._inflight[0][1].done():
            self._write_head()

    def finish(self) -> OmeTiffSummary:
        """Write the remaining tiles and the IFDs, rename to ``out``; every level must be final."""
        try:
            not_final = [k for k, (h, _) in enumerate(self.shapes) if self._final[k] < h]
            if not_final:
                raise ValueError(f"levels {not_final} are not final yet: {self._final} of {self.shapes}")
            while self.busy:
                self._submit()
                self._write_head()
            assert self._tiff is not None
            self._tiff.close()
            os.replace(self.tmp, self.out)
            if self._ngff is not None:
                self._ngff.finish()
        except BaseException:
            self.abort()
            raise
        self._shutdown_pool()
        return OmeTiffSummary(
            path=self.out,
            levels=tuple(self.shapes),
            bytes=self.out.stat().st_size,
            seconds=time.perf_counter() - self._t0,
        )

    def abort(self) -> None:
        """Stop encoding and remove the partial file (the mosaic is untouched)."""
        for _, fut in self._inflight:
            fut.cancel()
        self._inflight.clear()
        self._queue.clear()
        self._shutdown_pool()
        if self._tiff is not None:
            self._tiff.abort()
        self.tmp.unlink(missing_ok=True)
        if self._ngff is not None:
            self._ngff.abort()

    def __enter__(self) -> OmeTiffStream:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()

    # ------------------------------------------------------------------ internals

    def _shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _submit(self) -> None:
        assert self._pool is not None
        while self._queue and len(self._inflight) < self._window:
            head = self._queue[0]
            k, row, col = head
            key = (k, row, col)
            if self._direct:
                self.mosaic.prefetch(k, row, col)  # an export of a cold mosaic: don't wait on each file
            self._inflight.append((key, self._pool.submit(self._encode_tile, k, row, col)))
            head[2] += 1
            if head[2] * self.tile >= self.shapes[k][1]:
                self._queue.popleft()

    def _write_head(self) -> None:
        assert self._tiff is not None
        key, fut = self._inflight.popleft()
        data = fut.result()  # re-raises an encoder's error here, in the caller's thread
        self._tiff.write_tile(*key, data)
        self.written += 1
        self._submit()
        if self._progress is not None:
            self._progress(self.written, self.total)

    def _buffer(self) -> np.ndarray:
        buf: np.ndarray | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = np.empty((self.tile, self.tile, 3), dtype=np.uint8)
        return buf

    def _blank_tile(self) -> bytes:
        with self._blank_lock:
            if self._blank is None:
                self._blank = self._encode(np.full((self.tile, self.tile, 3), FILL, dtype=np.uint8))
            return self._blank

    def _encode_tile(self, k: int, row: int, col: int) -> bytes:
        """Read tile (row, col) of level k from the mosaic and encode it (in a pool thread)."""
        t = self.tile
        y, x = row * t, col * t
        if self._direct:
            data = self.mosaic.read_chunk_if_stored(k, row, col, out=self.mosaic.scratch_buffer())
            if data is None:
                # Never stored = all fill; its edge padding is fill too, so one encoding serves all.
                return self._blank_tile()
        else:
            data = np.asarray(self.mosaic.level(k)[y : y + t, x : x + t])
        if self._ngff is not None:
            self._ngff.write_tile(k, row, col, data)
        data = _padded(data, self._buffer())
        return self._encode(data)


def write_ome_tiff(
    mosaic: MosaicStore,
    out: str | Path,
    *,
    tile: int = 512,
    compression: Compression = "jpeg",
    jpeg_quality: int = 90,
    subsampling: tuple[int, int] = (2, 2),
    max_workers: int = 2,
    buffer_mib: int = 16,
    progress: Progress | None = None,
    ngff_out: str | Path | None = None,
) -> OmeTiffSummary:
    """Write ``mosaic`` (every level it has) as a pyramidal OME-TIFF at ``out``.

    The export of a finished (or partially finished, after
    ``MosaicStore.finish(partial=True)``) mosaic: an :class:`OmeTiffStream`
    with every row of every level final from the start. ``out`` only appears
    once the file is complete; on any error the temporary file is removed
    and the error propagates. ``ngff_out``: also write the pyramid as
    OME-Zarr (NGFF 0.4) there (see :mod:`runtime.output.ome_zarr`).
    """
    _check_options(compression, tile, jpeg_quality, subsampling)
    if not mosaic.pyramid_current:
        raise ValueError(
            f"{mosaic.path}: lower levels do not reflect level 0 (interrupted scan?); "
            "call MosaicStore.finish(partial=True) first"
        )
    with OmeTiffStream(
        mosaic,
        out,
        tile=tile,
        compression=compression,
        jpeg_quality=jpeg_quality,
        subsampling=subsampling,
        max_workers=max_workers,
        buffer_mib=buffer_mib,
        progress=progress,
        ngff_out=ngff_out,
    ) as stream:
        for k, (h, _) in enumerate(mosaic.level_shapes):
            stream.rows_final(k, h)
        return stream.finish()


@dataclass
class _Result:
    """What one pyramid job produced: encoded tiles, and its 2x-reduced pixels for the parent tile."""

    tiles: list[tuple[tuple[int, int, int], bytes]]
    parent: tuple[int, int, int] | None  # (level, row, col) of the tile these pixels feed
    quadrant: tuple[int, int]  # where in the parent: (row half, column half)
    pixels: np.ndarray | None  # None: all fill (blank), nothing to paste


class _PyramidFromLevel0:
    """Every level's tiles from level 0 alone, in one pass, without writing lower levels anywhere.

    Walks the pyramid as a quadtree (depth first, so Morton order at each
    level): a job reads the four level-0 chunks under one level-1 tile,
    encodes them, 2x-reduces them into that tile, encodes it and returns its
    own 2x reduction, which the main thread pastes into the level-2 tile
    above; a tile whose four children are in is reduced and encoded the same
    way, up to the top. Depth first keeps the partly assembled tiles to a
    handful per level, so memory is a few tiles per level plus the jobs in
    flight, whatever the slide's size -- and the order tiles reach the file
    in is irrelevant to :class:`~runtime.output.tiff_stream.TiffStreamWriter`.
    Reduction is ``downsample2x`` per tile; tile edges are even, so this is
    exactly the mosaic's whole-level rule (odd level edges replicated).
    """

    def __init__(
        self,
        mosaic: MosaicStore,
        tiff: TiffStreamWriter,
        encode: Callable[[np.ndarray], bytes],
        max_workers: int,
        window: int,
        on_tile: Callable[[], None],
    ) -> None:
        self.mosaic = mosaic
        self.tiff = tiff
        self.encode = encode
        self.shapes = mosaic.level_shapes
        self.tile = mosaic.chunk
        self.n = len(self.shapes)
        self.max_workers = max_workers
        self.window = window
        self.on_tile = on_tile
        self._local = threading.local()
        self._blank: bytes | None = None
        self._blank_lock = threading.Lock()

    # -- geometry
    def _tiles(self, k: int) -> tuple[int, int]:
        h, w = self.shapes[k]
        return -(-h // self.tile), -(-w // self.tile)

    def _children(self, k: int, i: int, j: int) -> list[tuple[int, int]]:
        down, across = self._tiles(k - 1)
        return [(2 * i + a, 2 * j + b) for a in (0, 1) for b in (0, 1) if 2 * i + a < down and 2 * j + b < across]

    def _extent(self, k: int, i: int, j: int) -> tuple[int, int]:
        h, w = self.shapes[k]
        return min(self.tile, h - i * self.tile), min(self.tile, w - j * self.tile)

    def _parent(self, k: int, i: int, j: int) -> tuple[tuple[int, int, int] | None, tuple[int, int]]:
        return ((k + 1, i // 2, j // 2) if k + 1 < self.n else None), (i % 2, j % 2)

    def _level1_order(self) -> Iterator[tuple[int, int]]:
        def visit(k: int, i: int, j: int) -> Iterator[tuple[int, int]]:
            if k == 1:
                yield i, j
                return
            for ci, cj in self._children(k, i, j):
                yield from visit(k - 1, ci, cj)

        down, across = self._tiles(self.n - 1)
        for i in range(down):
            for j in range(across):
                yield from visit(self.n - 1, i, j)

    def _prefetched(self, order: Iterator[tuple[int, int]], ahead: int = 8) -> Iterator[tuple[int, int]]:
        """``order``, hinting the level-0 chunks of the level-1 tile ``ahead`` places on to the kernel.

        At 4 gigapixels the mosaic outgrows the page cache: without the hint
        each job waits for its four chunk files from disk in turn.
        """
        window: deque[tuple[int, int]] = deque()
        for ij in order:
            for ci, cj in self._children(1, *ij):
                self.mosaic.prefetch(0, ci, cj)
            window.append(ij)
            if len(window) > ahead:
                yield window.popleft()
        yield from window

    # -- per-thread buffers
    def _buf(self, name: str) -> np.ndarray:
        buf: np.ndarray | None = getattr(self._local, name, None)
        if buf is None:
            buf = np.empty((self.tile, self.tile, 3), dtype=np.uint8)
            setattr(self._local, name, buf)
        return buf

    def _blank_tile(self) -> bytes:
        with self._blank_lock:
            if self._blank is None:
                self._blank = self.encode(np.full((self.tile, self.tile, 3), FILL, dtype=np.uint8))
            return self._blank

    # -- jobs (pool threads)
    def _level0_tile(self, i: int, j: int) -> _Result:
        """Single-level pyramid: just read and encode."""
        data = self.mosaic.read_chunk_if_stored(0, i, j, out=self.mosaic.scratch_buffer())
        enc = self._blank_tile() if data is None else self.encode(_padded(data, self._buf("pad")))
        return _Result([((0, i, j), enc)], None, (0, 0), None)

    def _level1_tile(self, i: int, j: int) -> _Result:
        half = self.tile // 2
        tiles: list[tuple[tuple[int, int, int], bytes]] = []
        level1: np.ndarray | None = None
        for ci, cj in self._children(1, i, j):
            data = self.mosaic.read_chunk_if_stored(0, ci, cj, out=self.mosaic.scratch_buffer())
            if data is None:
                tiles.append(((0, ci, cj), self._blank_tile()))
                continue
            tiles.append(((0, ci, cj), self.encode(_padded(data, self._buf("pad")))))
            if level1 is None:
                level1 = self._buf("level1")
                level1[...] = FILL
            q = downsample2x(data)
            y, x = (ci - 2 * i) * half, (cj - 2 * j) * half
            level1[y : y + q.shape[0], x : x + q.shape[1]] = q
        return self._finish_tile(1, i, j, level1, tiles)

    def _inner_tile(self, k: int, i: int, j: int, buf: np.ndarray | None) -> _Result:
        return self._finish_tile(k, i, j, buf, [])

    def _finish_tile(
        self, k: int, i: int, j: int, buf: np.ndarray | None, tiles: list[tuple[tuple[int, int, int], bytes]]
    ) -> _Result:
        """Encode the assembled level-k tile and reduce it for its parent."""
        parent, quadrant = self._parent(k, i, j)
        if buf is None:  # every child blank
            tiles.append(((k, i, j), self._blank_tile()))
            return _Result(tiles, parent, quadrant, None)
        ph, pw = self._extent(k, i, j)
        view = buf[:ph, :pw]
        tiles.append(((k, i, j), self.encode(_padded(view, self._buf("pad")))))
        # A fresh array: the buffer is reused by this thread's next job.
        return _Result(tiles, parent, quadrant, downsample2x(view) if parent is not None else None)

    # -- main thread
    def run(self) -> None:
        pending: dict[tuple[int, int, int], list[Any]] = {}  # parent -> [buffer or None, children missing]
        inflight: deque[Future[_Result]] = deque()
        half = self.tile // 2
        with ThreadPoolExecutor(self.max_workers, thread_name_prefix="ome-pyramid") as pool:
            if self.n == 1:
                down, across = self._tiles(0)
                jobs: Iterator[Callable[[], _Result]] = (
                    partial(self._level0_tile, i, j) for i in range(down) for j in range(across)
                )
            else:
                jobs = (partial(self._level1_tile, i, j) for i, j in self._prefetched(self._level1_order()))
            try:
                for job in jobs:
                    inflight.append(pool.submit(job))
                    while len(inflight) >= self.window:
                        self._collect(inflight, pending, pool, half)
                while inflight:
                    self._collect(inflight, pending, pool, half)
            finally:
                for f in inflight:
                    f.cancel()
        if pending:
            raise RuntimeError(f"pyramid incomplete: tiles {sorted(pending)} never got all their children")

    def _collect(
        self,
        inflight: deque[Future[_Result]],
        pending: dict[tuple[int, int, int], list[Any]],
        pool: ThreadPoolExecutor,
        half: int,
    ) -> None:
        res = inflight.popleft().result()
        for key, data in res.tiles:
            self.tiff.write_tile(*key, data)
            self.on_tile()
        if res.parent is None:
            return
        entry = pending.get(res.parent)
        if entry is None:
            entry = pending[res.parent] = [None, len(self._children(*res.parent))]
        if res.pixels is not None:
            if entry[0] is None:
                entry[0] = np.full((self.tile, self.tile, 3), FILL, dtype=np.uint8)
            y, x = res.quadrant[0] * half, res.quadrant[1] * half
            entry[0][y : y + res.pixels.shape[0], x : x + res.pixels.shape[1]] = res.pixels
        entry[1] -= 1
        if entry[1] == 0:
            del pending[res.parent]
            inflight.append(pool.submit(self._inner_tile, *res.parent, entry[0]))


def write_ome_tiff_from_level0(
    mosaic: MosaicStore,
    out: str | Path,
    *,
    compression: Compression = "jpeg",
    jpeg_quality: int = 90,
    subsampling: tuple[int, int] = (2, 2),
    max_workers: int = 2,
    buffer_mib: int = 16,
    progress: Progress | None = None,
) -> OmeTiffSummary:
    """Write the OME-TIFF pyramid of ``mosaic``'s level 0, computing the lower levels on the fly.

    Reads only level 0 (the stored lower levels, current or not, are
    ignored) and never writes a lower level anywhere but into the TIFF: the
    job libvips' ``tiffsave --pyramid`` does, and what ``bench writer``
    compares with it. Levels as ``mosaic.level_shapes``, tiles of the
    mosaic's chunk size. Unwritten (fill) chunks are exported as white.
    """
    tile = mosaic.chunk
    _check_options(compression, tile, jpeg_quality, subsampling)
    if max_workers < 1 or buffer_mib < 1:
        raise ValueError("max_workers and buffer_mib must be >= 1")
    t0 = time.perf_counter()
    out = Path(out)
    tmp = partial_path(out)
    shapes = mosaic.level_shapes
    pages = pyramid_pages(shapes, tile, compression, subsampling, mosaic.pixel_size_um, out.name.split(".")[0])
    total = sum(p.n_tiles for p in pages)
    # A level-1 job holds up to 5 encoded tiles (at most a raw tile each) until written.
    window = max(2 * max_workers, buffer_mib * 2**20 // (5 * tile * tile * 3))
    count = 0

    def on_tile() -> None:
        nonlocal count
        count += 1
        if progress is not None:
            progress(count, total)

    encode = tile_encoder(compression, jpeg_quality=jpeg_quality, subsampling=subsampling)
    try:
        tiff = TiffStreamWriter(tmp, pages)
        try:
            _PyramidFromLevel0(mosaic, tiff, encode, max_workers, window, on_tile).run()
            tiff.close()
        except BaseException:
            tiff.abort()
            raise
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return OmeTiffSummary(path=out, levels=tuple(shapes), bytes=out.stat().st_size, seconds=time.perf_counter() - t0)
