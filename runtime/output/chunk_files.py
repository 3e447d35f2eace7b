"""Whole-chunk file I/O for the mosaic's Zarr arrays, beside Zarr rather than through it.

See :class:`ChunkFiles` for why: the stitcher writes and the writer reads every chunk of
the mosaic once or twice, and Zarr's synchronous API costs as much per chunk as the
decoding. Used by :class:`runtime.output.mosaic_store.MosaicStore` only.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, BytesCodec, ZstdCodec

__all__ = ["FILL", "ChunkFiles", "MosaicError"]

# imagecodecs' stubs only admit bytes, but its codecs take any buffer (numpy arrays).
_codecs_rt: Any = imagecodecs
FILL = 255  # unwritten pixels: white, as glass


class MosaicError(ValueError):
    """The directory is not a mosaic this code can use, or its attributes or chunks are inconsistent."""


class ChunkFiles:
    """Whole-chunk file I/O for the layout :meth:`MosaicStore.create` makes.

    Zarr's sync API spends about 0.5 ms per call in its asyncio machinery
    and funnels every chunk through one event loop; for 512 px chunks that
    is as much as decoding them, and it dominated both scanning and export
    (a chunk write through Zarr took ~4-7 ms here, direct ~1.5 ms). For a
    local store with the codec chains ``create`` writes
    (bytes, then zstd, blosc or nothing), this reads and writes exactly what
    Zarr would: the file named by the array's chunk key encoding, holding
    the codec's frame of the full-size C-order chunk (edge chunks padded with
    the fill value); all-fill chunks are not stored (Zarr's
    ``write_empty_chunks=False``). Other layouts fall back to Zarr.
    """

    def __init__(self, arr: Any, chunk: int, codec: str, level: int) -> None:
        self.arr = arr
        self._chunk_key: Callable[[tuple[int, ...]], str] = arr.metadata.encode_chunk_key
        self.chunk = chunk
        self.dir = Path(arr.store.root, arr.path)
        self.codec = codec  # "zstd", "lz4" (blosc) or "none"
        self.level = level
        self._made_dirs: set[Path] = set()
        self._local = threading.local()

    @classmethod
    def for_array(cls, arr: Any, chunk: int) -> ChunkFiles | None:
        if not isinstance(arr.store, zarr.storage.LocalStore) or arr.filters:
            return None
        codecs = list(arr.metadata.codecs)
        if not codecs or not isinstance(codecs[0], BytesCodec) or len(codecs) > 2:
            return None
        if len(codecs) == 1:
            return cls(arr, chunk, "none", 0)
        c = codecs[1]
        if isinstance(c, ZstdCodec) and not c.checksum:
            return cls(arr, chunk, "zstd", c.level)
        if isinstance(c, BloscCodec) and c.shuffle == BloscShuffle.noshuffle and c.cname.value == "lz4":
            return cls(arr, chunk, "lz4", c.clevel)
        return None

    def path(self, i: int, j: int) -> Path:
        return self.dir / self._chunk_key((i, j, 0))

    def _scratch(self, name: str, size: int) -> bytearray:
        """A per-thread byte buffer of at least ``size`` bytes, reused across chunks.

        Allocating and freeing ~0.5-1 MiB per chunk makes glibc map and unmap
        (or trim) memory each time: page faults cost as much as the decoding.
        """
        buf: bytearray | None = getattr(self._local, name, None)
        if buf is None or len(buf) < size:
            buf = bytearray(size)
            setattr(self._local, name, buf)
        return buf

    def read(self, i: int, j: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """The full-size chunk, or None if it is not stored (all fill).

        ``out`` (C-contiguous, chunk x chunk x 3 uint8) receives the pixels;
        reusing it avoids a fresh allocation per chunk (see ``_scratch``).
        """
        c = self.chunk
        if out is None:
            out = np.empty((c, c, 3), dtype=np.uint8)
        flat = out.reshape(-1)  # a view, or an error if out is not contiguous
        try:
            f = open(self.path(i, j), "rb", buffering=0)  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            return None
        with f:
            size = os.fstat(f.fileno()).st_size
            if self.codec == "none":
                n = f.readinto(flat.data) if size == flat.size else size
            else:
                raw = memoryview(self._scratch("raw", size))[:size]
                if f.readinto(raw) != size:
                    raise MosaicError(f"{self.dir}: chunk ({i}, {j}) changed while being read")
                # imagecodecs, not numcodecs: it releases the GIL, so chunks decode in parallel.
                try:
                    if self.codec == "zstd":
                        n = len(_codecs_rt.zstd_decode(raw, out=flat))
                    else:
                        n = len(_codecs_rt.blosc_decode(raw, out=flat, numthreads=1))
                except Exception as err:  # imagecodecs' ZstdError/BloscError: a damaged chunk file
                    raise MosaicError(f"{self.dir}: chunk ({i}, {j}) cannot be decoded: {err}") from err
        if n != c * c * 3:
            raise MosaicError(f"{self.dir}: chunk ({i}, {j}) holds {n} bytes, expected {c * c * 3}")
        return out

    def write(self, i: int, j: int, data: np.ndarray) -> None:
        """Store chunk (i, j) from ``data`` (the chunk's pixels inside the level)."""
        c = self.chunk
        path = self.path(i, j)
        # All fill (FILL is uint8's largest value, so: its minimum is FILL): no temporary mask of the chunk.
        if int(data[0, 0, 0]) == FILL and int(data.min()) == FILL:
            path.unlink(missing_ok=True)
            return
        if data.shape[:2] != (c, c) or not data.flags.c_contiguous:
            full = np.frombuffer(self._scratch("full", c * c * 3), dtype=np.uint8, count=c * c * 3)
            full = full.reshape(c, c, 3)
            if data.shape[:2] != (c, c):
                full[...] = FILL
            full[: data.shape[0], : data.shape[1]] = data
            data = full
        payload: Any
        # Worst-case compressed size: the raw size plus the codecs' small headers.
        bound = c * c * 3 + 4096
        if self.codec == "zstd":
            payload = _codecs_rt.zstd_encode(data, level=self.level, out=self._scratch("enc", bound))
        elif self.codec == "lz4":
            payload = _codecs_rt.blosc_encode(
                data,
                level=self.level,
                compressor="lz4",
                shuffle=0,
                typesize=1,
                numthreads=1,
                out=self._scratch("enc", bound),
            )
        else:
            payload = data
        if path.parent not in self._made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(path.parent)
        # Write-then-rename like Zarr: a reader never sees half a chunk.
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(tmp, "wb", buffering=0) as f:
                f.write(payload)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
