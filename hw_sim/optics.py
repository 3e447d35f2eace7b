"""Microscope optics and camera: from slide transmittance to the frames a scanner records.

Optics: incoherent brightfield imaging. Each RGB channel has its own wavelength
and pupil function ``P(f) = circ(|f| <= NA/λ) * exp(i (defocus + spherical))``;
the intensity PSF is ``|IFFT(P)|²`` and the image is the transmittance
convolved with it. Incoherent imaging is the simplest model in which defocus
blurs correctly at high NA (0.95: the paraxial approximation would be badly
wrong, so the exact angular-spectrum defocus phase is used).

Why spherical aberration and chromatic shift: with a perfect pupil the image
at +z is the complex conjugate situation of -z and the two intensity images
are identical, so the *sign* of defocus would be unobservable from one frame.
A real dry 40x/0.95 objective has residual spherical aberration (cover-glass
mismatch) and some axial colour; both make above-focus and below-focus images
differ, which single-shot defocus regression relies on. Modelling them in the
pupil keeps the simulated asymmetry physical rather than an ad-hoc trick.

Sampling: the PSF is computed on a grid three times finer than the camera
pixels (the incoherent cutoff 2NA/λ exceeds the camera's Nyquist frequency),
then integrated over each camera pixel (3x3 fine samples), which is what a
pixel with 100% fill factor does. The PSF lives in a (2m+1)² box, m =
``margin_px``, sized for ``max_defocus_um``: callers render the transmittance
with an m-pixel margin so the FFT convolution's wrap-around only pollutes the
margin, which is then cropped.

Camera: smooth radial vignetting, illumination and white-balance gain, photon
shot noise (Poisson on electrons), Gaussian read noise, 8-bit quantisation.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.fft as sfft

F32 = npt.NDArray[np.float32]
C64 = npt.NDArray[np.complex64]

_OVERSAMPLE = 3  # fine PSF samples per camera pixel (odd, so pixels are centred on a fine sample)
_OTF_CACHE = 8  # image-size OTFs kept per Optics (3 channels, ~6 MB per entry at 512 px)


def _check_keys(cls: type, d: dict[str, Any]) -> None:
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")


@dataclass(frozen=True)
class OpticsParams:
    """Objective and illumination. Defaults: a dry 40x/0.95 plan apochromat-like objective.

    ``spherical_waves``: Zernike Z(4,0) coefficient (RMS waves, Noll normalisation).
    ``chromatic_shift_um``: best-focus z of each channel relative to the nominal focus.
    ``max_defocus_um``: largest |defocus| (after chromatic shift) the PSF box is sized for.
    """

    na: float = 0.95
    magnification: float = 40.0
    immersion_n: float = 1.0
    wavelengths_um: tuple[float, float, float] = (0.61, 0.54, 0.46)
    spherical_waves: float = 0.08
    chromatic_shift_um: tuple[float, float, float] = (0.15, 0.0, -0.2)
    max_defocus_um: float = 6.0
    # Which objective this is, for the record: a preset of hw_sim.synth.OBJECTIVES, "custom", or "".
    objective: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.na < self.immersion_n:
            raise ValueError(f"na must be in (0, immersion_n={self.immersion_n}), got {self.na}")
        if len(self.wavelengths_um) != 3 or not all(0.2 < w < 2.0 for w in self.wavelengths_um):
            raise ValueError(f"wavelengths_um must be 3 wavelengths in µm, got {self.wavelengths_um}")
        if len(self.chromatic_shift_um) != 3:
            raise ValueError(f"chromatic_shift_um must have 3 values, got {self.chromatic_shift_um}")
        if self.max_defocus_um <= 0:
            raise ValueError(f"max_defocus_um must be positive, got {self.max_defocus_um}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["wavelengths_um"] = list(self.wavelengths_um)
        d["chromatic_shift_um"] = list(self.chromatic_shift_um)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OpticsParams:
        _check_keys(cls, d)
        kw = dict(d)
        for name in ("wavelengths_um", "chromatic_shift_um"):
            if name in kw:
                kw[name] = tuple(float(x) for x in kw[name])
        return cls(**kw)


@dataclass(frozen=True)
class CameraParams:
    """Sensor and illumination level.

    ``illumination``: fraction of full scale that unobstructed light reaches at the
    frame centre (a scanner sets exposure so glass sits just below saturation).
    ``vignetting``: relative intensity loss at the frame corners (smooth, radial).
    ``channel_gain``: white balance per RGB channel.
    The ADC maps ``full_well_e`` electrons to 255 (8-bit output).
    """

    full_well_e: float = 10000.0
    read_noise_e: float = 4.0
    illumination: float = 0.97
    vignetting: float = 0.12
    channel_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.full_well_e <= 0 or self.read_noise_e < 0:
            raise ValueError("full_well_e must be positive and read_noise_e non-negative")
        if not 0 <= self.vignetting < 1:
            raise ValueError(f"vignetting must be in [0, 1), got {self.vignetting}")
        if len(self.channel_gain) != 3 or self.illumination <= 0:
            raise ValueError("channel_gain must have 3 values and illumination must be positive")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_gain"] = list(self.channel_gain)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CameraParams:
        _check_keys(cls, d)
        kw = dict(d)
        if "channel_gain" in kw:
            kw["channel_gain"] = tuple(float(x) for x in kw["channel_gain"])
        return cls(**kw)


def margin_for(params: OpticsParams, pixel_size_um: float) -> int:
    """PSF half-size (px): geometric blur radius at the largest defocus plus the diffraction core."""
    n, na = params.immersion_n, params.na
    max_z = params.max_defocus_um + max(abs(s) for s in params.chromatic_shift_um)
    radius_um = max_z * na / math.sqrt(n * n - na * na) + 4.0 * max(params.wavelengths_um) / na
    m = math.ceil(radius_um / pixel_size_um)
    # Grow the box until the fine PSF grid, 3 * (2m + 1), is 7-smooth: FFTs of a length with a
    # large prime factor are several times slower.
    while not _smooth_len(_OVERSAMPLE * (2 * m + 1)):
        m += 1
    return m


def _smooth_len(n: int) -> bool:
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
    return n == 1


class PreparedObject:
    """A transmittance's spectrum, computed once and imaged at many defocus values."""

    def __init__(self, spectra: list[C64], shape: tuple[int, int]) -> None:
        self.spectra = spectra
        self.shape = shape


