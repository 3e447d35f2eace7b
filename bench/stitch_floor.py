"""``python -m bench stitch --floor``: what the per-pixel steps a stitched slide cannot skip cost here.

Each step is timed alone, on one core (this process pinned to one CPU, OpenCV with one thread),
with the libraries the runtime uses, on the bench's own base recording (real tile content: tissue
and glass as the scan has them), as CPU seconds per gigapixel of *mosaic* (level 0):

``resample``
    ``subpixel_shift`` (the separable 7-tap kernel the accumulator uses) and ``to_uint8``, once per
    tile; a tile brings ``(1 - overlap)^2`` of its pixels to the mosaic.
``register``
    ``to_grey`` of a tile plus ``register_pair`` of one horizontal and one vertical overlap (the
    strips the accumulator keeps), i.e. an interior tile's two pairs: the horizontal one searched,
    the vertical one started at its displacement (``near``, as the accumulator starts a tile's
    second pair where its first pair and the solved neighbours put it; no glass test, no coarse
    search). ``register_pair_ms``: a searched pair; ``register_pair_near_ms``: a started one.
``blend``
    the least a feathered paste must do: copy the tile's opaque part into the canvas (uint8) and
    ``composite`` the overlap strips in float.
``downsample``
    ``downsample2x`` of 512 px chunks; the pyramid reduces 1 + 1/4 + ... = 4/3 of level 0.
``zstd``
    ``zstd_encode`` (level 1, imagecodecs, what the mosaic store writes) of 512 px chunks, for all
    levels (4/3 of level 0); ``lz4`` the Blosc-LZ4 alternative the store also offers.
``read + JPEG``
    the writer's share: ``zstd_decode`` of the chunks and the OME-TIFF's JPEG encode (quality 90,
    4:2:0, tifffile's codec), for all levels.

The sum is a floor for these libraries on this CPU: no scheduling, no Python glue, no I/O, no
journal. ``best Mpx/s`` is what two such cores could sustain if nothing else ran.

The daemon as configured (``mosaic.compressor = "none"``, a journal) does not pay ``zstd`` but pays
steps the floor above leaves out; each is timed the same way and summed apart, as
``stitcher_as_configured`` / ``writer_as_configured`` / ``daemon_as_configured``:

``flatfield``
    the flat-field gain (a float multiply of the resampled tile), once per tile.
``strip texture``
    the glass test of the two strips the accumulator keeps per tile (``texture``, every 4th row).
``chunk write``, ``chunk read``
    level-0 and pyramid chunks written raw to files (the working mosaic's default codec), all levels,
    and the writer's reading them back (instead of ``zstd_decode``).
``tile spill``
    the journal's durable copy of each camera tile (``TileSpill.save``: write, fsync, rename); the CPU
    it costs, not the time waiting for the disk.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from runtime.stitching.registration import RegistrationParams

# A registration pair: a's strip, b, and b's predicted offset in a's strip (rows, columns).
Pair = tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8], tuple[float, float]]

LEVELS = 4 / 3  # all pyramid levels together, per pixel of level 0
# What the daemon as configured pays besides the floor's steps (and instead of zstd: codec "none").
CONFIGURED_EXTRAS = ("flatfield", "strip_texture", "chunk_write", "tile_spill")


@contextmanager
def one_core() -> Iterator[None]:
    """This process on one CPU (the last it may use) and OpenCV on one thread, for the duration."""
    import cv2

    pinned = hasattr(os, "sched_setaffinity")
    cores = os.sched_getaffinity(0) if pinned else set()
    if pinned:
        os.sched_setaffinity(0, {max(cores)})
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)
        if pinned:
            os.sched_setaffinity(0, cores)


def cpu_per_call(fn: Callable[[int], object], n: int, rounds: int = 3) -> float:
    """Fastest of ``rounds`` batches of ``n`` calls: CPU seconds per call."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for i in range(n):
            fn(i)
        best = min(best, (time.process_time() - t0) / n)
    return best


def overlap_pairs(
    greys: list[npt.NDArray[np.uint8]], n_row: int, meta: Any
) -> tuple[list[Pair], RegistrationParams, tuple[int, int]]:
    """The registration pairs of grey tiles laid out ``n_row`` to a row, as the accumulator sets them up
    (the search spans twice the stage's largest error; a's trailing or bottom strip against b whole):
    the pairs ``(a, b, predicted)``, their ``RegistrationParams`` and the strips' (height, width)."""
    from runtime.config import StitchConfig
    from runtime.stitching.registration import RegistrationParams

    th, tw, ov = meta.tile_height, meta.tile_width, meta.overlap
    step_y, step_x = round(th * (1 - ov)), round(tw * (1 - ov))
    cfg = StitchConfig()
    search = 2 * cfg.max_stage_error_um / meta.pixel_size_um
    strip_x, strip_y = round(tw * ov) + math.ceil(search) + 8, round(th * ov) + math.ceil(search) + 8
    params = RegistrationParams(search_px=search, min_ncc=cfg.min_ncc)
    pairs: list[Pair] = []
    for i in range(n_row - 1):  # horizontal: a's trailing strip, b whole
        pairs.append((greys[i][:, tw - strip_x :].copy(), greys[i + 1], (0.0, float(step_x - (tw - strip_x)))))
    if len(greys) > n_row:
        for i in range(n_row):  # vertical: a's bottom strip, the tile below whole
            pairs.append((greys[i][th - strip_y :].copy(), greys[i + n_row], (float(step_y - (th - strip_y)), 0.0)))
    return pairs, params, (strip_y, strip_x)


