"""The streaming slide analyzer: rows of final slide pixels in, a grid of answers out.

:class:`SlideAnalyzer` is fed rows of pyramid levels (slide coordinates: the stitcher has
already placed every tile, so the scan and an archived slide take the same path) as they become
final, in order, in pieces of any size. It keeps only the rows the next band of work needs:

- **tumour grid** (the level nearest the tumour model's ``pixel_size_um``): the level is cut into
  square cells of ``patch_px`` model pixels; each cell's tissue fraction (optical density, cheap)
  decides whether it is tissue; only tissue cells are resampled to the model's pixel size and
  sent to the :class:`~runtime.analysis.types.TumourModel`, in batches. Glass is never sent.
- **nuclei** (the level nearest the nuclei model's): windows of ``nuclei_window`` model pixels
  (default: the whole number of the detector's own window steps nearest ``NUCLEI_REGION``, so it
  runs no partly wasted windows)
  with the model's ``halo_px`` of context on every side; a detection counts only in its window's
  core, so windows tile the slide without double counts or seams. Windows without tissue are
  skipped.

Cells and windows sit on fixed grids from the slide's origin and every batch is formed in the
same order, so the answer does not depend on how the rows were cut into pieces (a test checks
streaming equals the whole image). :meth:`SlideAnalyzer.finish` runs the slide model over the
tissue cells' embeddings and centres (µm) and returns a :class:`GridResult`; :func:`analyze_source`
drives it over a :class:`SlideSource` (a Zarr mosaic or a pyramidal TIFF) and
:func:`write_outputs` turns the result into the files (heatmap, annotations, nuclei, summary).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from runtime.analysis.baselines import (
    TISSUE_OD,
    LoGNuclei,
    MaxProbabilitySlide,
    NuclearDensityTumour,
    optical_density,
    tissue_fraction,
    total_od,
)
from runtime.analysis.heatmap import OVERLAY_MAX_PX
from runtime.analysis.types import F32, U8, NucleiModel, SlideModel, TumourModel

if TYPE_CHECKING:
    from runtime.analysis.lesion_head import LesionHead

log = logging.getLogger("wsi.analysis")

WHITE = 255  # what lies beyond the slide's edge: glass
NUCLEI_WINDOW = 256  # model px per nuclei region side for a detector without its own tiling (step_px 0)
# A detector with its own tiling: regions of whole window steps, about this many model px per side
# (a band of rows this tall is analysed as soon as it is final: larger regions leave more to the tail).
NUCLEI_REGION = 288

ANNOTATIONS_NAME = "annotations.geojson"
NUCLEI_NAME = "nuclei.geojson"
HEATMAP_NAME = "heatmap.ome.tif"
HEATMAP_PNG = "heatmap.png"
ATTENTION_PNG = "attention.png"
CAM_PNG = "cam.png"
SUMMARY_NAME = "analysis.json"
OUTPUT_THREADS = 3  # write_outputs: the heatmap and the two overlays beside the annotations


class AnalysisError(RuntimeError):
    """The analysis could not run (bad model folder, unreadable slide); the message says what."""


@dataclass(frozen=True)
class ModelSet:
    """The three models the analyzer runs, and their names for the report."""

    tumour: TumourModel
    nuclei: NucleiModel | None
    slide: SlideModel | None
    names: dict[str, str] = field(default_factory=dict)
    # Re-outlines lesions from a 1 µm read of the slide (runtime.analysis.lesion_head); None: off.
    lesion_head: LesionHead | None = None


def baseline_models() -> ModelSet:
    """The classical baselines (runtime.analysis.baselines): no model files needed."""
    return ModelSet(
        NuclearDensityTumour(),
        LoGNuclei(),
        MaxProbabilitySlide(),
        {"tumour": "baseline:nuclear_density", "nuclei": "baseline:log", "slide": "baseline:max_probability"},
    )


def _folder_name(model: object) -> str:
    folder = getattr(model, "folder", None)
    if folder is None:
        return type(model).__name__
    return f"{folder.path} ({str(getattr(folder, 'sha256', ''))[:12]})"


def load_models(
    tumour: str | Path | None = None,
    nuclei: str | Path | None = None,
    slide: str | Path | None = None,
    *,
    backend: str = "auto",
    with_nuclei: bool = True,
    lesion_head: bool = False,
) -> ModelSet:
    """The trained models (``runtime.analysis.models``; None or "builtin": the committed folders;
    ``slide`` "none": no slide model, the slide score is the max patch probability). Raises
    :class:`AnalysisError` naming the folder and the problem."""
    from runtime.analysis import models as trained

    def folder(v: str | Path | None) -> Path | None:
        return None if v is None or str(v) == "builtin" else Path(v)

    pref: Any = backend
    try:
        if str(slide) == "none":
            t = trained.load_tumour_model(folder(tumour), pref)
            n = trained.load_nuclei_model(folder(nuclei), pref) if with_nuclei else None
            s = None
        else:
            m = trained.load_analysis_models(folder(tumour), folder(nuclei), folder(slide), pref)
            t, n, s = m.tumour, m.nuclei, m.slide
    except Exception as err:  # ModelFolderError, InferenceError, OSError ...: each names the folder
        raise AnalysisError(f"analysis models: {err}") from err
    names = {"tumour": _folder_name(t), "slide": _folder_name(s) if s is not None else "max patch probability"}
    if with_nuclei and n is not None:
        names["nuclei"] = _folder_name(n)
    head = None
    if lesion_head:
        from runtime.analysis.lesion_head import load_lesion_head

        try:
            head = load_lesion_head(None, "ort_cpu" if backend == "tensorrt" else pref)
        except Exception as err:
            raise AnalysisError(f"analysis models: {err}") from err
        names["lesion_head"] = _folder_name(head)
    return ModelSet(t, n if with_nuclei else None, s, names, head)


@dataclass(frozen=True)
class SlideGeometry:
    """Level shapes (h, w) of a pyramid, level 0 first, and level 0's pixel size."""

    level_shapes: tuple[tuple[int, int], ...]
    pixel_size_um: float

    def downsample(self, k: int) -> float:
        """Level-0 pixels per level-``k`` pixel: the power of two the widths' ratio rounds to (a
        pyramid that halves and rounds up, like ours, is exactly 2^k: 701 px -> 351 px is 2, not
        1.997), else the ratio itself (a pyramid of other factors)."""
        ratio = self.level_shapes[0][1] / self.level_shapes[k][1]
        pow2 = 2.0 ** round(math.log2(ratio))
        return (
            pow2
            if abs(ratio / pow2 - 1.0) < 0.01 or abs(self.level_shapes[k][1] - self.level_shapes[0][1] / pow2) < 1
            else ratio
        )

    def level_for(self, want_um: float) -> tuple[int, float]:
        """The level to read for a model at ``want_um`` per pixel, and the resampling factor (model
        px / level px, >= 1 where a finer level exists: downsample, never upsample, the rest of the way)."""
        best = 0
        for k in range(len(self.level_shapes)):
            if self.pixel_size_um * self.downsample(k) <= want_um * 1.001:
                best = k
        return best, want_um / (self.pixel_size_um * self.downsample(best))


