"""Slide content the models never trained on: real images and textures, imaged by the same optics.

The simulator's procedural H&E (:class:`hw_sim.slide.SyntheticSlide`) is what every committed model
was trained on, so scoring them only on it would let them pass by knowing the generator. This
module puts other content under the same pupil optics, camera and stage: an :class:`ImageSlide`
is a :class:`~hw_sim.slide.SyntheticSlide` (same layout, focus surface, artifacts) whose
transmittance comes from an RGB image instead of the procedural stain model.

Images that ship inside public packages (no download at run time):

=============  ==============================================================  ===============
name           what                                                            licence
=============  ==============================================================  ===============
``ihc``        colonic glands, IHC (DAB) with haematoxylin counterstain,       "no known
               real tissue (scikit-image ``data/ihc.png``, CMMI)               copyright
                                                                               restrictions"
``brick``      brick wall texture (scikit-image, CC0Textures)                  CC0
``gravel``     gravel texture (scikit-image, CC0Textures)                      CC0
``grass``      grass texture (scikit-image, CC0Textures)                       CC0
=============  ==============================================================  ===============

scikit-image is needed only for these names (the ``bench`` and ``export`` extras install it); any
RGB image file works as ``file:PATH``. The image is tiled by mirroring, so any area can be scanned,
and mapped to the slide at ``image_px_um`` micrometres per image pixel: ``SlideSpec.content_px_um``, else
a ``@UM`` suffix on the name (``file:PATH@0.25``, ``ihc@0.25``: the image's own sampling, so a benchmark
that takes content names shows a real 40x image at 40x), else :data:`DEFAULT_IMAGE_PX_UM` (0.5 for files).
``SlideSpec.content_region`` (``left``, ``right``, ``top``, ``bottom``) shows one half of the image
instead, tiled the same way: slides of opposite halves show disjoint pixels of it (a calibration that
never saw the scored content).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt

from hw_sim.slide import CONTENT_REGIONS, SlideSpec, SyntheticSlide

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

PACKAGED: Final[dict[str, str]] = {"ihc": "ihc.png", "brick": "brick.png", "gravel": "gravel.png", "grass": "grass.png"}
"""Content name -> file in scikit-image's ``skimage/data`` folder (shipped in the wheel)."""

DEFAULT_IMAGE_PX_UM: Final[dict[str, float]] = {"ihc": 0.5, "brick": 1.0, "gravel": 1.0, "grass": 1.0}
"""A plausible sampling per content: the IHC image looks like a 20x scan (~0.5 µm/px)."""


class ContentError(ValueError):
    """A content name or file that cannot be used, named in the message."""


def split_sampling(name: str) -> tuple[str, float | None]:
    """``(name, None)``, or for ``NAME@UM`` (``UM`` a number) ``(NAME, UM)``: the content at ``UM`` µm
    per image pixel. A name whose text after its last ``@`` is not a number has no suffix."""
    base, sep, tail = name.rpartition("@")
    if not sep:
        return name, None
    try:
        um = float(tail)
    except ValueError:
        return name, None
    if not (um > 0 and math.isfinite(um)):
        raise ContentError(f"content {name!r}: the sampling after '@' must be a positive number of µm per pixel")
    return base, um


def load_content(name: str) -> U8:
    """The RGB uint8 image of a content name (``ihc``, ``brick``, ...) or ``file:PATH``, either with an
    optional ``@UM`` sampling suffix (:func:`split_sampling`; it does not change the pixels)."""
    name, _ = split_sampling(name)
    if name.startswith("file:"):
        path = Path(name[len("file:") :])
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ContentError(f"content {name!r}: cannot read an image from {path}")
        return np.ascontiguousarray(image[..., ::-1])  # OpenCV reads BGR
    if name not in PACKAGED:
        raise ContentError(f"unknown content {name!r}; one of {', '.join(PACKAGED)} or file:PATH")
    try:
        import skimage.data  # the package ships these files; nothing is downloaded
    except ImportError:
        raise ContentError(f"content {name!r} needs scikit-image (pip install -e '.[bench]' or '.[export]')") from None
    path = Path(skimage.data.__file__).parent / PACKAGED[name]
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ContentError(f"content {name!r}: {path} is missing from this scikit-image install")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(image[..., ::-1])


def _mirror(coord: npt.NDArray[np.float64], size: int) -> npt.NDArray[np.float32]:
    """Fold coordinates into [0, size - 1] by mirroring (tiles the image without seams)."""
    period = 2.0 * (size - 1)
    folded = np.mod(coord, period)
    return np.where(folded > size - 1, period - folded, folded).astype(np.float32)


