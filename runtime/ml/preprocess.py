"""Model input preprocessing, shared by training (``export/``) and inference (``runtime/``).

One implementation for both sides: a model is only as good as the agreement
between the inputs it was trained on and the inputs it sees on the scanner.
Numpy + OpenCV only (the runtime never imports torch). The parameters live in
each model's ``model.json`` (``preprocess``), so a model folder says how to
feed it.

Autofocus input (per crop, 7 x S x S, float32):
  0-2  RGB of an S-px full-resolution crop, each channel divided by its own mean
       minus 1 (a contrast image: illumination and stain strength drop out, the
       per-channel sharpness that carries the *sign* of defocus -- axial colour --
       stays), times ``CONTRAST_GAIN``;
  3-5  the same for the ``context``-px window around it, area-downsampled to S px:
       large defocus blurs beyond an S-px crop, the context still shows it;
  6    log magnitude of the crop's Fourier transform (Hann-windowed grey,
       fftshifted, standardised): Jiang et al. 2018 found a Fourier channel helps;
  7-9  (``autofocus_v2`` only) the same contrast image for the ``wide``-px window
       centred on the context window, area-downsampled to S px. At 8-10 µm the
       blur disc of a 0.95 NA objective is ~55 µm (220 px) across: wider than
       the 256-px context, so the shape of the disc's edge -- which spherical
       aberration makes different above and below focus, i.e. the sign -- is
       only seen whole in a wider window. A tile narrower than ``wide`` is
       mirror-padded (the PSF is radially symmetric, so the mirrored blur looks
       like blur), which is a fallback, not what the model was trained on.
A tile gives ``crops_per_window`` crops in each ``context`` window, the crops
with the most contrast, so tissue wins over glass on partly covered fields.

Classifier input (per window, 3 x S x S): the tile area-resampled to
``input_pixel_size_um`` and cut into S-px windows, ``x / 255`` standardised by
fixed constants (absolute brightness matters: glass is bright).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

CONTRAST_GAIN = 4.0
SPECTRUM_CHANNEL = 6  # the autofocus input's one channel that is not a contrast image (its Fourier magnitude)


class PreprocessError(ValueError):
    """A tile cannot be turned into model input (too small, wrong shape or dtype)."""


def _check_tile(tile: npt.NDArray[Any]) -> None:
    if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
        raise PreprocessError(f"expected an RGB uint8 tile (h, w, 3), got {tile.dtype} {tile.shape}")


def window_starts(length: int, window: int) -> list[int]:
    """Start offsets of the fewest ``window``-long windows that cover ``length`` (evenly spread)."""
    if length < window:
        raise PreprocessError(f"tile side {length} px is smaller than the model window {window} px")
    n = math.ceil(length / window)
    if n == 1:
        return [0]
    return [round(i * (length - window) / (n - 1)) for i in range(n)]


@dataclass(frozen=True)
class AutofocusPreprocess:
    crop: int = 64
    context: int = 256
    crops_per_window: int = 4
    wide: int = 0  # 0: autofocus_v1 (7 channels); > 0: autofocus_v2 with the wide window (10 channels)

    @property
    def downsample(self) -> int:
        return self.context // self.crop

    def __post_init__(self) -> None:
        if self.context % self.crop != 0 or self.crops_per_window < 1:
            raise ValueError(f"context {self.context} must be a multiple of crop {self.crop}; crops_per_window >= 1")
        if self.wide and self.wide < self.context:
            raise ValueError(f"wide window {self.wide} px must be 0 (none) or at least the context {self.context} px")

    @property
    def kind(self) -> str:
        return "autofocus_v2" if self.wide else "autofocus_v1"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind,
            "crop": self.crop,
            "context": self.context,
            "crops_per_window": self.crops_per_window,
            "contrast_gain": CONTRAST_GAIN,
        }
        if self.wide:
            d["wide"] = self.wide
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutofocusPreprocess:
        kind = d.get("kind")
        if kind == "autofocus_v1":
            return cls(int(d["crop"]), int(d["context"]), int(d["crops_per_window"]))
        if kind == "autofocus_v2":
            return cls(int(d["crop"]), int(d["context"]), int(d["crops_per_window"]), int(d["wide"]))
        raise PreprocessError(
            f"unsupported autofocus preprocessing {kind!r} (expected 'autofocus_v1' or 'autofocus_v2')"
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (10 if self.wide else 7, self.crop, self.crop)

    def crop_positions(self, gray: F32) -> list[tuple[int, int, int, int]]:
        """(window y, window x, crop y, crop x) top-left corners, absolute in the tile."""
        h, w = gray.shape
        s = self.crop
        half = s // 2
        out: list[tuple[int, int, int, int]] = []
        for wy in window_starts(h, self.context):
            for wx in window_starts(w, self.context):
                win = gray[wy : wy + self.context, wx : wx + self.context]
                # Contrast of every half-overlapping crop position, from box sums of x and x².
                mean = cv2.boxFilter(win, -1, (s, s), normalize=True, borderType=cv2.BORDER_REFLECT)
                sq = cv2.boxFilter(win * win, -1, (s, s), normalize=True, borderType=cv2.BORDER_REFLECT)
                centres = np.arange(half, self.context - half + 1, half)
                m = mean[np.ix_(centres, centres)]
                v = np.maximum(sq[np.ix_(centres, centres)] - m * m, 0.0)
                score = np.sqrt(v) / np.maximum(m, 1e-3)
                taken: list[tuple[int, int]] = []
                for flat in np.argsort(-score, axis=None, kind="stable"):
                    cy, cx = (int(c) for c in np.unravel_index(flat, score.shape))
                    y, x = int(centres[cy]) - half, int(centres[cx]) - half
                    # Spread the crops: at most half-overlapping with one already taken.
                    if all(abs(y - ty) >= half or abs(x - tx) >= half for ty, tx in taken):
                        taken.append((y, x))
                    if len(taken) == self.crops_per_window:
                        break
                out.extend((wy, wx, wy + y, wx + x) for y, x in taken)
        return out

    def inputs(self, tile: U8) -> F32:
        """(N, 7, crop, crop) float32 model input for one tile."""
        return self.inputs_at(tile)[0]

    def inputs_at(self, tile: U8) -> tuple[F32, list[tuple[int, int, int, int]]]:
        """Model input and the positions (window y, x, crop y, x) it was cut from."""
        _check_tile(tile)
        img = tile.astype(np.float32) * np.float32(1.0 / 255.0)
        gray = img.mean(axis=2)
        s, c = self.crop, self.context
        positions = self.crop_positions(gray)
        out = np.empty((len(positions), *self.input_shape), np.float32)
        hann = np.outer(np.hanning(s), np.hanning(s)).astype(np.float32)
        contexts: dict[tuple[int, int], F32] = {}
        wides: dict[tuple[int, int], F32] = {}
        padded = self._padded(img)
        for i, (wy, wx, y, x) in enumerate(positions):
            crop = img[y : y + s, x : x + s]
            out[i, 0:3] = _contrast(crop).transpose(2, 0, 1)
            if (wy, wx) not in contexts:
                win = img[wy : wy + c, wx : wx + c]
                small = np.asarray(cv2.resize(win, (s, s), interpolation=cv2.INTER_AREA), np.float32)
                contexts[(wy, wx)] = _contrast(small).transpose(2, 0, 1)
            out[i, 3:6] = contexts[(wy, wx)]
            if self.wide:
                if (wy, wx) not in wides:
                    wides[(wy, wx)] = self._wide_window(padded, img.shape[:2], wy, wx)
                out[i, 7:10] = wides[(wy, wx)]
            g = crop.mean(axis=2)
            g = (g / max(float(g.mean()), 1e-3) - 1.0) * hann
            mag = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(g))) * np.float32(s))
            out[i, SPECTRUM_CHANNEL] = (mag - mag.mean()) / (float(mag.std()) + 1e-3)
        return out, positions

    def _padded(self, img: F32) -> F32:
        """The tile, mirror-padded on each axis where it is narrower than the wide window."""
        if not self.wide:
            return img
        h, w = img.shape[:2]
        py, px = max(0, self.wide - h), max(0, self.wide - w)
        if not (py or px):
            return img
        return np.asarray(
            cv2.copyMakeBorder(img, py // 2, py - py // 2, px // 2, px - px // 2, cv2.BORDER_REFLECT_101), np.float32
        )

    def _wide_window(self, padded: F32, tile_shape: tuple[int, ...], wy: int, wx: int) -> F32:
        """Contrast image of the wide window centred on context window (wy, wx), kept inside the
        (padded) tile, downsampled to crop size: (3, crop, crop)."""
        h, w = tile_shape[:2]
        ph, pw = padded.shape[:2]
        oy, ox = (ph - h) // 2, (pw - w) // 2  # where the tile sits in the padded image
        half_c, wd = self.context // 2, self.wide
        y = min(max(oy + wy + half_c - wd // 2, 0), ph - wd)
        x = min(max(ox + wx + half_c - wd // 2, 0), pw - wd)
        win = padded[y : y + wd, x : x + wd]
        s = self.crop
        small = np.asarray(cv2.resize(win, (s, s), interpolation=cv2.INTER_AREA), np.float32)
        return _contrast(small).transpose(2, 0, 1)


def _contrast(x: F32) -> F32:
    mean: F32 = x.reshape(-1, 3).mean(axis=0)  # (3,): per-channel mean
    return ((x / np.maximum(mean, 1e-3) - 1.0) * np.float32(CONTRAST_GAIN)).astype(np.float32)


@dataclass(frozen=True)
class ClassifierPreprocess:
    size: int = 64
    input_pixel_size_um: float = 1.0
    mean: float = 0.5
    std: float = 0.25

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "classifier_v1",
            "size": self.size,
            "input_pixel_size_um": self.input_pixel_size_um,
            "mean": self.mean,
            "std": self.std,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierPreprocess:
        if d.get("kind") != "classifier_v1":
            raise PreprocessError(f"unsupported classifier preprocessing {d.get('kind')!r} (expected 'classifier_v1')")
        return cls(int(d["size"]), float(d["input_pixel_size_um"]), float(d["mean"]), float(d["std"]))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def _scaled(self, height: int, width: int, pixel_size_um: float) -> tuple[int, int]:
        """A tile's (height, width) in pixels at the model's pixel size."""
        scale = pixel_size_um / self.input_pixel_size_um
        return max(self.size, round(height * scale)), max(self.size, round(width * scale))

    def window_grid(self, height: int, width: int, pixel_size_um: float) -> tuple[int, int]:
        """(rows, cols) of the windows :meth:`inputs` cuts from a ``height`` x ``width`` tile; the
        windows come row by row (top to bottom, each left to right)."""
        nh, nw = self._scaled(height, width, pixel_size_um)
        return len(window_starts(nh, self.size)), len(window_starts(nw, self.size))

    def inputs(self, tile: U8, pixel_size_um: float) -> F32:
        """(N, 3, size, size) float32: the tile at the model's pixel size, cut into windows."""
        _check_tile(tile)
        if pixel_size_um <= 0 or pixel_size_um > self.input_pixel_size_um:
            raise PreprocessError(
                f"camera pixel {pixel_size_um} µm is coarser than the classifier's {self.input_pixel_size_um} µm"
            )
        nh, nw = self._scaled(tile.shape[0], tile.shape[1], pixel_size_um)
        small = cv2.resize(tile, (nw, nh), interpolation=cv2.INTER_AREA).astype(np.float32)
        small = (small * np.float32(1.0 / 255.0) - np.float32(self.mean)) / np.float32(self.std)
        wins = [
            small[y : y + self.size, x : x + self.size].transpose(2, 0, 1)
            for y in window_starts(nh, self.size)
            for x in window_starts(nw, self.size)
        ]
        return np.ascontiguousarray(np.stack(wins), dtype=np.float32)
