"""A BigTIFF writer that takes tiles of any page, in any order, and writes the IFDs last.

Why not tifffile: ``TiffWriter.write`` writes one page at a time, and each
page from a tile iterator consumed strictly in order; page k must be finished
before page k+1 starts. A slide's pyramid does not become final in that order:
while the scan moves down, a level-1 band is final after every second level-0
band, a level-2 band after every fourth, and so on. With tifffile the writer
would have to either hold the lower levels until level 0 is done (memory
growing with the slide) or encode them only after the last tile -- a third of
level 0's pixels again, several seconds on 2 cores for a 1-gigapixel slide,
all of it between the last tile and a usable file.

TIFF itself does not care about the order: a reader finds every tile through
the page's TileOffsets/TileByteCounts, so tiles may sit anywhere in the file.
This writer appends each encoded tile at the end of the file as soon as it is
ready, remembers where it went (8 + 4 bytes per tile, so a 4-gigapixel pyramid
needs ~260 KiB of bookkeeping), and once every tile of every page is in,
writes the IFDs after the tile data and points the header at the first one.
Until then the header's first-IFD offset is 0: a half-written file is not a
valid TIFF, and it lives under a temporary name anyway.

Layout: the main IFD is ``pages[0]``; ``pages[1:]`` are its SubIFDs (the
OME-TIFF pyramid layout). The tags mirror, tag for tag, what tifffile writes
for the same page (see ``tests/test_tiff_stream.py``), so tifffile, Bio-Formats
and OpenSlide read these files like tifffile's own.

With ``chain_levels``, ``pages[1:]`` are *also* chained after the main IFD as
top-level IFDs (NextIFD), each a second IFD with the very same entries as its
SubIFD -- same TileOffsets/TileByteCounts arrays, written once and pointed at
twice -- so readers that follow only the top-level chain (OpenSlide's
generic-tiff driver: openslide/openslide#344) see every level too. The pixels
are stored once; the copies cost one IFD per level (~380 bytes). OME-TIFF
readers map planes through the OME-XML's TiffData (IFD 0 only) and take the
levels from SubIFDs, so they ignore the chain (measured: README, "Which file
for which tool").
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tifffile import COMPRESSION, DATATYPE, FILETYPE, PHOTOMETRIC, PLANARCONFIG, PREDICTOR, RESUNIT, TIFF

from runtime.paths import create_exclusive

__all__ = ["TiffPage", "TiffStreamWriter"]

# Codes and enumerated values come from tifffile (TIFF.TAGS, DATATYPE, COMPRESSION, ...), the
# library whose output these files mirror; only the struct layout of each field type is ours.
_TYPE_FMT = {
    DATATYPE.ASCII: "B",
    DATATYPE.SHORT: "H",
    DATATYPE.LONG: "I",
    DATATYPE.RATIONAL: "I",
    DATATYPE.LONG8: "Q",
    DATATYPE.IFD8: "Q",
}
_TYPE_SIZE = {
    DATATYPE.ASCII: 1,
    DATATYPE.SHORT: 2,
    DATATYPE.LONG: 4,
    DATATYPE.RATIONAL: 8,
    DATATYPE.LONG8: 8,
    DATATYPE.IFD8: 8,
}


def _tag(name: str) -> int:
    """The code of TIFF tag ``name`` in tifffile's registry (``TIFF.TAGS`` maps names to codes)."""
    code = TIFF.TAGS[name]
    if not isinstance(code, int):
        raise KeyError(name)
    return code


_NEW_SUBFILE_TYPE = _tag("NewSubfileType")
_IMAGE_WIDTH = _tag("ImageWidth")
_IMAGE_LENGTH = _tag("ImageLength")
_BITS_PER_SAMPLE = _tag("BitsPerSample")
_COMPRESSION = _tag("Compression")
_PHOTOMETRIC = _tag("PhotometricInterpretation")
_IMAGE_DESCRIPTION = _tag("ImageDescription")
_SAMPLES_PER_PIXEL = _tag("SamplesPerPixel")
_X_RESOLUTION = _tag("XResolution")
_Y_RESOLUTION = _tag("YResolution")
_PLANAR_CONFIGURATION = _tag("PlanarConfiguration")
_RESOLUTION_UNIT = _tag("ResolutionUnit")
_SOFTWARE = _tag("Software")
_PREDICTOR = _tag("Predictor")
_TILE_WIDTH = _tag("TileWidth")
_TILE_LENGTH = _tag("TileLength")
_TILE_OFFSETS = _tag("TileOffsets")
_TILE_BYTE_COUNTS = _tag("TileByteCounts")
_SUB_IFDS = _tag("SubIFDs")
_YCBCR_SUBSAMPLING = _tag("YCbCrSubSampling")
_REFERENCE_BLACK_WHITE_TAG = _tag("ReferenceBlackWhite")