def tumour_grid(geometry: SlideGeometry, model: TumourModel, subdivide: int = 1) -> tuple[int, int, int]:
    """The level the tumour grid is cut from, the cell side and the patch side in that level's
    pixels (the patch is ``subdivide`` cells wide, centred on its cell)."""
    level, factor = geometry.level_for(model.pixel_size_um)
    cell = max(1, round(model.patch_px * factor / subdivide))
    return level, cell, cell * subdivide


@dataclass
class GridResult:
    """What the analyzer found, on the tumour grid (cells of ``cell_px`` level-0 pixels)."""

    shape: tuple[int, int]  # level 0 (h, w)
    pixel_size_um: float  # level 0
    cell_px: float  # level-0 pixels per grid cell
    probability: F32  # (gh, gw) tumour probability; 0 where not analysed
    tissue: F32  # (gh, gw) tissue fraction of the cell
    analysed: npt.NDArray[np.bool_]  # cells sent to the tumour model
    artifact: npt.NDArray[np.bool_]  # cells whose colour is not H&E (ink, folds)
    attention: F32  # (gh, gw) slide-model attention (0 where not analysed)
    slide_score: float
    nuclei: F32  # (K, 2) centroids (y, x) in level-0 pixel coordinates (pixel (i, j) covers [i, i+1) x [j, j+1))
    stats: dict[str, Any]

    @property
    def cell_um(self) -> float:
        return self.cell_px * self.pixel_size_um

    @property
    def max_probability(self) -> float:
        """The max-tile-probability slide score (the baseline aggregate)."""
        return float(self.probability.max()) if self.probability.size else 0.0


