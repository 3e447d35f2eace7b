"""QuPath GeoJSON: the features the analysis writes, and a validator of what QuPath's reader accepts.

Conventions (the same as the simulator's truth, ``python -m hw_sim truth --annotations``): a
``FeatureCollection`` in full-resolution (level 0) slide pixel coordinates, ``X`` right and ``Y``
down, point (0, 0) the top-left *corner* of pixel (0, 0), so pixel (i, j) covers [j, j + 1) x
[i, i + 1);

- regions (lesions, the tissue outline, artifacts) are ``annotation`` objects: a Polygon or
  MultiPolygon whose rings are closed (first position == last, at least 4 positions), exterior
  counter-clockwise in these coordinates (RFC 7946); ``classification`` ``{"name", "color":
  [r, g, b]}`` (QuPath rejects a class without a colour); ``measurements`` a name -> number
  object;
- nuclei are ``detection`` Points (in their own file when many: a whole slide has millions).

Files are streamed one feature per line and appear under their final name only when complete.
:func:`validate` checks a parsed document against the structure QuPath's GeoJSON reader
(``qupath.lib.io.PathIO`` / ``GsonTools``) accepts and returns every problem it finds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Final

import numpy as np

TUMOR_CLASS: Final = {"name": "Tumor", "color": [200, 0, 0]}
MIMIC_CLASS: Final = {"name": "Mimic", "color": [0, 160, 200]}
OTHER_CLASS: Final = {"name": "Other", "color": [30, 90, 220]}
TISSUE_CLASS: Final = {"name": "Tissue", "color": [80, 160, 80]}
ARTIFACT_CLASS: Final = {"name": "Artifact", "color": [120, 120, 120]}
"""QuPath classifications (name and colour)."""

OBJECT_TYPES: Final = frozenset({"annotation", "detection", "cell", "tile", "tma_core"})
"""``properties.objectType`` values QuPath's reader knows."""
GEOMETRY_TYPES: Final = frozenset(
    {"Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon", "GeometryCollection"}
)


class GeoJSONError(ValueError):
    """A GeoJSON document QuPath would not import; the message lists what is wrong."""


# --------------------------------------------------------------------------- building features


def rings(poly: Any) -> list[list[list[float]]]:
    """The closed rings of a shapely Polygon, exterior counter-clockwise (in x right, y down), rounded to 1/1000 px."""
    from shapely.geometry.polygon import orient

    p = orient(poly, 1.0)
    return [[[round(x, 3), round(y, 3)] for x, y in r.coords] for r in (p.exterior, *p.interiors)]


def geometry(geom: Any) -> dict[str, Any]:
    """A shapely Polygon or MultiPolygon as a GeoJSON geometry."""
    if geom.geom_type == "Polygon":
        return {"type": "Polygon", "coordinates": rings(geom)}
    if geom.geom_type == "MultiPolygon":
        return {"type": "MultiPolygon", "coordinates": [rings(g) for g in geom.geoms]}
    raise ValueError(f"an annotation needs a Polygon or MultiPolygon, not a {geom.geom_type}")


def max_diameter(geom: Any) -> float:
    """The largest distance between two points of ``geom`` (over its convex hull), in its units."""
    hull = geom.convex_hull
    if hull.geom_type != "Polygon":
        return 0.0
    pts = np.asarray(hull.exterior.coords)
    d = pts[:, None, :] - pts[None, :, :]
    return float(np.sqrt((d * d).sum(-1)).max())


def annotation(
    geom: Any,
    classification: Mapping[str, Any],
    measurements: Mapping[str, float],
    *,
    name: str | None = None,
    feature_id: str | None = None,
) -> dict[str, Any]:
    """An ``annotation`` Feature of a shapely (Multi)Polygon in slide pixels."""
    props: dict[str, Any] = {"objectType": "annotation"}
    if name is not None:
        props["name"] = name
    props["classification"] = {"name": classification["name"], "color": list(classification["color"])}
    props["measurements"] = {k: float(v) for k, v in measurements.items()}
    feat: dict[str, Any] = {"type": "Feature"}
    if feature_id is not None:
        feat["id"] = feature_id
    feat["geometry"] = geometry(geom)
    feat["properties"] = props
    return feat


def detection_point(x: float, y: float, classification: Mapping[str, Any]) -> dict[str, Any]:
    """A ``detection`` Point Feature at (x, y) slide pixels."""
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [round(float(x), 2), round(float(y), 2)]},
        "properties": {
            "objectType": "detection",
            "classification": {"name": classification["name"], "color": list(classification["color"])},
        },
    }


def detection_points_json(
    xs: Iterable[float], ys: Iterable[float], classes: Iterable[Mapping[str, Any]]
) -> Iterator[str]:
    """:func:`detection_point` features already serialised (a slide's nuclei number in the
    millions: formatting each point beats building and encoding a dict per point ~4x)."""
    props: dict[str, str] = {}
    for x, y, c in zip(xs, ys, classes, strict=True):
        tail = props.get(c["name"])
        if tail is None:
            p = {"objectType": "detection", "classification": {"name": c["name"], "color": list(c["color"])}}
            tail = props[c["name"]] = json.dumps(p, separators=(",", ":"))
        yield f'{{"type":"Feature","geometry":{{"type":"Point","coordinates":[{x:.2f},{y:.2f}]}},"properties":{tail}}}'


