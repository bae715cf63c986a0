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


def _edge_strength(image: np.ndarray, width_px: float) -> np.ndarray:
    """(H, W) float32: local edge contrast at scale `width_px`, even about an edge.

    The gradient magnitude of the image smoothed at `width_px`, times width_px *
    sqrt(2 pi): a straight step of contrast C gives a line of height C and width about
    `width_px` along it. Axes shorter than 2 pixels have no gradient.
    """
    smooth = _blur(image, width_px).astype(np.float64)
    grad2 = np.zeros(image.shape, np.float64)
    for axis in range(2):
        if image.shape[axis] >= 2:
            grad2 += np.gradient(smooth, axis=axis) ** 2
    return (np.sqrt(grad2) * (width_px * math.sqrt(2.0 * math.pi))).astype(np.float32)


@dataclass(frozen=True)
class DefocusBlur(Transform):
    """TEM defocus: a Gaussian blur from the spatial-coherence envelope, and a Fresnel fringe.

    Physics: with partial spatial coherence (illumination semi-angle alpha) the contrast
    transfer at defocus df is damped by an envelope exp(-(pi alpha df k)^2 ...), roughly
    Gaussian in spatial frequency k (cycles per nm), i.e. a Gaussian point spread of
    sigma = alpha * |df| / sqrt(2) in real space (exp(-2 pi^2 sigma^2 k^2) is its
    transform). Defocus also outlines edges with a Fresnel fringe about one Fresnel zone
    wide, sqrt(lambda |df|): bright in underfocus (df < 0), dark in overfocus (df > 0),
    the fringe an operator watches to find focus. It is approximated by adding (bright)
    or subtracting (dark) a line along each edge, of height `fringe` times the edge's
    contrast, not the full oscillating CTF (which would need the aberrations and a
    phase object).

    How far an operator leaves the image from focus depends on the magnification: at
    atomic resolution a few tens of nm of defocus already wash out lattice fringes, at
    low magnification microns are invisible. So the defocus is drawn in units of the
    pixel size, |df| = d * pixel_size_nm, and the blur in pixels, alpha * d / sqrt(2),
    is the same at every pixel size (about 0.02-1.8 px with the defaults, median ~0.5).

    defocus_range_px: (min, max) of d = |df| / pixel_size_nm, dimensionless; the sign of
      df is random.
    semi_angle_mrad: (min, max) illumination semi-angle alpha, mrad.
    fringe_range: (min, max) fringe height, fraction of the local edge contrast.
    wavelength_nm: electron wavelength (default 200 kV).
    max_sigma_px: cap on the blur in pixels; the fringe width is capped at 4 times it.
    """

    name: ClassVar[str] = "defocus"
    defocus_range_px: tuple[float, float] = (100.0, 2500.0)
    semi_angle_mrad: tuple[float, float] = (0.1, 1.0)
    fringe_range: tuple[float, float] = (0.0, 0.3)
    wavelength_nm: float = WAVELENGTH_200KV_NM
    max_sigma_px: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("DefocusBlur", "defocus_range_px", self.defocus_range_px, lo=0.0)
        check_range("DefocusBlur", "semi_angle_mrad", self.semi_angle_mrad, lo=0.0)
        check_range("DefocusBlur", "fringe_range", self.fringe_range, lo=0.0, hi=1.0)
        if self.wavelength_nm <= 0 or self.max_sigma_px < 0:
            raise ValueError("DefocusBlur.wavelength_nm must be > 0 and max_sigma_px >= 0")

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        px = sample.pixel_size_nm
        df = float(rng.uniform(*self.defocus_range_px)) * px * (1.0 if rng.random() < 0.5 else -1.0)
        alpha = float(rng.uniform(*self.semi_angle_mrad)) * 1e-3
        amp = float(rng.uniform(*self.fringe_range))
        sigma_px = min(self.max_sigma_px, alpha * abs(df) / math.sqrt(2.0) / px)
        zone_px = min(4.0 * self.max_sigma_px, math.sqrt(self.wavelength_nm * abs(df)) / px)
        out = _blur(sample.image, sigma_px)
        if amp > 0 and zone_px > 0.3:
            # an even line along each edge: bright in underfocus, dark in overfocus
            fringe = np.float32(-math.copysign(amp, df)) * _edge_strength(out, zone_px)
            out = out + fringe
        out = np.clip(out, 0.0, 1.0).astype(np.float32)
        return sample.replace(image=out).logged(
            self.name, defocus_nm=df, semi_angle_mrad=alpha * 1e3, sigma_px=sigma_px,
            fringe=amp, fringe_px=zone_px)


