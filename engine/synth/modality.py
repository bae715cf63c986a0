"""Imaging physics of the three modalities: fields of a specimen -> detector counts.

SEM (secondary electrons): brightness from composition, bright edges where the surface
  tilts, dark holes; the beam is scanned, so each row is shifted by scan-line jitter and
  slow drift; Gaussian probe blur; shot noise at a dose; per-line gain noise; uint16.
TEM (bright field): mass-thickness contrast (dense, thick regions dark), diffraction
  contrast of grains in a Bragg condition, defocus blur with a Fresnel fringe at edges,
  uneven beam illumination, low-dose shot noise; uint16.
optical (reflected bright field): reflectance, etched and tilted surfaces dark,
  diffraction-limited blur from the objective's NA, vignetting and an illumination
  gradient, shot plus Gaussian read noise; uint8.

Every step is a function of global pixel position and the image's seed: filters run on
the chunk plus a halo (`Imaging.halo`) and per-pixel noise is drawn per fixed
`NOISE_BLOCK` block from a generator keyed by (seed, block), so a chunk renders the same
whatever the chunk size or order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from engine.stores.catalog import MODALITIES
from engine.synth.errors import SynthArgumentError
from engine.synth.hashing import derive_seed, hash1, unit
from engine.synth.noise import fbm

# Level-0 pixel sizes (nm) an instrument of each kind records.
PIXEL_RANGE_NM = {"SEM": (1.0, 200.0), "TEM": (0.01, 5.0), "optical": (100.0, 2000.0)}
DTYPES = {"SEM": np.dtype("uint16"), "TEM": np.dtype("uint16"), "optical": np.dtype("uint8")}
NOISE_BLOCK = 128
_MAX_SIGMA_PX = 2.5
_WAVELENGTH_NM = 550.0

assert tuple(PIXEL_RANGE_NM) == MODALITIES


@dataclass(frozen=True)
class Imaging:
    """One image's instrument settings. Lengths in level-0 pixels unless named _nm.

    blur_px: Gaussian PSF sigma; fringe: TEM Fresnel fringe strength (sign = under/over
    focus); dose: mean detected quanta per pixel at unit signal; read_noise: Gaussian noise
    sigma as a fraction of full scale; gain, offset: signal -> fraction of full scale;
    jitter_px / drift_px / drift_period_px / glitch_px: scan-row x shifts (SEM only);
    line_noise: per-row gain sigma (SEM); illum_*: uneven illumination (centre as a
    fraction of the image, radius in image diagonals, amplitude, linear gradient);
    thickness_amp, mu: TEM foil thickness variation and absorption; bend: depth of TEM
    bend contours; knee: where the
    SE amplifier starts to saturate softly (fraction of full scale; 0: hard clip only).
    """

    modality: str
    shape: tuple[int, int]
    seed: int
    blur_px: float
    dose: float
    gain: float
    offset: float
    read_noise: float = 0.0
    fringe: float = 0.0
    jitter_px: float = 0.0
    drift_px: float = 0.0
    drift_period_px: float = 1.0
    glitch_px: float = 0.0
    line_noise: float = 0.0
    illum_cy: float = 0.5
    illum_cx: float = 0.5
    illum_radius: float = 1.0
    illum_amp: float = 0.0
    illum_grad: float = 0.0
    illum_angle: float = 0.0
    thickness_amp: float = 0.0
    mu: float = 1.0
    knee: float = 0.0
    bend: float = 0.0

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.modality]

    @property
    def halo(self) -> int:
        """Pixels of context a chunk needs on each side for the blur, fringe and slope filters."""
        widest = self.blur_px + (1.5 if self.fringe else 0.0)
        return int(math.ceil(4.0 * widest)) + 3

    @property
    def max_shift_px(self) -> float:
        """Bound on |row_shift|: how far a scanned row may sample away from its nominal x."""
        return self.jitter_px + self.drift_px + self.glitch_px

    def row_shift(self, rows: np.ndarray) -> np.ndarray:
        """x offset in pixels (float32) at which each level-0 row samples the specimen."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros(rows.shape, np.float32)
        if self.max_shift_px == 0:
            return out
        s = derive_seed(self.seed, "scan")
        out += (unit(hash1(rows, s)) * 2 - 1) * np.float32(self.jitter_px)
        # a rare line where the scan generator slipped
        slip = unit(hash1(rows, s + 1)) < np.float32(0.004)
        out += np.where(slip, (unit(hash1(rows, s + 2)) * 2 - 1) * np.float32(self.glitch_px), 0).astype(np.float32)
        # slow drift: 1-D smooth noise along the frame time (rows)
        t = rows.astype(np.float64) / self.drift_period_px
        k = np.floor(t)
        f = (t - k).astype(np.float32)
        f = f * f * (3 - 2 * f)
        a = unit(hash1(k.astype(np.int64), s + 3))
        b = unit(hash1(k.astype(np.int64) + 1, s + 3))
        out += ((a + (b - a) * f) * 2 - 1) * np.float32(self.drift_px)
        return out