def write_collection(fh: IO[str], features: Iterable[dict[str, Any] | str]) -> int:
    """Stream a FeatureCollection (one feature per line: a dict, or a feature already serialised);
    returns the number of features."""
    fh.write('{"type": "FeatureCollection", "features": [\n')
    n = 0
    for f in features:
        fh.write((",\n" if n else "") + (f if isinstance(f, str) else json.dumps(f, separators=(",", ":"))))
        n += 1
    fh.write("\n]}\n")
    return n


def write_atomic(path: Path, features: Iterable[dict[str, Any] | str]) -> int:
    """Write a FeatureCollection to ``path`` via ``.NAME.partial`` (renamed when complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            n = write_collection(fh, features)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


# --------------------------------------------------------------------------- validation


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_position(p: Any, where: str) -> Iterator[str]:
    if not isinstance(p, list) or len(p) < 2 or not all(_is_number(c) for c in p[:2]):
        yield f"{where}: a position must be [x, y] finite numbers, got {str(p)[:60]}"


def _check_ring(ring: Any, where: str) -> Iterator[str]:
    if not isinstance(ring, list) or len(ring) < 4:
        yield f"{where}: a ring needs at least 4 positions, got {len(ring) if isinstance(ring, list) else ring!r}"
        return
    bad = [e for i, p in enumerate(ring) for e in _check_position(p, f"{where}[{i}]")]
    if bad:
        yield from bad[:3]
        return
    if ring[0][:2] != ring[-1][:2]:
        yield f"{where}: ring is not closed (first position {ring[0]} != last {ring[-1]})"


def _check_geometry(g: Any, where: str) -> Iterator[str]:
    if not isinstance(g, dict) or g.get("type") not in GEOMETRY_TYPES:
        yield f"{where}: geometry type must be one of {sorted(GEOMETRY_TYPES)}, got {g!r:.80}"
        return
    kind, coords = g["type"], g.get("coordinates")
    if kind == "GeometryCollection":
        for i, sub in enumerate(g.get("geometries") or []):
            yield from _check_geometry(sub, f"{where}.geometries[{i}]")
        return
    if not isinstance(coords, list):
        yield f"{where}: {kind} has no coordinates list"
        return
    if kind == "Point":
        yield from _check_position(coords, where)
    elif kind in ("MultiPoint", "LineString"):
        for i, p in enumerate(coords):
            yield from _check_position(p, f"{where}[{i}]")
    elif kind == "MultiLineString":
        for i, line in enumerate(coords):
            for j, p in enumerate(line if isinstance(line, list) else [line]):
                yield from _check_position(p, f"{where}[{i}][{j}]")
    elif kind == "Polygon":
        if not coords:
            yield f"{where}: Polygon without rings"
        for i, ring in enumerate(coords):
            yield from _check_ring(ring, f"{where}.ring[{i}]")
    else:  # MultiPolygon
        if not coords:
            yield f"{where}: MultiPolygon without polygons"
        for i, poly in enumerate(coords):
            if not isinstance(poly, list) or not poly:
                yield f"{where}.polygon[{i}]: no rings"
                continue
            for j, ring in enumerate(poly):
                yield from _check_ring(ring, f"{where}.polygon[{i}].ring[{j}]")


def _check_classification(c: Any, where: str) -> Iterator[str]:
    if not isinstance(c, dict):
        yield f"{where}: classification must be an object with name and color, got {c!r:.60}"
        return
    if not isinstance(c.get("name"), str) or not c["name"]:
        yield f"{where}: classification has no name"
    col = c.get("color")
    if col is None:
        yield f"{where}: classification {c.get('name')!r} has no color (QuPath rejects it)"
    elif not (
        isinstance(col, list)
        and len(col) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in col)
    ):
        yield f"{where}: classification color must be [r, g, b] integers 0-255, got {col!r}"


def validate_feature(f: Any, where: str = "feature") -> list[str]:
    """Every problem QuPath's reader would have with one Feature (empty when it imports)."""
    if not isinstance(f, dict) or f.get("type") != "Feature":
        return [f"{where}: not a Feature object"]
    errors = list(_check_geometry(f.get("geometry"), f"{where}.geometry"))
    props = f.get("properties")
    if not isinstance(props, dict):
        return [*errors, f"{where}: no properties object"]
    if props.get("objectType") not in OBJECT_TYPES:
        errors.append(f"{where}: objectType must be one of {sorted(OBJECT_TYPES)}, got {props.get('objectType')!r}")
    if "classification" in props:
        errors += _check_classification(props["classification"], f"{where}.classification")
    if "measurements" in props:
        m = props["measurements"]
        if not isinstance(m, dict):
            errors.append(f"{where}: measurements must be a name -> number object, got {type(m).__name__}")
        else:
            errors += [
                f"{where}: measurement {k!r} is not a finite number ({v!r:.40})"
                for k, v in m.items()
                if not _is_number(v)
            ]
    if "name" in props and not isinstance(props["name"], str):
        errors.append(f"{where}: name must be a string")
    return errors


def validate(doc: Any) -> list[str]:
    """Every problem of a parsed GeoJSON FeatureCollection QuPath would import (empty: it imports)."""
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection" or not isinstance(doc.get("features"), list):
        return ["not a FeatureCollection with a features list"]
    errors: list[str] = []
    for i, f in enumerate(doc["features"]):
        errors += validate_feature(f, f"features[{i}]")
    return errors


def check_file(path: Path) -> int:
    """Parse and validate ``path``; the number of features, or :class:`GeoJSONError` listing the problems."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise GeoJSONError(f"{path}: not readable JSON ({err})") from None
    errors = validate(doc)
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise GeoJSONError(f"{path}: {'; '.join(errors[:5])}{more}")
    return len(doc["features"])
