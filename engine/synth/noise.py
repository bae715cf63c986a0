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
    """Cells of the points and the small cell grid covering them plus `margin`.

    Returns floor(y), floor(x) (float32, shapes of y and x), the flat index of each
    point's cell in the grid (intp, broadcast shape), the grid's cell rows (gh, 1) and
    columns (1, gw) as int64, and gw. `y` may be (h, 1): rows share their cell row.
    """
    fy = np.floor(y)
    fx = np.floor(x)
    y0 = int(fy.min()) - margin
    x0 = int(fx.min()) - margin
    gh = int(fy.max()) - y0 + 1 + margin
    gw = int(fx.max()) - x0 + 1 + margin
    gy = np.arange(y0, y0 + gh, dtype=np.int64)[:, None]
    gx = np.arange(x0, x0 + gw, dtype=np.int64)[None, :]
    base = (fy - np.float32(y0)).astype(np.intp) * gw + (fx - np.float32(x0)).astype(np.intp)
    return fy, fx, base, gy, gx, gw


def value_noise(y: np.ndarray, x: np.ndarray, seed: int) -> np.ndarray:
    """Smoothstep-interpolated lattice noise, float32 in [0, 1), feature size ~1 unit."""
    fy, fx, base, gy, gx, gw = _cell_grid(y, x, 1)
    g = unit(hash2(gy, gx, seed)).ravel()
    ty = y - fy
    ty = ty * ty * (3 - 2 * ty)
    tx = x - fx
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
    k0 = int(k.min())
    lattice = unit(hash1(np.arange(k0, int(k.max()) + 2), seed))  # hash the few lattice points once
    ki = (k - np.float32(k0)).astype(np.intp)
    a = lattice.take(ki)
    b = lattice.take(ki + 1)
    b -= a
    b *= f
    b += a
    return b


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
    point; ident, ident2: uint32 hashes of the nearest and second-nearest points' cells,
    global identities usable as seeds for per-cell properties; fy, fx: float32 position
    of the nearest point; gap: float32 distance between the nearest and second-nearest
    points; d3 (when asked): distance to the third-nearest point.
    """

    d1: np.ndarray
    d2: np.ndarray
    ident: np.ndarray
    ident2: np.ndarray
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

    def value2(self, k: int) -> np.ndarray:
        """`value(k)` of the second-nearest point's cell."""
        return unit(rehash(self.ident2, k))


def worley(y: np.ndarray, x: np.ndarray, seed: int, *, jitter: float = 1.0, third: bool = False,
           basis: tuple[tuple[float, float], tuple[float, float]] | None = None) -> Cells:
    """Cellular noise with one feature point per lattice cell, searched over 3x3 cells.

    `jitter` in [0, 1] is how far a point may stray from its cell centre (1: anywhere in
    the cell, a Poisson-like Voronoi; smaller: more regular cells). `basis`, two (y, x)
    lattice vectors, replaces the unit square lattice (e.g. hexagonal packing); distances
    and positions are then in the units of y and x.

    Any point outside the 3x3 cells is at least one cell away, so every distance under
    one cell is exact; d3 (and rarely d2) may be overestimated where it is larger, which
    is where no caller looks (boundaries and junctions are where they are small).
    """
    if basis is None:
        ly, lx = y, x
    else:
        (ay, ax), (by_, bx) = basis
        det = ay * bx - by_ * ax
        ly = (y * np.float32(bx) - x * np.float32(by_)) * np.float32(1 / det)
        lx = (x * np.float32(ay) - y * np.float32(ax)) * np.float32(1 / det)
    _, _, base, gy, gx, gw = _cell_grid(ly, lx, 1)
    base = np.broadcast_to(base, x.shape)
    h = hash2(gy, gx, seed)
    j = np.float32(jitter)
    half = np.float32(0.5)
    fy_grid = (gy.astype(np.float32) + half + (unit(rehash(h, 101)) - half) * j).ravel()
    fx_grid = (gx.astype(np.float32) + half + (unit(rehash(h, 102)) - half) * j).ravel()
    if basis is not None:
        fy_grid, fx_grid = (fy_grid * np.float32(ay) + fx_grid * np.float32(by_),
                            fy_grid * np.float32(ax) + fx_grid * np.float32(bx))
    # Sort keys: a non-negative float32's bits order like the float, so the squared
    # distance's bits with the neighbour number k (0-8) in the 4 lowest mantissa bits
    # (a relative change under 2e-6) let integer min/max track the nearest points and
    # which neighbour they came from, with no masked copies (numpy's slowest path).
    offsets = np.array([dy * gw + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dtype=np.intp)
    low = np.int32(15)
    keep = np.int32(~15)
    big = np.int32(np.iinfo(np.int32).max)
    d1 = d2 = d3 = None
    tmp = np.empty(x.shape, np.int32)
    for k, off in enumerate(offsets):
        idx = base + off
        d = fy_grid.take(idx)
        d -= y
        d *= d
        e = fx_grid.take(idx)
        e -= x
        e *= e
        d += e
        key = d.view(np.int32)
        key &= keep
        key |= np.int32(k)
        if d1 is None:
            d1, d2 = key, np.full(x.shape, big, np.int32)
            d3 = np.full(x.shape, big, np.int32) if third else None
            continue
        if third:
            np.maximum(d2, key, out=tmp)
            np.minimum(d3, tmp, out=d3)
        np.maximum(d1, key, out=tmp)
        np.minimum(d2, tmp, out=d2)
        np.minimum(d1, key, out=d1)
    best = base + offsets.take(d1 & low)
    second = base + offsets.take(d2 & low)

    def distance(key):
        key &= keep
        out = key.view(np.float32)
        return np.sqrt(out, out=out)

    d1, d2 = distance(d1), distance(d2)
    if third:
        d3 = distance(d3)
    fy, fx = fy_grid.take(best), fx_grid.take(best)
    gy2 = fy_grid.take(second)
    gy2 -= fy
    gy2 *= gy2
    gx2 = fx_grid.take(second)
    gx2 -= fx
    gx2 *= gx2
    gy2 += gx2
    h = h.ravel()
    return Cells(d1, d2, h.take(best), h.take(second), fy, fx, np.sqrt(gy2, out=gy2), d3)