def pixel_range(modality: str) -> tuple[float, float]:
    if modality not in PIXEL_RANGE_NM:
        raise SynthArgumentError(f"unknown modality {modality!r}; valid modalities: {', '.join(MODALITIES)}")
    return PIXEL_RANGE_NM[modality]


def plan_imaging(modality: str, pixel_size_nm: float, shape: tuple[int, int], seed: int,
                 rng: np.random.Generator) -> Imaging:
    """Draw one image's instrument settings; blur follows from the physics and pixel size."""
    pixel_range(modality)

    def logu(lo: float, hi: float) -> float:
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    def sigma_px(sigma_nm: float) -> float:
        # the PSF plus the pixel's own footprint, kept within what the halo covers
        return float(min(_MAX_SIGMA_PX, math.hypot(sigma_nm / pixel_size_nm, 0.35)))

    h, w = shape
    common = dict(
        modality=modality, shape=(int(h), int(w)), seed=int(seed),
        illum_cy=float(rng.uniform(0.2, 0.8)), illum_cx=float(rng.uniform(0.2, 0.8)),
        illum_angle=float(rng.uniform(0, 2 * math.pi)),
    )
    if modality == "SEM":
        probe_fwhm_nm = logu(1.5, 8.0)
        # the operator sets contrast and brightness to spread the signal over the range
        contrast, black = float(rng.uniform(1.2, 1.7)), float(rng.uniform(0.08, 0.16))
        return Imaging(
            **common, blur_px=sigma_px(probe_fwhm_nm / 2.355), dose=logu(80.0, 800.0),
            gain=contrast, offset=float(rng.uniform(0.03, 0.08)) - black * contrast, knee=0.8,
            jitter_px=logu(0.05, 0.45), drift_px=logu(0.3, 4.0),
            drift_period_px=float(rng.uniform(0.3, 1.5) * h), glitch_px=float(rng.uniform(0.5, 2.5)),
            line_noise=logu(0.003, 0.02), illum_radius=float(rng.uniform(1.5, 3.0)),
            illum_amp=float(rng.uniform(0.0, 0.1)), illum_grad=float(rng.uniform(0.0, 0.08)),
        )
    if modality == "TEM":
        info_limit_nm = logu(0.06, 0.15)
        return Imaging(
            **common, blur_px=sigma_px(info_limit_nm / 2.355), dose=logu(80.0, 600.0),
            # the camera is set so that vacuum (a hole) sits below full scale
            gain=float(rng.uniform(0.65, 0.8)), offset=float(rng.uniform(0.02, 0.06)),
            fringe=float(rng.choice([-1.0, 1.0]) * rng.uniform(0.15, 0.6)),
            illum_radius=float(rng.uniform(0.8, 1.6)), illum_amp=float(rng.uniform(0.1, 0.3)),
            illum_grad=float(rng.uniform(0.0, 0.05)),
            thickness_amp=float(rng.uniform(0.1, 0.35)), mu=float(rng.uniform(0.9, 1.5)),
            bend=float(rng.uniform(0.0, 0.45)),
        )
    # the objective is matched to the camera: its resolution spans ~2.5-4 pixels
    na = float(np.clip(0.61 * _WAVELENGTH_NM / (rng.uniform(2.5, 4.0) * pixel_size_nm), 0.1, 0.95))
    return Imaging(
        **common, blur_px=sigma_px(0.21 * _WAVELENGTH_NM / na), dose=logu(400.0, 4000.0),
        # exposure set so bright phases sit just under full scale, as auto-exposure does
        gain=float(rng.uniform(0.75, 0.95)), offset=float(rng.uniform(0.0, 0.03)),
        read_noise=logu(0.003, 0.015), illum_radius=float(rng.uniform(0.6, 1.2)),
        illum_amp=float(rng.uniform(0.08, 0.3)), illum_grad=float(rng.uniform(0.0, 0.15)),
    )


