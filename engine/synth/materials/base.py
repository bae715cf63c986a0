"""What a material renders: physical fields on a grid of specimen coordinates.

A material does not know the instrument. It returns `Fields` (composition, optical
reflectance, surface relief, crystal orientation contrast) and a modality
(`engine.synth.modality`) turns them into an image with that instrument's physics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Grid:
    """Sample points of one rendered region, in units of the material's length `L`.

    y: (h, 1) float32 rows; x: (h, w) float32 (a scanning instrument shifts each row, so
    x is not shared between rows); px: size of one pixel in units (pixel_size / L), used
    to anti-alias edges and keep thin lines at least a pixel wide.
    """

    y: np.ndarray
    x: np.ndarray
    px: float
    shift: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return self.x.shape

    def window(self, ymin: float, ymax: float, xmin: float, xmax: float) -> tuple[slice, slice] | None:
        """Rows and columns whose samples may fall in the box (units); None if none can.

        `shift` bounds how far a row's x samples stray from a regular grid (scan jitter
        and drift), so the column range is widened by it.
        """
        h, w = self.shape
        y0, x0, p = float(self.y[0, 0]), float(self.x[0, 0]) , self.px
        r0 = max(0, int(np.floor((ymin - y0) / p)))
        r1 = min(h, int(np.ceil((ymax - y0) / p)) + 1)
        c0 = max(0, int(np.floor((xmin - x0 - 2 * self.shift) / p)))
        c1 = min(w, int(np.ceil((xmax - x0 + 2 * self.shift) / p)) + 1)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def cells_in(self, size: float, reach: float):
        """Integer lattice cells (of `size` units) whose objects, reaching at most `reach`
        units from their cell, may touch this grid: (iy, ix) int64 arrays, (n,)."""
        h, w = self.shape
        ys = float(self.y[0, 0]), float(self.y[-1, 0])
        xs = float(self.x.min()), float(self.x.max())
        iy = np.arange(int(np.floor((ys[0] - reach) / size)), int(np.floor((ys[1] + reach) / size)) + 1)
        ix = np.arange(int(np.floor((xs[0] - reach) / size)), int(np.floor((xs[1] + reach) / size)) + 1)
        gy, gx = np.meshgrid(iy, ix, indexing="ij")
        return gy.ravel(), gx.ravel()


@dataclass
class Fields:
    """Physical fields of the specimen at each sample point, float32 (h, w).

    z: mean atomic number / density in [0, 1] (backscatter yield, TEM mass-thickness);
    reflect: optical bright-field reflectance in [0, 1] after etching;
    height: depth below the polished surface in [0, 1] (etched grooves, pits, holes;
    slightly negative where a hard phase stands proud);
    tint: crystal-orientation contrast in [-1, 1] (SEM channelling, TEM diffraction,
    colour of an etched grain in optical light).
    """

    z: np.ndarray
    reflect: np.ndarray
    height: np.ndarray
    tint: np.ndarray

    @classmethod
    def filled(cls, shape: tuple[int, int], *, z=0.5, reflect=0.8, height=0.0, tint=0.0) -> Fields:
        f = np.float32
        return cls(np.full(shape, f(z)), np.full(shape, f(reflect)), np.full(shape, f(height)), np.full(shape, f(tint)))


Render = Callable[[Grid, int], Fields]


@dataclass(frozen=True)
class Material:
    """A registered material.

    length_nm: its characteristic length (grain size, lamellar spacing, ...);
    feature_px: the range of that length in pixels an image may show (sets the pixel size);
    modalities: the instruments it is plausibly imaged with.
    """

    name: str
    length_nm: float
    feature_px: tuple[float, float]
    modalities: tuple[str, ...]
    render: Render
    description: str


def ramp(v: np.ndarray, edge: float, width) -> np.ndarray:
    """0 below `edge`, 1 above, linear over `width` (a float or an array like `v`)
    centred on it: an anti-aliased step."""
    out = v - np.float32(edge)
    if np.ndim(width):
        out /= np.maximum(width, np.float32(1e-6))
    else:
        out *= np.float32(1.0 / max(width, 1e-6))
    out += np.float32(0.5)
    return np.clip(out, 0, 1, out=out)


def groove(distance: np.ndarray, half_width: float) -> np.ndarray:
    """Profile of an etched line: 1 on the line, falling smoothly to 0 at `half_width`."""
    t = np.clip(distance * np.float32(1.0 / half_width), 0, 1)
    t = 1 - t * t
    return t * t


def rotate(y: np.ndarray, x: np.ndarray, angle: np.ndarray | float):
    """Coordinates along (u) and across (v) the direction `angle` (radians)."""
    c = np.cos(angle).astype(np.float32)
    s = np.sin(angle).astype(np.float32)
    return x * c + y * s, y * c - x * s
