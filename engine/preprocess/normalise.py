"""Applying fitted parameters to a tile: raw pixels -> float32 in [0, 1].

A tile is placed by the level-0 position of its first pixel's top-left corner
(`origin`, edge coordinates, see `engine.tiling.transform`) and its pixel size in
level-0 pixels (`scale`): pixel (i, j) covers level-0 ``origin + (i, j) * scale`` to
``origin + (i + 1, j + 1) * scale``. For a tile of level k read from level pixel
(y0, x0) that is ``origin = (y0 * 2**k, x0 * 2**k)``, ``scale = 2**k``
(`TileSpec.read_origin0`); the datasource's rows carry `origin` and `scale` columns,
which also cover resampled tiles.

Every step except SEM line damping depends only on a pixel's value and its level-0
position, so a pixel maps to the same output in every tile that holds it. Non-finite
pixels (NaN, inf: dead or masked pixels of float images) map to 0, as the fit ignores them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from engine.preprocess.params import PreprocessParams


def apply(params: PreprocessParams, tile: np.ndarray, origin: tuple[float, float] = (0.0, 0.0),
          scale: float | tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """(H, W) raw pixels of any numeric dtype -> (H, W) float32 in [0, 1]; NaN and inf -> 0.

    origin: (y, x) level-0 edge coordinates of the tile's top-left corner.
    scale: level-0 pixels per tile pixel, one number or (y, x).
    """
    values = np.asarray(tile)
    if values.ndim != 2:
        raise ValueError(f"expected an (H, W) tile, got shape {values.shape}")
    x = values.astype(np.float64)
    if x.size == 0:
        return x.astype(np.float32)
    bad = ~np.isfinite(x) if values.dtype.kind == "f" else None
    if bad is not None and bad.any():
        # `low` maps to 0 and keeps SEM line damping's row medians finite
        x[bad] = params.low
    else:
        bad = None
    sy, sx = (scale, scale) if np.isscalar(scale) else scale
    if params.background is not None:
        ys = origin[0] + (np.arange(x.shape[0]) + 0.5) * sy
        xs = origin[1] + (np.arange(x.shape[1]) + 0.5) * sx
        x = x / params.background.evaluate(ys, xs) * params.background_level
    if params.line_damping > 0:
        x = x - params.line_damping * _line_offsets(x)[:, None]
    out = (x - params.low) / (params.high - params.low)
    if bad is not None:
        out[bad] = 0.0
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _line_offsets(x: np.ndarray) -> np.ndarray:
    """Per-row offsets of scan-line noise: each row's median minus a smooth trend over rows.

    Uses the tile's own rows (with its halo), so unlike the other steps it can differ
    slightly between tiles; it is off unless asked for.
    """
    rows = np.median(x, axis=1)
    return rows - ndimage.median_filter(rows, size=min(9, len(rows)) | 1, mode="nearest")
