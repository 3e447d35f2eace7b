"""The recording format: what a scanner records, and what ``hw_sim`` replays.

A recording is a Zarr v3 group holding, for every field of a serpentine scan,
a z-stack of camera frames taken around a coarse focus estimate, with the
commanded stage positions and the z of every plane. Replaying it lets the
runtime autofocus (choose a plane or interpolate), stitch (the commanded
positions are wrong by a few µm, as on real hardware) and time the scan
without a scanner. Synthetic recordings also carry the truth (actual field
positions, true focus z, the slide's spec) so results can be scored.

The full specification, for vendors producing recordings from real hardware,
is ``runtime/devices/RECORDING_FORMAT.md``. This module is its reference reader and
writer: :meth:`Recording.open` validates everything that is cheap to check
up front and fails with a :class:`RecordingError` naming the array or key;
:meth:`Recording.plane` checks each frame as it is read (missing, truncated or
undecodable chunks) because a recording is too big to verify on open.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr
from zarr.codecs import BytesCodec, ZstdCodec
from zarr.core.metadata import ArrayV3Metadata

from runtime.devices.protocols import ScanArea, check_frame_buffer

FORMAT = "wsi-recording"
FORMAT_VERSION = 1

F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
U8 = npt.NDArray[np.uint8]


class RecordingError(ValueError):
    """A recording is missing, malformed or corrupt; the message names the array, key, field or plane."""


@dataclass(frozen=True)
class Timing:
    """How long a real scanner takes to move, settle and expose (defaults: a typical 40x WSI scanner)."""

    stage_speed_um_s: float = 50_000.0
    stage_accel_um_s2: float = 500_000.0
    settle_s: float = 0.030
    z_speed_um_s: float = 2_000.0
    z_settle_s: float = 0.005
    exposure_s: float = 0.002

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Timing:
        """Strict: every key present, a finite number, speeds > 0 and times >= 0 (exposure > 0)."""
        if not isinstance(d, dict):
            raise RecordingError(f"timing: expected an object, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise RecordingError(f"timing: unknown keys {sorted(unknown)}")
        kw = {}
        for f in fields(cls):
            v = _number(d, f.name, "timing")
            strict = f.name.endswith(("_um_s", "_um_s2")) or f.name == "exposure_s"
            if v < 0 or (strict and v == 0):
                raise RecordingError(f"timing.{f.name}: must be {'> 0' if strict else '>= 0'}, got {v}")
            kw[f.name] = v
        return cls(**kw)


@dataclass(frozen=True)
class RecordingMeta:
    """The recording's attributes, plus ``n_fields``/``n_z`` from the ``stacks`` shape."""

    pixel_size_um: float
    tile_height: int
    tile_width: int
    n_fields: int
    n_z: int
    rows: int
    cols: int
    overlap: float
    area: ScanArea
    field_width_um: float
    field_height_um: float
    optics: dict[str, Any]
    camera: dict[str, Any]
    timing: Timing
    slide: dict[str, Any] | None = None

    @property
    def step_x_um(self) -> float:
        """Commanded distance between neighbouring columns (µm)."""
        return self.field_width_um * (1.0 - self.overlap)

    @property
    def step_y_um(self) -> float:
        return self.field_height_um * (1.0 - self.overlap)

    def to_attrs(self) -> dict[str, Any]:
        """The group attributes (JSON) that describe this recording."""
        a = self.area
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "pixel_size_um": float(self.pixel_size_um),
            "tile_height": int(self.tile_height),
            "tile_width": int(self.tile_width),
            "grid": {
                "rows": int(self.rows),
                "cols": int(self.cols),
                "overlap": float(self.overlap),
                "area": {"x_um": a.x_um, "y_um": a.y_um, "width_um": a.width_um, "height_um": a.height_um},
                "field_width_um": float(self.field_width_um),
                "field_height_um": float(self.field_height_um),
            },
            "optics": dict(self.optics),
            "camera": dict(self.camera),
            "timing": self.timing.to_dict(),
            "slide": None if self.slide is None else dict(self.slide),
        }


