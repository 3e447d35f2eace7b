"""Ground truth of a synthetic recording: the scanned area, in focus, as one tiled TIFF.

The runtime's stitched mosaic is scored against this image, so both must use
the same coordinates: mosaic pixel (0, 0) covers the stage point
(area.x_um, area.y_um), the top-left corner of the first field's *commanded*
position, and the mosaic spans the commanded grid,
``width = round((cols - 1) * step_x / pixel) + tile_width`` (same for height).

The truth is what a perfect scanner would record: the slide imaged in focus
through the same (diffraction-limited, slightly aberrated) optics, with the
camera's illumination and white-balance gain but without noise or vignetting.
It is rendered tile by tile and streamed into the TIFF, never held whole.

**Annotations** (:func:`write_annotations`, ``python -m hw_sim truth REC --annotations
truth.geojson``): the tumour truth of a slide with lesions (``hw_sim synth --lesions N``) as a
GeoJSON FeatureCollection that QuPath imports as it is, in the same full-resolution pixel
coordinates as the mosaic and the slide the runtime writes: ``X = (x_um - area.x_um) /
pixel_size_um``, ``Y = (y_um - area.y_um) / pixel_size_um`` (x right, y down), so point (0, 0) is
the top-left *corner* of mosaic pixel (0, 0) and pixel (i, j) covers [j, j + 1) x [i, i + 1).

- each tumour lesion: an ``annotation`` whose ``classification`` is ``{"name": "Tumor",
  "color": [r, g, b]}``, its outline clipped to the tissue piece (a lesion cut by the tissue
  edge ends there) and to the mosaic, as a Polygon or MultiPolygon with closed rings (exterior
  counter-clockwise in these coordinates, as RFC 7946 asks); ``measurements``: ``Area mm^2``,
  ``Max diameter mm``, ``Grade`` (atypia 0-1). Gland lumens and the slide's small holes inside
  a lesion are part of it, as a pathologist's outline would include them;
- each benign mimic (``--mimics``): an ``annotation`` classified ``Mimic``: crowded benign
  tissue that is *not* tumour, for scoring false positives on hard negatives;
- every nucleus: a ``detection`` Point at its centre, classified ``Tumor`` or ``Other``; in
  the same file, or streamed into a separate one (``--nuclei FILE``) for large areas.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tifffile

from hw_sim.content import make_slide
from hw_sim.optics import CameraParams, Optics, OpticsParams
from hw_sim.slide import SlideSpec, SyntheticSlide
from runtime.analysis.geojson import (
    MIMIC_CLASS,
    OTHER_CLASS,
    TUMOR_CLASS,
    annotation,
    detection_point,
    max_diameter,
    write_atomic,
)
from runtime.devices.recording import Recording, RecordingError, RecordingMeta

TILE = 512


def mosaic_shape(meta: RecordingMeta) -> tuple[int, int]:
    """(height, width) in pixels of the commanded grid's mosaic."""
    px = meta.pixel_size_um
    height = round((meta.rows - 1) * meta.step_y_um / px) + meta.tile_height
    width = round((meta.cols - 1) * meta.step_x_um / px) + meta.tile_width
    return height, width


