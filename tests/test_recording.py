"""The recording format: synth writes it, Recording reads and validates it, truth renders its area."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr

from hw_sim.synth import AREA_ORIGIN_UM, SynthParams, grid_for, synthesize
from hw_sim.truth import TruthRenderer, mosaic_shape, write_truth
from runtime.devices.protocols import ScanArea
from runtime.devices.recording import (
    Recording,
    RecordingError,
    RecordingMeta,
    RecordingWriter,
    Timing,
    repack_frames,
)

PARAMS = SynthParams(fields_x=2, fields_y=2, seed=1, tile=128, z_planes=5, z_step_um=0.5)


@pytest.fixture(scope="module")
def rec_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("rec") / "tiny", PARAMS)


@pytest.fixture()
def broken(rec_path: Path, tmp_path: Path) -> Path:
    """A private copy of the recording to damage."""
    return Path(shutil.copytree(rec_path, tmp_path / "copy"))


def _sharpness(img: np.ndarray) -> float:
    g = img[..., 1].astype(np.float64)
    return float(((g[:, 1:] - g[:, :-1]) ** 2).mean() / max(g.mean(), 1.0))


# --------------------------------------------------------------------------- round trip


def test_synthetic_recording_round_trip(rec_path: Path) -> None:
    rec = Recording.open(rec_path)
    m = rec.meta
    assert (m.rows, m.cols, m.n_fields, m.n_z) == (2, 2, 4, 5)
    assert (m.tile_height, m.tile_width, m.pixel_size_um) == (128, 128, 0.25)
    assert (m.area.x_um, m.area.y_um) == AREA_ORIGIN_UM
    assert m.field_width_um == 32.0 and m.timing == Timing()
    assert m.slide is not None and m.slide["seed"] == PARAMS.seed
    plan = grid_for(PARAMS)
    np.testing.assert_array_equal(rec.stage_xy_um, [(f.x_um, f.y_um) for f in plan.fields])
    assert rec.grid_rc.tolist() == [[0, 0], [0, 1], [1, 1], [1, 0]], "serpentine acquisition order"
    assert rec.field_index(1, 0) == 3 and rec.field_index(5, 5) is None
    np.testing.assert_allclose(np.diff(rec.z_um, axis=1), 0.5)
    # The stack is centred on a coarse estimate: within ±1 µm of the true focus, rarely on it.
    assert rec.truth_actual_xy_um is not None and rec.truth_focus_z_um is not None
    centre = rec.z_um.mean(axis=1)
    assert np.all(np.abs(centre - rec.truth_focus_z_um) <= 1.0 + 1e-9)
    err = rec.truth_actual_xy_um - rec.stage_xy_um
    assert np.all(np.abs(err) <= 3 * PARAMS.stage_error_um) and np.abs(err).max() > 0.1
    frame = rec.plane(0, 2)
    assert frame.dtype == np.uint8 and frame.shape == (128, 128, 3)


def test_frames_are_sharpest_near_the_true_focus(rec_path: Path) -> None:
    rec = Recording.open(rec_path)
    assert rec.truth_focus_z_um is not None
    checked = 0
    for f in range(rec.meta.n_fields):
        planes = [rec.plane(f, k) for k in range(rec.meta.n_z)]
        if np.mean([p.std() for p in planes]) < 10:  # glass: nothing to focus on
            continue
        best = int(np.argmax([_sharpness(p) for p in planes]))
        nearest = int(np.argmin(np.abs(rec.z_um[f] - rec.truth_focus_z_um[f])))
        assert abs(best - nearest) <= 1, (f, best, nearest)
        checked += 1
    assert checked >= 2


def test_writer_round_trip_without_truth(tmp_path: Path) -> None:
    meta = RecordingMeta(
        pixel_size_um=0.5,
        tile_height=16,
        tile_width=24,
        n_fields=2,
        n_z=3,
        rows=1,
        cols=2,
        overlap=0.25,
        area=ScanArea(10.0, 20.0, 21.0, 8.0),
        field_width_um=12.0,
        field_height_um=8.0,
        optics={"na": 0.75, "magnification": 20},
        camera={"model": "vendor-x"},
        timing=Timing(exposure_s=0.001),
    )
    w = RecordingWriter(tmp_path / "r", meta)
    rng = np.random.default_rng(0)
    stacks = rng.integers(0, 256, (2, 3, 16, 24, 3), dtype=np.uint8)
    for f in range(2):
        w.write_field(f, stacks[f], [1.0, 1.5, 2.0], (16.0 + 9 * f, 24.0), (0, f))
    rec = Recording.open(tmp_path / "r")
    assert rec.meta == meta
    assert rec.truth_actual_xy_um is None and rec.truth_focus_z_um is None
    for f in range(2):
        for k in range(3):
            np.testing.assert_array_equal(rec.plane(f, k), stacks[f, k])
    with pytest.raises(RecordingError, match="already exists"):
        RecordingWriter(tmp_path / "r", meta)


# --------------------------------------------------------------------------- validation


def _arr(group: zarr.Group, name: str) -> zarr.Array:
    node = group[name]
    assert isinstance(node, zarr.Array)
    return node


def _attrs(path: Path) -> dict[str, Any]:
    return json.loads((path / "zarr.json").read_text())["attributes"]


def _set_attrs(path: Path, attrs: dict[str, Any]) -> None:
    doc = json.loads((path / "zarr.json").read_text())
    doc["attributes"] = attrs
    (path / "zarr.json").write_text(json.dumps(doc))


def test_missing_array_is_named(broken: Path) -> None:
    shutil.rmtree(broken / "z_um")
    with pytest.raises(RecordingError, match=r"'z_um': missing"):
        Recording.open(broken)


def test_wrong_dtype_is_named(broken: Path) -> None:
    g = zarr.open_group(broken, mode="r+")
    data = np.asarray(_arr(g, "stage_xy_um")[...])
    del g["stage_xy_um"]
    g.create_array(name="stage_xy_um", shape=data.shape, dtype="float32")[...] = data
    with pytest.raises(RecordingError, match=r"'stage_xy_um': dtype float32, expected float64"):
        Recording.open(broken)


def test_wrong_shape_is_named(broken: Path) -> None:
    g = zarr.open_group(broken, mode="r+")
    del g["grid_rc"]
    g.create_array(name="grid_rc", shape=(3, 2), dtype="int32")[...] = 0
    with pytest.raises(RecordingError, match=r"'grid_rc': shape \(3, 2\), expected \(4, 2\)"):
        Recording.open(broken)


def test_missing_truth_array_is_named(broken: Path) -> None:
    shutil.rmtree(broken / "truth" / "focus_z_um")
    with pytest.raises(RecordingError, match=r"'truth/focus_z_um': missing"):
        Recording.open(broken)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda a: a.pop("timing"), r"attrs\.timing: missing"),
        (lambda a: a["timing"].update(settle_s="slow"), r"timing\.settle_s: expected a finite number"),
        (lambda a: a.update(format="something-else"), r"attrs\.format"),
        (lambda a: a.update(format_version=2), r"format_version"),
        (lambda a: a.update(tile_width=100), r"attrs\.grid\.field_width_um: .*inconsistent with 100 px"),
        (lambda a: a["grid"].update(field_height_um=40.0), r"attrs\.grid\.field_height_um: .*inconsistent"),
        (lambda a: a["grid"].update(rows=1), r"stacks: 4 fields but attrs\.grid has only 1 x 2"),
        (lambda a: a["grid"]["area"].update(width_um=-1.0), r"attrs\.grid\.area"),
        (lambda a: a.update(slide=[1, 2]), r"attrs\.slide"),
    ],
)
def test_bad_attrs_are_named(broken: Path, edit: Callable[[dict[str, Any]], object], message: str) -> None:
    attrs = _attrs(broken)
    edit(attrs)
    _set_attrs(broken, attrs)
    with pytest.raises(RecordingError, match=message):
        Recording.open(broken)


def test_unwritten_field_is_detected(broken: Path) -> None:
    z_arr = _arr(zarr.open_group(broken, mode="r+"), "z_um")
    z = np.asarray(z_arr[...])
    z[2] = np.nan
    z_arr[...] = z
    with pytest.raises(RecordingError, match=r"'z_um': non-finite value at index \(2, 0\)"):
        Recording.open(broken)


def test_truncated_and_missing_frames_are_named(broken: Path) -> None:
    rec = Recording.open(broken)  # validation on open does not read frames
    chunk = broken / "stacks" / "c" / "1" / "2" / "0" / "0" / "0"
    size = chunk.stat().st_size
    with open(chunk, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(RecordingError, match=r"field 1 plane 2: frame corrupt or truncated"):
        rec.plane(1, 2)
    chunk.unlink()
    with pytest.raises(RecordingError, match=r"field 1 plane 2: frame missing"):
        rec.plane(1, 2)
    assert rec.plane(1, 3).shape == (128, 128, 3), "other frames still read"
    with pytest.raises(RecordingError, match=r"field 9: out of range"):
        rec.plane(9, 0)


def test_plane_into_decodes_the_chunk_into_the_buffer_as_zarr_does(rec_path: Path) -> None:
    """The direct zstd path (hw_sim's codecs) gives zarr's pixels, in the caller's buffer."""
    rec = Recording.open(rec_path)
    stacks = zarr.open_array(rec_path / "stacks", mode="r")
    out = np.zeros((128, 128, 3), np.uint8)
    for field, k in [(0, 0), (2, 4), (3, 1)]:
        assert rec.plane_into(field, k, out) is out
        np.testing.assert_array_equal(out, stacks[field, k])
        np.testing.assert_array_equal(rec.plane(field, k), stacks[field, k])
    for bad in (np.zeros((128, 127, 3), np.uint8), np.zeros((128, 128, 3), np.int16), out[:, ::-1]):
        with pytest.raises(ValueError, match="frame buffer"):
            rec.plane_into(0, 0, bad)


def test_a_damaged_or_foreign_chunk_is_named(broken: Path) -> None:
    rec = Recording.open(broken)
    chunk = broken / "stacks" / "c" / "1" / "2" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern: the zstd content checksum catches it
    chunk.write_bytes(bytes(data))
    with pytest.raises(RecordingError, match=r"field 1 plane 2: frame corrupt or truncated"):
        rec.plane(1, 2)
    # A sound zstd frame of the wrong size (another recording's chunk): named, not half-filled.
    from numcodecs.zstd import compress

    chunk.write_bytes(compress(bytes(64 * 64 * 3), 3))
    with pytest.raises(RecordingError, match=r"field 1 plane 2: frame corrupt .*holds 12288 bytes, a frame is 49152"):
        rec.plane(1, 2)


def test_raw_frames_hold_the_same_pixels_and_read_without_zarr(rec_path: Path, tmp_path: Path) -> None:
    """A recording repacked with raw frames: the same pixels, metadata and positions; its chunk
    files are the frames' bytes, read straight into the caller's buffer."""
    raw = repack_frames(rec_path, tmp_path / "raw", compress=False)
    a, b = Recording.open(rec_path), Recording.open(raw)
    assert (a.frames_codec, b.frames_codec) == ("zstd", "raw")
    assert a.meta == b.meta
    np.testing.assert_array_equal(a.z_um, b.z_um)
    np.testing.assert_array_equal(a.stage_xy_um, b.stage_xy_um)
    assert a.truth_actual_xy_um is not None and b.truth_actual_xy_um is not None
    np.testing.assert_array_equal(a.truth_actual_xy_um, b.truth_actual_xy_um)
    chunk = raw / "stacks" / "c" / "3" / "1" / "0" / "0" / "0"
    assert chunk.stat().st_size == 128 * 128 * 3, "one raw frame per chunk file"
    out = np.zeros((128, 128, 3), np.uint8)
    for field in range(PARAMS.fields_x * PARAMS.fields_y):
        for k in range(PARAMS.z_planes):
            assert b.plane_into(field, k, out) is out
            np.testing.assert_array_equal(out, a.plane(field, k))
    # And back to zstd: the pixels survive the round trip.
    again = repack_frames(raw, tmp_path / "zstd", compress=True)
    c = Recording.open(again)
    assert c.frames_codec == "zstd"
    np.testing.assert_array_equal(c.plane(3, 1), a.plane(3, 1))
    with pytest.raises(RecordingError, match="already exists"):
        repack_frames(rec_path, raw, compress=False)


def test_a_short_or_long_raw_chunk_is_named(rec_path: Path, tmp_path: Path) -> None:
    raw = repack_frames(rec_path, tmp_path / "raw", compress=False)
    rec = Recording.open(raw)
    chunk = raw / "stacks" / "c" / "1" / "2" / "0" / "0" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[:-1])
    with pytest.raises(RecordingError, match=r"field 1 plane 2: frame corrupt .*holds 49151 bytes, a frame is 49152"):
        rec.plane(1, 2)
    chunk.write_bytes(data + b"\0")
    with pytest.raises(RecordingError, match=r"field 1 plane 2: frame corrupt .*holds 49153 bytes"):
        rec.plane(1, 2)
    chunk.unlink()
    with pytest.raises(RecordingError, match=r"field 1 plane 2: frame missing"):
        rec.plane(1, 2)


