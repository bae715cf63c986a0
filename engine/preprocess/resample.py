"""Resampling tiles to a model's pixel size when no pyramid level is close enough.

Output pixels lie on one global grid per image: output pixel ``j`` covers level-0 edge
coordinates ``[j * step, (j + 1) * step)`` (per axis), ``step`` being the target pixel
size in level-0 pixels. A tile owns the output pixels whose *start* edge lies in its
core (`OutputGrid.core_window`), so the cores of resampled tiles still partition the
image exactly, without gaps or overlaps, however `step` divides the tile size. Each
output pixel's value is sampled at its centre ``(j + 0.5) * step`` from the source
level by linear interpolation after a Gaussian anti-aliasing prefilter (sigma
``(m - 1) / 2`` source pixels for a downsampling factor ``m``, skimage's rule); the read
halo gives the filter its context, so tiles agree with resampling the whole level.

Mapping back: pixel edge ``u`` of a resampled tile whose first pixel is output pixel
``j0`` sits at level-0 ``j0 * step + u * step``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from engine.tiling.transform import LevelTransform


@dataclass(frozen=True, slots=True)
class OutputGrid:
    """The global output-pixel grid of one image at a target pixel size.

    step: (y, x) level-0 pixels per output pixel. extent: (y, x) output pixels covering
    the image's level-0 shape. halo: output pixels of halo wanted around each core.
    """

    step: tuple[float, float]
    extent: tuple[int, int]
    halo: int = 0

    @classmethod
    def for_image(cls, level0_shape: tuple[int, int], level0_pixel_nm: tuple[float, float], target_nm: float,
                  halo: int = 0) -> OutputGrid:
        step = (target_nm / level0_pixel_nm[0], target_nm / level0_pixel_nm[1])
        extent = (math.ceil(level0_shape[0] / step[0]), math.ceil(level0_shape[1] / step[1]))
        return cls(step, extent, int(halo))

    def core_window(self, core0: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
        """Output pixels (j0, j1, i0, i1), half open, owned by a core given as level-0 (y0, y1, x0, x1)."""
        y0, y1, x0, x1 = core0
        (sy, sx), (ey, ex) = self.step, self.extent
        return (min(math.ceil(y0 / sy), ey), min(math.ceil(y1 / sy), ey),
                min(math.ceil(x0 / sx), ex), min(math.ceil(x1 / sx), ex))

    def halo_of(self, window: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) output halo around `window`, clipped to the grid."""
        j0, j1, i0, i1 = window
        (ey, ex), g = self.extent, self.halo
        return (min(g, j0), min(g, ey - j1), min(g, i0), min(g, ex - i1))

    def tile_frame(self, core0: tuple[float, float, float, float], sides: tuple[bool, ...] = (True,) * 4
                   ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int, int, int]]:
        """(first, shape, halo) of the output tile of a core given as level-0 (y0, y1, x0,
        x1): its first output pixel (j, i), its (H, W) and its (top, bottom, left, right)
        halo; `sides` (top, bottom, left, right) False drops that side's halo (its source
        was not read)."""
        window = self.core_window(core0)
        top, bottom, left, right = (h if s else 0 for h, s in zip(self.halo_of(window), sides))
        first = (window[0] - top, window[2] - left)
        shape = (window[1] - window[0] + top + bottom, window[3] - window[2] + left + right)
        return first, shape, (top, bottom, left, right)

    def source_halo(self, transform: LevelTransform) -> int:
        """Halo (level pixels) a source tile needs so its cores' output halos and filters have data."""
        m = max(self.step[0] / transform.factor[0], self.step[1] / transform.factor[1])
        sigma = max(0.0, (m - 1) / 2)
        # output halo + one output pixel of rounding at the core's far edge + the linear
        # interpolation's neighbour + the prefilter's support (4 sigma, scipy's truncate).
        return math.ceil((self.halo + 1) * m + 1 + 4 * sigma) + 1


def resample(src: np.ndarray, src_origin: tuple[int, int], transform: LevelTransform, step: tuple[float, float],
             out_origin: tuple[int, int], out_shape: tuple[int, int]) -> np.ndarray:
    """Sample output pixels from a source array read from one pyramid level.

    src: (h, w) pixels of the level, read from level pixel `src_origin` (y, x).
    transform: the level's map to level 0. step: (y, x) level-0 pixels per output pixel.
    out_origin: global output pixel (j, i) of the result's first pixel; out_shape (H, W).
    Returns (H, W) float32; output pixels whose centre falls outside `src` take the
    nearest source pixel (the image edge).
    """
    if 0 in out_shape:
        return np.zeros(out_shape, np.float32)
    data = np.asarray(src, dtype=np.float32)
    matrix, offset = [], []
    for axis in (0, 1):
        f, shift, s = transform.factor[axis], transform.shift[axis], step[axis]
        m = s / f
        matrix.append(m)
        # output index o -> level-0 centre (out_origin + o + 0.5) * s -> level edge -> src index
        offset.append(((out_origin[axis] + 0.5) * s - shift) / f - 0.5 - src_origin[axis])
    sigma = [max(0.0, (m - 1) / 2) for m in matrix]
    if any(sigma):
        data = ndimage.gaussian_filter(data, sigma, mode="nearest")
    return ndimage.affine_transform(data, matrix, offset=offset, output_shape=tuple(out_shape), order=1,
                                    mode="nearest").astype(np.float32, copy=False)


def cast_pixels(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float pixels to `dtype`: integers rounded and clipped to the dtype's range."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype, copy=False)


def resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Label masks back to a core's shape (nearest neighbour: label values are identities)."""
    h, w = mask.shape[-2:]
    ys = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
    return mask[..., ys[:, None], xs[None, :]]
