"""Pyramidal OME-TIFF from a :class:`~runtime.mosaic.MosaicStore`, streamed tile by tile.

The file follows the OME-TIFF pyramid rules (what Bio-Formats/QuPath read):

- BigTIFF, tiled ``tile`` x ``tile``, RGB interleaved (PlanarConfiguration 1);
- the full resolution is the only top-level IFD; the lower levels are its
  SubIFDs, largest to smallest, each with NewSubFileType = 1 (reduced image),
  integer factor 2 between levels (sizes rounded up, as the mosaic has them);
- OME-XML in the first IFD with PhysicalSizeX/Y in µm; the TIFF resolution
  tags say the same per level (pixels per cm).

JPEG colour: like libvips and Aperio scanners (and tifffile's default for RGB
JPEG), tiles are stored as YCbCr JPEG with 2x2 chroma subsampling
(PhotometricInterpretation YCbCr, YCbCrSubSampling, ReferenceBlackWhite):
~1.5-2x smaller than full chroma at the same quality, read natively by
Bio-Formats and OpenSlide. ``subsampling=(1, 1)`` keeps full chroma (still
YCbCr). The lossless codecs store plain RGB with a horizontal predictor.

Who does what: tifffile lays out the file (IFDs, SubIFDs, tags, OME-XML)
from an iterator of already *encoded* tiles. The tiles are encoded here, by
``max_workers`` threads that each read a chunk file, decode it into a
thread-owned buffer and compress it with the very codec function and
arguments tifffile would use (the tests check the bytes are identical).
Letting tifffile encode instead meant reading tiles serially in its thread
and encoding them in batches: measured 2.3-2.8 s vs 1.4-1.8 s for a
16384^2 JPEG pyramid on 2 cores, with more page faults.

Memory: ``max_workers`` raw tiles plus at most ``buffer_mib`` of encoded
tiles waiting to be written, whatever the mosaic size. The file is written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tifffile

from runtime.mosaic import MosaicStore

__all__ = ["Compression", "OmeTiffSummary", "partial_path", "write_ome_tiff"]

Compression = Literal["jpeg", "deflate", "zstd", "none"]
Progress = Callable[[int, int], None]

# TIFF Compression tag values; "deflate" is the Adobe variant (8) every reader knows.
_TIFF_COMPRESSION: dict[str, int] = {"jpeg": 7, "deflate": 8, "zstd": 50000, "none": 1}
_HORIZONTAL_PREDICTOR = 2


@dataclass(frozen=True)
class OmeTiffSummary:
    path: Path
    levels: tuple[tuple[int, int], ...]  # (height, width) per level, full resolution first
    bytes: int
    seconds: float


def partial_path(out: Path) -> Path:
    """Where :func:`write_ome_tiff` writes before the final rename."""
    return out.with_name(out.name + ".partial")


def tile_encoder(
    compression: Compression, *, jpeg_quality: int = 90, subsampling: tuple[int, int] = (2, 2)
) -> Callable[[np.ndarray], bytes]:
    """Encode one full (tile, tile, 3) uint8 tile exactly as tifffile's ``write`` would.

    Same codec functions (``tifffile.TIFF.COMPRESSORS``/``PREDICTORS``) and
    the arguments tifffile derives from ``photometric='rgb'``, so the tags
    tifffile writes for ``compression``/``subsampling``/``predictor`` match.
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


def _tile_jobs(mosaic: MosaicStore, k: int, tile: int) -> Iterator[tuple[int, int]]:
    """(y, x) of each tile of level k in row-major order (the order tifffile expects)."""
    h, w = mosaic.level_shapes[k]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            yield y, x


