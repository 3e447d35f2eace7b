"""The analysis outputs QuPath and Bio-Formats read: the GeoJSON validator (accepts what we write,
rejects each malformation QuPath's reader rejects) and the pyramidal heatmap OME-TIFF."""

from __future__ import annotations

import copy
import itertools
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from shapely.geometry import Point, box

from runtime.analysis import geojson
from runtime.analysis.heatmap import write_heatmap, write_overlay
from runtime.analysis.lesions import find_lesions, region_features
from runtime.analysis.pipeline import GridResult
from tests import bioformats


def grid_result(gh: int = 40, gw: int = 56, cell_px: float = 64.0) -> GridResult:
    """A grid with a tumour square, tissue everywhere but a glass border, an artifact cell."""
    prob = np.zeros((gh, gw), np.float32)
    prob[10:20, 12:30] = 0.9
    tissue = np.zeros((gh, gw), np.float32)
    tissue[2:-2, 2:-2] = 1.0
    art = np.zeros((gh, gw), bool)
    art[30:32, 40:42] = True
    return GridResult(
        shape=(round(gh * cell_px) - 5, round(gw * cell_px) - 7),
        pixel_size_um=0.5,
        cell_px=cell_px,
        probability=prob,
        tissue=tissue,
        analysed=tissue > 0,
        artifact=art,
        attention=prob / prob.sum(),
        slide_score=0.9,
        nuclei=np.array([[15 * cell_px, 20 * cell_px], [5 * cell_px, 5 * cell_px]], np.float32),
        stats={"patches": int((tissue > 0).sum())},
    )


def written_collection() -> dict[str, Any]:
    r = grid_result()
    feats = region_features(r, find_lesions(r))
    feats.append(geojson.detection_point(10.0, 20.0, geojson.OTHER_CLASS))
    return {"type": "FeatureCollection", "features": feats}


def test_validator_accepts_what_the_analysis_writes(tmp_path: Path) -> None:
    doc = written_collection()
    names = [f["properties"]["classification"]["name"] for f in doc["features"]]
    assert names.count("Tumor") == 1 and names.count("Tissue") == 1 and "Artifact" in names
    assert geojson.validate(doc) == []
    path = tmp_path / "a.geojson"
    geojson.write_atomic(path, doc["features"])
    assert geojson.check_file(path) == len(doc["features"])
    assert json.loads(path.read_text())["type"] == "FeatureCollection"
    tumour = next(f for f in doc["features"] if f["properties"]["classification"]["name"] == "Tumor")
    assert set(tumour["properties"]["measurements"]) >= {"Area mm^2", "Mean probability", "Max probability"}


def _tumour(doc: dict[str, Any]) -> dict[str, Any]:
    f: dict[str, Any] = next(f for f in doc["features"] if f["properties"]["classification"]["name"] == "Tumor")
    return f


def _missing_colour(d: dict[str, Any]) -> None:
    del _tumour(d)["properties"]["classification"]["color"]


def _open_ring(d: dict[str, Any]) -> None:
    ring = _tumour(d)["geometry"]["coordinates"][0]
    ring[-1] = [ring[-1][0] + 1.0, ring[-1][1]]


def _text_measurement(d: dict[str, Any]) -> None:
    _tumour(d)["properties"]["measurements"]["Area mm^2"] = "0.2"


def _nan_measurement(d: dict[str, Any]) -> None:
    _tumour(d)["properties"]["measurements"]["Area mm^2"] = float("nan")


def _wrong_object_type(d: dict[str, Any]) -> None:
    _tumour(d)["properties"]["objectType"] = "lesion"


def _measurement_list(d: dict[str, Any]) -> None:
    _tumour(d)["properties"]["measurements"] = [0.2, 0.9]


def _colour_out_of_range(d: dict[str, Any]) -> None:
    _tumour(d)["properties"]["classification"]["color"] = [300, 0, 0]


def _short_ring(d: dict[str, Any]) -> None:
    _tumour(d)["geometry"]["coordinates"][0] = [[0, 0], [1, 0], [0, 0]]


def _not_a_collection(d: dict[str, Any]) -> None:
    d["type"] = "Feature"


@pytest.mark.parametrize(
    ("break_it", "says"),
    [
        (_missing_colour, "no color"),
        (_open_ring, "not closed"),
        (_text_measurement, "not a finite number"),
        (_nan_measurement, "not a finite number"),
        (_wrong_object_type, "objectType"),
        (_measurement_list, "name -> number"),
        (_colour_out_of_range, "0-255"),
        (_short_ring, "at least 4"),
        (_not_a_collection, "FeatureCollection"),
    ],
)
def test_validator_rejects_each_malformation(break_it: Any, says: str, tmp_path: Path) -> None:
    doc = copy.deepcopy(written_collection())
    break_it(doc)
    errors = geojson.validate(doc)
    assert errors and any(says in e for e in errors), errors
    path = tmp_path / "bad.geojson"
    path.write_text(json.dumps(doc))
    with pytest.raises(geojson.GeoJSONError, match=says):
        geojson.check_file(path)


