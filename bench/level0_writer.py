"""The writer bench's second contender: every pyramid level from level 0 alone, in one pass.

``write_ome_tiff_from_level0`` reads only level 0 of a mosaic and computes the lower
levels on the fly, writing them nowhere but into the TIFF -- the job libvips'
``tiffsave --pyramid`` does -- so ``python -m bench writer`` compares like with like.
The daemon never does this: its stitcher builds the lower levels as the scan goes
and the writer streams them (:mod:`runtime.output.ome_tiff`).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from runtime.output.mosaic_store import FILL, MosaicStore
from runtime.output.ome_tiff import (
    Compression,
    OmeTiffSummary,
    Progress,
    check_options,
    pad_tile,
    partial_path,
    pyramid_pages,
    tile_encoder,
)
from runtime.output.pyramid import downsample2x
from runtime.output.tiff_stream import TiffStreamWriter


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
        enc = self._blank_tile() if data is None else self.encode(pad_tile(data, self._buf("pad")))
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
            tiles.append(((0, ci, cj), self.encode(pad_tile(data, self._buf("pad")))))
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
        tiles.append(((k, i, j), self.encode(pad_tile(view, self._buf("pad")))))
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
    check_options(compression, tile, jpeg_quality, subsampling)
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
