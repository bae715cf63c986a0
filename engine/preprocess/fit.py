"""Fitting preprocessing parameters for one image, once, from a bounded read of it.

Parameters are computed once per image, never per tile: a tile's contrast then does not
depend on what happens to lie in it, and neighbouring tiles join without seams.

Where the numbers come from (`engine.preprocess.sample`, chunk by chunk):

- intensity statistics (percentiles) from a strided sample of level 0: every k-th
  pixel of every k-th row, about `max_pixels`**2 pixels in all. Not from a coarse
  pyramid level: a level averaged 2**n x 2**n has far less noise than the level-0 tiles
  the parameters are applied to, so its 0.5 / 99.5 percentiles lie too close together
  and level-0 tiles clip many times the designed fraction. A level of up to
  `READ_PIXELS` pixels is read whole (the sample then does not depend on its chunking,
  so the batch job and the online endpoint agree); a larger one in evenly spread chunk
  rows and columns. Only finite pixels count (NaN and inf are ignored); percentiles are
  exact on the sample, so a few extreme pixels do not shift them.
- the optical illumination field from block means over a fixed grid of cells (larger
  side <= `BACKGROUND_PIXELS` cells: illumination varies slowly, features do not
  matter), taken from level 0 in the same pass when level 0 is read whole, else from
  the finest stored level of at most `READ_PIXELS` pixels. The grid does not depend on
  which levels the pyramid stores.

What is fitted, by method (`engine.preprocess.params.method_for`):

- SEM: robust contrast stretch, raw percentiles 0.5 -> 0 and 99.5 -> 1 (SEM detectors
  saturate, so the extremes are not trusted); optional scan-line damping.
- TEM: brightness normalisation: the median maps to 0.5 and +-3 robust standard
  deviations (IQR / 1.349) to 0 and 1, so foils of different thickness and dose look alike.
- optical: illumination flattening: the cell means, lightly smoothed, are modelled by a
  robust degree-3 polynomial (dark features are rejected as outliers), stored as a grid
  of at most 32 x 32 nodes; the sample flattened by it is stretched from its 1st to its
  99th percentile.
- default: percentile stretch, 1 -> 0 and 99 -> 1.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from engine.errors import GrainflowError
from engine.preprocess.params import Background, PreprocessParams, method_for
from engine.preprocess.sample import Scan, SampleBlock, scan_level, spread_indices
from engine.stores.image import chunk_grid
from engine.tiling.transform import LevelTransform

COARSE_PIXELS = 1024  # the strided sample holds about COARSE_PIXELS**2 pixels
READ_PIXELS = 2**24  # a level of at most this many pixels is read whole (16 Mpx: 32 MB of uint16)
BACKGROUND_PIXELS = 256  # most illumination cells per axis
GRID_NODES = 32  # most background nodes per axis
POLY_DEGREE = 3  # of the illumination model
PERCENTILES = {"SEM": (0.5, 99.5), "optical": (1.0, 99.0), "default": (1.0, 99.0)}
TEM_SIGMAS = 3.0


def fit_preprocessing(image, modality: str | None, *, line_damping: float = 0.0,
                      max_pixels: int = COARSE_PIXELS) -> PreprocessParams:
    """Parameters for `image` (a `MultiscaleImage`) from a strided sample of its level 0.

    modality: the catalog's modality ('SEM', 'TEM', 'optical'; others get 'default').
    line_damping: 0..1, strength of SEM scan-line offset removal (ignored otherwise).
    max_pixels: the sample holds about max_pixels**2 level-0 pixels.
    Raises GrainflowError when the image has no finite pixel.
    """
    method = method_for(modality)
    arr = image.array(0)
    h, w = arr.shape[-2:]
    rows = cols = None
    read = (h, w)
    if h * w > READ_PIXELS:  # evenly spread chunk rows and columns, about READ_PIXELS in all
        (cy, cx), share = chunk_grid(arr), math.sqrt(READ_PIXELS / (h * w))
        ny, nx = math.ceil(h / cy), math.ceil(w / cx)
        rows, cols = spread_indices(ny, math.ceil(ny * share)), spread_indices(nx, math.ceil(nx * share))
        read = (min(len(rows) * cy, h), min(len(cols) * cx, w))
    stride = max(1, math.ceil(math.sqrt(read[0] * read[1] / max(int(max_pixels), 1) ** 2)))
    whole = rows is None
    cells = _cells(h, w) if method == "optical" and whole else None
    scan = scan_level(arr, stride=stride, cells=cells, chunk_rows=rows, chunk_cols=cols)
    if method == "optical":
        return _fit_optical(image, scan, cells)
    if method == "TEM":
        q25, median, q75 = _percentiles(scan.finite_values(), (25.0, 50.0, 75.0))
        spread = TEM_SIGMAS * max((q75 - q25) / 1.349, 1e-6 * max(abs(median), 1.0))
        return PreprocessParams("TEM", median - spread, median + spread, level=0)
    low, high = _percentiles(scan.finite_values(), PERCENTILES[method])
    damping = float(np.clip(line_damping, 0.0, 1.0)) if method == "SEM" else 0.0
    return PreprocessParams(method, *_nonempty(low, high), line_damping=damping, level=0)


def _cells(h: int, w: int) -> tuple[int, int]:
    """(by, bx) cell size in pixels of an h x w level: at most BACKGROUND_PIXELS cells per
    axis, and at least one (a strip of a few pixels gets one cell across)."""
    k = max(1, math.ceil(max(h, w) / BACKGROUND_PIXELS))
    return min(k, h), min(k, w)


def _fit_optical(image, scan: Scan, cells: tuple[int, int] | None) -> PreprocessParams:
    if cells is not None:  # level 0 was read whole: its cell sums came with the sample
        bg_level, sums, counts = 0, scan.sums, scan.counts
    else:
        bg_level = next((i.index for i in image.levels if i.shape[0] * i.shape[1] <= READ_PIXELS),
                        len(image.levels) - 1)
        cells = _cells(*image.levels[bg_level].shape)
        bg = scan_level(image.array(bg_level), cells=cells)
        sums, counts = bg.sums, bg.counts
    with np.errstate(invalid="ignore", divide="ignore"):
        field = sums / counts  # NaN where a cell has no finite pixel
    if not np.isfinite(field).any():
        raise GrainflowError(_NO_FINITE)
    # Light smoothing takes out texture and noise; a robust low-order polynomial then
    # models the illumination. A polynomial has no edge bias, where heavy Gaussian
    # smoothing with any padding bends the field at the image's borders and corners,
    # exactly where vignetting is strongest.
    h, w = field.shape
    valid = np.isfinite(field)
    sigma = max(1.0, max(h, w) / 64)
    smooth = ndimage.gaussian_filter(np.where(valid, field, np.median(field[valid])), sigma=sigma, mode="nearest")
    ky, kx = cells
    transform = LevelTransform.from_image(image, bg_level)
    gy, gx = min(GRID_NODES, h), min(GRID_NODES, w)
    rows, cols = np.linspace(0, h - 1, gy), np.linspace(0, w - 1, gx)
    nodes = _robust_polynomial(smooth, valid, rows, cols)
    nodes = np.maximum(nodes, 1e-3 * max(float(np.median(smooth)), 1e-6))  # never divide by ~zero
    # Nodes sit on cell centres; store them in level-0 edge coordinates.
    origin = transform.to_level0((rows[0] + 0.5) * ky, (cols[0] + 0.5) * kx)
    far = transform.to_level0((rows[-1] + 0.5) * ky, (cols[-1] + 0.5) * kx)
    spacing = ((far[0] - origin[0]) / max(gy - 1, 1) or 1.0, (far[1] - origin[1]) / max(gx - 1, 1) or 1.0)
    background = Background(tuple(map(tuple, nodes.tolist())), origin, spacing)
    level_value = float(np.median(nodes))

    def flatten(block: SampleBlock) -> np.ndarray:
        # the very field tiles will use, at the sample's level-0 pixel centres
        return block.values / background.evaluate(block.rows + 0.5, block.cols + 0.5) * level_value

    low, high = _percentiles(scan.finite_values(flatten), PERCENTILES["optical"])
    return PreprocessParams("optical", *_nonempty(low, high), background=background,
                            background_level=level_value, level=0)


def _robust_polynomial(field: np.ndarray, valid: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """A degree-3 polynomial fitted to `field` (h x w) where `valid`, evaluated at rows x
    cols (pixel indices).

    Pixels more than 3 robust sigmas off the fit (pores, inclusions, scratches) are
    dropped and the fit repeated, so dark features do not pull the background down.
    """
    h, w = field.shape
    v = np.linspace(-1.0, 1.0, h) if h > 1 else np.zeros(1)
    u = np.linspace(-1.0, 1.0, w) if w > 1 else np.zeros(1)
    terms = [(i, j) for i in range(POLY_DEGREE + 1) for j in range(POLY_DEGREE + 1 - i)]
    yy, xx = np.meshgrid(v, u, indexing="ij")
    design = np.stack([yy.ravel() ** i * xx.ravel() ** j for i, j in terms], axis=1)
    z = field.ravel()
    inside = valid.ravel()
    keep = inside.copy()
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(design[keep], z[keep], rcond=None)
        resid = z - design @ coef
        spread = 1.4826 * np.median(np.abs(resid[keep])) + 1e-12
        keep = inside & (np.abs(resid) < 3 * spread)
        if not keep.any():
            break
    gv = np.interp(rows, np.arange(h), v)
    gu = np.interp(cols, np.arange(w), u)
    ny, nx = np.meshgrid(gv, gu, indexing="ij")
    return sum(c * ny**i * nx**j for c, (i, j) in zip(coef, terms))


_NO_FINITE = ("the image has no finite pixels (all are NaN or infinity); "
              "preprocessing needs some finite values")


def _percentiles(values: np.ndarray, qs) -> list[float]:
    """Percentiles (0-100) of finite sample values (1-d float64), exact (linear between
    order statistics): no histogram bins, so a few extreme pixels cannot squeeze the
    rest of the range into one bin."""
    if values.size == 0:
        raise GrainflowError(_NO_FINITE)
    return [float(v) for v in np.percentile(values, qs)]


def _nonempty(low: float, high: float) -> tuple[float, float]:
    """A usable range: a flat image maps to 0.5 instead of dividing by zero.

    Flat: equal, or (after optical flattening) apart by rounding only; relative, as an
    image of 1e-11 A currents is not flat.
    """
    if high - low > 1e-9 * max(abs(low), abs(high)):
        return low, high
    return low - 0.5, low + 0.5
