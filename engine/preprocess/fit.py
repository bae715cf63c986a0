"""Fitting preprocessing parameters from one coarse pyramid level of an image.

Parameters are computed once per image, over the whole of a coarse level (dask and
dask-image, chunk by chunk), never per tile: a tile's contrast then does not depend on
what happens to lie in it, and neighbouring tiles join without seams.

What is fitted, by method (`engine.preprocess.params.method_for`):

- SEM: robust contrast stretch, raw percentiles 0.5 -> 0 and 99.5 -> 1 (SEM detectors
  saturate, so the extremes are not trusted); optional scan-line damping.
- TEM: brightness normalisation: the median maps to 0.5 and +-3 robust standard
  deviations (IQR / 1.349) to 0 and 1, so foils of different thickness and dose look alike.
- optical: illumination flattening: the background comes from a coarser level still
  (larger side <= 256 pixels: illumination varies slowly, features do not matter),
  lightly smoothed, then modelled by a robust degree-3 polynomial (dark features are
  rejected as outliers), stored as a grid of at most 32 x 32 nodes; the coarse level
  flattened by it is stretched from its 1st to its 99th percentile.
- default: percentile stretch, 1 -> 0 and 99 -> 1.

The coarse level describes the image's contrast; level-0 noise is a little stronger
and may clip at the ends of the range, which is the point of a robust stretch.
"""

from __future__ import annotations

import math

import dask
import dask.array as da
import numpy as np
from dask_image import ndfilters

from engine.errors import GrainflowError
from engine.preprocess.params import Background, PreprocessParams, method_for
from engine.tiling.transform import LevelTransform

COARSE_PIXELS = 1024  # the coarse level is the finest whose larger side fits this
BACKGROUND_PIXELS = 256  # likewise for the level the illumination field is smoothed on
GRID_NODES = 32  # most background nodes per axis
POLY_DEGREE = 3  # of the illumination model
PERCENTILES = {"SEM": (0.5, 99.5), "optical": (1.0, 99.0), "default": (1.0, 99.0)}
TEM_SIGMAS = 3.0


def coarse_level(image, max_pixels: int = COARSE_PIXELS) -> int:
    """The finest level whose larger side is at most `max_pixels` (else the coarsest)."""
    for info in image.levels:
        if max(info.shape) <= max_pixels:
            return info.index
    return len(image.levels) - 1


def coarse_array(image, level: int) -> da.Array:
    """The level as a lazy float64 (y, x) dask array; chunks are read when computed."""
    arr = image.array(level)
    lead = (0,) * (arr.ndim - 2)
    lazy = da.from_array(arr, chunks=arr.chunks, asarray=True, fancy=False)
    return lazy[lead].astype(np.float64)


def fit_preprocessing(image, modality: str | None, *, line_damping: float = 0.0,
                      max_pixels: int = COARSE_PIXELS) -> PreprocessParams:
    """Parameters for `image` (a `MultiscaleImage`) read from its coarse level only.

    modality: the catalog's modality ('SEM', 'TEM', 'optical'; others get 'default').
    line_damping: 0..1, strength of SEM scan-line offset removal (ignored otherwise).
    """
    method = method_for(modality)
    level = coarse_level(image, max_pixels)
    coarse = coarse_array(image, level)
    integer = np.dtype(image.levels[level].dtype).kind in "ui"
    if method == "TEM":
        q25, median, q75 = _percentiles(coarse, (25.0, 50.0, 75.0), integer=integer)
        spread = TEM_SIGMAS * max((q75 - q25) / 1.349, 1e-6 * max(abs(median), 1.0))
        return PreprocessParams("TEM", median - spread, median + spread, level=level)
    if method == "optical":
        return _fit_optical(image, level, coarse, coarse_level(image, min(max_pixels, BACKGROUND_PIXELS)))
    low, high = _percentiles(coarse, PERCENTILES[method], integer=integer)
    damping = float(np.clip(line_damping, 0.0, 1.0)) if method == "SEM" else 0.0
    return PreprocessParams(method, *_nonempty(low, high), line_damping=damping, level=level)