@dataclass(frozen=True)
class DiffractionBlur(Transform):
    """Optical diffraction limit: blur as imaged by an objective of aperture NA.

    Physics: a point images as an Airy disk of first-zero radius 0.61 lambda / NA; its
    core is well fitted by a Gaussian of sigma = 0.21 lambda / NA. The image already
    carries the blur of the objective it was recorded with; Gaussian widths add in
    quadrature, so imitating a weaker objective adds only
        sigma_add = sqrt(max(0, sigma_target^2 - sigma_native^2)),
        sigma_target = 0.21 lambda / NA,  sigma_native = 0.21 lambda / native_na.
    Assumption: the archive's optical images were recorded at (or, if sharper, near)
    `native_na`, by default the best aperture of na_range; a drawn NA at or above it adds
    no blur. Sampling blur (the pixel's footprint) is in both images and cancels.

    wavelength_range_nm: (min, max) illumination wavelength, nm (visible: 400-700).
    na_range: (min, max) numerical aperture of the imitated objective, dimensionless.
    native_na: NA the images were recorded with; None: na_range's max.
    max_sigma_px: cap on the added blur, pixels.
    Added blur in pixels = 0.21 * wavelength * sqrt(1 / NA^2 - 1 / native_na^2) / pixel_size_nm.
    """

    name: ClassVar[str] = "diffraction"
    wavelength_range_nm: tuple[float, float] = (400.0, 700.0)
    na_range: tuple[float, float] = (0.25, 0.95)
    native_na: float | None = None
    max_sigma_px: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("DiffractionBlur", "wavelength_range_nm", self.wavelength_range_nm, lo=1.0)
        check_range("DiffractionBlur", "na_range", self.na_range, lo=1e-3, hi=1.6)
        if self.native_na is not None and not 1e-3 <= self.native_na <= 1.6:
            raise ValueError(f"DiffractionBlur.native_na must be in [0.001, 1.6]; got {self.native_na}")
        if self.max_sigma_px < 0:
            raise ValueError("DiffractionBlur.max_sigma_px must be >= 0")

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        lam = float(rng.uniform(*self.wavelength_range_nm))
        na = float(rng.uniform(*self.na_range))
        native = self.native_na if self.native_na is not None else self.na_range[1]
        target, have = AIRY_SIGMA * lam / na, AIRY_SIGMA * lam / native
        sigma_px = min(self.max_sigma_px, math.sqrt(max(0.0, target**2 - have**2)) / sample.pixel_size_nm)
        out = np.clip(_blur(sample.image, sigma_px), 0.0, 1.0)
        return sample.replace(image=out).logged(self.name, wavelength_nm=lam, na=na, sigma_px=sigma_px)


