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
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import tifffile

from hw_sim.content import make_slide
from hw_sim.optics import CameraParams, Optics, OpticsParams
from hw_sim.slide import SlideSpec
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
