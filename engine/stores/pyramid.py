"""Pyramid levels by 2x downsampling, one output chunk at a time.

Never holds more than one 2x2 block of chunks of the finer level, so an image of any
size is downsampled in bounded memory.
"""

from __future__ import annotations

import numpy as np
import zarr


def n_levels_for(shape: tuple[int, int], chunk: int) -> int:
    """Levels until the coarsest fits in one chunk (at least one level)."""
    n, size = 1, max(shape)
    while size > chunk:
        size = (size + 1) // 2
        n += 1
    return n


def downsample_mean(block: np.ndarray) -> np.ndarray:
    """2x2 mean of an HxW block (odd edges repeat the last row/column), dtype kept.

    Integers are rounded half up, so a constant image stays constant.
    """
    h, w = block.shape
    if h % 2 or w % 2:
        block = np.pad(block, ((0, h % 2), (0, w % 2)), mode="edge")
    acc = block.astype(np.float64 if block.dtype.itemsize >= 4 else np.float32)
    mean = (acc[0::2, 0::2] + acc[1::2, 0::2] + acc[0::2, 1::2] + acc[1::2, 1::2]) * 0.25
    if np.issubdtype(block.dtype, np.integer):
        mean = np.floor(mean + 0.5)
    return mean.astype(block.dtype)


def downsample_nearest(block: np.ndarray) -> np.ndarray:
    """Every second pixel: label values are identities and must not be averaged."""
    return block[0::2, 0::2]


def write_next_level(finer: zarr.Array, coarser: zarr.Array, *, labels: bool) -> None:
    """Fill `coarser` (shape ceil(finer/2)) from `finer`, one coarser chunk at a time."""
    reduce = downsample_nearest if labels else downsample_mean
    ch, cw = coarser.chunks
    H, W = coarser.shape
    for y in range(0, H, ch):
        for x in range(0, W, cw):
            src = finer[2 * y : min(2 * (y + ch), finer.shape[0]), 2 * x : min(2 * (x + cw), finer.shape[1])]
            coarser[y : min(y + ch, H), x : min(x + cw, W)] = reduce(np.asarray(src))