class Optics:
    """Images transmittance fields of ``shape`` (h, w) at ``pixel_size_um`` through the objective."""

    def __init__(
        self,
        params: OpticsParams,
        pixel_size_um: float,
        shape: tuple[int, int],
        camera: CameraParams | None = None,
    ) -> None:
        if pixel_size_um <= 0:
            raise ValueError(f"pixel_size_um must be positive, got {pixel_size_um}")
        self.params = params
        self.camera = camera if camera is not None else CameraParams()
        self.pixel_size_um = float(pixel_size_um)
        self.shape = (int(shape[0]), int(shape[1]))
        self.margin_px = margin_for(params, pixel_size_um)
        m = self.margin_px
        self.input_shape = (self.shape[0] + 2 * m, self.shape[1] + 2 * m)
        self._fft_shape = (
            sfft.next_fast_len(self.input_shape[0]),
            sfft.next_fast_len(self.input_shape[1], True),
        )
        self._otfs: OrderedDict[int, list[C64]] = OrderedDict()
        self._pupil_geometry = self._make_pupil_geometry()

    # ---- PSF

    def _make_pupil_geometry(
        self,
    ) -> list[tuple[npt.NDArray[np.bool_], npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
        """Per channel, on the fine grid: pupil support, defocus phase per µm, spherical phase (rad)."""
        k_box = 2 * self.margin_px + 1
        n_fine = _OVERSAMPLE * k_box
        f = sfft.fftfreq(n_fine, d=self.pixel_size_um / _OVERSAMPLE)
        fx, fy = np.meshgrid(f, f)
        f2 = fx * fx + fy * fy
        n = self.params.immersion_n
        geo = []
        for lam in self.params.wavelengths_um:
            cutoff = self.params.na / lam
            inside = f2 <= cutoff * cutoff
            rho2 = f2[inside] / (cutoff * cutoff)
            kz = 2 * math.pi * (np.sqrt((n / lam) ** 2 - f2[inside]) - n / lam)  # rad per µm of defocus
            z40 = math.sqrt(5.0) * (6 * rho2 * rho2 - 6 * rho2 + 1)
            sph = 2 * math.pi * self.params.spherical_waves * z40
            geo.append((inside, kz, sph))
        return geo

    def psf(self, defocus_um: float) -> F32:
        """Camera-sampled intensity PSF per channel, float32 (2m+1, 2m+1, 3), centred, each sums to 1.

        ``defocus_um`` > 0: the sample is above its in-focus position (stage z too high).
        """
        m = self.margin_px
        k_box = 2 * m + 1
        n_fine = _OVERSAMPLE * k_box
        out = np.empty((k_box, k_box, 3), np.float32)
        for c, (inside, kz, sph) in enumerate(self._pupil_geometry):
            z = defocus_um - self.params.chromatic_shift_um[c]
            if abs(z) > self.params.max_defocus_um + max(abs(s) for s in self.params.chromatic_shift_um):
                raise ValueError(
                    f"defocus {defocus_um:+.2f} µm is beyond the PSF box (max_defocus_um="
                    f"{self.params.max_defocus_um}); raise OpticsParams.max_defocus_um"
                )
            pupil = np.zeros((n_fine, n_fine), np.complex64)
            pupil[inside] = np.exp(1j * (kz * z + sph))  # phase in float64, amplitude in complex64
            amp = sfft.ifft2(pupil)
            fine = amp.real**2 + amp.imag**2
            # Integrate over camera pixels: pixel 0 covers fine samples -1, 0, +1 (so it stays centred).
            fine = np.roll(fine, 1, axis=(0, 1))
            cam = fine.reshape(k_box, _OVERSAMPLE, k_box, _OVERSAMPLE).sum(axis=(1, 3))
            cam = np.roll(cam, (m, m), axis=(0, 1))  # centre at (m, m)
            out[..., c] = cam / cam.sum()
        return out

    def _otf(self, defocus_um: float) -> list[C64]:
        """Image-size OTFs (rfft2 layout) per channel, cached by defocus rounded to 1 nm."""
        key = round(defocus_um * 1000)
        hit = self._otfs.get(key)
        if hit is not None:
            self._otfs.move_to_end(key)
            return hit
        psf = self.psf(key / 1000)
        m = self.margin_px
        k_box = 2 * m + 1
        otfs = []
        for c in range(3):
            pad = np.zeros(self._fft_shape, np.float32)
            pad[:k_box, :k_box] = psf[..., c]
            pad = np.roll(pad, (-m, -m), axis=(0, 1))  # PSF centre to (0, 0): no image shift
            otfs.append(sfft.rfft2(pad).astype(np.complex64))
        self._otfs[key] = otfs
        if len(self._otfs) > _OTF_CACHE:
            self._otfs.popitem(last=False)
        return otfs

    # ---- imaging

    def prepare(self, transmittance_with_margin: F32) -> PreparedObject:
        """FFT the object once so that a z-stack costs one inverse FFT per plane and channel."""
        t = np.asarray(transmittance_with_margin)
        if t.shape != (*self.input_shape, 3):
            raise ValueError(
                f"expected transmittance of shape {(*self.input_shape, 3)} (field + margin), got {t.shape}"
            )
        spectra = [sfft.rfft2(t[..., c], s=self._fft_shape).astype(np.complex64) for c in range(3)]
        return PreparedObject(spectra, self.input_shape)

    def image(self, transmittance_with_margin: F32 | PreparedObject, defocus_um: float) -> F32:
        """Optical intensity, float32 (h, w, 3), relative to the illumination (glass ~ its transmittance).

        Accepts the transmittance rendered with ``margin_px`` on every side, or a
        :meth:`prepare`-d one when imaging the same field at several planes.
        """
        obj = (
            transmittance_with_margin
            if isinstance(transmittance_with_margin, PreparedObject)
            else self.prepare(transmittance_with_margin)
        )
        otfs = self._otf(defocus_um)
        m = self.margin_px
        h, w = self.shape
        out = np.empty((h, w, 3), np.float32)
        for c in range(3):
            img = sfft.irfft2(obj.spectra[c] * otfs[c], s=self._fft_shape)
            out[..., c] = img[m : m + h, m : m + w]
        return out

    # ---- camera

    def camera_capture(self, intensity: F32, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
        """Expose and read out: vignetting, gain, shot and read noise, 8-bit quantisation."""
        cam = self.camera
        h, w = intensity.shape[:2]
        gain = np.asarray(cam.channel_gain, np.float32) * np.float32(cam.illumination)
        electrons = (
            intensity * self._vignette(h, w, cam.vignetting)[..., None] * gain * np.float32(cam.full_well_e)
        )
        np.maximum(electrons, 0, out=electrons)
        # Shot noise is Poisson; above ~30 e- it is indistinguishable from a Gaussian of the same
        # variance, which is 4x cheaper to draw. Shot and read noise then combine in one draw.
        sigma = np.sqrt(electrons + np.float32(cam.read_noise_e**2))
        noisy = electrons + sigma * rng.standard_normal(electrons.shape, dtype=np.float32)
        dark = electrons < 30
        if dark.any():
            noisy[dark] = rng.poisson(electrons[dark]) + rng.normal(0.0, cam.read_noise_e, int(dark.sum()))
        dn = noisy * np.float32(255.0 / cam.full_well_e)
        clipped: F32 = np.clip(np.rint(dn), 0, 255)
        return clipped.astype(np.uint8)

    @staticmethod
    def _vignette(h: int, w: int, strength: float) -> F32:
        """1 at the centre, 1 - strength at the corners, quadratic in radius (cos⁴-like near axis)."""
        y = (np.arange(h, dtype=np.float32) - (h - 1) / 2) / np.float32(h / 2)
        x = (np.arange(w, dtype=np.float32) - (w - 1) / 2) / np.float32(w / 2)
        r2 = (y[:, None] ** 2 + x[None, :] ** 2) / np.float32(2.0)
        return (np.float32(1.0) - np.float32(strength) * r2).astype(np.float32)