def test_synth_writes_raw_frames_when_asked(tmp_path: Path) -> None:
    params = SynthParams(fields_x=2, fields_y=1, seed=3, tile=64, z_planes=2)
    a = Recording.open(synthesize(tmp_path / "z", params))
    b = Recording.open(synthesize(tmp_path / "r", params, compress=False))
    assert (a.frames_codec, b.frames_codec) == ("zstd", "raw")
    for field in range(2):
        for k in range(2):
            np.testing.assert_array_equal(a.plane(field, k), b.plane(field, k))


def test_not_a_recording(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="not a recording"):
        Recording.open(tmp_path)


# --------------------------------------------------------------------------- synth


@pytest.mark.parametrize(
    ("nx", "ny", "overlap"), [(1, 1, 0.1), (4, 3, 0.1), (7, 5, 0.15), (3, 9, 0.0), (5, 2, 0.3)]
)
def test_synth_grid_has_exactly_the_requested_fields(nx: int, ny: int, overlap: float) -> None:
    plan = grid_for(SynthParams(fields_x=nx, fields_y=ny, overlap=overlap, tile=512, pixel_size_um=0.25))
    assert (plan.cols, plan.rows) == (nx, ny)


def test_synth_refuses_to_overwrite(rec_path: Path, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError, match="already exists"):
        synthesize(rec_path, PARAMS)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(FileExistsError, match="not a recording"):
        synthesize(precious, PARAMS, overwrite=True)
    assert (precious / "thesis.txt").exists()