def test_annotation_rings_are_closed_and_counter_clockwise() -> None:
    geom = box(0, 0, 10, 10).difference(Point(5, 5).buffer(2))
    f = geojson.annotation(geom, geojson.TUMOR_CLASS, {"Area mm^2": 1.0})
    ext, hole = f["geometry"]["coordinates"]
    for ring in (ext, hole):
        assert ring[0] == ring[-1] and len(ring) >= 4
    area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ext)) / 2
    assert area > 0  # counter-clockwise in x right, y down, as hw_sim's truth writes it
    with pytest.raises(ValueError, match="Polygon or MultiPolygon"):
        geojson.annotation(Point(1, 1), geojson.TUMOR_CLASS, {})


def test_heatmap_is_a_pyramidal_ome_tiff_with_the_cell_pixel_size(tmp_path: Path) -> None:
    r = grid_result()
    out = write_heatmap(tmp_path / "heatmap.ome.tif", r)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome
        levels = tif.series[0].levels
        assert len(levels) >= 2
        assert levels[0].shape == r.probability.shape
        assert levels[1].shape == (20, 28)
        full = levels[0].asarray()
        assert full[15, 20] == round(0.9 * 255) and full[0, 0] == 0
        pixels = ET.fromstring(tif.ome_metadata or "").find(".//{*}Pixels")
        assert pixels is not None
        assert float(pixels.get("PhysicalSizeX", 0)) == pytest.approx(r.cell_um)
        assert float(pixels.get("PhysicalSizeY", 0)) == pytest.approx(r.cell_um)
    png = write_overlay(tmp_path / "h.png", r.probability, r.analysed, None, r.shape)
    import cv2

    img = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.shape[2] == 4 and max(img.shape[:2]) == 1024
    thumb = np.full((r.shape[0] // 8, r.shape[1] // 8, 3), 200, np.uint8)
    png2 = write_overlay(tmp_path / "h2.png", r.probability, r.analysed, thumb, r.shape)
    img2 = cv2.imread(str(png2), cv2.IMREAD_UNCHANGED)
    assert img2 is not None and img2.shape[:2] == thumb.shape[:2] and img2.shape[2] == 3
    # The encoder's settings (filter, zlib strategy) are OpenCV's: another decoder reads the same pixels.
    pil = pytest.importorskip("PIL.Image")
    for path, bgr in ((png, img), (png2, img2)):
        with pil.open(path) as im:
            im.verify()
        with pil.open(path) as im:
            assert np.array_equal(
                np.asarray(im), cv2.cvtColor(bgr, cv2.COLOR_BGRA2RGBA if bgr.shape[2] == 4 else cv2.COLOR_BGR2RGB)
            )


def test_overlay_blends_only_where_it_shows_and_equals_the_full_blend(tmp_path: Path) -> None:
    """write_overlay blends the thumbnail with the colour ramp only where alpha > 0: the image must be
    the blend computed over every pixel (alpha 0 leaves the thumbnail's own pixel)."""
    import cv2

    from runtime.analysis.heatmap import _ramp

    rng = np.random.default_rng(3)
    r = grid_result()
    values = (rng.random(r.probability.shape) ** 3).astype(np.float32)
    values[:, :5] = 0.0  # a band the overlay leaves to the slide
    thumb = rng.integers(0, 256, (r.shape[0] // 8, r.shape[1] // 8, 3), dtype=np.uint8)
    bgr = cv2.imread(str(write_overlay(tmp_path / "o.png", values, r.analysed, thumb, r.shape)))
    assert bgr is not None
    got = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    oh, ow = thumb.shape[:2]
    gh, gw = values.shape
    full_w, full_h = round(gw * (r.shape[1] / gw) * ow / r.shape[1]), round(gh * (r.shape[0] / gh) * oh / r.shape[0])
    v = np.asarray(cv2.resize(values, (full_w, full_h), interpolation=cv2.INTER_LINEAR), np.float32)[:oh, :ow]
    a = cv2.resize(r.analysed.astype(np.float32), (full_w, full_h), interpolation=cv2.INTER_NEAREST)[:oh, :ow]
    alpha = (a * np.clip(1.2 * v - 0.1, 0, 0.8)).astype(np.float32)[..., None]
    want = np.clip(np.rint(thumb.astype(np.float32) * (1 - alpha) + _ramp(v) * alpha), 0, 255).astype(np.uint8)
    assert 0 < (alpha > 0).mean() < 1
    assert np.array_equal(got, want)
    assert np.array_equal(got[alpha[..., 0] == 0], thumb[alpha[..., 0] == 0])


@pytest.mark.skipif(bioformats.java() is None, reason="java is not installed")
def test_bioformats_opens_the_heatmap_as_a_pyramid(tmp_path: Path) -> None:
    r = grid_result()
    out = write_heatmap(tmp_path / "heatmap.ome.tif", r)
    series, resolutions, size_x = bioformats.bioformats_pyramid(out)
    assert series == 1
    assert resolutions >= 2
    assert size_x == pytest.approx(r.cell_um)