# --------------------------------------------------------------------------- attribute parsing


def _number(d: dict[str, Any], key: str, where: str) -> float:
    if key not in d:
        raise RecordingError(f"{where}.{key}: missing")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise RecordingError(f"{where}.{key}: expected a finite number, got {v!r}")
    return float(v)


def _integer(d: dict[str, Any], key: str, where: str, minimum: int = 1) -> int:
    if key not in d:
        raise RecordingError(f"{where}.{key}: missing")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise RecordingError(f"{where}.{key}: expected an integer, got {v!r}")
    if v < minimum:
        raise RecordingError(f"{where}.{key}: must be >= {minimum}, got {v}")
    return v


def _object(d: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    if key not in d:
        raise RecordingError(f"{where}.{key}: missing")
    v = d[key]
    if not isinstance(v, dict):
        raise RecordingError(f"{where}.{key}: expected an object, got {type(v).__name__}")
    return v


def _parse_attrs(attrs: dict[str, Any], n_fields: int, n_z: int) -> RecordingMeta:
    w = "attrs"
    fmt = attrs.get("format")
    if fmt != FORMAT:
        raise RecordingError(f"attrs.format: expected {FORMAT!r}, got {fmt!r} (not a recording?)")
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise RecordingError(f"attrs.format_version: this reader supports {FORMAT_VERSION}, got {version!r}")
    px = _number(attrs, "pixel_size_um", w)
    if px <= 0:
        raise RecordingError(f"attrs.pixel_size_um: must be > 0, got {px}")
    th = _integer(attrs, "tile_height", w)
    tw = _integer(attrs, "tile_width", w)
    grid = _object(attrs, "grid", w)
    g = "attrs.grid"
    rows = _integer(grid, "rows", g)
    cols = _integer(grid, "cols", g)
    overlap = _number(grid, "overlap", g)
    if not 0.0 <= overlap < 0.5:
        raise RecordingError(f"attrs.grid.overlap: must be in [0, 0.5), got {overlap}")
    area_d = _object(grid, "area", g)
    try:
        area = ScanArea(
            *(_number(area_d, k, "attrs.grid.area") for k in ("x_um", "y_um", "width_um", "height_um"))
        )
    except ValueError as err:
        raise RecordingError(f"attrs.grid.area: {err}") from err
    fw = _number(grid, "field_width_um", g)
    fh = _number(grid, "field_height_um", g)
    for key, val, px_count in (("field_width_um", fw, tw), ("field_height_um", fh, th)):
        expect = px_count * px
        if abs(val - expect) > 1e-6 * max(1.0, expect):
            raise RecordingError(
                f"attrs.grid.{key}: {val} µm is inconsistent with {px_count} px x {px} µm/px = {expect} µm"
            )
    if n_fields > rows * cols:
        raise RecordingError(
            f"stacks: {n_fields} fields but attrs.grid has only {rows} x {cols} = {rows * cols}"
        )
    optics = _object(attrs, "optics", w)
    camera = _object(attrs, "camera", w)
    timing = Timing.from_dict(_object(attrs, "timing", w))
    slide = attrs.get("slide")
    if slide is not None and not isinstance(slide, dict):
        raise RecordingError(f"attrs.slide: expected an object or null, got {type(slide).__name__}")
    return RecordingMeta(
        pixel_size_um=px,
        tile_height=th,
        tile_width=tw,
        n_fields=n_fields,
        n_z=n_z,
        rows=rows,
        cols=cols,
        overlap=overlap,
        area=area,
        field_width_um=fw,
        field_height_um=fh,
        optics=optics,
        camera=camera,
        timing=timing,
        slide=slide,
    )


# --------------------------------------------------------------------------- arrays


def _array(group: zarr.Group, name: str, where: str = "") -> zarr.Array[Any]:
    label = f"{where}{name}"
    try:
        node = group[name]
    except KeyError:
        raise RecordingError(f"array '{label}': missing") from None
    except Exception as err:  # corrupt zarr.json and the like
        raise RecordingError(f"array '{label}': cannot be opened ({err})") from err
    if not isinstance(node, zarr.Array):
        raise RecordingError(f"'{label}': expected an array, found a group")
    return node


def _check(arr: zarr.Array[Any], label: str, dtype: str, shape: tuple[int, ...]) -> None:
    if arr.dtype != np.dtype(dtype):
        raise RecordingError(f"array '{label}': dtype {arr.dtype}, expected {dtype}")
    if tuple(arr.shape) != shape:
        raise RecordingError(f"array '{label}': shape {tuple(arr.shape)}, expected {shape}")


def _load(arr: zarr.Array[Any], label: str) -> npt.NDArray[Any]:
    try:
        data = np.asarray(arr[...])
    except Exception as err:
        raise RecordingError(f"array '{label}': cannot be read ({err})") from err
    data.setflags(write=False)
    return data


def _finite(data: npt.NDArray[Any], label: str) -> None:
    bad = ~np.isfinite(data)
    if bad.any():
        first = np.argwhere(bad)[0]
        raise RecordingError(
            f"array '{label}': non-finite value at index {tuple(int(i) for i in first)} (field not written?)"
        )


def _plain_zstd(arr: zarr.Array[Any]) -> Callable[[bytes, U8], Any] | None:
    """numcodecs' zstd ``decompress(source, dest)`` when each chunk file of ``arr`` is one zstd frame
    of the raw bytes (codecs ``bytes`` + ``zstd``, nothing else: how hw_sim writes); else None."""
    meta = arr.metadata
    if not isinstance(meta, ArrayV3Metadata) or meta.storage_transformers:
        return None
    codecs = meta.codecs
    if len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], ZstdCodec):
        return None
    from numcodecs.zstd import decompress

    fn: Callable[[bytes, U8], Any] = decompress
    return fn