def test_synth_overwrite_replaces_a_recording(tmp_path: Path) -> None:
    params = SynthParams(fields_x=1, fields_y=1, tile=64, z_planes=2, seed=5)
    out = synthesize(tmp_path / "r", params)
    synthesize(out, params, overwrite=True)
    assert Recording.open(out).meta.n_fields == 1
    assert [p.name for p in tmp_path.iterdir()] == ["r"], "no partial folders left behind"


# --------------------------------------------------------------------------- truth


def test_truth_matches_the_in_focus_frames(rec_path: Path, tmp_path: Path) -> None:
    rec = Recording.open(rec_path)
    out = tmp_path / "truth.tif"
    shape = write_truth(rec_path, out)
    # 2 fields of 128 px, stepped by 0.9 * 32 µm = 115.2 px.
    assert shape == mosaic_shape(rec.meta) == (128 + 115, 128 + 115)
    with tifffile.TiffFile(out) as tif:
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (512, 512)
        truth = page.asarray()
    assert truth.shape == (*shape, 3) and truth.dtype == np.uint8

    # The same pixels, rendered independently.
    np.testing.assert_array_equal(truth, TruthRenderer(rec.meta).render(0, 0)[: shape[0], : shape[1]])

    # Each field's best-focused frame, placed at its ACTUAL position, matches the truth.
    assert rec.truth_actual_xy_um is not None and rec.truth_focus_z_um is not None
    m, px = rec.meta, rec.meta.pixel_size_um
    for f in range(m.n_fields):
        k = int(np.argmin(np.abs(rec.z_um[f] - rec.truth_focus_z_um[f])))
        frame = rec.plane(f, k).astype(np.float64)
        x, y = rec.truth_actual_xy_um[f]
        c0 = round((x - m.field_width_um / 2 - m.area.x_um) / px)
        r0 = round((y - m.field_height_um / 2 - m.area.y_um) / px)
        # Compare the frame's central part (little vignetting) where it lies inside the mosaic.
        rs = slice(max(32, -r0), min(96, shape[0] - r0))
        cs = slice(max(32, -c0), min(96, shape[1] - c0))
        a = frame[rs, cs, 1]
        b = truth[rs.start + r0 : rs.stop + r0, cs.start + c0 : cs.stop + c0, 1].astype(np.float64)
        assert np.abs(a - b).mean() < 6, f  # shot noise ~2.4 DN, residual defocus, sub-pixel offset
        if b.std() > 10:
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9, f


def test_truth_needs_a_synthetic_recording(tmp_path: Path) -> None:
    meta = RecordingMeta(
        pixel_size_um=0.5,
        tile_height=8,
        tile_width=8,
        n_fields=1,
        n_z=1,
        rows=1,
        cols=1,
        overlap=0.1,
        area=ScanArea(0.0, 0.0, 4.0, 4.0),
        field_width_um=4.0,
        field_height_um=4.0,
        optics={},
        camera={},
        timing=Timing(),
    )
    RecordingWriter(tmp_path / "real", meta).write_field(
        0, np.zeros((1, 8, 8, 3), np.uint8), [0.0], (2.0, 2.0), (0, 0)
    )
    with pytest.raises(RecordingError, match=r"attrs\.slide: missing"):
        write_truth(tmp_path / "real", tmp_path / "t.tif")
    assert not (tmp_path / "t.tif").exists()
