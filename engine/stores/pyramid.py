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


def downsample_labels(block: np.ndarray) -> np.ndarray:
    """2x2 label mode of an HxW integer block -> ceil(H/2) x ceil(W/2), dtype kept.

    Label values are identities (instance ids, class indices), never averaged: each
    coarser pixel takes one of its 2x2 block's own values. It stands for the whole
    block, as a `downsample_mean` pixel does, so label level k lines up with image
    level k. Keeping each block's top-left pixel instead (block[0::2, 0::2]) put level
    k's labels (2**k - 1) / 2 level-0 pixels up-left of the image's (a whole level pixel
    at level 2, so masks and boxes read from coarse levels missed their defects) and
    dropped one-pixel cracks on odd rows or columns.

    The value is the block's most frequent one; ties go to a non-zero (defect) label, so
    a one-pixel-wide line survives to every level, then to the smaller value, so the
    result does not depend on where in the block a value sits. Odd edges repeat the last
    row/column (as `downsample_mean`), so an edge pixel keeps its own label.
    """
    if not np.issubdtype(block.dtype, np.integer):
        raise TypeError(f"label pyramids need integer labels; got {block.dtype} (cast label images to uint32)")
    h, w = block.shape
    if h % 2 or w % 2:
        block = np.pad(block, ((0, h % 2), (0, w % 2)), mode="edge")
    candidates = [block[0::2, 0::2], block[0::2, 1::2], block[1::2, 0::2], block[1::2, 1::2]]
    # votes[i]: how many of the block's four pixels hold candidate i's value (1 to 4)
    votes = [np.ones(candidates[0].shape, np.uint8) for _ in candidates]
    for i in range(4):
        for j in range(i + 1, 4):
            same = candidates[i] == candidates[j]
            votes[i] += same
            votes[j] += same
    most = np.maximum.reduce(votes)
    winners = [v == most for v in votes]
    defect_wins = np.logical_or.reduce([w & (c != 0) for w, c in zip(winners, candidates)])
    out = np.full(candidates[0].shape, np.iinfo(block.dtype).max, block.dtype)
    for won, value in zip(winners, candidates):
        # a background winner only counts where no defect label ties with it
        eligible = won & ((value != 0) | ~defect_wins)
        np.minimum(out, value, out=out, where=eligible)
    return out


def write_next_level(finer: zarr.Array, coarser: zarr.Array, *, labels: bool) -> None:
    """Fill `coarser` (shape ceil(finer/2)) from `finer`, one coarser chunk at a time:
    2x2 means (`downsample_mean`), or with `labels` the 2x2 label mode (`downsample_labels`)."""
    reduce = downsample_labels if labels else downsample_mean
    ch, cw = coarser.chunks
    H, W = coarser.shape
    for y in range(0, H, ch):
        for x in range(0, W, cw):
            src = finer[2 * y : min(2 * (y + ch), finer.shape[0]), 2 * x : min(2 * (x + cw), finer.shape[1])]
            coarser[y : min(y + ch, H), x : min(x + cw, W)] = reduce(np.asarray(src))