def measure(rec: Any, chunk: int = 512) -> dict[str, Any]:
    """The floor per step on one core (see the module docstring) from recording ``rec``; chunks of
    ``chunk`` px (at most the tile's size)."""
    import cv2
    import imagecodecs

    from runtime.output.journal import TileSpill
    from runtime.output.ome_tiff import tile_encoder
    from runtime.output.pyramid import downsample2x
    from runtime.stitching.blending import composite, subpixel_shift, to_uint8
    from runtime.stitching.registration import register_pair, texture, to_grey

    codecs: Any = imagecodecs
    with one_core(), tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        m = rec.meta
        th, tw = m.tile_height, m.tile_width
        chunk = min(chunk, th, tw) // 2 * 2
        ov = m.overlap
        step_y, step_x = round(th * (1 - ov)), round(tw * (1 - ov))
        mosaic_px_per_tile = step_y * step_x
        per_tile = 1e9 / mosaic_px_per_tile  # tiles per gigapixel of mosaic
        # Two middle rows, four columns: horizontal and vertical neighbours with real content.
        n_row = min(4, m.cols)
        r0 = max(0, m.rows // 2 - 1)
        rows = range(r0, min(r0 + 2, m.rows))
        tiles = [rec.plane(rec.field_index(r, c), 0) for r in rows for c in range(n_row)]
        out: dict[str, Any] = {"tile": [th, tw], "overlap": ov, "mosaic_px_per_tile": mosaic_px_per_tile}

        out["resample"] = cpu_per_call(lambda i: to_uint8(subpixel_shift(tiles[i % len(tiles)], 0.37, -0.21)), 8)
        out["resample"] *= per_tile
        gain = np.full((th, tw, 3), 1.05, np.float32)  # the flat-field's inverse gain, one per pixel and channel
        shifted = subpixel_shift(tiles[0], 0.37, -0.21)
        out["flatfield"] = cpu_per_call(lambda i: cv2.multiply(shifted, gain, dst=shifted), 8) * per_tile

        greys = [to_grey(t) for t in tiles]
        pairs, params, (strip_y, strip_x) = overlap_pairs(greys, n_row, m)
        measured = [register_pair(a_, b_, p_, params) for a_, b_, p_ in pairs]
        outcomes = [m_.reason for m_ in measured]
        out["pairs"] = {r: outcomes.count(r) for r in sorted(set(outcomes))}
        pair_s = cpu_per_call(lambda i: register_pair(*pairs[i % len(pairs)], params), 2 * len(pairs))
        # The vertical pairs (after the n_row - 1 horizontal ones) started where they were measured.
        second = [(pr, m_.shift if m_.accepted else None) for pr, m_ in zip(pairs, measured, strict=True)][n_row - 1 :]
        second = second or [(pr, None) for pr in pairs]
        near_s = cpu_per_call(
            lambda i: register_pair(*second[i % len(second)][0], params, near=second[i % len(second)][1]),
            2 * len(second),
        )
        grey_s = cpu_per_call(lambda i: to_grey(tiles[i % len(tiles)]), 8)
        out["register_pair_ms"] = pair_s * 1e3
        out["register_pair_near_ms"] = near_s * 1e3
        out["register"] = (grey_s + pair_s + near_s) * per_tile
        strips = [(g[:, tw - strip_x :].copy(), g[th - strip_y :].copy()) for g in greys]
        out["strip_texture"] = (
            cpu_per_call(lambda i: [texture(s_, row_step=4) for s_ in strips[i % len(strips)]], len(strips)) * per_tile
        )
        spill = TileSpill(tmp)
        out["tile_spill"] = cpu_per_call(lambda i: spill.save(i % 4, tiles[i % len(tiles)]), 8) * per_tile

        canvas = np.full((th + 64, tw + 64, 3), 255, np.uint8)
        covered = np.ones((th, tw), np.bool_)
        moved = subpixel_shift(tiles[0], 0.37, -0.21)
        moved8 = to_uint8(moved)
        ov_y, ov_x = th - step_y, tw - step_x
        ramp_x = np.broadcast_to(np.linspace(0, 1, ov_x, dtype=np.float32), (th, ov_x)).copy()
        ramp_y = np.broadcast_to(np.linspace(0, 1, ov_y, dtype=np.float32)[:, None], (ov_y, tw)).copy()

        def blend(_: int) -> None:
            canvas[ov_y:th, ov_x:tw] = moved8[ov_y:, ov_x:]  # the opaque part: a copy
            composite(canvas[:th, :ov_x], covered[:, :ov_x], moved[:, :ov_x], ramp_x)  # left overlap
            composite(canvas[:ov_y, :tw], covered[:ov_y], moved[:ov_y], ramp_y)  # top overlap

        out["blend"] = cpu_per_call(blend, 8) * per_tile

        chunks = [
            np.ascontiguousarray(t[y : y + chunk, x : x + chunk])
            for t in tiles
            for y in range(0, th - chunk + 1, chunk)
            for x in range(0, tw - chunk + 1, chunk)
        ]
        per_chunk = 1e9 / (chunk * chunk)  # chunks per gigapixel
        n = len(chunks)
        out["downsample"] = cpu_per_call(lambda i: downsample2x(chunks[i % n]), n) * per_chunk * LEVELS
        encoded = [bytes(codecs.zstd_encode(c, level=1)) for c in chunks]
        out["zstd"] = cpu_per_call(lambda i: codecs.zstd_encode(chunks[i % n], level=1), n) * per_chunk * LEVELS
        out["zstd_ratio"] = sum(c.nbytes for c in chunks) / sum(len(e) for e in encoded)
        lz4 = dict(level=5, compressor="lz4", shuffle=0, typesize=1, numthreads=1)
        out["lz4"] = cpu_per_call(lambda i: codecs.blosc_encode(chunks[i % n], **lz4), n) * per_chunk * LEVELS
        out["lz4_ratio"] = sum(c.nbytes for c in chunks) / sum(
            len(bytes(codecs.blosc_encode(c, **lz4))) for c in chunks
        )

        def write(i: int) -> None:
            with open(os.path.join(tmp, f"chunk{i % 8}"), "wb") as f:
                chunks[i % n].tofile(f)

        out["chunk_write"] = cpu_per_call(write, n) * per_chunk * LEVELS
        out["chunk_read"] = (
            cpu_per_call(lambda i: np.fromfile(os.path.join(tmp, f"chunk{i % 8}"), np.uint8), min(n, 8))
            * per_chunk
            * LEVELS
        )
        buf = np.empty((chunk, chunk, 3), np.uint8)
        read_s = cpu_per_call(lambda i: codecs.zstd_decode(encoded[i % n], out=buf.reshape(-1)), n)
        jpeg = tile_encoder("jpeg", jpeg_quality=90, subsampling=(2, 2))
        jpeg_s = cpu_per_call(lambda i: jpeg(chunks[i % n]), n)
        out["zstd_decode"] = read_s * per_chunk * LEVELS
        out["jpeg"] = jpeg_s * per_chunk * LEVELS
        stitcher = out["resample"] + out["register"] + out["blend"] + out["downsample"] + out["zstd"]
        writer = out["zstd_decode"] + out["jpeg"]
        out["stitcher_floor"] = stitcher
        out["writer_floor"] = writer
        out["daemon_floor"] = stitcher + writer
        # Two cores, each busy all the time with nothing but these steps.
        out["best_mpx_per_s_2_cores"] = 2 * 1e3 / (stitcher + writer)
        configured = stitcher - out["zstd"] + sum(out[k] for k in CONFIGURED_EXTRAS)
        out["stitcher_as_configured"] = configured
        out["writer_as_configured"] = out["chunk_read"] + out["jpeg"]
        out["daemon_as_configured"] = configured + out["writer_as_configured"]
        out["best_mpx_per_s_2_cores_as_configured"] = 2 * 1e3 / out["daemon_as_configured"]
        return out


STEPS = [
    ("resample", "subpixel_shift + to_uint8, once per tile"),
    ("register", "to_grey + 2 overlap pairs per tile (register_pair; the second started near)"),
    ("blend", "opaque copy + float composite of the overlap strips"),
    ("downsample", "downsample2x, all levels (4/3 of level 0)"),
    ("zstd", "zstd level 1 encode of 512 px chunks, all levels"),
    ("stitcher_floor", "sum: the stitcher's unavoidable steps"),
    ("zstd_decode", "writer: zstd decode of the chunks, all levels"),
    ("jpeg", "writer: JPEG q90 4:2:0 encode of 512 px tiles, all levels"),
    ("writer_floor", "sum: the writer's"),
    ("daemon_floor", "stitcher + writer"),
    ("lz4", "(alternative) Blosc-LZ4 encode, all levels"),
    ("flatfield", "as configured: flat-field gain, once per tile"),
    ("strip_texture", "as configured: glass test of the 2 kept strips per tile"),
    ("chunk_write", "as configured: raw chunk files (codec none), all levels"),
    ("tile_spill", "as configured: the journal's durable tile copy (write, fsync, rename)"),
    ("stitcher_as_configured", "stitcher floor - zstd + the four above"),
    ("chunk_read", "as configured: the writer reads raw chunks back, all levels"),
    ("writer_as_configured", "chunk_read + jpeg"),
    ("daemon_as_configured", "stitcher_as_configured + writer_as_configured"),
]


def report_rows(floor: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"step": name, "cpu_s_per_gpx": floor[name], "what": what} for name, what in STEPS]