def _slope(height: np.ndarray) -> np.ndarray:
    """|grad height| per pixel, float32 (central differences)."""
    gy, gx = np.gradient(height)
    gy *= gy
    gx *= gx
    gy += gx
    return np.sqrt(gy, out=gy)


def _illumination(im: Imaging, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Multiplicative illumination field over global pixels [y0:y0+h, x0:x0+w], float32."""
    H, W = im.shape
    diag = math.hypot(H, W)
    yy = ((np.arange(y0, y0 + h, dtype=np.float32) + 0.5) - np.float32(im.illum_cy * H)) / np.float32(diag)
    xx = ((np.arange(x0, x0 + w, dtype=np.float32) + 0.5) - np.float32(im.illum_cx * W)) / np.float32(diag)
    r2 = yy[:, None] ** 2 + xx[None, :] ** 2
    r2 *= np.float32(1.0 / im.illum_radius**2)
    # a cos^4-like fall-off from the optical axis plus a linear tilt of the lamp field
    field = 1 - np.float32(im.illum_amp) * np.minimum(r2, 1)
    tilt = np.float32(im.illum_grad) * (yy[:, None] * np.float32(math.sin(im.illum_angle))
                                        + xx[None, :] * np.float32(math.cos(im.illum_angle)))
    field += tilt
    return field


def _smooth(im: Imaging, field, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """A field that varies over a good part of the image, evaluated at every `step`-th
    global pixel and interpolated bilinearly over [y0:y0+h, x0:x0+w] (float32).

    `field(rows, cols)` takes pixel coordinates, (n, 1) and (n, m) float32. The nodes sit
    on the global pixel grid, so every chunk interpolates between the same values.
    """
    step = max(1, max(im.shape) // 128)
    k0, k1 = y0 // step, (y0 + h - 1) // step + 1
    j0, j1 = x0 // step, (x0 + w - 1) // step + 1
    rows = (np.arange(k0, k1 + 1, dtype=np.float32) * step)[:, None]
    cols = np.broadcast_to((np.arange(j0, j1 + 1, dtype=np.float32) * step)[None, :], (k1 - k0 + 1, j1 - j0 + 1))
    nodes = field(rows, np.ascontiguousarray(cols))
    r = np.arange(y0, y0 + h)
    ry, ty = r // step - k0, ((r % step) / step).astype(np.float32)[:, None]
    c = np.arange(x0, x0 + w)
    cx, tx = c // step - j0, ((c % step) / step).astype(np.float32)[None, :]
    along = nodes[ry] * (1 - ty) + nodes[ry + 1] * ty
    return along[:, cx] * (1 - tx) + along[:, cx + 1] * tx


def expected_signal(im: Imaging, z, reflect, height, tint, y0: int, x0: int, halo: int) -> np.ndarray:
    """Noise-free signal (float32, about 0..1) of the region inside `halo`.

    Inputs are the fields over global pixels [y0-halo : y0+h+halo, x0-halo : x0+w+halo];
    the result covers [y0 : y0+h, x0 : x0+w].
    """
    hh, ww = z.shape
    h, w = hh - 2 * halo, ww - 2 * halo
    depth = np.clip(height, 0, 1)
    if im.modality == "SEM":
        s = z * np.float32(0.5) + np.float32(0.25)
        s += tint * np.float32(0.07)
        # secondary-electron yield rises on tilted surfaces (edge effect) and falls in
        # holes, from which few electrons escape
        slope = _slope(height)
        s *= 1 + np.float32(1.4) * np.minimum(slope, 1.2)
        s *= 1 - np.float32(0.65) * depth
    elif im.modality == "TEM":
        scale = np.float32(2.0 / max(im.shape))
        thick = _smooth(im, lambda r, c: fbm(r * scale, c * scale, derive_seed(im.seed, "foil"), octaves=2),
                        y0 - halo, x0 - halo, hh, ww)
        thick *= np.float32(im.thickness_amp)
        thick += 1
        mass = z * thick
        mass *= 1 - depth
        s = np.exp(-np.float32(im.mu) * mass)
        s *= 1 - np.float32(0.35) * np.clip(tint, 0, 1)
        if im.bend:
            # bend contours: where the bent foil passes through a Bragg condition
            tilt = _smooth(im, lambda r, c: fbm(r * (scale * 1.5), c * (scale * 1.5), derive_seed(im.seed, "bend"),
                                                octaves=2, gain=0.3), y0 - halo, x0 - halo, hh, ww)
            tilt *= np.float32(1 / 0.1)
            tilt *= tilt
            s *= 1 - np.float32(im.bend) * np.exp(-tilt)
    else:
        s = reflect * (1 - np.float32(0.85) * depth)
        # light from a tilted facet leaves the objective's aperture: etched edges are dark
        slope = _slope(height)
        slope *= np.float32(1 / 0.35)
        slope *= slope
        slope += 1
        s /= slope
    blurred = ndimage.gaussian_filter(s, im.blur_px, truncate=4.0)
    if im.fringe:
        wide = ndimage.gaussian_filter(s, im.blur_px + 1.5, truncate=4.0)
        blurred += np.float32(im.fringe) * (blurred - wide)
    out = blurred[halo : halo + h, halo : halo + w]
    out *= _illumination(im, y0, x0, h, w)
    return out


def _standard_normal(im: Imaging, y0: int, x0: int, h: int, w: int, stream: int) -> np.ndarray:
    """N(0, 1) float32 per global pixel, drawn per NOISE_BLOCK block keyed by (seed, block)."""
    out = np.empty((h, w), np.float32)
    b = NOISE_BLOCK
    key = derive_seed(im.seed, "pixel-noise", stream)
    for by in range(y0 // b, (y0 + h - 1) // b + 1):
        for bx in range(x0 // b, (x0 + w - 1) // b + 1):
            block = np.random.default_rng([key, by, bx]).standard_normal((b, b), dtype=np.float32)
            ya, yb = max(y0, by * b), min(y0 + h, (by + 1) * b)
            xa, xb = max(x0, bx * b), min(x0 + w, (bx + 1) * b)
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = block[ya - by * b : yb - by * b, xa - bx * b : xb - bx * b]
    return out


def detect(im: Imaging, signal: np.ndarray, y0: int, x0: int) -> np.ndarray:
    """Noisy, quantised pixels of `im.dtype` from the expected signal of [y0:, x0:].

    Shot noise uses the normal approximation N(n, n) of Poisson counts (exact draws of
    Poisson counts per block would depend on the chunk's extent).
    """
    h, w = signal.shape
    counts = np.maximum(signal, 0) * np.float32(im.dose)
    noise = _standard_normal(im, y0, x0, h, w, 0)
    noise *= np.sqrt(counts)
    counts += noise
    s = counts
    s *= np.float32(1.0 / im.dose)
    if im.read_noise:
        s += _standard_normal(im, y0, x0, h, w, 1) * np.float32(im.read_noise)
    if im.line_noise:
        rows = np.arange(y0, y0 + h)
        g = (unit(hash1(rows, derive_seed(im.seed, "line"))) - np.float32(0.5)) * np.float32(3.46 * im.line_noise)
        s *= (1 + g)[:, None]
    s *= np.float32(im.gain)
    s += np.float32(im.offset)
    if im.knee:
        # bright edges compress towards full scale instead of clipping flat
        k = np.float32(im.knee)
        room = np.float32(1 - im.knee)
        over = s > k
        s[over] = k + room * np.tanh((s[over] - k) / room)
    top = np.iinfo(im.dtype).max
    s *= np.float32(top)
    np.clip(s, 0, top, out=s)
    return np.rint(s).astype(im.dtype)
