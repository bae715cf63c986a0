"""Procedural noise on hashed lattices: value noise, fBm and Worley (cellular) noise.

Inputs are coordinates in lattice units: `y` of shape (h, 1) or (h, w) and `x` of shape
(h, w), float32. Lattice values come from `hashing.hash2(cell_y, cell_x, seed)`, so the
result at a point depends only on the point and the seed, never on which chunk asked:
a chunk is rendered alone, and neighbouring chunks meet without seams.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.synth.hashing import hash1, hash2, rehash, unit


def _cell_grid(y: np.ndarray, x: np.ndarray, margin: int):
    """Integer cells of the points, and the small cell grid covering them plus `margin`."""
    yb = np.broadcast_to(y, x.shape)
    cy = np.floor(yb).astype(np.int32)
    cx = np.floor(x).astype(np.int32)
    y0 = int(cy.min()) - margin
    x0 = int(cx.min()) - margin
    gh = int(cy.max()) - y0 + 1 + margin
    gw = int(cx.max()) - x0 + 1 + margin
    gy = np.arange(y0, y0 + gh, dtype=np.int64)[:, None]
    gx = np.arange(x0, x0 + gw, dtype=np.int64)[None, :]
    base = (cy - y0) * gw + (cx - x0)
    return yb, base, gy, gx, gw


def value_noise(y: np.ndarray, x: np.ndarray, seed: int) -> np.ndarray:
    """Smoothstep-interpolated lattice noise, float32 in [0, 1), feature size ~1 unit."""
    yb, base, gy, gx, gw = _cell_grid(y, x, 1)
    g = unit(hash2(gy, gx, seed)).ravel()
    ty = yb - np.floor(yb)
    ty = ty * ty * (3 - 2 * ty)
    tx = x - np.floor(x)
    tx = tx * tx * (3 - 2 * tx)
    a = g.take(base)
    b = g.take(base + 1)
    a += (b - a) * tx
    c = g.take(base + gw)
    d = g.take(base + gw + 1)
    c += (d - c) * tx
    a += (c - a) * ty
    return a


def value_noise_1d(t: np.ndarray, seed: int) -> np.ndarray:
    """Smooth 1-D lattice noise along `t` (any shape, float32), in [0, 1)."""
    k = np.floor(t)
    f = t - k
    f = f * f * (3 - 2 * f)
    ki = k.astype(np.int64)
    a = unit(hash1(ki, seed))
    b = unit(hash1(ki + 1, seed))
    return a + (b - a) * f


def fbm(y: np.ndarray, x: np.ndarray, seed: int, octaves: int = 3, gain: float = 0.5) -> np.ndarray:
    """Fractal sum of value noise, float32 centred on 0 and within about [-1, 1].

    Octave k has feature size 2**-k units; the lattice of each octave is offset so octaves
    do not share lattice points (which would show as a grid).
    """
    total = np.zeros(np.broadcast_shapes(y.shape, x.shape), np.float32)
    amp, norm, f = 1.0, 0.0, 1.0
    for k in range(octaves):
        off = np.float32(17.31 * k)
        n = value_noise(y * np.float32(f) + off, x * np.float32(f) - off, seed + 7919 * k)
        n -= np.float32(0.5)
        n *= np.float32(2 * amp)
        total += n
        norm += amp
        amp *= gain
        f *= 2.0
    total *= np.float32(1.0 / norm)
    return total


@dataclass
class Cells:
    """Worley noise at each point, all (h, w).

    d1, d2: float32 distances (lattice units) to the nearest and second-nearest feature
    point; ident: uint32 hash of the nearest point's cell, a global identity usable as a
    seed for per-cell properties; fy, fx: float32 position of the nearest point; gap:
    float32 distance between the nearest and second-nearest points; d3 (when asked):
    distance to the third-nearest point.
    """

    d1: np.ndarray
    d2: np.ndarray
    ident: np.ndarray
    fy: np.ndarray
    fx: np.ndarray
    gap: np.ndarray
    d3: np.ndarray | None = None

    def edge(self) -> np.ndarray:
        """Distance (lattice units) to the boundary with the next cell: the perpendicular
        bisector of the two nearest points, (d2^2 - d1^2) / (2 |p2 - p1|).

        (d2 - d1) / 2 would be cheaper but fattens the boundaries around small cells.
        """
        out = self.d2 * self.d2
        out -= self.d1 * self.d1
        out /= np.maximum(self.gap, np.float32(1e-6)) * np.float32(2)
        return out

    def value(self, k: int) -> np.ndarray:
        """Per-cell uniform float32 in [0, 1), stream `k` (constant inside a cell)."""
        return unit(rehash(self.ident, k))


def worley(y: np.ndarray, x: np.ndarray, seed: int, *, jitter: float = 1.0, third: bool = False,
           basis: tuple[tuple[float, float], tuple[float, float]] | None = None) -> Cells:
    """Cellular noise with one feature point per lattice cell, searched over 3x3 cells.

    `jitter` in [0, 1] is how far a point may stray from its cell centre (1: anywhere in
    the cell, a Poisson-like Voronoi; smaller: more regular cells). `basis`, two (y, x)
    lattice vectors, replaces the unit square lattice (e.g. hexagonal packing); distances
    and positions are then in the units of y and x.
    """
    yb = np.broadcast_to(y, x.shape)
    if basis is None:
        ly, lx = y, x
    else:
        (ay, ax), (by_, bx) = basis
        det = ay * bx - by_ * ax
        ly = (yb * np.float32(bx) - x * np.float32(by_)) * np.float32(1 / det)
        lx = (x * np.float32(ay) - yb * np.float32(ax)) * np.float32(1 / det)
    _, base, gy, gx, gw = _cell_grid(ly, lx, 1)
    h = hash2(gy, gx, seed)
    j = np.float32(jitter)
    half = np.float32(0.5)
    fy_grid = (gy.astype(np.float32) + half + (unit(rehash(h, 101)) - half) * j).ravel()
    fx_grid = (gx.astype(np.float32) + half + (unit(rehash(h, 102)) - half) * j).ravel()
    if basis is not None:
        fy_grid, fx_grid = (fy_grid * np.float32(ay) + fx_grid * np.float32(by_),
                            fy_grid * np.float32(ax) + fx_grid * np.float32(bx))
    inf = np.float32(np.inf)
    d1 = np.full(x.shape, inf, np.float32)
    d2 = np.full(x.shape, inf, np.float32)
    d3 = np.full(x.shape, inf, np.float32) if third else None
    best = np.zeros(x.shape, np.int32)
    second = np.zeros(x.shape, np.int32)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            idx = base + (dy * gw + dx)
            d = fy_grid.take(idx)
            d -= yb
            d *= d
            e = fx_grid.take(idx)
            e -= x
            e *= e
            d += e
            nearer = d < d1
            closer2 = d < d2
            if third:
                np.minimum(d3, d, out=d3)
                np.copyto(d3, d2, where=closer2)
            np.minimum(d2, d, out=d2)
            np.copyto(d2, d1, where=nearer)
            np.copyto(d1, d, where=nearer)
            np.copyto(second, idx, where=closer2)
            np.copyto(second, best, where=nearer)
            np.copyto(best, idx, where=nearer)
    np.sqrt(d1, out=d1)
    np.sqrt(d2, out=d2)
    if third:
        np.sqrt(d3, out=d3)
    fy, fx = fy_grid.take(best), fx_grid.take(best)
    gy2 = fy_grid.take(second)
    gy2 -= fy
    gy2 *= gy2
    gx2 = fx_grid.take(second)
    gx2 -= fx
    gx2 *= gx2
    gy2 += gx2
    return Cells(d1, d2, h.ravel().take(best), fy, fx, np.sqrt(gy2, out=gy2), d3)
