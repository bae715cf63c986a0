"""Optics of the instrument: blur from the imaging system and uneven illumination.

These change intensities only; the geometry, mask and boxes stay as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy import ndimage

from engine.augment.base import Transform, check_range
from engine.augment.sample import Sample

# Electron wavelength at 200 kV (relativistic), nm.
WAVELENGTH_200KV_NM = 0.002508
# sigma of the Gaussian that best fits the Airy disk's core, in units of wavelength / NA
# (Zhang, Zerubia & Olivo-Marin, Appl. Opt. 46, 1819 (2007)); its FWHM is 0.51 lambda/NA.
AIRY_SIGMA = 0.21


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px <= 0:
        return image
    return ndimage.gaussian_filter(image, sigma_px, mode="reflect").astype(np.float32, copy=False)


@dataclass(frozen=True)
class DefocusBlur(Transform):
    """TEM defocus: a Gaussian blur from the spatial-coherence envelope, and a Fresnel fringe.

    Physics: with partial spatial coherence (illumination semi-angle alpha) the contrast
    transfer at defocus df is damped by an envelope exp(-(pi alpha df k)^2 ...), roughly
    Gaussian in spatial frequency k (cycles per nm), i.e. a Gaussian point spread of
    sigma = alpha * |df| / sqrt(2) in real space (exp(-2 pi^2 sigma^2 k^2) is its transform). Defocus also puts Fresnel fringes at edges, about one Fresnel zone
    wide, sqrt(lambda |df|); they are approximated by adding a difference of Gaussians
    at that width, of sign set by under- or over-focus (a CTF-like edge ring, not the
    full oscillating CTF, which would need the aberrations and a phase object).

    defocus_range_nm: (min, max) of |df|, nm; the sign is random.
    semi_angle_mrad: (min, max) illumination semi-angle alpha, mrad.
    fringe_range: (min, max) fringe amplitude, fraction of the local edge contrast.
    wavelength_nm: electron wavelength (default 200 kV).
    max_sigma_px: cap on the blur in pixels (at fine pixel sizes the physical blur would
      wipe the image out; a real operator would not record that).
    Blur in pixels = sigma_nm / pixel_size_nm, so it scales with the image's pixel size.
    """

    name: ClassVar[str] = "defocus"
    defocus_range_nm: tuple[float, float] = (50.0, 2000.0)
    semi_angle_mrad: tuple[float, float] = (0.1, 1.0)
    fringe_range: tuple[float, float] = (0.0, 0.3)
    wavelength_nm: float = WAVELENGTH_200KV_NM
    max_sigma_px: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("DefocusBlur", "defocus_range_nm", self.defocus_range_nm, lo=0.0)
        check_range("DefocusBlur", "semi_angle_mrad", self.semi_angle_mrad, lo=0.0)
        check_range("DefocusBlur", "fringe_range", self.fringe_range, lo=0.0, hi=1.0)
        if self.wavelength_nm <= 0 or self.max_sigma_px < 0:
            raise ValueError("DefocusBlur.wavelength_nm must be > 0 and max_sigma_px >= 0")

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        df = float(rng.uniform(*self.defocus_range_nm)) * (1.0 if rng.random() < 0.5 else -1.0)
        alpha = float(rng.uniform(*self.semi_angle_mrad)) * 1e-3
        amp = float(rng.uniform(*self.fringe_range))
        sigma_px = min(self.max_sigma_px, alpha * abs(df) / math.sqrt(2.0) / sample.pixel_size_nm)
        zone_px = min(4.0 * self.max_sigma_px, math.sqrt(self.wavelength_nm * abs(df)) / sample.pixel_size_nm)
        out = _blur(sample.image, sigma_px)
        if amp > 0 and zone_px > 0.3:
            # the fringe is the edge signal at the Fresnel-zone width, sign by focus side
            edge = out - _blur(out, zone_px)
            out = out + np.float32(math.copysign(amp, df)) * edge
        out = np.clip(out, 0.0, 1.0).astype(np.float32)
        return sample.replace(image=out).logged(
            self.name, defocus_nm=df, semi_angle_mrad=alpha * 1e3, sigma_px=sigma_px,
            fringe=amp, fringe_px=zone_px)


@dataclass(frozen=True)
class DiffractionBlur(Transform):
    """Optical diffraction limit: blur by the Airy pattern of an objective of aperture NA.

    Physics: a point images as an Airy disk of first-zero radius 0.61 lambda / NA; its
    core is well fitted by a Gaussian of sigma = 0.21 lambda / NA. Applying it imitates
    imaging the same field with a weaker objective (widths add in quadrature to the
    blur the image already has).

    wavelength_range_nm: (min, max) illumination wavelength, nm (visible: 400-700).
    na_range: (min, max) numerical aperture of the objective, dimensionless.
    max_sigma_px: cap on the blur, pixels.
    Blur in pixels = 0.21 * wavelength / NA / pixel_size_nm.
    """

    name: ClassVar[str] = "diffraction"
    wavelength_range_nm: tuple[float, float] = (400.0, 700.0)
    na_range: tuple[float, float] = (0.25, 0.95)
    max_sigma_px: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("DiffractionBlur", "wavelength_range_nm", self.wavelength_range_nm, lo=1.0)
        check_range("DiffractionBlur", "na_range", self.na_range, lo=1e-3, hi=1.6)
        if self.max_sigma_px < 0:
            raise ValueError("DiffractionBlur.max_sigma_px must be >= 0")

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        lam = float(rng.uniform(*self.wavelength_range_nm))
        na = float(rng.uniform(*self.na_range))
        sigma_px = min(self.max_sigma_px, AIRY_SIGMA * lam / na / sample.pixel_size_nm)
        out = np.clip(_blur(sample.image, sigma_px), 0.0, 1.0)
        return sample.replace(image=out).logged(self.name, wavelength_nm=lam, na=na, sigma_px=sigma_px)


@dataclass(frozen=True)
class UnevenIllumination(Transform):
    """A smooth multiplicative illumination field: vignetting and a misaligned condenser.

    Physics: in a microscope the field is not lit evenly. Vignetting (the cos^4 law and
    apertures clipping oblique rays) darkens the image away from the optical axis,
    approximated by 1 - v (r / R)^2 with r the distance from the axis and R the half
    diagonal; a Koehler illumination that is off-centre or tilted adds a linear gradient
    1 + g (u / D), u the position along a random direction, D the diagonal. The field is
    scaled to mean 1 (exposure is set on the whole field), multiplied in, and clipped to
    the detector's range. In TEM the same model stands for an off-centre, converged beam.

    vignetting_range: (min, max) of v, fractional darkening at R.
    gradient_range: (min, max) of g, fractional change across the diagonal.
    centre_shift: how far the optical axis may sit from the image centre, as a
      fraction of the image size.
    """

    name: ClassVar[str] = "illumination"
    vignetting_range: tuple[float, float] = (0.0, 0.3)
    gradient_range: tuple[float, float] = (0.0, 0.2)
    centre_shift: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("UnevenIllumination", "vignetting_range", self.vignetting_range, lo=0.0, hi=0.9)
        check_range("UnevenIllumination", "gradient_range", self.gradient_range, lo=0.0, hi=1.0)
        if not 0.0 <= self.centre_shift <= 1.0:
            raise ValueError(f"UnevenIllumination.centre_shift must be in [0, 1]; got {self.centre_shift}")

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        h, w = sample.shape
        v = float(rng.uniform(*self.vignetting_range))
        g = float(rng.uniform(*self.gradient_range))
        cy, cx = 0.5 + rng.uniform(-self.centre_shift, self.centre_shift, 2)
        theta = float(rng.uniform(0.0, 2.0 * math.pi))
        field = illumination_field((h, w), v, g, float(cy), float(cx), theta)
        out = np.clip(sample.image * field, 0.0, 1.0).astype(np.float32)
        return sample.replace(image=out).logged(
            self.name, vignetting=v, gradient=g, centre_y=float(cy), centre_x=float(cx), angle=theta)


def illumination_field(shape: tuple[int, int], v: float, g: float, cy: float, cx: float,
                       theta: float) -> np.ndarray:
    """(H, W) float32 field of mean 1 (see UnevenIllumination); cy, cx fractions of H, W."""
    h, w = shape
    y = (np.arange(h, dtype=np.float32) + 0.5)[:, None]
    x = (np.arange(w, dtype=np.float32) + 0.5)[None, :]
    diag = math.hypot(h, w)
    r2 = ((y - cy * h) ** 2 + (x - cx * w) ** 2) / (0.5 * diag) ** 2
    vignette = np.maximum(1.0 - v * r2, 0.05)  # never fully dark: light still leaks in
    u = ((x - 0.5 * w) * math.cos(theta) + (y - 0.5 * h) * math.sin(theta)) / diag
    field = (vignette * (1.0 + g * u)).astype(np.float32)
    return field / np.float32(field.mean())