def _encoded_tiles(
    mosaic: MosaicStore,
    k: int,
    tile: int,
    encode: Callable[[np.ndarray], bytes],
    pool: ThreadPoolExecutor,
    window: int,
    on_tile: Callable[[], None],
) -> Iterator[bytes]:
    """Encoded tiles of level k, in order, with at most ``window`` in flight."""
    level = mosaic.level(k)
    local = threading.local()
    direct = tile == mosaic.chunk

    def job(yx: tuple[int, int]) -> bytes:
        y, x = yx
        if direct:
            # The usual case: a tile is a chunk, decoded into this thread's buffer.
            data = mosaic.read_chunk(k, y // tile, x // tile, out=mosaic.scratch_buffer())
        else:
            data = np.asarray(level[y : y + tile, x : x + tile])
        if data.shape[:2] != (tile, tile):
            # Edge tile: pad by edge replication, so JPEG blocks that straddle the
            # image edge don't ring against a black border.
            pad = ((0, tile - data.shape[0]), (0, tile - data.shape[1]), (0, 0))
            data = np.pad(data, pad, mode="edge")
        elif not data.flags.c_contiguous:
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = np.empty((tile, tile, 3), dtype=np.uint8)
            buf[...] = data
            data = buf
        return encode(data)

    pending: deque[Future[bytes]] = deque()
    try:
        for yx in _tile_jobs(mosaic, k, tile):
            pending.append(pool.submit(job, yx))
            if len(pending) >= window:
                data = pending.popleft().result()
                on_tile()  # before the yield: tifffile never resumes us after the last tile
                yield data
        while pending:
            data = pending.popleft().result()
            on_tile()
            yield data
    finally:
        # tifffile failed or the generator was dropped: don't encode the rest.
        for f in pending:
            f.cancel()


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
) -> OmeTiffSummary:
    """Write ``mosaic`` (every level it has) as a pyramidal OME-TIFF at ``out``.

    ``max_workers`` threads read and compress tiles; ``buffer_mib`` bounds
    the tiles in flight. ``progress(done, total)`` is called per tile
    written. ``out`` only appears once the file is complete; on any error
    the temporary file is removed and the error propagates.
    """
    if compression not in _TIFF_COMPRESSION:
        raise ValueError(f"compression must be one of {sorted(_TIFF_COMPRESSION)}, got {compression!r}")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be 1..100, got {jpeg_quality}")
    if tuple(subsampling) not in {(1, 1), (2, 1), (2, 2), (4, 1)}:
        raise ValueError(f"subsampling must be (1, 1), (2, 1), (2, 2) or (4, 1), got {subsampling}")
    if max_workers < 1 or buffer_mib < 1:
        raise ValueError("max_workers and buffer_mib must be >= 1")
    if not mosaic.pyramid_current:
        raise ValueError(
            f"{mosaic.path}: lower levels do not reflect level 0 (interrupted scan?); "
            "call MosaicStore.finish(partial=True) first"
        )
    out = Path(out)
    tmp = partial_path(out)
    t0 = time.perf_counter()
    shapes = mosaic.level_shapes
    px = mosaic.pixel_size_um
    # tifffile needs these to write the matching tags; it does not encode (the tiles come encoded).
    options: dict[str, Any] = {
        "tile": (tile, tile),
        "photometric": "rgb",
        "planarconfig": "contig",
        "compression": _TIFF_COMPRESSION[compression],
        "resolutionunit": "CENTIMETER",
    }
    if compression == "jpeg":
        options["subsampling"] = tuple(subsampling)
    elif compression in ("deflate", "zstd"):
        options["predictor"] = _HORIZONTAL_PREDICTOR
    encode = tile_encoder(compression, jpeg_quality=jpeg_quality, subsampling=subsampling)
    # Encoded tiles are at most a raw tile's size (JPEG ~1/10 of it): bounded by buffer_mib.
    window = max(2 * max_workers, buffer_mib * 2**20 // (tile * tile * 3))
    total = sum(-(-h // tile) * -(-w // tile) for h, w in shapes)
    count = 0

    def on_tile() -> None:
        nonlocal count
        count += 1
        if progress is not None:
            progress(count, total)

    metadata = {
        "axes": "YXS",
        "Name": out.name.split(".")[0],
        "PhysicalSizeX": px,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": px,
        "PhysicalSizeYUnit": "µm",
    }
    try:
        with (
            ThreadPoolExecutor(max_workers, thread_name_prefix="ome-tiff") as pool,
            tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif,
        ):
            for k, (h, w) in enumerate(shapes):
                # Pixels per cm at this level; a level-k pixel spans 2**k level-0 pixels.
                ppcm = 1e4 / (px * 2**k)
                extra: dict[str, Any] = (
                    {"subifds": len(shapes) - 1, "metadata": metadata, "software": "wsi-edge-runtime"}
                    if k == 0
                    else {"subfiletype": 1, "metadata": None}
                )
                tif.write(
                    _encoded_tiles(mosaic, k, tile, encode, pool, window, on_tile),
                    shape=(h, w, 3),
                    dtype=np.uint8,
                    resolution=(ppcm, ppcm),
                    **options,
                    **extra,
                )
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return OmeTiffSummary(
        path=out,
        levels=tuple(shapes),
        bytes=out.stat().st_size,
        seconds=time.perf_counter() - t0,
    )