class _Rows:
    """Rows [y0, y0 + len) of one level, appended in order; older rows dropped on request."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.y0 = 0
        self.data = np.empty((0, width, 3), np.uint8)
        self.peak = 0

    @property
    def end(self) -> int:
        return self.y0 + self.data.shape[0]

    def append(self, y: int, rows: U8) -> None:
        if y != self.end:
            raise ValueError(f"rows must arrive in order: got row {y}, expected {self.end}")
        if rows.ndim != 3 or rows.shape[1] != self.width or rows.shape[2] != 3:
            raise ValueError(f"rows must be (n, {self.width}, 3) uint8, got {rows.shape}")
        self.data = np.concatenate([self.data, rows.astype(np.uint8, copy=False)]) if self.data.size else rows.copy()
        self.peak = max(self.peak, self.data.shape[0])

    def window(self, ya: int, yb: int, xa: int, xb: int) -> U8:
        """Rows [ya, yb) x columns [xa, xb), padded with glass outside the level (or past what arrived)."""
        out = np.full((yb - ya, xb - xa, 3), WHITE, np.uint8)
        sy0, sy1 = max(ya, self.y0), min(yb, self.end)
        sx0, sx1 = max(xa, 0), min(xb, self.width)
        if sy1 > sy0 and sx1 > sx0:
            out[sy0 - ya : sy1 - ya, sx0 - xa : sx1 - xa] = self.data[sy0 - self.y0 : sy1 - self.y0, sx0:sx1]
        return out

    def drop_before(self, y: int) -> None:
        if y > self.y0:
            cut = min(y, self.end) - self.y0
            self.data = self.data[cut:].copy() if cut < self.data.shape[0] else self.data[:0]
            self.y0 += cut


def _resize(img: U8, size: int) -> U8:
    """Square ``img`` resampled to ``size`` px (area average when shrinking)."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(img, (size, size), interpolation=interp), np.uint8)


def _tissue_and_artifact(patches: U8) -> tuple[F32, npt.NDArray[np.bool_]]:
    """Per patch (N, p, p, 3): the tissue fraction (total optical density > 0.25: glass reads
    ~0.1), and whether it looks like an artifact rather than H&E: very dark on average (ink,
    folds) or green-dominant (pen ink: H&E absorbs green most, so its green OD is highest)."""
    od = optical_density(patches)
    frac = (total_od(od) > TISSUE_OD).mean(axis=(1, 2)).astype(np.float32)
    mean_od = od.reshape(len(patches), -1, 3).mean(1)
    dark = mean_od.sum(1) > 2.2
    green_ink = (mean_od[:, 0] > mean_od[:, 1] + 0.15) & (mean_od[:, 2] > mean_od[:, 1] + 0.15)
    return frac, (dark | green_ink) & (frac > 0.5)