class TruthRenderer:
    """Renders any rectangle of a synthetic recording's truth mosaic (uint8 RGB)."""

    def __init__(self, meta: RecordingMeta, tile: int = TILE) -> None:
        if meta.slide is None:
            raise RecordingError(
                "attrs.slide: missing; ground truth exists only for synthetic recordings "
                "(made by hw_sim synth)"
            )
        try:
            spec = SlideSpec.from_dict(meta.slide)
            optics_params = OpticsParams.from_dict(meta.optics)
            camera = CameraParams.from_dict(meta.camera)
        except (TypeError, ValueError) as err:
            raise RecordingError(f"attrs.slide/optics/camera: cannot rebuild the simulation ({err})") from err
        self.meta = meta
        self.slide = make_slide(spec)
        # In focus only: a small PSF box (and margin) is enough.
        self.optics = Optics(replace(optics_params, max_defocus_um=0.5), meta.pixel_size_um, (tile, tile))
        self.tile = tile
        self._gain = np.asarray(camera.channel_gain, np.float32) * np.float32(camera.illumination * 255.0)

    def render(self, row0: int, col0: int) -> npt.NDArray[np.uint8]:
        """The (tile, tile, 3) block whose top-left is mosaic pixel (row0, col0)."""
        px, m, t = self.meta.pixel_size_um, self.optics.margin_px, self.tile
        x0 = self.meta.area.x_um + (col0 - m) * px
        y0 = self.meta.area.y_um + (row0 - m) * px
        trans = self.slide.transmittance(x0, y0, t + 2 * m, t + 2 * m, px)
        img = self.optics.image(trans, 0.0) * self._gain
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_truth(recording: Path, out: Path) -> tuple[int, int]:
    """Write the in-focus truth of ``recording``'s scanned area to ``out`` (tiled RGB TIFF).

    Returns (height, width). Raises RecordingError if the recording is not synthetic.
    """
    rec = Recording.open(recording)
    renderer = TruthRenderer(rec.meta)
    height, width = mosaic_shape(rec.meta)

    def tiles() -> Iterator[npt.NDArray[np.uint8]]:
        for r in range(0, height, TILE):
            for c in range(0, width, TILE):
                # tifffile zero-pads incomplete edge tiles; yield only the part inside the image.
                yield renderer.render(r, c)[: height - r, : width - c]

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial{out.suffix or '.tif'}")
    px_per_cm = 1e4 / rec.meta.pixel_size_um
    try:
        tifffile.imwrite(
            tmp,
            tiles(),
            shape=(height, width, 3),
            dtype=np.uint8,
            tile=(TILE, TILE),
            photometric="rgb",
            compression="zlib",
            bigtiff=height * width * 3 > 2**31,
            resolution=(px_per_cm, px_per_cm),
            resolutionunit="CENTIMETER",
            description=f"hw_sim truth of {Path(recording).name}; pixel (0,0) at stage "
            f"({rec.meta.area.x_um}, {rec.meta.area.y_um}) um; {rec.meta.pixel_size_um} um/px",
            metadata=None,
        )
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return height, width


# --------------------------------------------------------------------------- annotations
# The QuPath conventions (classes and colours, closed counter-clockwise rings, the streamed
# FeatureCollection) are the analysis's own (runtime.analysis.geojson): truth and results import
# into QuPath alike and can be compared class by class.

_NUCLEI_CHUNK_UM = 256.0  # nuclei are enumerated in squares of this size: memory stays bounded


def _slide_of(meta: RecordingMeta) -> SyntheticSlide:
    if meta.slide is None:
        raise RecordingError(
            "attrs.slide: missing; ground truth exists only for synthetic recordings (made by hw_sim synth)"
        )
    try:
        return make_slide(SlideSpec.from_dict(meta.slide))
    except (TypeError, ValueError) as err:
        raise RecordingError(f"attrs.slide: cannot rebuild the simulated slide ({err})") from err


def lesion_geometries(slide: SyntheticSlide, meta: RecordingMeta) -> list[tuple[Any, Any]]:
    """(lesion, shapely geometry in mosaic pixels) of every lesion and mimic with tissue in the
    mosaic, each clipped to its tissue piece and to the mosaic."""
    import shapely
    from shapely.geometry import Polygon, box

    if slide.lesions is None:
        return []
    px, ax, ay = meta.pixel_size_um, meta.area.x_um, meta.area.y_um
    height, width = mosaic_shape(meta)
    frame = box(0.0, 0.0, float(width), float(height))
    out = []
    for les in slide.lesions.lesions:
        star = Polygon((les.outline() - (ax, ay)) / px).buffer(0)  # buffer(0): valid even if the star self-touches
        star = star.intersection(frame)
        if star.is_empty:
            continue
        geom = star.intersection(_tissue_polygon(slide, meta, star.bounds))
        geom = shapely.make_valid(geom)
        polys = [g for g in getattr(geom, "geoms", [geom]) if isinstance(g, Polygon) and g.area > 0]
        if polys:
            out.append((les, shapely.MultiPolygon(polys) if len(polys) > 1 else polys[0]))
    return out


