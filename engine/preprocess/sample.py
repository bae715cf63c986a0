"""Reading what a fit needs from one pyramid level, chunk by chunk, in bounded memory.

`scan_level` reads stored chunks (shards, for a sharded array) of one level and keeps,
from each, only

- a strided sample: every k-th pixel of every k-th row, on one lattice over the whole
  level (rows and columns divisible by k), so the sample does not depend on how the
  level is chunked; pixels are not averaged, so the sample has a tile's noise;
- block sums and counts of finite pixels over a fixed grid of cells (cell (i, j) covers
  level pixels [i * by, (i + 1) * by) x [j * bx, (j + 1) * bx); the partial cells past
  the last full one are left out), for a block-averaged view of the level.

At most `workers` chunks are decoded at once; nothing of the size of the level is
allocated, whatever its chunking (a one-chunk 4096 x 4096 level holds one chunk).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from engine.stores.image import chunk_grid

WORKERS = 4  # chunks decoded at once (reads release the GIL; memory is ~WORKERS chunks)


@dataclass(frozen=True)
class SampleBlock:
    """The strided sample of one chunk: values (n, m) float64, raw units (non-finite pixels
    kept as they are), and the level pixel indices of its rows (n,) and columns (m,)."""

    values: np.ndarray
    rows: np.ndarray
    cols: np.ndarray


@dataclass(frozen=True)
class Scan:
    """What `scan_level` kept. blocks: the strided sample, one block per chunk read.
    sums, counts: (gh, gw) float64 sums and int64 counts of finite pixels per cell
    (None when no cells were asked for)."""

    blocks: list[SampleBlock]
    sums: np.ndarray | None
    counts: np.ndarray | None

    def finite_values(self, transform=None) -> np.ndarray:
        """The sample's finite values as one flat float64 array, after `transform(block)`
        (a function of a `SampleBlock` returning its values changed, e.g. flattened)."""
        parts = [(b.values if transform is None else transform(b)).ravel() for b in self.blocks]
        values = np.concatenate(parts) if parts else np.zeros(0)
        return values[np.isfinite(values)]


def spread_indices(n: int, m: int) -> np.ndarray:
    """At most m of range(n), evenly spread and including both ends."""
    if m >= n:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max(m, 1))).astype(np.int64))


def scan_level(arr, *, stride: int | None = None, cells: tuple[int, int] | None = None,
               chunk_rows=None, chunk_cols=None, workers: int = WORKERS) -> Scan:
    """Scan the (y, x) plane of `arr` (a zarr array, leading axes at index 0).

    stride: k of the strided sample (None: no sample). cells: (by, bx) cell size in level
    pixels for block sums (None: none). chunk_rows, chunk_cols: indices of the chunk rows
    and columns to read (None: all); cells need every chunk, so they go with all only.
    """
    h, w = arr.shape[-2:]
    cy, cx = chunk_grid(arr)
    rows = np.arange(math.ceil(h / cy)) if chunk_rows is None else np.asarray(chunk_rows)
    cols = np.arange(math.ceil(w / cx)) if chunk_cols is None else np.asarray(chunk_cols)
    if cells is not None and (chunk_rows is not None or chunk_cols is not None):
        raise ValueError("block sums need every chunk of the level; chunk_rows/chunk_cols select a part")
    lead = (0,) * (len(arr.shape) - 2)
    grid = None
    if cells is not None:
        by, bx = cells
        grid = (by, bx, h // by, w // bx)

    def read(rc):
        r, c = rc
        y0, x0 = int(r) * cy, int(c) * cx
        y1, x1 = min(y0 + cy, h), min(x0 + cx, w)
        block = np.asarray(arr[lead + (slice(y0, y1), slice(x0, x1))])
        sample = None
        if stride is not None:
            sy, sx = (-y0) % stride, (-x0) % stride  # first rows/columns on the global lattice
            values = block[sy::stride, sx::stride].astype(np.float64)
            sample = SampleBlock(values, np.arange(y0 + sy, y1, stride), np.arange(x0 + sx, x1, stride))
        part = None if grid is None else _cell_sums(block, y0, x0, grid)
        return sample, part

    tasks = [(r, c) for r in rows for c in cols]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(tasks)))) as pool:
        results = list(pool.map(read, tasks))
    blocks = [s for s, _ in results if s is not None and s.values.size]
    sums = counts = None
    if grid is not None:
        sums, counts = np.zeros(grid[2:]), np.zeros(grid[2:], np.int64)
        for _, part in results:
            if part is not None:
                ci, cj, s, n = part
                sums[np.ix_(ci, cj)] += s  # integer pixels sum exactly in float64 (< 2**53)
                counts[np.ix_(ci, cj)] += n
    return Scan(blocks, sums, counts)


def _cell_sums(block: np.ndarray, y0: int, x0: int, grid):
    """Sums and counts of finite pixels of `block` (placed at level pixel (y0, x0)) per
    cell it touches: (cell rows, cell columns, sums, counts), or None if it touches none."""
    by, bx, gh, gw = grid
    ys, xs = _segments(y0, block.shape[0], by, gh), _segments(x0, block.shape[1], bx, gw)
    if ys is None or xs is None:
        return None
    (ry, ci, hy), (rx, cj, hx) = ys, xs
    # One cell row at a time: sum(dtype=float64) accumulates without a float64 copy of
    # the chunk (reduceat with a dtype would cast all of it first).
    s, n = np.empty((len(ry), hx)), np.empty((len(ry), hx), np.int64)
    for i, (r0, r1) in enumerate(zip(ry, np.append(ry[1:], hy))):
        strip = block[r0:r1, :hx]
        if strip.dtype.kind == "f":
            finite = np.isfinite(strip)
            strip = np.where(finite, strip, 0)
            n[i] = finite.sum(axis=0)
        else:
            n[i] = r1 - r0
        s[i] = strip.sum(axis=0, dtype=np.float64)
    s, n = np.add.reduceat(s, rx, axis=1), np.add.reduceat(n, rx, axis=1)
    return ci, cj, s, n


def _segments(start: int, length: int, size: int, n_cells: int):
    """Where cells of `size` begin within [start, start + length) (relative indices), their
    cell indices, and the length that lies in full cells; None if none does."""
    end = min(start + length, n_cells * size)
    if end <= start:
        return None
    first = start // size
    edges = np.arange(first, (end - 1) // size + 1) * size
    return np.maximum(edges, start) - start, edges // size, end - start