# Names older callers import from here: the tifffile enum members themselves.
COMPRESSION_NONE, COMPRESSION_JPEG = COMPRESSION.NONE, COMPRESSION.JPEG
COMPRESSION_DEFLATE, COMPRESSION_ZSTD = COMPRESSION.ADOBE_DEFLATE, COMPRESSION.ZSTD
PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR = PHOTOMETRIC.RGB, PHOTOMETRIC.YCBCR
# YCbCr JPEG: full-range reference black/white, as tifffile (and libtiff) write them.
_REFERENCE_BLACK_WHITE = (0, 1, 255, 1, 128, 1, 255, 1, 128, 1, 255, 1)


def rational(value: float) -> tuple[int, int]:
    """(numerator, denominator) of ``value``, both within uint32 -- tifffile's ``rational``."""
    if value == 0:
        return 0, 1
    f = Fraction(value)
    f = f.limit_denominator(min(4294967295, int(4294967295 / abs(f))))
    return f.numerator, f.denominator


@dataclass(frozen=True)
class TiffPage:
    """One tiled, interleaved 8-bit RGB image of the file (one pyramid level)."""

    height: int
    width: int
    tile: int
    compression: COMPRESSION  # TIFF Compression tag value
    photometric: PHOTOMETRIC = PHOTOMETRIC.RGB
    subsampling: tuple[int, int] | None = None  # YCbCrSubSampling (JPEG/YCbCr only)
    predictor: PREDICTOR | None = None  # Predictor tag (HORIZONTAL) for lossless codecs
    pixels_per_cm: float | None = None  # X/YResolution with ResolutionUnit centimetre
    subfiletype: FILETYPE = FILETYPE.UNDEFINED  # NewSubfileType (0: full resolution; REDUCEDIMAGE: lower levels)
    description: str | None = None  # ImageDescription (OME-XML on the first page)
    software: str | None = None

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile)

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile)

    @property
    def n_tiles(self) -> int:
        return self.tiles_down * self.tiles_across


_Tag = tuple[int, DATATYPE, Sequence[int] | bytes]
"""(tag code, field type, values) of one IFD entry."""


def _entry_tags(page: TiffPage) -> list[_Tag]:
    """(tag, type, values) of every tag but TileOffsets/TileByteCounts/SubIFDs, as tifffile writes them."""
    tags: list[_Tag] = []
    if page.subfiletype:
        tags.append((_NEW_SUBFILE_TYPE, DATATYPE.LONG, [page.subfiletype]))
    tags += [
        (_IMAGE_WIDTH, DATATYPE.LONG, [page.width]),
        (_IMAGE_LENGTH, DATATYPE.LONG, [page.height]),
        (_BITS_PER_SAMPLE, DATATYPE.SHORT, [8, 8, 8]),
        (_COMPRESSION, DATATYPE.SHORT, [page.compression]),
        (_PHOTOMETRIC, DATATYPE.SHORT, [page.photometric]),
    ]
    if page.description is not None:
        tags.append((_IMAGE_DESCRIPTION, DATATYPE.ASCII, page.description.encode("utf-8") + b"\0"))
    tags += [(_SAMPLES_PER_PIXEL, DATATYPE.SHORT, [3])]
    if page.pixels_per_cm is not None:
        res = rational(page.pixels_per_cm)
        tags += [(_X_RESOLUTION, DATATYPE.RATIONAL, res), (_Y_RESOLUTION, DATATYPE.RATIONAL, res)]
    # Contiguous: interleaved RGB.
    tags += [(_PLANAR_CONFIGURATION, DATATYPE.SHORT, [PLANARCONFIG.CONTIG])]
    if page.pixels_per_cm is not None:
        tags.append((_RESOLUTION_UNIT, DATATYPE.SHORT, [RESUNIT.CENTIMETER]))
    if page.software is not None:
        tags.append((_SOFTWARE, DATATYPE.ASCII, page.software.encode("ascii") + b"\0"))
    if page.predictor is not None:
        tags.append((_PREDICTOR, DATATYPE.SHORT, [page.predictor]))
    tags += [(_TILE_WIDTH, DATATYPE.LONG, [page.tile]), (_TILE_LENGTH, DATATYPE.LONG, [page.tile])]
    if page.photometric == PHOTOMETRIC.YCBCR:
        tags.append((_YCBCR_SUBSAMPLING, DATATYPE.SHORT, list(page.subsampling or (2, 2))))
        tags.append((_REFERENCE_BLACK_WHITE_TAG, DATATYPE.RATIONAL, _REFERENCE_BLACK_WHITE))
    return tags


