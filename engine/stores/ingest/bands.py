"""A (y, x) plane read a band of rows at a time, so an image larger than memory can be ingested.

A reader returns a `BandedPlane` for a plane too large to decode whole (see
`engine.stores.ingest.tiff_planes`); ingest writes it band by band. `as_banded` gives an
in-memory array the same interface, so ingest has one write path for both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class BandedPlane:
    """A (y, x) plane whose pixels are decoded on demand, top to bottom.

    `shape`: (y, x) in pixels, `dtype`: native byte order; both as ingested, after the
    reader's conversions (colour to gray, inversion, cropping). `blocks()` yields the
    plane as consecutive (rows, x) arrays covering rows 0..y, of whatever height the
    file decodes at once; each call reads the file afresh. `np.asarray(plane)` decodes
    the whole plane (for callers that want an array and have the memory).
    """

    shape: tuple[int, int]
    dtype: np.dtype
    blocks: Callable[[], Iterator[np.ndarray]]

    @property
    def ndim(self) -> int:
        return 2

    def bands(self, rows: int) -> Iterator[np.ndarray]:
        """(rows, x) bands top to bottom; the last holds what is left. Memory: about one
        band plus one decoded block."""
        return _rebanded(self.blocks(), rows)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        y = 0
        for block in self.blocks():
            out[y : y + block.shape[0]] = block
            y += block.shape[0]
        return out if dtype is None else out.astype(dtype, copy=False)


def as_banded(pixels: np.ndarray | BandedPlane) -> BandedPlane:
    """`pixels` as a BandedPlane; an in-memory (y, x) array is one block (bands are views)."""
    if isinstance(pixels, BandedPlane):
        return pixels
    return BandedPlane(tuple(pixels.shape), pixels.dtype, lambda: iter((pixels,)))


def _rebanded(blocks: Iterable[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """`blocks` (consecutive row blocks of any heights) regrouped into bands of `rows` rows."""
    if rows < 1:
        raise ValueError(f"a band needs at least one row, got {rows}")
    pending: list[np.ndarray] = []
    have = 0
    for block in blocks:
        pending.append(block)
        have += block.shape[0]
        while have >= rows:
            # A block holding whole bands is sliced without copying (an in-memory array).
            joined = pending[0] if len(pending) == 1 else np.concatenate(pending)
            yield joined[:rows]
            rest = joined[rows:]
            pending, have = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
    if have:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)
