"""OME-Zarr (OME-NGFF 0.4) output of the slide's pyramid, written tile by tile beside the OME-TIFF.

For napari (napari-ome-zarr) and web viewers (Viv/vizarr, neuroglancer),
which read OME-NGFF pyramids directly and from object storage.

Why a second copy rather than the working mosaic itself: NGFF requires the
channel axis before the spatial ones (``c, y, x``), while the mosaic stores
interleaved ``y, x, c`` chunks (what the TIFF tiles need, and what the
stitcher writes without a transpose); and the mosaic is a working copy that
is deleted after the export by default.

Format: NGFF 0.4 on Zarr v2 (the version napari-ome-zarr, Viv and
neuroglancer all read; 0.5 needs Zarr v3 readers), one array per level
``(3, h, w)`` uint8, chunks ``(3, tile, tile)`` (one file per tile, like the
TIFF), zstd, fill value 255 (blank glass tiles are not stored), ``/``
dimension separator as 0.4 requires; ``multiscales`` with a scale transform
per level in micrometres and ``omero`` channel metadata (red, green, blue,
window 0-255) so viewers show true colour.

Chunks are written directly as files (the zstd frame of the C-order chunk,
under the array's chunk key), like ``runtime.output.mosaic_store``'s chunk I/O and for the
same reason: zarr-python's per-call overhead would cost as much as the
encoding. Written under ``OUT.partial`` and renamed when complete.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import imagecodecs
import numcodecs
import numpy as np
import zarr

__all__ = ["NgffWriter"]

_codecs_rt: Any = imagecodecs  # the stubs only admit bytes; the codecs take any buffer
FILL = 255
_ZSTD_LEVEL = 1


class NgffWriter:
    """An OME-NGFF 0.4 pyramid at ``path``, filled with :meth:`write_tile` (thread-safe) and :meth:`finish`."""

    def __init__(
        self, path: str | Path, shapes: Sequence[tuple[int, int]], tile: int, pixel_size_um: float, name: str
    ) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.shapes = [(int(h), int(w)) for h, w in shapes]
        self.tile = tile
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        group = zarr.open_group(zarr.storage.LocalStore(self.tmp), mode="w-", zarr_format=2)
        for k, (h, w) in enumerate(self.shapes):
            group.create_array(
                str(k),
                shape=(3, h, w),
                chunks=(3, tile, tile),
                dtype="uint8",
                compressors=numcodecs.Zstd(level=_ZSTD_LEVEL),
                fill_value=FILL,
                chunk_key_encoding={"name": "v2", "separator": "/"},
            )
        group.attrs.update(_metadata(self.shapes, pixel_size_um, name))
        self._dirs = [self.tmp / str(k) for k in range(len(self.shapes))]
        self._made: set[Path] = set()
        self._lock = threading.Lock()
        self._local = threading.local()

    def write_tile(self, k: int, i: int, j: int, data: np.ndarray | None) -> None:
        """Tile (i, j) of level k from its (h, w, 3) pixels (clipped at the level's edge); None = blank."""
        if data is None:
            return  # not stored: reads as the fill value, like the mosaic's blank chunks
        t = self.tile
        h, w = data.shape[:2]
        chunk = self._chunk_buffer()
        if (h, w) != (t, t):
            chunk[...] = FILL  # Zarr v2 stores edge chunks at full size, padded with the fill value
        chunk[:, :h, :w] = data.transpose(2, 0, 1)
        payload = _codecs_rt.zstd_encode(chunk, level=_ZSTD_LEVEL)
        path = self._dirs[k] / "0" / str(i) / str(j)
        if path.parent not in self._made:
            with self._lock:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._made.add(path.parent)
        tmp = path.with_name(f"{j}.{uuid.uuid4().hex}.partial")
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)

    def finish(self) -> Path:
        """Rename to the final path (replacing an older output of the same name)."""
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _chunk_buffer(self) -> np.ndarray:
        buf: np.ndarray | None = getattr(self._local, "chunk", None)
        if buf is None:
            buf = self._local.chunk = np.empty((3, self.tile, self.tile), dtype=np.uint8)
        return buf


def _metadata(shapes: Sequence[tuple[int, int]], pixel_size_um: float, name: str) -> dict[str, Any]:
    axes = [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    datasets = [
        {
            "path": str(k),
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, pixel_size_um * 2**k, pixel_size_um * 2**k]}
            ],
        }
        for k in range(len(shapes))
    ]
    channels = [
        {"label": label, "color": color, "active": True, "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
        for label, color in (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))
    ]
    return {
        "multiscales": [
            {
                "version": "0.4",
                "name": name,
                "axes": axes,
                "datasets": datasets,
                "type": "mean",  # 2x2 area averaging
                "metadata": {"method": "runtime.output.pyramid.downsample2x"},
            }
        ],
        "omero": {"version": "0.4", "name": name, "channels": channels, "rdefs": {"model": "color"}},
    }