def _plain_raw(arr: zarr.Array[Any]) -> bool:
    """Whether each chunk file of ``arr`` holds the chunk's raw bytes (the ``bytes`` codec alone, no
    sharding: how ``RecordingWriter(compress=False)`` writes)."""
    meta = arr.metadata
    if not isinstance(meta, ArrayV3Metadata) or meta.storage_transformers:
        return False
    codecs = meta.codecs
    return len(codecs) == 1 and isinstance(codecs[0], BytesCodec)


def _read_exactly(path: Path, out: U8) -> None:
    """The file's bytes into ``out`` (C-contiguous), with one copy from the page cache; ValueError
    unless the file holds exactly ``out.nbytes`` bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size != out.nbytes:
            raise ValueError(f"the chunk file holds {size} bytes, a frame is {out.nbytes}")
        view = out.reshape(-1).data  # a view: out is C-contiguous
        done = 0
        while done < size:
            n = os.readv(fd, [view[done:]])
            if n == 0:
                raise ValueError(f"the chunk file ended after {done} of {size} bytes")
            done += n
    finally:
        os.close(fd)


def _zstd_content_size(data: bytes) -> int | None:
    """The content size a zstd frame's header declares (RFC 8878, 3.1.1.1), None if it has none."""
    if len(data) < 6 or data[:4] != b"\x28\xb5\x2f\xfd":
        raise ValueError("not a zstd frame")
    descriptor = data[4]
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    at = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]  # after the window descriptor, dict id
    width = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if width == 0:
        return None
    if len(data) < at + width:
        raise ValueError("truncated zstd frame header")
    return int.from_bytes(data[at : at + width], "little") + (256 if width == 2 else 0)