def _tissue_polygon(slide: SyntheticSlide, meta: RecordingMeta, bounds: tuple[float, float, float, float]) -> Any:
    """The tissue pieces (mask > 0.5, holes not removed) over ``bounds`` (mosaic pixels), traced
    on a grid of at most ~1000 x 1000 samples (step >= 0.5 µm): its outline is within half a
    step of the true edge."""
    import cv2
    from shapely.geometry import Polygon

    px, ax, ay = meta.pixel_size_um, meta.area.x_um, meta.area.y_um
    x0, y0, x1, y1 = (b * px for b in bounds)
    step = max(0.5, (x1 - x0) / 1000, (y1 - y0) / 1000)
    pad = 2 * step  # a margin of outside samples closes every contour
    nx, ny = math.ceil((x1 - x0 + 2 * pad) / step), math.ceil((y1 - y0 + 2 * pad) / step)
    xs = (ax + x0 - pad + (np.arange(nx) + 0.5) * step).astype(np.float64)
    ys = (ay + y0 - pad + (np.arange(ny) + 0.5) * step).astype(np.float64)
    mask = (slide._piece_mask_grid(xs, ys) > 0.5).astype(np.uint8)
    mask = np.pad(mask, 1)  # a ring of "no tissue" closes every contour (it then lies past the bounds)
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)

    def to_px(c: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        j, i = c[:, 0, 0].astype(np.float64) - 1, c[:, 0, 1].astype(np.float64) - 1
        return np.stack([(xs[0] + j * step - ax) / px, (ys[0] + i * step - ay) / px], axis=1)

    polys = []
    for k, c in enumerate(contours):
        if hierarchy[0][k][3] != -1 or len(c) < 3:
            continue  # a hole: added to its parent below
        holes = []
        child = hierarchy[0][k][2]
        while child != -1:
            if len(contours[child]) >= 3:
                holes.append(to_px(contours[child]))
            child = hierarchy[0][child][0]
        # The traced outline is a staircase of samples; simplifying within one step removes the stairs.
        polys.append(Polygon(to_px(c), holes).simplify(step / px).buffer(0))
    from shapely.ops import unary_union

    return unary_union(polys)


def lesion_features(slide: SyntheticSlide, meta: RecordingMeta) -> list[dict[str, Any]]:
    """The GeoJSON ``annotation`` features of the lesions and mimics (see the module docstring)."""
    mm2 = (meta.pixel_size_um / 1000.0) ** 2
    return [
        annotation(
            geom,
            TUMOR_CLASS if les.tumour else MIMIC_CLASS,
            {
                "Area mm^2": geom.area * mm2,
                "Max diameter mm": max_diameter(geom) * meta.pixel_size_um / 1000.0,
                "Grade": les.grade,
            },
            name=f"{'tumour' if les.tumour else 'mimic'} {les.index} ({les.pattern})",
            feature_id=f"lesion-{les.index}",
        )
        for les, geom in lesion_geometries(slide, meta)
    ]


def iter_nucleus_features(slide: SyntheticSlide, meta: RecordingMeta) -> Iterator[dict[str, Any]]:
    """A ``detection`` Point feature per nucleus inside the mosaic, enumerated chunk by chunk."""
    px, ax, ay = meta.pixel_size_um, meta.area.x_um, meta.area.y_um
    height, width = mosaic_shape(meta)
    w_um, h_um = width * px, height * px
    for y0 in np.arange(0.0, h_um, _NUCLEI_CHUNK_UM):
        for x0 in np.arange(0.0, w_um, _NUCLEI_CHUNK_UM):
            x1, y1 = min(x0 + _NUCLEI_CHUNK_UM, w_um), min(y0 + _NUCLEI_CHUNK_UM, h_um)
            cx, cy, tum = slide.nuclei(ax + x0, ay + y0, ax + x1, ay + y1)
            for x, y, t in zip((cx - ax) / px, (cy - ay) / px, tum, strict=True):
                yield detection_point(x, y, TUMOR_CLASS if t else OTHER_CLASS)


def write_annotations(recording: Path, out: Path, nuclei_out: Path | None = None) -> tuple[int, int]:
    """Write the tumour (and mimic) annotations and the nuclei of ``recording`` as GeoJSON.

    Nuclei go into ``out`` too, unless ``nuclei_out`` names a separate file. Returns (number of
    lesion and mimic annotations, number of nuclei). Raises RecordingError if the recording is
    not synthetic.
    """
    if nuclei_out is not None and Path(nuclei_out).resolve() == Path(out).resolve():
        raise ValueError(f"--nuclei {nuclei_out} is the annotations file itself; name another file or leave it out")
    meta = Recording.open(recording).meta
    slide = _slide_of(meta)
    lesions = lesion_features(slide, meta)
    counted = [0]

    def nuclei() -> Iterator[dict[str, Any]]:
        for f in iter_nucleus_features(slide, meta):
            counted[0] += 1
            yield f

    if nuclei_out is None:
        write_atomic(Path(out), itertools.chain(lesions, nuclei()))
    else:
        write_atomic(Path(nuclei_out), nuclei())
        write_atomic(Path(out), lesions)
    return len(lesions), counted[0]
