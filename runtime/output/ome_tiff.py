"""Pyramidal OME-TIFF from a :class:`~runtime.output.mosaic_store.MosaicStore`, streamed while the mosaic grows.

The file follows the OME-TIFF pyramid rules (what Bio-Formats/QuPath read):

- BigTIFF, tiled ``tile`` x ``tile``, RGB interleaved (PlanarConfiguration 1);
- the full resolution is the first top-level IFD (the only one the OME-XML
  names); the lower levels are its SubIFDs, largest to smallest, each with
  NewSubFileType = 1 (reduced image), integer factor 2 between levels (sizes
  rounded up, as the mosaic has them);
- ``openslide_levels`` (default): the same lower levels are also chained as
  top-level IFDs after the first, pointing at the same tiles -- the layout
  OpenSlide's generic-tiff driver reads (it never follows SubIFDs). One file
  then opens at every level in Bio-Formats, OpenSlide, tiffslide, tifffile
  and libvips; the extra IFDs cost ~380 bytes per level, no pixels. Off: the
  strict OME-TIFF layout, a single top-level IFD;
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
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tifffile
from tifffile import COMPRESSION, FILETYPE, PHOTOMETRIC, PREDICTOR

from runtime.output.dicom_wsi import DicomIdentifiers, DicomWsiWriter
from runtime.output.mosaic_store import FILL, MosaicStore
from runtime.output.ome_zarr import NgffWriter
from runtime.output.tiff_stream import TiffPage, TiffStreamWriter

__all__ = [
    "Compression",
    "OmeTiffStream",
    "OmeTiffSummary",
    "partial_path",
    "pyramid_pages",
    "tile_encoder",
    "write_ome_tiff",
]

Compression = Literal["jpeg", "deflate", "zstd", "none"]
Progress = Callable[[int, int], None]

# TIFF Compression tag values; "deflate" is the Adobe variant (8) every reader knows.
_TIFF_COMPRESSION: dict[str, COMPRESSION] = {
    "jpeg": COMPRESSION.JPEG,
    "deflate": COMPRESSION.ADOBE_DEFLATE,
    "zstd": COMPRESSION.ZSTD,
    "none": COMPRESSION.NONE,
}
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
    predict: Any = tifffile.TIFF.PREDICTORS[PREDICTOR.HORIZONTAL]
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


def check_options(compression: str, tile: int, jpeg_quality: int, subsampling: tuple[int, int]) -> None:
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
            photometric=PHOTOMETRIC.YCBCR if jpeg else PHOTOMETRIC.RGB,
            subsampling=(subsampling[0], subsampling[1]) if jpeg else None,
            predictor=PREDICTOR.HORIZONTAL if compression in ("deflate", "zstd") else None,
            # Pixels per cm at this level; a level-k pixel spans 2**k level-0 pixels.
            pixels_per_cm=1e4 / (pixel_size_um * 2**k),
            subfiletype=FILETYPE.REDUCEDIMAGE if k else FILETYPE.UNDEFINED,
            description=ome_xml(name, h, w, pixel_size_um) if k == 0 else None,
            software=SOFTWARE,
        )
        for k, (h, w) in enumerate(shapes)
    ]


def pad_tile(data: np.ndarray, buf: np.ndarray) -> np.ndarray:
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
    (any level, any order between levels; rows only grow), :meth:`blocks_final` for tiles final
    ahead of their rows (the stitcher's blocks: a 2-row scan's last rows are otherwise all
    encoded after its last tile), :meth:`pump` now
    and then to write finished tiles without waiting, and :meth:`finish` once
    every level is final. :meth:`abort` (or any error) removes the partial
    file. ``progress(done, total)`` is called per tile written. With
    ``ngff_out``, each tile read is also written to an OME-Zarr (NGFF 0.4)
    pyramid there (:mod:`runtime.output.ome_zarr`), finished and renamed with the TIFF.
    With ``dicom_out``, each tile written is also a frame of a DICOM WSI series there
    (:mod:`runtime.output.dicom_wsi`: the JPEG bytes themselves; lossless codecs get a JPEG 2000
    frame encoded beside the TIFF's), identified by ``dicom_ids`` (default: anonymous).
    ``openslide_levels``: also chain the lower levels as top-level IFDs, so
    OpenSlide sees them (see the module docstring).
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
        openslide_levels: bool = True,
        dicom_out: str | Path | None = None,
        dicom_ids: DicomIdentifiers | None = None,
    ) -> None:
        check_options(compression, tile, jpeg_quality, subsampling)
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
        self._blank: tuple[bytes, bytes | None] | None = None
        self._blank_lock = threading.Lock()
        pages = pyramid_pages(
            self.shapes, tile, compression, subsampling, mosaic.pixel_size_um, self.out.name.split(".")[0]
        )
        self.total = sum(p.n_tiles for p in pages)
        self.written = 0
        self._final = [0] * len(self.shapes)  # rows of each level known final
        self._next_row = [0] * len(self.shapes)  # first tile row of each level not yet queued
        # Tiles ready to encode, oldest first: (level, tile row, next column, end column). A band
        # is one entry however wide, so a backlog costs nothing while the scan outruns us; a
        # block (blocks_final) is an entry of one tile.
        self._queue: deque[list[int]] = deque()
        # Tiles already handed to the encoders, per level (1 byte per tile): a tile queued both as
        # a block and in its row is encoded once.
        self._submitted = [np.zeros((p.tiles_down, p.tiles_across), dtype=bool) for p in pages]
        # Each tile's TIFF bytes, and its DICOM frame where that is not the same bytes.
        self._inflight: deque[tuple[tuple[int, int, int], Future[tuple[bytes, bytes | None]]]] = deque()
        # Encoded tiles are at most a raw tile's size (JPEG ~1/10 of it): bounded by buffer_mib.
        self._window = max(2 * max_workers, buffer_mib * 2**20 // (tile * tile * 3))
        self._pool: ThreadPoolExecutor | None = None
        self._tiff: TiffStreamWriter | None = None
        self._ngff: NgffWriter | None = None
        self._dicom: DicomWsiWriter | None = None
        self._dicom_encode: Callable[[np.ndarray], bytes] | None = None
        try:
            self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="ome-tiff")
            self._tiff = TiffStreamWriter(self.tmp, pages, chain_levels=openslide_levels)
            if ngff_out is not None:
                name = self.out.name.split(".")[0]
                self._ngff = NgffWriter(ngff_out, self.shapes, tile, mosaic.pixel_size_um, name)
            if dicom_out is not None:
                self._dicom = DicomWsiWriter(
                    dicom_out,
                    self.shapes,
                    tile,
                    mosaic.pixel_size_um,
                    codec=compression,
                    ids=dicom_ids,
                    name=self.out.name.split(".")[0],
                )
                self._dicom_encode = self._dicom.frame_encoder
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
        across = self._submitted[level].shape[1]
        while self._next_row[level] * t < h and min((self._next_row[level] + 1) * t, h) <= self._final[level]:
            self._queue.append([level, self._next_row[level], 0, across])
            self._next_row[level] += 1
        self.pump()

    def blocks_final(self, level: int, blocks: Sequence[tuple[int, int]]) -> None:
        """Tiles (row, col) of ``level`` are final on disk ahead of the rows :meth:`rows_final` vouches
        for (the stitcher's blocks written ahead): queue them now rather than when their row is final.

        Only where a tile is a mosaic chunk (``tile == mosaic.chunk``) and no DICOM copy is made
        (its frames must come in row-major order); otherwise this does nothing and the tiles are
        written with their rows. Each tile is still encoded once, and the file is
        the same: a TIFF reader finds tiles through TileOffsets, in whatever order they were appended.
        """
        if not self._direct or self._dicom is not None:
            return
        done = self._submitted[level]
        for row, col in blocks:
            if not (0 <= row < done.shape[0] and 0 <= col < done.shape[1]):
                raise IndexError(
                    f"block ({row}, {col}) outside level {level} ({done.shape[0]} x {done.shape[1]} tiles)"
                )
            if not done[row, col]:
                self._queue.append([level, row, col, col + 1])
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
            if self._dicom is not None:
                self._dicom.finish()
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
        if self._dicom is not None:
            self._dicom.abort()

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
            k, row, col, end = head
            head[2] += 1
            if head[2] >= end:
                self._queue.popleft()
            if self._submitted[k][row, col]:
                continue  # already queued as a block (blocks_final)
            self._submitted[k][row, col] = True
            if self._direct:
                self.mosaic.prefetch(k, row, col)  # an export of a cold mosaic: don't wait on each file
            self._inflight.append(((k, row, col), self._pool.submit(self._encode_tile, k, row, col)))

    def _write_head(self) -> None:
        assert self._tiff is not None
        key, fut = self._inflight.popleft()
        data, frame = fut.result()  # re-raises an encoder's error here, in the caller's thread
        self._tiff.write_tile(*key, data)
        if self._dicom is not None:
            self._dicom.write_tile(*key, data if frame is None else frame)
        self.written += 1
        self._submit()
        if self._progress is not None:
            self._progress(self.written, self.total)

    def _buffer(self) -> np.ndarray:
        buf: np.ndarray | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = np.empty((self.tile, self.tile, 3), dtype=np.uint8)
        return buf

    def _blank_tile(self) -> tuple[bytes, bytes | None]:
        with self._blank_lock:
            if self._blank is None:
                self._blank = self._encode_both(np.full((self.tile, self.tile, 3), FILL, dtype=np.uint8))
            return self._blank

    def _encode_both(self, data: np.ndarray) -> tuple[bytes, bytes | None]:
        """The TIFF tile, and the DICOM frame when it needs its own encoding (else None: the same bytes)."""
        return self._encode(data), None if self._dicom_encode is None else self._dicom_encode(data)

    def _encode_tile(self, k: int, row: int, col: int) -> tuple[bytes, bytes | None]:
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
        data = pad_tile(data, self._buffer())
        return self._encode_both(data)


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
    openslide_levels: bool = True,
    dicom_out: str | Path | None = None,
    dicom_ids: DicomIdentifiers | None = None,
) -> OmeTiffSummary:
    """Write ``mosaic`` (every level it has) as a pyramidal OME-TIFF at ``out``.

    The export of a finished (or partially finished, after
    ``MosaicStore.finish(partial=True)``) mosaic: an :class:`OmeTiffStream`
    with every row of every level final from the start. ``out`` only appears
    once the file is complete; on any error the temporary file is removed
    and the error propagates. ``ngff_out``: also write the pyramid as
    OME-Zarr (NGFF 0.4) there (see :mod:`runtime.output.ome_zarr`).
    ``openslide_levels``, ``dicom_out``, ``dicom_ids``: as for :class:`OmeTiffStream`.
    """
    check_options(compression, tile, jpeg_quality, subsampling)
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
        openslide_levels=openslide_levels,
        dicom_out=dicom_out,
        dicom_ids=dicom_ids,
    ) as stream:
        for k, (h, _) in enumerate(mosaic.level_shapes):
            stream.rows_final(k, h)
        return stream.finish()