class Recording:
    """A validated, opened recording. Frames are read lazily with :meth:`plane`."""

    def __init__(
        self,
        path: Path,
        meta: RecordingMeta,
        stacks: zarr.Array[Any],
        z_um: F64,
        stage_xy_um: F64,
        grid_rc: I32,
        truth_actual_xy_um: F64 | None,
        truth_focus_z_um: F64 | None,
    ) -> None:
        self.path = path
        self._meta = meta
        self._stacks = stacks
        self._z_um = z_um
        self._stage_xy_um = stage_xy_um
        self._grid_rc = grid_rc
        self._truth_xy = truth_actual_xy_um
        self._truth_z = truth_focus_z_um
        self._by_rc = {(int(r), int(c)): i for i, (r, c) in enumerate(grid_rc)}
        self._zstd = _plain_zstd(stacks)
        self._raw = self._zstd is None and _plain_raw(stacks)

    @classmethod
    def open(cls, path: Path | str) -> Recording:
        """Open and validate; raises :class:`RecordingError` naming what is wrong."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise RecordingError(f"{path}: not a recording (no zarr.json; expected a Zarr v3 group folder)")
        try:
            group = zarr.open_group(path, mode="r")
        except Exception as err:
            raise RecordingError(f"{path}: cannot open as a Zarr v3 group ({err})") from err
        if group.metadata.zarr_format != 3:
            raise RecordingError(f"{path}: Zarr format {group.metadata.zarr_format}, expected 3")

        stacks = _array(group, "stacks")
        if stacks.ndim != 5 or stacks.shape[4] != 3:
            raise RecordingError(
                f"array 'stacks': shape {tuple(stacks.shape)}, expected (n_fields, n_z, H, W, 3)"
            )
        n_fields, n_z = int(stacks.shape[0]), int(stacks.shape[1])
        if n_fields < 1 or n_z < 1:
            raise RecordingError(f"array 'stacks': shape {tuple(stacks.shape)} has no fields or no planes")
        meta = _parse_attrs(dict(group.attrs), n_fields, n_z)
        h, w = meta.tile_height, meta.tile_width
        _check(stacks, "stacks", "uint8", (n_fields, n_z, h, w, 3))
        if tuple(stacks.chunks) != (1, 1, h, w, 3):
            raise RecordingError(
                f"array 'stacks': chunks {tuple(stacks.chunks)}, expected (1, 1, {h}, {w}, 3)"
            )

        z_arr = _array(group, "z_um")
        _check(z_arr, "z_um", "float64", (n_fields, n_z))
        z_um = _load(z_arr, "z_um")
        _finite(z_um, "z_um")
        if n_z > 1 and not (np.diff(z_um, axis=1) > 0).all():
            f = int(np.argwhere(~(np.diff(z_um, axis=1) > 0))[0][0])
            raise RecordingError(f"array 'z_um': planes of field {f} are not in strictly increasing z")

        xy_arr = _array(group, "stage_xy_um")
        _check(xy_arr, "stage_xy_um", "float64", (n_fields, 2))
        stage_xy = _load(xy_arr, "stage_xy_um")
        _finite(stage_xy, "stage_xy_um")

        rc_arr = _array(group, "grid_rc")
        _check(rc_arr, "grid_rc", "int32", (n_fields, 2))
        grid_rc = _load(rc_arr, "grid_rc")
        bad = (
            (grid_rc[:, 0] < 0)
            | (grid_rc[:, 0] >= meta.rows)
            | (grid_rc[:, 1] < 0)
            | (grid_rc[:, 1] >= meta.cols)
        )
        if bad.any():
            f = int(np.flatnonzero(bad)[0])
            raise RecordingError(
                f"array 'grid_rc': field {f} at {tuple(int(v) for v in grid_rc[f])} is outside the "
                f"{meta.rows} x {meta.cols} grid"
            )
        if len({(int(r), int(c)) for r, c in grid_rc}) != n_fields:
            raise RecordingError("array 'grid_rc': two fields share a (row, col)")

        truth_xy = truth_z = None
        if "truth" in group:
            truth = group["truth"]
            if not isinstance(truth, zarr.Group):
                raise RecordingError("'truth': expected a group")
            a = _array(truth, "actual_xy_um", "truth/")
            _check(a, "truth/actual_xy_um", "float64", (n_fields, 2))
            truth_xy = _load(a, "truth/actual_xy_um")
            _finite(truth_xy, "truth/actual_xy_um")
            z = _array(truth, "focus_z_um", "truth/")
            _check(z, "truth/focus_z_um", "float64", (n_fields,))
            truth_z = _load(z, "truth/focus_z_um")
            _finite(truth_z, "truth/focus_z_um")
        return cls(path, meta, stacks, z_um, stage_xy, grid_rc, truth_xy, truth_z)

    # ---- metadata

    @property
    def meta(self) -> RecordingMeta:
        return self._meta

    @property
    def stage_xy_um(self) -> F64:
        """(n_fields, 2) commanded field centres (x, y) in µm, read-only."""
        return self._stage_xy_um

    @property
    def grid_rc(self) -> I32:
        """(n_fields, 2) grid (row, col) of each field, read-only."""
        return self._grid_rc

    @property
    def z_um(self) -> F64:
        """(n_fields, n_z) stage z of each plane in µm, strictly increasing per field, read-only."""
        return self._z_um

    @property
    def truth_actual_xy_um(self) -> F64 | None:
        """(n_fields, 2) actual field centres (µm), or None for recordings without truth."""
        return self._truth_xy

    @property
    def truth_focus_z_um(self) -> F64 | None:
        """(n_fields,) true in-focus z per field (µm), or None for recordings without truth."""
        return self._truth_z

    def true_top_left_px(self, field: int) -> tuple[float, float]:
        """(y, x) of the field's actual top-left corner in mosaic pixels (origin: the scan area's
        corner): what stitching should have solved. Raises RecordingError without truth."""
        m, xy = self._meta, self._truth_xy
        if xy is None:
            raise RecordingError("this recording has no truth (truth_actual_xy_um)")
        px = m.pixel_size_um
        return (
            float((xy[field, 1] - m.field_height_um / 2 - m.area.y_um) / px),
            float((xy[field, 0] - m.field_width_um / 2 - m.area.x_um) / px),
        )

    def field_index(self, row: int, col: int) -> int | None:
        """The field recorded at grid (row, col), or None if that grid cell was not recorded."""
        return self._by_rc.get((row, col))

    @property
    def frames_codec(self) -> str:
        """How the frames are stored: "zstd", "raw" (read without decoding) or "other" (through zarr)."""
        return "zstd" if self._zstd is not None else "raw" if self._raw else "other"

    # ---- pixels

    def plane(self, field: int, k: int) -> U8:
        """Frame ``k`` of ``field``: uint8 (H, W, 3). Raises RecordingError if it is missing or corrupt."""
        m = self._meta
        return self.plane_into(field, k, np.empty((m.tile_height, m.tile_width, 3), np.uint8))

    def plane_into(self, field: int, k: int, out: U8) -> U8:
        """Frame ``k`` of ``field`` decoded into ``out`` (C-contiguous uint8 (H, W, 3)); returns ``out``.

        RecordingError if the frame is missing or corrupt (``out`` is then undefined); ValueError
        if ``out`` is not such an array. A frame stored the way ``hw_sim`` writes it (the ``bytes``
        and ``zstd`` codecs, no sharding) is decompressed from its chunk file straight into
        ``out``: through zarr, each read is a hop to zarr's event-loop thread and back, and a copy
        from the decoded chunk into the result, which doubled the replay's cost per frame (8.2 ->
        4.6 ms for a 1024 px frame here). A frame stored raw (the ``bytes`` codec alone:
        ``hw_sim synth --frames raw``) is read from its chunk file into ``out`` (0.2 ms: a camera's
        frame costs its host no decoding either). Any other codec is read through zarr and copied in.
        """
        m = self._meta
        if not 0 <= field < m.n_fields:
            raise RecordingError(f"field {field}: out of range (recording has {m.n_fields} fields)")
        if not 0 <= k < m.n_z:
            raise RecordingError(f"field {field} plane {k}: out of range (recording has {m.n_z} planes)")
        check_frame_buffer(out, (m.tile_height, m.tile_width))
        key = self._stacks.metadata.encode_chunk_key((field, k, 0, 0, 0))
        chunk = self.path / "stacks" / key
        # Zarr reads a missing chunk as the fill value: a silent black frame. Check the file instead.
        if not chunk.is_file():
            raise RecordingError(f"field {field} plane {k}: frame missing (no chunk file stacks/{key})")
        try:
            if self._zstd is not None:
                data = chunk.read_bytes()
                size = _zstd_content_size(data)
                if size != out.nbytes:  # zstd would fill a larger buffer partly and say nothing
                    raise ValueError(f"the zstd frame holds {size} bytes, a frame is {out.nbytes}")
                self._zstd(data, out)  # checks the frame's content checksum (hw_sim writes one)
            elif self._raw:
                _read_exactly(chunk, out)
            else:
                out[...] = self._stacks[field, k]
        except Exception as err:
            raise RecordingError(
                f"field {field} plane {k}: frame corrupt or truncated (stacks/{key}: {err})"
            ) from err
        return out


# --------------------------------------------------------------------------- writing


def _create_stacks(group: zarr.Group, meta: RecordingMeta, compress: bool) -> zarr.Array[Any]:
    """The ``stacks`` array of a new recording in ``group``: one chunk per frame, zstd level 3 with its
    content checksum (``compress``) or raw (the ``bytes`` codec alone)."""
    h, w = meta.tile_height, meta.tile_width
    return group.create_array(
        name="stacks",
        shape=(meta.n_fields, meta.n_z, h, w, 3),
        chunks=(1, 1, h, w, 3),
        dtype="uint8",
        compressors=ZstdCodec(level=3, checksum=True) if compress else None,
        fill_value=0,
    )


class RecordingWriter:
    """Creates a recording and writes it one field at a time.

    Small arrays are pre-filled with NaN / -1, so a field that was never
    written makes :meth:`Recording.open` fail instead of reading as zeros.
    """

    def __init__(self, path: Path | str, meta: RecordingMeta, with_truth: bool = False, compress: bool = True) -> None:
        """``compress``: the frames as zstd (level 3, with a checksum; about 0.77 of raw on the
        simulator's tissue), else raw (the ``bytes`` codec alone: no decoding on replay)."""
        self.path = Path(path)
        self.meta = meta
        if self.path.exists():
            raise RecordingError(f"{self.path}: already exists")
        n, nz = meta.n_fields, meta.n_z
        group = zarr.open_group(self.path, mode="w-", zarr_format=3)
        group.attrs.update(meta.to_attrs())
        rows = min(n, 1024)
        self._stacks = _create_stacks(group, meta, compress)
        self._z = group.create_array(
            name="z_um", shape=(n, nz), chunks=(rows, nz), dtype="float64", fill_value=float("nan")
        )
        self._xy = group.create_array(
            name="stage_xy_um", shape=(n, 2), chunks=(rows, 2), dtype="float64", fill_value=float("nan")
        )
        self._rc = group.create_array(
            name="grid_rc", shape=(n, 2), chunks=(rows, 2), dtype="int32", fill_value=-1
        )
        self._truth: tuple[zarr.Array[Any], zarr.Array[Any]] | None = None
        if with_truth:
            t = group.create_group("truth")
            self._truth = (
                t.create_array(
                    name="actual_xy_um",
                    shape=(n, 2),
                    chunks=(rows, 2),
                    dtype="float64",
                    fill_value=float("nan"),
                ),
                t.create_array(
                    name="focus_z_um", shape=(n,), chunks=(rows,), dtype="float64", fill_value=float("nan")
                ),
            )

    def write_field(
        self,
        field: int,
        stack: U8,
        z_um: npt.ArrayLike,
        stage_xy_um: tuple[float, float],
        grid_rc: tuple[int, int],
        actual_xy_um: tuple[float, float] | None = None,
        focus_z_um: float | None = None,
    ) -> None:
        """Write one field's z-stack (n_z, H, W, 3) uint8, its plane z's and positions."""
        m = self.meta
        if not 0 <= field < m.n_fields:
            raise ValueError(f"field {field} out of range (n_fields={m.n_fields})")
        expect = (m.n_z, m.tile_height, m.tile_width, 3)
        if stack.shape != expect or stack.dtype != np.uint8:
            raise ValueError(f"stack must be uint8 {expect}, got {stack.dtype} {stack.shape}")
        for k in range(m.n_z):
            self._stacks[field, k] = stack[k]
        self.write_positions(field, z_um, stage_xy_um, grid_rc, actual_xy_um, focus_z_um)

    def write_plane(self, field: int, k: int, frame: U8) -> None:
        """Write a single frame, for writers that produce planes one at a time."""
        m = self.meta
        if not (0 <= field < m.n_fields and 0 <= k < m.n_z):
            raise ValueError(f"field {field} plane {k} out of range ({m.n_fields} fields, {m.n_z} planes)")
        if frame.shape != (m.tile_height, m.tile_width, 3) or frame.dtype != np.uint8:
            raise ValueError(
                f"frame must be uint8 ({m.tile_height}, {m.tile_width}, 3), got {frame.dtype} {frame.shape}"
            )
        self._stacks[field, k] = frame

    def truncate(self, n_fields: int) -> None:
        """Keep only fields ``[0, n_fields)``: a recording cut short (a cancelled scan) whose first
        ``n_fields`` fields were written. The grid in the attributes stays; ``n_fields`` shrinks."""
        m = self.meta
        if not 1 <= n_fields <= m.n_fields:
            raise ValueError(f"cannot truncate {m.n_fields} fields to {n_fields}")
        self._stacks.resize((n_fields, m.n_z, m.tile_height, m.tile_width, 3))
        self._z.resize((n_fields, m.n_z))
        self._xy.resize((n_fields, 2))
        self._rc.resize((n_fields, 2))
        if self._truth is not None:
            self._truth[0].resize((n_fields, 2))
            self._truth[1].resize((n_fields,))
        self.meta = replace(m, n_fields=n_fields)

    def write_positions(
        self,
        field: int,
        z_um: npt.ArrayLike,
        stage_xy_um: tuple[float, float],
        grid_rc: tuple[int, int],
        actual_xy_um: tuple[float, float] | None = None,
        focus_z_um: float | None = None,
    ) -> None:
        """Write one field's plane z's and positions (the pixels go through :meth:`write_plane`)."""
        m = self.meta
        if not 0 <= field < m.n_fields:
            raise ValueError(f"field {field} out of range (n_fields={m.n_fields})")
        z = np.asarray(z_um, np.float64)
        if z.shape != (m.n_z,):
            raise ValueError(f"z_um must have {m.n_z} values, got shape {z.shape}")
        self._z[field] = z
        self._xy[field] = np.asarray(stage_xy_um, np.float64)
        self._rc[field] = np.asarray(grid_rc, np.int32)
        if self._truth is not None:
            if actual_xy_um is None or focus_z_um is None:
                raise ValueError("this recording has a truth group: pass actual_xy_um and focus_z_um")
            self._truth[0][field] = np.asarray(actual_xy_um, np.float64)
            self._truth[1][field] = float(focus_z_um)


def repack_frames(src: Path | str, dst: Path | str, compress: bool) -> Path:
    """Copy the recording ``src`` to ``dst`` (a new folder) with its frames stored as zstd
    (``compress``) or raw: the same pixels, metadata and positions. Written under a temporary name
    and renamed when complete."""
    import shutil

    src, dst = Path(src), Path(dst)
    rec = Recording.open(src)
    if dst.exists():
        raise RecordingError(f"{dst}: already exists")
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.copytree(src, tmp, ignore=lambda d, names: names if Path(d) == src / "stacks" else [])
    try:
        shutil.rmtree(tmp / "stacks")
        m = rec.meta
        stacks = _create_stacks(zarr.open_group(tmp, mode="r+", zarr_format=3), m, compress)
        frame = np.empty((m.tile_height, m.tile_width, 3), np.uint8)
        for f in range(m.n_fields):
            for k in range(m.n_z):
                stacks[f, k] = rec.plane_into(f, k, frame)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