def _fit_optical(image, level: int, coarse: da.Array, bg_level: int) -> PreprocessParams:
    source = coarse_array(image, bg_level)
    # An image without a pyramid has no small level: block-average it (chunk by chunk)
    # down to about BACKGROUND_PIXELS first, trimming the last partial block.
    k = max(1, math.ceil(max(source.shape) / BACKGROUND_PIXELS))
    ky, kx = min(k, source.shape[0]), min(k, source.shape[1])
    if k > 1:
        source = da.coarsen(np.mean, source, {0: ky, 1: kx}, trim_excess=True)
    h, w = source.shape
    # Light smoothing (dask-image, one block: the level is small) takes out texture and
    # noise; a robust low-order polynomial then models the illumination. A polynomial has
    # no edge bias, where heavy Gaussian smoothing with any padding bends the field at
    # the image's borders and corners, exactly where vignetting is strongest.
    # sigma per axis at most (n - 1) / 4: dask-image overlaps by 4 sigma, which must fit in
    # the axis (a strip, a cross-section: a short side of a few pixels; 1 px: no smoothing).
    sigma = max(1.0, max(h, w) / 64)
    smooth = ndfilters.gaussian_filter(source.rechunk(-1), sigma=tuple(min(sigma, (n - 1) / 4) for n in (h, w)),
                                       mode="nearest")
    (field,) = dask.compute(smooth)
    transform = LevelTransform.from_image(image, bg_level)
    gy, gx = min(GRID_NODES, h), min(GRID_NODES, w)
    rows, cols = np.linspace(0, h - 1, gy), np.linspace(0, w - 1, gx)
    nodes = _robust_polynomial(field, rows, cols)
    nodes = np.maximum(nodes, 1e-3 * max(float(np.median(field)), 1e-6))  # never divide by ~zero
    # Nodes sit on pixel centres of the background level; store them in level-0 edge coordinates.
    origin = transform.to_level0((rows[0] + 0.5) * ky, (cols[0] + 0.5) * kx)
    far = transform.to_level0((rows[-1] + 0.5) * ky, (cols[-1] + 0.5) * kx)
    spacing = ((far[0] - origin[0]) / max(gy - 1, 1) or 1.0, (far[1] - origin[1]) / max(gx - 1, 1) or 1.0)
    background = Background(tuple(map(tuple, nodes.tolist())), origin, spacing)
    level_value = float(np.median(nodes))
    # Flatten the coarse level with the very field tiles will use, then stretch it.
    h, w = coarse.shape
    transform = LevelTransform.from_image(image, level)
    ys = transform.to_level0(np.arange(h) + 0.5, 0)[0]
    xs = transform.to_level0(0, np.arange(w) + 0.5)[1]
    flat = coarse.map_blocks(_flatten_block, background, level_value, ys, xs, dtype=np.float64)
    low, high = _percentiles(flat, PERCENTILES["optical"], integer=False)
    return PreprocessParams("optical", *_nonempty(low, high), background=background,
                            background_level=level_value, level=level)


def _robust_polynomial(field: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """A degree-3 polynomial fitted to `field` (h x w), evaluated at rows x cols (pixel indices).

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
    keep = np.ones(z.shape, bool)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(design[keep], z[keep], rcond=None)
        resid = z - design @ coef
        spread = 1.4826 * np.median(np.abs(resid[keep])) + 1e-12
        keep = np.abs(resid) < 3 * spread
    gv = np.interp(rows, np.arange(h), v)
    gu = np.interp(cols, np.arange(w), u)
    ny, nx = np.meshgrid(gv, gu, indexing="ij")
    return sum(c * ny**i * nx**j for c, (i, j) in zip(coef, terms))


def _flatten_block(block: np.ndarray, background: Background, level_value: float, ys: np.ndarray, xs: np.ndarray,
                   block_info=None) -> np.ndarray:
    (y0, y1), (x0, x1) = block_info[0]["array-location"]
    return block / background.evaluate(ys[y0:y1], xs[x0:x1]) * level_value


def _percentiles(arr: da.Array, qs, *, integer: bool) -> list[float]:
    """Percentiles (0-100) of a dask array from a histogram computed chunk by chunk.

    dask's own `percentile` merges per-chunk estimates that depend on the chunking.
    Integer data with a range under 2**20 is counted value by value (exact); anything
    else goes into 65536 bins over its range and reports the bin's centre.
    """
    lo, hi = (float(v) for v in dask.compute(arr.min(), arr.max()))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise GrainflowError(f"the image's pixels include NaN or infinity (min {lo}, max {hi}); "
                             "preprocessing needs finite values")
    # flat: equal, or (after optical flattening) apart by rounding only, which 65536 bins cannot split
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi)):  # relative: an image of 1e-11 A currents is not flat
        return [lo for _ in qs]
    if integer and hi - lo < 2**20:
        bins, width = int(hi - lo) + 1, 1.0
        (counts,) = dask.compute(da.bincount((arr - lo).astype(np.int64).ravel(), minlength=bins))
        values = lo + np.arange(bins, dtype=np.float64)
    else:
        bins, width = 65536, (hi - lo) / 65536
        counts, _ = da.histogram(arr, bins=bins, range=(lo, hi))
        (counts,) = dask.compute(counts)
        values = lo + (np.arange(bins) + 0.5) * width
    cdf = np.cumsum(counts) / counts.sum()
    return [float(values[min(int(np.searchsorted(cdf, q / 100.0, side="left")), bins - 1)]) for q in qs]


def _nonempty(low: float, high: float) -> tuple[float, float]:
    """A usable range: a flat image maps to 0.5 instead of dividing by zero."""
    if high > low:
        return low, high
    return low - 0.5, low + 0.5