class TiffStreamWriter:
    """Write ``pages`` (main IFD + SubIFDs) to ``path``, tile by tile in any order.

    ``chain_levels``: also chain the SubIFDs as top-level IFDs after the main one
    (same entries, same tile bytes; see the module docstring).

    Not thread-safe: one thread calls :meth:`write_tile` (encoding happens
    elsewhere, in parallel). :meth:`close` raises if a tile is missing, so a
    file with holes is never finished.
    """

    def __init__(
        self, path: str | Path, pages: Sequence[TiffPage], *, chain_levels: bool = False, buffer_bytes: int = 1 << 20
    ) -> None:
        if not pages:
            raise ValueError("need at least one page")
        for p in pages:
            if p.tile < 16 or p.tile % 16:
                raise ValueError(f"tile must be a multiple of 16 (TIFF rule), got {p.tile}")
            if p.height < 1 or p.width < 1:
                raise ValueError(f"empty page {p.height} x {p.width}")
        self.path = Path(path)
        self.pages = list(pages)
        self.chain_levels = chain_levels
        # -1 = not written yet (0 would be a legal-looking offset to a reader).
        self._offsets = [np.full(p.n_tiles, -1, dtype=np.int64) for p in self.pages]
        self._counts = [np.zeros(p.n_tiles, dtype=np.int64) for p in self.pages]
        self._missing = sum(p.n_tiles for p in self.pages)
        # A new file, never through a link: a stale one at ``path`` (a crashed writer's partial
        # file, or a link someone planted) is unlinked first, which removes the link, not its target.
        fd = create_exclusive(self.path, replace_stale=True)
        try:
            self._f: BinaryIO | None = os.fdopen(fd, "wb", buffering=buffer_bytes)
        except BaseException:
            os.close(fd)
            raise
        # BigTIFF header: byte order, version 43, offset size 8, reserved 0, first IFD (patched in close()).
        self._f.write(b"II" + struct.pack("<HHHQ", 43, 8, 0, 0))
        self._pos = 16

    @property
    def tiles_missing(self) -> int:
        return self._missing

    def write_tile(self, page: int, row: int, col: int, data: bytes | bytearray | memoryview) -> None:
        """Append the encoded tile (row, col) of ``page``; each tile exactly once."""
        if self._f is None:
            raise ValueError("writer is closed")
        p = self.pages[page]
        if not (0 <= row < p.tiles_down and 0 <= col < p.tiles_across):
            raise IndexError(f"tile ({row}, {col}) outside page {page} ({p.tiles_down} x {p.tiles_across} tiles)")
        idx = row * p.tiles_across + col
        if self._offsets[page][idx] >= 0:
            raise ValueError(f"tile ({row}, {col}) of page {page} written twice")
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if not 0 < n < 2**32:
            raise ValueError(f"tile ({row}, {col}) of page {page} has {n} bytes")
        self._f.write(data)
        self._offsets[page][idx] = self._pos
        self._counts[page][idx] = n
        self._pos += n
        self._missing -= 1

    def close(self) -> int:
        """Write every IFD, point the header at the first; returns the file size."""
        if self._f is None:
            raise ValueError("writer is closed")
        if self._missing:
            raise ValueError(f"{self._missing} tiles were never written; the TIFF would have holes")
        f = self._f
        # SubIFDs first: the main IFD's SubIFDs tag needs their offsets.
        subs = [self._ifd_entries(k, []) for k in range(1, len(self.pages))]
        sub_offsets = [self._write_entries(e, 0) for e in subs]
        # Chained copies, smallest level first so each knows the offset of the next: the same
        # entries (out-of-line values, tile offsets included, written once), only NextIFD differs.
        nxt = 0
        if self.chain_levels:
            for entries in reversed(subs):
                nxt = self._write_entries(entries, nxt)
        extra: list[_Tag] = [(_SUB_IFDS, DATATYPE.IFD8, sub_offsets)] if sub_offsets else []
        first = self._write_entries(self._ifd_entries(0, extra), nxt)
        f.seek(8)
        f.write(struct.pack("<Q", first))
        f.close()
        self._f = None
        return self._pos

    def abort(self) -> None:
        """Close without finishing (the caller removes the file)."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> TiffStreamWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()
        elif self._f is not None:
            self.close()

    # ------------------------------------------------------------------ internals

    def _append(self, data: bytes) -> int:
        assert self._f is not None
        pos = self._pos
        self._f.write(data)
        self._pos += len(data)
        return pos

    def _align(self) -> None:
        # TIFF wants IFDs and out-of-line values on word boundaries; 8 keeps LONG8 arrays aligned too.
        pad = -self._pos % 8
        if pad:
            self._append(b"\0" * pad)

    def _ifd_entries(self, k: int, extra: Sequence[_Tag]) -> bytes:
        """Write page k's out-of-line values; return its IFD's entries (count and fields, no NextIFD)."""
        counts = self._counts[k]
        count_type = _bytecount_type(self.pages[k], int(counts.max()))
        tags = [
            *_entry_tags(self.pages[k]),
            (_TILE_OFFSETS, DATATYPE.LONG8, self._offsets[k].astype("<u8").tobytes()),
            (_TILE_BYTE_COUNTS, count_type, counts.astype(_NUMPY_TYPE[count_type]).tobytes()),
            *extra,
        ]
        tags.sort(key=lambda t: t[0])  # TIFF requires ascending tag order
        entries = []
        for tag, typ, values in tags:
            raw, count = _pack(typ, values)
            if len(raw) <= 8:
                field = raw.ljust(8, b"\0")
            else:
                self._align()
                field = struct.pack("<Q", self._append(raw))
            entries.append(struct.pack("<HHQ", tag, typ, count) + field)
        return struct.pack("<Q", len(entries)) + b"".join(entries)

    def _write_entries(self, entries: bytes, next_ifd: int) -> int:
        """Write one IFD (``entries`` from :meth:`_ifd_entries`, then NextIFD); return its offset."""
        self._align()
        return self._append(entries + struct.pack("<Q", next_ifd))


_NUMPY_TYPE = {DATATYPE.SHORT: "<u2", DATATYPE.LONG: "<u4", DATATYPE.LONG8: "<u8"}


def _bytecount_type(page: TiffPage, largest: int) -> DATATYPE:
    """TileByteCounts' type by tifffile's rule (from the raw tile size, x10 if compressed), widened if needed."""
    if page.n_tiles == 1:
        return DATATYPE.LONG8
    estimate = page.tile * page.tile * 3 * (10 if page.compression != COMPRESSION.NONE else 1)
    size = max(estimate, largest)
    return DATATYPE.SHORT if size < 2**16 else DATATYPE.LONG if size < 2**32 else DATATYPE.LONG8


def _pack(typ: DATATYPE, values: Sequence[int] | bytes) -> tuple[bytes, int]:
    """Little-endian bytes of a tag's values and the TIFF count (RATIONAL counts pairs)."""
    size = _TYPE_SIZE[typ]
    if isinstance(values, bytes):
        # Pre-packed arrays (ASCII text, tile offsets/counts).
        return values, len(values) // size
    raw = struct.pack(f"<{len(values)}{_TYPE_FMT[typ]}", *values)
    return raw, len(raw) // size
