"""Cast irons: graphite flakes (grey) and spheroids (nodular) in a steel matrix.

Graphite particles are sparse objects on a lattice: each lattice cell holds at most a
few, their parameters hashed from the cell, and each is drawn only over its own bounding
window (`Grid.window`), which is cheaper than testing every pixel against every cell.
"""

from __future__ import annotations

import numpy as np

from engine.synth.hashing import hash2, rehash, unit
from engine.synth.materials.base import Fields, Grid, ramp
from engine.synth.materials.steels import pearlite
from engine.synth.noise import fbm

f32 = np.float32


def _matrix(g: Grid, seed: int, spacing_units: float) -> tuple[np.ndarray, np.ndarray]:
    """Pearlitic matrix: (reflectance, height), float32. Lamellae of `spacing_units` are
    usually too fine to resolve at these magnifications and show as grey colonies."""
    scale = f32(1.0 / spacing_units)
    sub = Grid(g.y * scale, g.x * scale, g.px / spacing_units, g.shift / spacing_units)
    cem, _, tint, _ = pearlite(sub, seed, colony=40.0)
    # colonies etch to different shades (lamellar spacing and orientation vary); their
    # boundaries are not resolved at these magnifications
    mottle = fbm(g.y * f32(1.5), g.x * f32(1.5), seed + 3, octaves=2)
    reflect = f32(0.56) - cem * f32(0.5) + tint * f32(0.05) + mottle * f32(0.08)
    height = (1 - cem) * f32(0.2)
    return reflect, height


def grey_cast_iron(g: Grid, seed: int) -> Fields:
    """Type-A graphite flakes (L = flake thickness, ~4 um): curved, tapered, sometimes
    branched plates 6-18 L long in random orientation, in a pearlitic matrix."""
    graphite = np.zeros(g.shape, np.float32)
    size = 9.0
    iy, ix = g.cells_in(size, 12.0)
    h = hash2(iy, ix, seed + 21)
    for k in range(2):  # a main flake and often a branch from it
        hk = rehash(h, 10 * k)
        keep = unit(rehash(hk, 1)) < (0.95 if k == 0 else 0.6)
        cy = (iy + unit(rehash(h, 2))) * size
        cx = (ix + unit(rehash(h, 3))) * size
        angle = unit(rehash(h, 4)) * np.pi
        length = 8.0 + unit(rehash(h, 5)) * 14.0
        if k == 1:  # the branch leaves the main flake part way along at an angle
            t = (unit(rehash(hk, 6)) - 0.5) * length * 0.6
            cy, cx = cy + np.sin(angle) * t, cx + np.cos(angle) * t
            angle = angle + np.where(unit(rehash(hk, 7)) < 0.5, -1, 1) * (0.4 + 0.5 * unit(rehash(hk, 8)))
            length = length * (0.3 + 0.3 * unit(rehash(hk, 9)))
            cy, cx = cy + np.sin(angle) * length / 2, cx + np.cos(angle) * length / 2
        bend = (unit(rehash(hk, 11)) - 0.5) * 0.12
        thick = 0.5 + unit(rehash(hk, 12)) * 0.7
        keep &= _touches(g, cy, cx, _flake_reach(length, bend, thick))
        for j in np.flatnonzero(keep):
            _flake(g, graphite, float(cy[j]), float(cx[j]), float(angle[j]), float(length[j]),
                   float(bend[j]), float(thick[j]), int(hk[j]))
    reflect, height = _matrix(g, seed, 0.1)
    f = Fields.filled(g.shape, z=0.6)
    reflect += (f32(0.17) - reflect) * graphite
    height += (f32(0.45) - height) * graphite
    f.reflect, f.height = reflect, height
    f.z = f32(0.6) - graphite * f32(0.5)
    return f