class SlideAnalyzer:
    """Streams a slide's levels through the models (see the module docstring)."""

    def __init__(
        self,
        geometry: SlideGeometry,
        models: ModelSet,
        *,
        batch_size: int = 64,
        nuclei_window: int | None = None,
        min_tissue: float = 0.1,
        nuclei: bool = True,
        beat: Callable[[], None] | None = None,
        subdivide: int = 1,
        pause: Callable[[], bool] | None = None,
    ) -> None:
        """``beat``: called between model calls (a worker's heartbeat). ``pause``: asked before each
        nuclei region and tumour band; True leaves the rest of the work for the next :meth:`feed` or
        :meth:`finish` (a worker hands the analyzer from one thread to another between them; the
        answer does not change). ``subdivide``: grid cells
        per patch side; 1 tiles the slide with patches, 2 moves the patch by half its width (a grid
        twice as fine, four times the model calls; the slide model still sees the non-overlapping
        patches only, as it was trained)."""
        self.geometry = geometry
        self._beat = beat or (lambda: None)
        self._pause = pause or (lambda: False)
        self.models = models
        self.batch_size = max(1, batch_size)
        self.min_tissue = min_tissue
        if subdivide < 1:
            raise ValueError(f"subdivide must be >= 1, got {subdivide}")
        self.subdivide = subdivide
        self.t_level, self.cell_l, self.patch_l = tumour_grid(geometry, models.tumour, subdivide)
        self.margin_l = (self.patch_l - self.cell_l) // 2  # the patch reaches this far beyond its cell
        self.t_ds = geometry.downsample(self.t_level)
        th, tw = geometry.level_shapes[self.t_level]
        self.grid_shape = (math.ceil(th / self.cell_l), math.ceil(tw / self.cell_l))
        gh, gw = self.grid_shape
        self.probability = np.zeros((gh, gw), np.float32)
        self.tissue = np.zeros((gh, gw), np.float32)
        self.analysed = np.zeros((gh, gw), bool)
        self.artifact = np.zeros((gh, gw), bool)
        self._t_rows = _Rows(tw)
        self._t_band = 0
        self._pending: list[tuple[int, int, U8]] = []
        self._embeddings: list[F32] = []
        self._cells: list[tuple[int, int]] = []
        self.stats: dict[str, Any] = {
            "patches": 0,
            "tumour_s": 0.0,
            "nuclei_s": 0.0,
            "windows": 0,
            "windows_run": 0,
            "subdivide": subdivide,
        }
        # Nuclei
        self.nuclei_model = models.nuclei if nuclei else None
        self._n_rows: _Rows | None = None
        self._centroids: list[F32] = []
        if self.nuclei_model is not None:
            n = self.nuclei_model
            self.n_level, self.n_factor = geometry.level_for(n.pixel_size_um)
            self.n_ds = geometry.downsample(self.n_level)
            if nuclei_window is None:  # whole detector steps, ~NUCLEI_REGION: 3 of a 128-px window, 1 of a 320-px one
                nuclei_window = n.step_px * max(1, round(NUCLEI_REGION / n.step_px)) if n.step_px > 0 else NUCLEI_WINDOW
            self.win_l = max(8, round(nuclei_window * self.n_factor))
            self.halo_l = math.ceil(n.halo_px * self.n_factor)
            nh, nw = geometry.level_shapes[self.n_level]
            self._n_rows = _Rows(nw)
            self._n_band = 0
            self._n_x = 0  # the next region's column in the band (a pause may leave a band half done)
            self._n_bands = math.ceil(nh / self.win_l)
        self._finished = False

    # -- feeding --------------------------------------------------------------------------
    @property
    def levels(self) -> tuple[int, ...]:
        """The pyramid levels this analyzer reads (feed rows of these; others are ignored)."""
        lv = {self.t_level}
        if self._n_rows is not None:
            lv.add(self.n_level)
        return tuple(sorted(lv))

    def rows_needed(self, level: int) -> int:
        """Rows of ``level`` received so far (the next :meth:`feed` must start there)."""
        if level == self.t_level:
            return self._t_rows.end
        assert self._n_rows is not None and level == self.n_level
        return self._n_rows.end

    @property
    def buffered_rows(self) -> int:
        """The most rows any level's buffer has held (bounded by a band, not by the slide)."""
        return max(self._t_rows.peak, self._n_rows.peak if self._n_rows is not None else 0)

    def feed(self, level: int, y0: int, rows: U8) -> None:
        """Rows [y0, y0 + len(rows)) of ``level`` (uint8 RGB), final; in order per level."""
        if self._finished:
            raise RuntimeError("feed after finish")
        if level == self.t_level:
            self._t_rows.append(y0, rows)
            self._tumour_bands(final=False)
        if self._n_rows is not None and level == self.n_level:
            self._n_rows.append(y0, rows)
            self._nuclei_bands(final=False)

    def finish(self) -> GridResult:
        """Flush the last bands (padded with glass), run the slide model, return the grid."""
        if not self._finished:
            self._pause = lambda: False  # everything now
            self._tumour_bands(final=True)
            self._run_batch()
            if self._n_rows is not None:
                self._nuclei_bands(final=True)
            self._finished = True
        gh, gw = self.grid_shape
        attention = np.zeros((gh, gw), np.float32)
        score = self.max_probability
        t0 = time.perf_counter()
        if self.models.slide is not None and self._cells:
            emb = np.concatenate(self._embeddings)
            cells = np.asarray(self._cells, np.float32)
            # Patch centres in µm: the centre of the cell each patch is centred on.
            coords = (cells + 0.5) * np.float32(self.cell_l * self.t_ds * self.geometry.pixel_size_um)
            out = self.models.slide.predict(emb, coords.astype(np.float32))
            score = float(out.score)
            attention[cells[:, 0].astype(int), cells[:, 1].astype(int)] = out.attention
        self.stats["slide_s"] = time.perf_counter() - t0
        self.stats["buffered_rows"] = self.buffered_rows
        nuclei = np.concatenate(self._centroids) if self._centroids else np.zeros((0, 2), np.float32)
        return GridResult(
            shape=self.geometry.level_shapes[0],
            pixel_size_um=self.geometry.pixel_size_um,
            cell_px=self.cell_l * self.t_ds,
            probability=self.probability,
            tissue=self.tissue,
            analysed=self.analysed,
            artifact=self.artifact,
            attention=attention,
            slide_score=score,
            nuclei=nuclei.astype(np.float32),
            stats=dict(self.stats),
        )

    @property
    def max_probability(self) -> float:
        return float(self.probability.max()) if self.probability.size else 0.0

    # -- tumour grid ----------------------------------------------------------------------
    def _tumour_bands(self, final: bool) -> None:
        c, p, m, (gh, gw) = self.cell_l, self.patch_l, self.margin_l, self.grid_shape
        while self._t_band < gh and (self._t_rows.end >= self._t_band * c - m + p or final):
            if self._pause():
                return
            b = self._t_band
            # The band of patches centred on this row of cells: cell j's patch is columns
            # [j*c - m, j*c - m + p) of the level (glass beyond its edges).
            band = self._t_rows.window(b * c - m, b * c - m + p, -m, (gw - 1) * c - m + p)
            cells = band[m : m + c, m : m + gw * c].reshape(c, gw, c, 3).transpose(1, 0, 2, 3)
            frac, art = _tissue_and_artifact(cells)
            self.tissue[b] = frac
            self.artifact[b] = art
            for j in np.nonzero(frac >= self.min_tissue)[0]:
                patch = _resize(np.ascontiguousarray(band[:, j * c : j * c + p]), self.models.tumour.patch_px)
                self._pending.append((b, int(j), patch))
                if len(self._pending) >= self.batch_size:
                    self._run_batch()
            self._t_band += 1
            self._t_rows.drop_before(self._t_band * c - m)

    def _run_batch(self) -> None:
        if not self._pending:
            return
        batch = np.stack([p for _, _, p in self._pending])
        t0 = time.perf_counter()
        out = self.models.tumour.predict(batch)
        self.stats["tumour_s"] += time.perf_counter() - t0
        self.stats["patches"] += len(batch)
        self._beat()
        emb = np.asarray(out.embedding, np.float32)
        keep = []
        for k, (i, j, _) in enumerate(self._pending):
            self.probability[i, j] = out.probability[k]
            self.analysed[i, j] = True
            if i % self.subdivide == 0 and j % self.subdivide == 0:  # the slide model's bag: non-overlapping patches
                self._cells.append((i, j))
                keep.append(k)
        self._embeddings.append(emb[keep])
        self._pending = []

    # -- nuclei ---------------------------------------------------------------------------
    def _nuclei_bands(self, final: bool) -> None:
        rows, model = self._n_rows, self.nuclei_model
        assert rows is not None and model is not None
        w, h, f = self.win_l, self.halo_l, self.n_factor
        while self._n_band < self._n_bands and (rows.end >= (self._n_band + 1) * w + h or final):
            b = self._n_band
            while self._n_x < rows.width:
                if self._pause():
                    return
                x0 = self._n_x
                self._n_x += w
                self.stats["windows"] += 1
                core = rows.window(b * w, (b + 1) * w, x0, x0 + w)
                if tissue_fraction(core) < 0.01:
                    continue
                self.stats["windows_run"] += 1
                region = rows.window(b * w - h, (b + 1) * w + h, x0 - h, x0 + w + h)
                size = round(region.shape[0] / f)
                t0 = time.perf_counter()
                found = np.asarray(model.detect(_resize(region, size)), np.float32).reshape(-1, 2)
                self.stats["nuclei_s"] += time.perf_counter() - t0
                self._beat()
                scale = region.shape[0] / size
                # Region pixel index -> level pixel coordinates (centre of pixel i is i + 0.5).
                yy = (found[:, 0] + 0.5) * scale + (b * w - h)
                xx = (found[:, 1] + 0.5) * scale + (x0 - h)
                keep = (yy >= b * w) & (yy < (b + 1) * w) & (xx >= x0) & (xx < x0 + w)
                if keep.any():
                    self._centroids.append((np.stack([yy[keep], xx[keep]], axis=1) * self.n_ds).astype(np.float32))
            self._n_x = 0
            self._n_band += 1
            rows.drop_before(self._n_band * w - h)