@dataclass(frozen=True)
class UnevenIllumination(Transform):
    """A smooth multiplicative illumination field: vignetting and a misaligned condenser.

    Physics: in a microscope the field of view is not lit evenly. Vignetting (the cos^4
    law and apertures clipping oblique rays) darkens it away from the optical axis,
    1 - v min(1, (r / R)^2) with r the distance from the axis and R the frame's half
    diagonal; a
    Koehler illumination that is off-centre or tilted adds a linear gradient 1 + g (u / D),
    u the position along a random direction, D the frame's diagonal. In TEM the same
    model stands for an off-centre, converged beam.

    A training tile is a small part of the frame, so it sees only the part of this field
    under it: a mild gradient, not a whole vignette. The tile's side is `tile_fraction`
    of the frame's and its place in the frame is drawn; the field is evaluated there.
    It is divided by an upper bound of its values over the tile (the outer tile, see
    view_fraction), so it only darkens (exposure is set on the brightest part) and never
    pushes a pixel past the detector's full scale: no new clipping. With the defaults
    (a tile an eighth of the frame's side, e.g. 256 px of 2048) a tile's field varies by
    a few percent, at most ~20 % (a corner tile at v = 0.3, g = 0.2).

    Two views of one region (fusion's detail and context, centred on the same point)
    see one field at two scales when the detail view is given view_fraction = its side
    over the context's, in nm (PairedAugment does): both then draw the same frame
    position and normalisation, and the detail's field is the central part of the
    context's.

    vignetting_range: (min, max) of v, fractional darkening at R.
    gradient_range: (min, max) of g, fractional change across the frame's diagonal.
    centre_shift: how far the optical axis may sit from the frame's centre, as a
      fraction of the frame size.
    tile_fraction: side of the (outer) tile as a fraction of the frame's side, in (0, 1];
      the archive's tiles and frames set it (1: the tile is the whole frame).
    view_fraction: side of this view as a fraction of the outer tile's, in (0, 1].
    """

    name: ClassVar[str] = "illumination"
    vignetting_range: tuple[float, float] = (0.0, 0.3)
    gradient_range: tuple[float, float] = (0.0, 0.2)
    centre_shift: float = 0.25
    tile_fraction: float = 0.125
    view_fraction: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("UnevenIllumination", "vignetting_range", self.vignetting_range, lo=0.0, hi=0.9)
        check_range("UnevenIllumination", "gradient_range", self.gradient_range, lo=0.0, hi=1.0)
        if not 0.0 <= self.centre_shift <= 1.0:
            raise ValueError(f"UnevenIllumination.centre_shift must be in [0, 1]; got {self.centre_shift}")
        for name in ("tile_fraction", "view_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"UnevenIllumination.{name} must be in (0, 1]; got {getattr(self, name)}")

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        v = float(rng.uniform(*self.vignetting_range))
        g = float(rng.uniform(*self.gradient_range))
        cy, cx = 0.5 + rng.uniform(-self.centre_shift, self.centre_shift, 2)
        theta = float(rng.uniform(0.0, 2.0 * math.pi))
        # the tile's centre in the frame, so that the tile lies inside it
        f = self.tile_fraction
        ty, tx = 0.5 * f + rng.random(2) * (1.0 - f)
        field = illumination_field(sample.shape, v, g, float(cy), float(cx), theta,
                                   tile=(float(ty), float(tx), f), view_fraction=self.view_fraction)
        out = np.clip(sample.image * field, 0.0, 1.0).astype(np.float32)  # field <= 1: the clip is a no-op
        return sample.replace(image=out).logged(
            self.name, vignetting=v, gradient=g, centre_y=float(cy), centre_x=float(cx), angle=theta,
            tile_y=float(ty), tile_x=float(tx))


def illumination_field(shape: tuple[int, int], v: float, g: float, cy: float, cx: float, theta: float,
                       tile: tuple[float, float, float] = (0.5, 0.5, 1.0), view_fraction: float = 1.0) -> np.ndarray:
    """(H, W) float32 field in (0, 1] over a view (see UnevenIllumination).

    The frame is the unit square (fractions of its height and width, with the view's
    aspect ratio); cy, cx: the optical axis in it. tile: (centre y, centre x, side) of
    the outer tile in the frame; the view is its central view_fraction, sampled at its
    (H, W) pixel centres. The field is divided by an upper bound of its values over the
    outer tile (the vignette's maximum there times the gradient's), the same number for
    every view of one tile. Defaults: the view is the whole frame.
    """
    h, w = shape
    ty, tx, side = tile
    c, s_ = math.cos(theta), math.sin(theta)

    def vignette(y, x):
        # distances in units of the frame's half diagonal
        r2 = ((y - cy) ** 2 * h * h + (x - cx) ** 2 * w * w) / (0.25 * (h * h + w * w))
        # darkening v at R and no more: an off-centre axis puts corners beyond R, where
        # the quadratic law is no longer fitted
        return 1.0 - v * np.minimum(r2, 1.0)

    def gradient(y, x):
        return 1.0 + g * ((x - 0.5) * w * c + (y - 0.5) * h * s_) / math.hypot(h, w)

    f = side * view_fraction
    y = (ty + ((np.arange(h, dtype=np.float64) + 0.5) / h - 0.5) * f)[:, None]
    x = (tx + ((np.arange(w, dtype=np.float64) + 0.5) / w - 0.5) * f)[None, :]
    field = vignette(y, x) * gradient(y, x)
    # An upper bound of the field over the outer tile, computed the same way for every
    # view: the least of (a) the vignette's peak (at the tile's point nearest the axis)
    # times the gradient's (at a corner), and (b) the peak on a lattice over the tile
    # plus the most the field can rise between lattice points (its slope is at most
    # 8 v (1 + g / 2) + g per unit of frame along each axis).
    lo_y, hi_y, lo_x, hi_x = ty - side / 2, ty + side / 2, tx - side / 2, tx + side / 2
    v_max = float(vignette(np.clip(cy, lo_y, hi_y), np.clip(cx, lo_x, hi_x)))
    g_max = max(float(gradient(yy, xx)) for yy in (lo_y, hi_y) for xx in (lo_x, hi_x))
    n = 65
    ly, lx = np.linspace(lo_y, hi_y, n)[:, None], np.linspace(lo_x, hi_x, n)[None, :]
    slope = 8.0 * v * (1.0 + g / 2.0) + g
    lattice = float((vignette(ly, lx) * gradient(ly, lx)).max()) + slope * side / (n - 1)
    return (field / min(v_max * g_max, lattice)).astype(np.float32)
