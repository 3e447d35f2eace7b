"""Every reader the field uses, asked the same questions about one slide.

For each reader: how many levels, each level's (width, height), the downsample
it derives, the pixel size it reports, and the pixels of the smallest level
(compared across readers). Each ``check_*`` asserts the reader agrees with the
expected pyramid and returns what it saw, so a test can print or compare it.

OpenSlide (``openslide-python`` + the ``openslide-bin`` wheel), tiffslide,
wsidicom (DICOM WSI; OpenSlide 4 reads that too) and ome-zarr (the NGFF copy)
are in the ``test`` extra and imported unconditionally: a missing one fails
loudly. pyvips needs the system's libvips (``apt-get install libvips42``);
without it :func:`pyvips_or_skip` skips with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import openslide
import pytest
import tifffile
import tiffslide
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader as NgffReader
from wsidicom import WsiDicom

from tests import bioformats


@dataclass(frozen=True)
class Seen:
    """What one reader reports: (width, height) per level, full resolution first, and µm per pixel."""

    sizes: list[tuple[int, int]]
    mpp: float | None
    smallest: np.ndarray | None = None  # the last level's RGB pixels, (h, w, 3) uint8


def expected_sizes(height: int, width: int, n_levels: int) -> list[tuple[int, int]]:
    """(width, height) of each level: halved, rounded up (the mosaic's rule)."""
    return [(-(-width // 2**k), -(-height // 2**k)) for k in range(n_levels)]


def _check(name: str, seen: Seen, sizes: list[tuple[int, int]], mpp: float | None) -> Seen:
    assert seen.sizes == sizes, f"{name}: levels {seen.sizes}, expected {sizes}"
    if mpp is not None:
        assert seen.mpp is not None, f"{name}: no pixel size"
        assert seen.mpp == pytest.approx(mpp, rel=1e-6), f"{name}: pixel size {seen.mpp}, expected {mpp}"
    return seen


def check_openslide(path: Path, sizes: list[tuple[int, int]], mpp: float, vendor: str = "generic-tiff") -> Seen:
    """OpenSlide 4: every level, ``openslide.mpp-x/y``. ``generic-tiff``: the levels in the top-level IFD
    chain; ``dicom``: ``path`` is one file of a DICOM WSI series, the others beside it."""
    with openslide.OpenSlide(str(path)) as slide:
        props = slide.properties
        assert props[openslide.PROPERTY_NAME_VENDOR] == vendor
        dims = [(int(w), int(h)) for w, h in slide.level_dimensions]
        # OpenSlide derives each downsample from the level's size: the mean of the two axes' ratios.
        for (w, h), ds in zip(dims, slide.level_downsamples, strict=True):
            assert ds == pytest.approx((dims[0][0] / w + dims[0][1] / h) / 2)
        assert float(props[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(mpp)
        k = slide.level_count - 1
        smallest = np.asarray(slide.read_region((0, 0), k, slide.level_dimensions[k]).convert("RGB"))
        seen = Seen(dims, float(props[openslide.PROPERTY_NAME_MPP_X]), smallest)
    return _check("openslide", seen, sizes, mpp)


def check_wsidicom(folder: Path, sizes: list[tuple[int, int]], mpp: float) -> Seen:
    """wsidicom: the DICOM WSI series in ``folder``, each level's size and pixel spacing (µm)."""
    with WsiDicom.open(folder) as slide:
        levels = slide.levels
        dims = [(lvl.size.width, lvl.size.height) for lvl in levels]
        for k, lvl in enumerate(levels):
            assert lvl.mpp is not None, f"wsidicom level {k}: no pixel spacing"
            assert (lvl.mpp.width, lvl.mpp.height) == pytest.approx((mpp * 2**k, mpp * 2**k)), f"level {k} mpp"
        last = levels[-1]
        smallest = np.asarray(slide.read_region((0, 0), last.level, last.size.to_tuple()).convert("RGB"))
        seen = Seen(dims, levels[0].mpp.width if levels[0].mpp else None, smallest)
    return _check("wsidicom", seen, sizes, mpp)


def check_ome_zarr(path: Path, sizes: list[tuple[int, int]], mpp: float) -> Seen:
    """ome-zarr-py's reader: one multiscales image, axes c/y/x in micrometres, each level's shape and scale."""
    nodes = list(NgffReader(parse_url(str(path)))())
    assert nodes, f"ome-zarr found no image in {path}"
    image = nodes[0]
    axes = [(a["name"], a.get("unit")) for a in image.metadata["axes"]]
    assert axes == [("c", None), ("y", "micrometer"), ("x", "micrometer")], axes
    dims, scales = [], []
    for k, (data, transforms) in enumerate(zip(image.data, image.metadata["coordinateTransformations"], strict=True)):
        assert data.shape[0] == 3 and data.dtype == np.uint8, f"ome-zarr level {k}: {data.shape} {data.dtype}"
        dims.append((int(data.shape[2]), int(data.shape[1])))
        (scale,) = [t["scale"] for t in transforms if t["type"] == "scale"]
        assert scale[1:] == pytest.approx([mpp * 2**k] * 2), f"ome-zarr level {k} scale {scale}"
        scales.append(float(scale[2]))
    smallest = np.asarray(image.data[-1]).transpose(1, 2, 0)
    return _check("ome-zarr", Seen(dims, scales[0], smallest), sizes, mpp)


def check_tiffslide(path: Path, sizes: list[tuple[int, int]], mpp: float) -> Seen:
    """tiffslide (OpenSlide's API on tifffile): the OME series' levels, ``tiffslide.mpp-x/y``."""
    with tiffslide.TiffSlide(str(path)) as slide:
        props = slide.properties
        dims = [(int(w), int(h)) for w, h in slide.level_dimensions]
        assert float(props["tiffslide.mpp-y"]) == pytest.approx(mpp)
        k = slide.level_count - 1
        smallest = np.asarray(slide.read_region((0, 0), k, slide.level_dimensions[k]).convert("RGB"))
        seen = Seen(dims, float(props["tiffslide.mpp-x"]), smallest)
    return _check("tiffslide", seen, sizes, mpp)


def check_tifffile(path: Path, sizes: list[tuple[int, int]], mpp: float) -> Seen:
    """tifffile: one OME series whose levels are the SubIFDs; per-level resolution tags; OME PhysicalSize."""
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and len(tif.series) == 1, [s.name for s in tif.series]
        levels = tif.series[0].levels
        dims = [(int(lvl.shape[1]), int(lvl.shape[0])) for lvl in levels]
        for k, lvl in enumerate(levels):
            page = lvl.keyframe
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            num, den = page.tags["XResolution"].value
            assert 1e4 * den / num == pytest.approx(mpp * 2**k, rel=1e-6), f"level {k} resolution"
        ome = tif.ome_metadata or ""
        px = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', ome)
        smallest = levels[-1].asarray()
    return _check("tifffile", Seen(dims, float(px.group(1)) if px else None, smallest), sizes, mpp)


def check_bioformats(path: Path, sizes: list[tuple[int, int]], mpp: float) -> Seen:
    """Bio-Formats: one series with ``len(sizes)`` resolutions, each its size; PhysicalSizeX from the OME-XML."""
    if bioformats.java() is None:
        pytest.skip("java is not installed")
    series, resolutions, size_x = bioformats.bioformats_pyramid(path)
    assert series == 1, f"Bio-Formats sees {series} series (unflattened); expected 1"
    assert resolutions == len(sizes), f"Bio-Formats sees {resolutions} resolutions"
    return _check("bioformats", Seen(bioformats.bioformats_level_sizes(path), size_x), sizes, mpp)


def pyvips_or_skip() -> ModuleType:
    """The pyvips module, or skip: it needs the system's libvips (``apt-get install libvips42``)."""
    try:
        import pyvips
    except (ImportError, OSError) as err:  # no binding, or the binding found no libvips
        pytest.skip(f"pyvips is not usable (pip install pyvips; apt-get install libvips42): {err}")
    module: ModuleType = pyvips
    return module


def check_pyvips(path: Path, sizes: list[tuple[int, int]], mpp: float) -> Seen:
    """libvips' TIFF loader: the main image plus ``subifd=k`` per lower level; xres in pixels per mm.

    Also the top-level pages (``page=k``), which are the chained copies when the slide has them.
    """
    pyvips = pyvips_or_skip()
    base = pyvips.Image.tiffload(str(path))
    n_sub = base.get("n-subifds") if base.get_typeof("n-subifds") else 0
    levels = [base] + [pyvips.Image.tiffload(str(path), subifd=k) for k in range(n_sub)]
    dims = [(lvl.width, lvl.height) for lvl in levels]
    for k, lvl in enumerate(levels):
        assert 1e3 / lvl.xres == pytest.approx(mpp * 2**k, rel=1e-6), f"pyvips level {k} xres {lvl.xres}"
    smallest = np.ndarray(
        buffer=levels[-1].write_to_memory(), dtype=np.uint8, shape=(levels[-1].height, levels[-1].width, 3)
    )
    return _check("pyvips", Seen(dims, 1e3 / base.xres, smallest), sizes, mpp)


def pyvips_pages(path: Path) -> list[tuple[int, int]]:
    """(width, height) of every top-level IFD as libvips' ``page=`` sees them."""
    pyvips = pyvips_or_skip()
    base = pyvips.Image.tiffload(str(path))
    n = base.get("n-pages") if base.get_typeof("n-pages") else 1
    return [(im.width, im.height) for im in (pyvips.Image.tiffload(str(path), page=k) for k in range(n))]


READERS = {
    "openslide": check_openslide,
    "tiffslide": check_tiffslide,
    "tifffile": check_tifffile,
    "bioformats": check_bioformats,
    "pyvips": check_pyvips,
}
"""Name -> check; each skips (with the reason) when its reader cannot run here."""