def region_pixels(region: str, height: int, width: int) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1; x1 and y1 exclusive) of a ``SlideSpec.content_region`` in an image of
    that size. Opposite halves split at the same rounded pixel, so they never share one."""
    if region not in CONTENT_REGIONS:
        raise ContentError(f"unknown content region {region!r}; one of {', '.join(map(repr, CONTENT_REGIONS))}")
    fx0, fy0, fx1, fy1 = CONTENT_REGIONS[region]
    box = (round(fx0 * width), round(fy0 * height), round(fx1 * width), round(fy1 * height))
    if box[2] - box[0] < 2 or box[3] - box[1] < 2:
        raise ContentError(f"content region {region!r} of a {width} x {height} px image is under 2 x 2 px")
    return box


def make_slide(spec: SlideSpec) -> SyntheticSlide:
    """The slide ``spec`` describes: procedural H&E, or an :class:`ImageSlide` of ``spec.content``
    (its ``spec.content_region``)."""
    if spec.content == "synthetic":
        return SyntheticSlide(spec)
    base, suffix_um = split_sampling(spec.content)
    px = spec.content_px_um or suffix_um or DEFAULT_IMAGE_PX_UM.get(base, 0.5)
    return ImageSlide(spec, load_content(base), px, region=spec.content_region)


class ImageSlide(SyntheticSlide):
    """A synthetic slide whose stained tissue is an image.

    Layout (pieces, holes), focus surface and artifacts are the procedural slide's (``spec``);
    inside tissue the transmittance is the image divided by its white point (its brightest
    percent: the image's own glass), outside it is the spec's glass. Sampling is bilinear.
    ``region`` (a ``SlideSpec.content_region``): only that part of the image is shown (cut after the
    white point, which stays the whole image's), mirrored from the slide origin like the whole image;
    ``pixel_box`` is the part in the image's pixels.
    """

    def __init__(
        self, spec: SlideSpec, image: U8, image_px_um: float, white_percentile: float = 99.5, region: str = ""
    ) -> None:
        super().__init__(spec)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ContentError(f"content image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        if not (image_px_um > 0 and math.isfinite(image_px_um)):
            raise ContentError(f"image_px_um must be positive, got {image_px_um}")
        white = np.percentile(image.reshape(-1, 3), white_percentile, axis=0).astype(np.float32)
        self.pixel_box = region_pixels(region, image.shape[0], image.shape[1])
        x0, y0, x1, y1 = self.pixel_box
        trans = np.clip(image[y0:y1, x0:x1].astype(np.float32) / np.maximum(white, 1.0), 0.003, 1.0)
        self._trans = np.ascontiguousarray(trans)
        self.image_px_um = float(image_px_um)

    def _grid(
        self, x0_um: float, y0_um: float, height_px: int, width_px: int, pixel_size_um: float
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        if height_px <= 0 or width_px <= 0 or pixel_size_um <= 0:
            raise ValueError(f"bad region {height_px}x{width_px} px at {pixel_size_um} µm/px")
        px = float(pixel_size_um)
        xs = x0_um + (np.arange(width_px, dtype=np.float64) + 0.5) * px
        ys = y0_um + (np.arange(height_px, dtype=np.float64) + 0.5) * px
        return xs, ys

    def _content(self, xs: npt.NDArray[np.float64], ys: npt.NDArray[np.float64]) -> F32:
        h, w = self._trans.shape[:2]
        shape = (len(ys), len(xs))
        map_x = np.broadcast_to(_mirror((xs - self.spec.origin_x_um) / self.image_px_um, w)[None, :], shape)
        map_y = np.broadcast_to(_mirror((ys - self.spec.origin_y_um) / self.image_px_um, h)[:, None], shape)
        out = cv2.remap(self._trans, np.ascontiguousarray(map_x), np.ascontiguousarray(map_y), cv2.INTER_LINEAR)
        return np.asarray(out, np.float32)

    def image_content(self, x0_um: float, y0_um: float, height_px: int, width_px: int, pixel_size_um: float) -> F32:
        """The (H, W, 3) image transmittance the slide maps onto a region (its content region, mirrored),
        everywhere, before the tissue mask and artifacts: what any recording of the region can show of the image."""
        return self._content(*self._grid(x0_um, y0_um, height_px, width_px, pixel_size_um))

    def transmittance(self, x0_um: float, y0_um: float, height_px: int, width_px: int, pixel_size_um: float) -> F32:
        xs, ys = self._grid(x0_um, y0_um, height_px, width_px, pixel_size_um)
        content = self._content(xs, ys)
        # The procedural slide's tissue mask (pieces minus holes) decides where the image shows;
        # its artifacts are drawn over it as on the procedural slide: a fold or a bubble scales
        # the content's optical density (content ** gain), ink and bubble rims add density.
        density = self._piece_mask_grid(xs, ys)
        if density.any():
            density *= np.float32(1.0) - self._holes_grid(xs, ys)
        fold, extra, _ = self._artifact_layers(xs, ys) if self.artifacts else (None, None, None)
        if fold is not None:
            content = np.power(content, fold[..., None])
        d = density[..., None]
        glass = np.float32(10.0**-self.spec.glass_od)
        out: F32 = (glass * (d * content + (np.float32(1.0) - d))).astype(np.float32)
        if extra is not None:
            out *= np.power(np.float32(10.0), -extra)
        return out
