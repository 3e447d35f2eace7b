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
and mapped to the slide at ``image_px_um`` micrometres per image pixel.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt

from hw_sim.slide import SlideSpec, SyntheticSlide

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

PACKAGED: Final[dict[str, str]] = {"ihc": "ihc.png", "brick": "brick.png", "gravel": "gravel.png", "grass": "grass.png"}
"""Content name -> file in scikit-image's ``skimage/data`` folder (shipped in the wheel)."""

DEFAULT_IMAGE_PX_UM: Final[dict[str, float]] = {"ihc": 0.5, "brick": 1.0, "gravel": 1.0, "grass": 1.0}
"""A plausible sampling per content: the IHC image looks like a 20x scan (~0.5 µm/px)."""


class ContentError(ValueError):
    """A content name or file that cannot be used, named in the message."""


def load_content(name: str) -> U8:
    """The RGB uint8 image of a content name (``ihc``, ``brick``, ...) or ``file:PATH``."""
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


def make_slide(spec: SlideSpec) -> SyntheticSlide:
    """The slide ``spec`` describes: procedural H&E, or an :class:`ImageSlide` of ``spec.content``."""
    if spec.content == "synthetic":
        return SyntheticSlide(spec)
    px = spec.content_px_um or DEFAULT_IMAGE_PX_UM.get(spec.content, 0.5)
    return ImageSlide(spec, load_content(spec.content), px)


class ImageSlide(SyntheticSlide):
    """A synthetic slide whose stained tissue is an image.

    Layout (pieces, holes), focus surface and artifacts are the procedural slide's (``spec``);
    inside tissue the transmittance is the image divided by its white point (its brightest
    percent: the image's own glass), outside it is the spec's glass. Sampling is bilinear.
    """

    def __init__(self, spec: SlideSpec, image: U8, image_px_um: float, white_percentile: float = 99.5) -> None:
        super().__init__(spec)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ContentError(f"content image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        if not (image_px_um > 0 and math.isfinite(image_px_um)):
            raise ContentError(f"image_px_um must be positive, got {image_px_um}")
        white = np.percentile(image.reshape(-1, 3), white_percentile, axis=0).astype(np.float32)
        self._trans = np.clip(image.astype(np.float32) / np.maximum(white, 1.0), 0.003, 1.0)
        self.image_px_um = float(image_px_um)

    def transmittance(self, x0_um: float, y0_um: float, height_px: int, width_px: int, pixel_size_um: float) -> F32:
        if height_px <= 0 or width_px <= 0 or pixel_size_um <= 0:
            raise ValueError(f"bad region {height_px}x{width_px} px at {pixel_size_um} µm/px")
        px = float(pixel_size_um)
        xs = x0_um + (np.arange(width_px, dtype=np.float64) + 0.5) * px
        ys = y0_um + (np.arange(height_px, dtype=np.float64) + 0.5) * px
        h, w = self._trans.shape[:2]
        shape = (height_px, width_px)
        map_x = np.broadcast_to(_mirror((xs - self.spec.origin_x_um) / self.image_px_um, w)[None, :], shape)
        map_y = np.broadcast_to(_mirror((ys - self.spec.origin_y_um) / self.image_px_um, h)[:, None], shape)
        content = cv2.remap(self._trans, np.ascontiguousarray(map_x), np.ascontiguousarray(map_y), cv2.INTER_LINEAR)
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