# --------------------------------------------------------------------------- sources


class SlideSource(Protocol):
    """A pyramidal slide the analyzer can read level rows from."""

    @property
    def geometry(self) -> SlideGeometry: ...

    def read_rows(self, level: int, y0: int, y1: int) -> U8:
        """Rows [y0, y1) of ``level`` as (n, w, 3) uint8 RGB."""
        ...

    def thumbnail(self, max_px: int) -> U8:
        """The coarsest level no larger than ``max_px`` on a side (or the coarsest), RGB."""
        ...


class MosaicSource:
    """Rows of the runtime's Zarr mosaic (:class:`~runtime.output.mosaic_store.MosaicStore`)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    @property
    def geometry(self) -> SlideGeometry:
        return SlideGeometry(tuple(tuple(s) for s in self.store.level_shapes), float(self.store.pixel_size_um))

    def read_rows(self, level: int, y0: int, y1: int) -> U8:
        return np.asarray(self.store.level(level)[y0:y1], np.uint8)

    def read_region(self, level: int, y0: int, y1: int, x0: int, x1: int) -> U8:
        """Rows [y0, y1), columns [x0, x1) of ``level``: only the chunks under it are read (the lesion
        head's windows; :func:`runtime.analysis.lesion_head.read_window`)."""
        return np.asarray(self.store.level(level)[y0:y1, x0:x1], np.uint8)

    def thumbnail(self, max_px: int) -> U8:
        shapes = self.store.level_shapes
        k = next((i for i, (h, w) in enumerate(shapes) if max(h, w) <= max_px), len(shapes) - 1)
        return np.asarray(self.store.level(k)[:], np.uint8)


class TiffSource:
    """Rows of a pyramidal TIFF (our OME-TIFF, SVS, generic tiled pyramids) through tifffile."""

    def __init__(self, path: Path) -> None:
        import tifffile

        self.path = Path(path)
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
        except Exception as err:  # tifffile raises many kinds for a file that is not a TIFF
            raise AnalysisError(f"{path}: not a readable TIFF ({err})") from None
        self._levels = [lv for lv in series.levels]
        shapes = []
        for lv in self._levels:
            if lv.axes != "YXS" or lv.shape[2] != 3:
                raise AnalysisError(f"{path}: a level of axes {lv.axes} {lv.shape} is not interleaved RGB (YXS)")
            shapes.append((int(lv.shape[0]), int(lv.shape[1])))
        self._geometry = SlideGeometry(tuple(shapes), self._pixel_size())
        self._zarr: list[Any] = []

    def _pixel_size(self) -> float:
        tif = self._tif
        if tif.is_ome and tif.ome_metadata:
            import re

            m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
            if m:
                return float(m.group(1))
        page = tif.pages.first
        desc = page.description or ""
        if "MPP" in desc:  # Aperio SVS: "... |MPP = 0.2520|"
            import re

            m = re.search(r"MPP\s*=\s*([0-9.]+)", desc)
            if m:
                return float(m.group(1))
        tags = page.tags
        if "XResolution" in tags and "ResolutionUnit" in tags:
            num, den = tags["XResolution"].value
            unit = int(tags["ResolutionUnit"].value)
            per = {2: 25400.0, 3: 10000.0}.get(unit)
            if per and num:
                return float(per * den / num)
        raise AnalysisError(f"{self.path}: no pixel size (OME PhysicalSizeX, SVS MPP or a TIFF resolution)")

    @property
    def geometry(self) -> SlideGeometry:
        return self._geometry

    def _array(self, level: int) -> Any:
        import zarr

        if not self._zarr:
            root = zarr.open(self._tif.series[0].aszarr(), mode="r")
            self._zarr = [root] if isinstance(root, zarr.Array) else [root[str(k)] for k in range(len(self._levels))]
        return self._zarr[level]

    def read_rows(self, level: int, y0: int, y1: int) -> U8:
        return np.asarray(self._array(level)[y0:y1], np.uint8)

    def read_region(self, level: int, y0: int, y1: int, x0: int, x1: int) -> U8:
        """Rows [y0, y1), columns [x0, x1) of ``level`` (only the tiles under it are decoded)."""
        return np.asarray(self._array(level)[y0:y1, x0:x1], np.uint8)

    def thumbnail(self, max_px: int) -> U8:
        shapes = self._geometry.level_shapes
        k = next((i for i, (h, w) in enumerate(shapes) if max(h, w) <= max_px), len(shapes) - 1)
        return self.read_rows(k, 0, shapes[k][0])

    def close(self) -> None:
        self._tif.close()


def analyze_source(
    source: SlideSource,
    models: ModelSet,
    *,
    band_rows: int = 512,
    batch_size: int = 64,
    nuclei: bool = True,
    progress: Callable[[], None] | None = None,
    subdivide: int = 1,
) -> GridResult:
    """Feed ``source``'s levels to a :class:`SlideAnalyzer` band by band and return its grid."""
    an = SlideAnalyzer(source.geometry, models, batch_size=batch_size, nuclei=nuclei, subdivide=subdivide)
    for level in an.levels:
        h = source.geometry.level_shapes[level][0]
        for y in range(0, h, band_rows):
            an.feed(level, y, source.read_rows(level, y, min(h, y + band_rows)))
            if progress is not None:
                progress()
    return an.finish()


# --------------------------------------------------------------------------- outputs


def head_outlined(
    result: GridResult, models: ModelSet, source: SlideSource | None, *, threshold: float = 0.5
) -> tuple[list[Any], dict[str, Any]]:
    """The slide's lesions as the tumour model's outline fit draws them, then, with a lesion head and
    a ``source`` to read, each re-outlined from a 1 µm read of its window or mosaic of windows
    (:func:`runtime.analysis.lesion_head.reoutline`), a lesion in which the head finds less than its
    ``min_um2`` of tumour dropped (the head's veto); and the re-outline's stats (empty without a head).
    The first step of :func:`slide_lesions`, which does not depend on the faint threshold: a caller
    trying several thresholds runs it once."""
    from runtime.analysis import lesions

    found = lesions.model_lesions(result, models.tumour, threshold=threshold)  # with the model's outline fit
    if models.lesion_head is None or source is None:
        return found, {}
    from runtime.analysis.lesion_head import reoutline

    head = models.lesion_head
    return reoutline(source, found, head, result.pixel_size_um, veto_min_um2=head.faint_min_um2)


def slide_lesions(
    result: GridResult,
    models: ModelSet,
    source: SlideSource | None,
    *,
    threshold: float = 0.5,
    faint_threshold: float | None = None,
    outlined: tuple[list[Any], dict[str, Any]] | None = None,
) -> list[Any]:
    """The slide's lesions (:func:`head_outlined`), and the map's faint regions where the head finds
    tumour added after them (:func:`runtime.analysis.lesion_head.confirm_faint`).
    Its counts go to ``result.stats`` (``lesion_head_calls``, ``lesion_head_windows``, ``lesion_head_reoutlined``,
    ``lesion_head_vetoed``, ``lesion_head_glass_filled``, ``lesion_head_added``, ``lesion_head_s``).
    ``faint_threshold``: the faint regions' threshold (default: the head's own,
    :func:`runtime.analysis.lesion_head.faint_settings`).
    ``outlined``: :func:`head_outlined`'s answer for the same result, models and threshold, if the caller
    has it (it is not computed again)."""
    found, st = outlined if outlined is not None else head_outlined(result, models, source, threshold=threshold)
    if models.lesion_head is None or source is None:
        return found
    from runtime.analysis.lesion_head import confirm_faint

    found, faint = confirm_faint(source, result, found, models.lesion_head, threshold=threshold, low=faint_threshold)
    result.stats["lesion_head_calls"] = st["calls"] + faint["calls"]
    result.stats["lesion_head_windows"] = st["windows"] + faint["calls"]  # one window per faint region
    result.stats["lesion_head_reoutlined"] = st["reoutlined"]
    result.stats["lesion_head_vetoed"] = st["vetoed"]
    result.stats["lesion_head_glass_filled"] = st["glass_filled"]
    result.stats["lesion_head_added"] = faint["added"]
    result.stats["lesion_head_s"] = st["s"] + faint["s"]
    return found


def write_outputs(
    out_dir: Path,
    result: GridResult,
    models: ModelSet,
    thumbnail: U8 | None = None,
    *,
    threshold: float = 0.5,
    source: SlideSource | None = None,
) -> dict[str, Any]:
    """Write the heatmap, the overlays, the annotations and the nuclei into ``out_dir``; return
    the summary (the report's ``analysis``), also written as ``analysis.json``. ``source``: the
    slide, read again for the lesion head's windows (without it the head does not run)."""
    from runtime.analysis import geojson, heatmap, lesions, summary

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The image files do not need the lesions and encode mostly outside the GIL (zlib, OpenCV):
    # written on threads beside the lesions and GeoJSON, the scan waits for the longest, not the sum.
    with ThreadPoolExecutor(OUTPUT_THREADS, thread_name_prefix="analysis-out") as pool:
        images = [
            pool.submit(heatmap.write_heatmap, out_dir / HEATMAP_NAME, result),
            *(
                pool.submit(heatmap.write_overlay, out_dir / name, values, result.analysed, thumbnail, result.shape)
                for name, values in (
                    (HEATMAP_PNG, result.probability),
                    (ATTENTION_PNG, heatmap.normalised_attention(result)),
                )
            ),
        ]
        found = slide_lesions(result, models, source, threshold=threshold)
        regions = lesions.region_features(result, found)
        geojson.write_atomic(out_dir / ANNOTATIONS_NAME, regions)
        n_nuclei = geojson.write_atomic(out_dir / NUCLEI_NAME, lesions.nuclei_features(result, found))
        for f in images:
            f.result()  # an image that failed fails the outputs, as before
    summ = summary.summarize(result, found, models.names)
    summ["files"] = {
        "annotations": ANNOTATIONS_NAME,
        "nuclei": NUCLEI_NAME if n_nuclei or models.nuclei is not None else None,
        "heatmap": HEATMAP_NAME,
        "heatmap_png": HEATMAP_PNG,
        "attention_png": ATTENTION_PNG,
    }
    summ["timing_s"]["outputs"] = round(time.perf_counter() - t0, 3)
    tmp = out_dir / f".{SUMMARY_NAME}.partial"
    tmp.write_text(json.dumps(summ, indent=2), encoding="utf-8")
    os.replace(tmp, out_dir / SUMMARY_NAME)
    return summ


def analyze_file(
    slide: Path,
    out_dir: Path,
    models: ModelSet,
    *,
    nuclei: bool = True,
    batch_size: int = 64,
    cam: int = 0,
    subdivide: int = 1,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """``python -m runtime analyze``: the same analysis on an existing pyramidal TIFF (``cam``:
    also the class-activation view of that many top patches, ``cam.png``)."""
    t0 = time.perf_counter()
    src = TiffSource(slide)
    try:
        result = analyze_source(src, models, batch_size=batch_size, nuclei=nuclei, subdivide=subdivide)
        result.stats["analysis_s"] = time.perf_counter() - t0
        thumb = src.thumbnail(OVERLAY_MAX_PX)
        summ = write_outputs(out_dir, result, models, thumb, threshold=threshold, source=src)
        if cam > 0:
            write_cam(src, result, models.tumour, out_dir, cam)
            summ["files"]["cam_png"] = CAM_PNG
    finally:
        src.close()
    summ["slide"] = str(slide)
    return summ


def top_patches(
    source: SlideSource, result: GridResult, model: TumourModel, k: int, subdivide: int = 1
) -> list[tuple[U8, float]]:
    """The ``k`` analysed cells of highest tumour probability, their patches read again from
    ``source`` and resampled as the model saw them, with their probabilities."""
    level, cell, patch_l = tumour_grid(source.geometry, model, subdivide)
    m = (patch_l - cell) // 2
    prob = np.where(result.analysed, result.probability, -1.0)
    order = np.argsort(prob, axis=None)[::-1][:k]
    h, w = source.geometry.level_shapes[level]
    out = []
    for flat in order:
        i, j = divmod(int(flat), prob.shape[1])
        if prob[i, j] < 0:
            break
        y0, x0 = i * cell - m, j * cell - m
        rows = source.read_rows(level, max(0, y0), min(h, y0 + patch_l))
        patch = np.full((patch_l, patch_l, 3), WHITE, np.uint8)
        part = rows[:, max(0, x0) : min(w, x0 + patch_l)]
        oy, ox = max(0, y0) - y0, max(0, x0) - x0
        patch[oy : oy + part.shape[0], ox : ox + part.shape[1]] = part
        out.append((_resize(patch, model.patch_px), float(result.probability[i, j])))
    return out


def write_cam(source: SlideSource, result: GridResult, model: TumourModel, out_dir: Path, k: int) -> Path:
    """``cam.png``: the class-activation view of the ``k`` most tumour-like patches."""
    from runtime.analysis.heatmap import occlusion_map
    from runtime.analysis.heatmap import write_cam as write_montage

    found = top_patches(source, result, model, k, int(result.stats.get("subdivide", 1)))
    if not found:
        raise AnalysisError("no tissue patch for the class-activation view")
    maps = [occlusion_map(model, p) for p, _ in found]
    return write_montage(Path(out_dir) / CAM_PNG, [p for p, _ in found], maps, [pr for _, pr in found])


def iter_bands(height: int, band: int) -> Iterator[tuple[int, int]]:
    """(y0, y1) bands of ``band`` rows covering [0, height)."""
    for y in range(0, height, band):
        yield y, min(height, y + band)


def as_rows(img: U8, pieces: Sequence[int]) -> Iterator[tuple[int, U8]]:
    """``img`` cut into consecutive row pieces of the given sizes (the rest as one piece)."""
    y = 0
    for n in pieces:
        if y >= img.shape[0]:
            return
        yield y, img[y : y + n]
        y += n
    if y < img.shape[0]:
        yield y, img[y:]