def _flake(g: Grid, out: np.ndarray, cy: float, cx: float, angle: float, length: float,
           bend: float, thick: float, seed: int) -> None:
    """Draw one flake (max with `out`): a tapered plate of `thick` units along a bent,
    kinked centre line `length` units long."""
    reach = _flake_reach(length, bend, thick)
    win = g.window(cy - reach, cy + reach, cx - reach, cx + reach)
    if win is None:
        return
    rs, cs = win
    y, x = g.y[rs] - f32(cy), g.x[rs, cs] - f32(cx)
    c, s = f32(np.cos(angle)), f32(np.sin(angle))
    a = x * c + y * s
    b = y * c - x * s
    b -= f32(bend) * a * a
    # flakes wander and kink, and their faces are rough: a few incommensurate waves
    # (cheaper than lattice noise, which matters with thousands of flakes per chunk)
    u = unit(rehash(np.array([seed], np.uint32), 1)).item(), unit(rehash(np.array([seed], np.uint32), 2)).item()
    b += np.sin(a * f32(0.45) + f32(6.283 * u[0])) * f32(0.45)
    b += np.sin(a * f32(1.3) + f32(6.283 * u[1])) * f32(0.18)
    b += np.sin(a * f32(3.7) + f32(3.1 * u[0] + 1.7)) * f32(0.06 * thick)
    t = a * f32(2 / length)
    t *= t
    np.subtract(1, t, out=t)
    np.maximum(t, 0, out=t)
    half = np.sqrt(t, out=t)
    half *= f32(thick / 2)
    half -= np.abs(b)
    inside = ramp(half, 0.0, g.px)
    np.maximum(out[rs, cs], inside, out=out[rs, cs])


def _flake_reach(length, bend, thick):
    """Bound on a flake's extent from its centre (units): half length, bow, kinks, width."""
    return length / 2 + np.abs(bend) * length * length / 4 + thick + 0.8


def _touches(g: Grid, cy: np.ndarray, cx: np.ndarray, reach) -> np.ndarray:
    """Which objects (centres, reach in units) can touch the grid's samples."""
    y0, y1 = float(g.y[0, 0]), float(g.y[-1, 0])
    x0, x1 = float(g.x.min()), float(g.x.max())
    return (cy + reach >= y0) & (cy - reach <= y1) & (cx + reach >= x0) & (cx - reach <= x1)


def nodular_cast_iron(g: Grid, seed: int) -> Fields:
    """Spheroidal graphite (L = nodule diameter, ~30 um) in pearlite, each nodule ringed
    by a bright ferrite halo ("bull's eye"); halos of close nodules merge."""
    size = 2.4
    iy, ix = g.cells_in(size, 1.2)
    h = hash2(iy, ix, seed + 31)
    keep = unit(rehash(h, 1)) < 0.8
    cy = (iy + 0.27 + 0.46 * unit(rehash(h, 2))) * size
    cx = (ix + 0.27 + 0.46 * unit(rehash(h, 3))) * size
    # nodule sizes are log-normal-ish with some small late-nucleated ones
    # sizes log-normal-ish, with some small late-nucleated nodules; never so large that
    # neighbours (centres >= 0.46 cells = 1.1 units apart) would touch
    radius = np.minimum(0.48 * np.exp(0.25 * (unit(rehash(h, 4)) + unit(rehash(h, 5)) - 1.0) * 2), 0.55)
    radius = np.where(unit(rehash(h, 6)) < 0.2, radius * 0.45, radius)
    halo = 0.18 + 0.22 * unit(rehash(h, 7))
    keep &= _touches(g, cy, cx, radius + halo + 0.1)
    # clearance: min over nodules of (distance - radius) / halo width
    nod = np.zeros(g.shape, np.float32)
    ring = np.full(g.shape, np.inf, np.float32)
    for j in np.flatnonzero(keep):
        r, w = float(radius[j]), float(halo[j])
        reach = r + w + 0.1
        win = g.window(cy[j] - reach, cy[j] + reach, cx[j] - reach, cx[j] + reach)
        if win is None:
            continue
        rs, cs = win
        d = np.sqrt((g.y[rs] - f32(cy[j])) ** 2 + (g.x[rs, cs] - f32(cx[j])) ** 2)
        np.maximum(nod[rs, cs], ramp(f32(r) - d, 0.0, g.px), out=nod[rs, cs])
        np.minimum(ring[rs, cs], (d - f32(r)) / f32(w), out=ring[rs, cs])
    # halo edge made irregular by the ferrite grains growing into the pearlite
    rough = fbm(g.y * f32(6), g.x * f32(6), seed + 33, octaves=2) * f32(0.35)
    ferrite = 1 - ramp(ring + rough, 1.0, 0.1)
    reflect, height = _matrix(g, seed, 0.015)
    reflect += (f32(0.88) - reflect) * ferrite
    height *= 1 - ferrite
    # graphite polishes below the matrix; radial growth sectors show faintly
    reflect += (f32(0.16) + fbm(g.y * f32(9), g.x * f32(9), seed + 34, octaves=1) * f32(0.04) - reflect) * nod
    height += (f32(0.4) - height) * nod
    f = Fields.filled(g.shape, z=0.6)
    f.reflect, f.height = reflect, height
    f.z = f32(0.6) - nod * f32(0.5)
    f.tint = ferrite * f32(0.2)
    return f
