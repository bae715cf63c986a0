"""Non-metals: a sintered porous ceramic, a fibre-reinforced polymer, and a
nanocrystalline thin film seen at lattice resolution. Lengths in units of L."""

from __future__ import annotations

import numpy as np

from engine.synth.materials.base import Fields, Grid, groove, ramp
from engine.synth.noise import fbm, value_noise, worley

f32 = np.float32


def porous_ceramic(g: Grid, seed: int) -> Fields:
    """Sintered, thermally etched alumina-like ceramic (L = grain size, ~2 um):
    polygonal grains with grooved boundaries, residual pores at many triple junctions
    (concave-triangular, under ~0.3 L) and a few small round pores inside grains."""
    cells = worley(g.y, g.x, seed, third=True)
    edge = cells.edge()
    # at a triple junction the three nearest grain centres are equidistant
    junction = cells.d3 - cells.d1
    radius = np.maximum(cells.value(4) - f32(0.55), 0) * f32(0.45)
    pore = ramp(radius - junction, 0.0, g.px)
    small = worley(g.y * f32(1 / 1.7), g.x * f32(1 / 1.7), seed + 71)
    pore = np.maximum(pore, ramp(f32(0.05) - small.d1 * f32(1.7), 0.0, g.px) * (small.value(1) < f32(0.3)))
    gb = groove(edge, max(0.03, 0.9 * g.px))
    tint = cells.value(1) * f32(2) - f32(1)
    f = Fields.filled(g.shape, z=0.45)
    f.tint = tint
    f.height = np.maximum(gb * f32(0.6), pore) + tint * f32(0.04)
    f.reflect = f32(0.62) + tint * f32(0.04)
    f.z = f32(0.45) * (1 - pore * f32(0.6))
    return f


def fibre_composite(g: Grid, seed: int) -> Fields:
    """Carbon-fibre/epoxy cross-section (L = fibre diameter, ~7 um): round fibres of
    near-uniform diameter, locally hexagonally packed, with resin-rich pockets; fibres
    polish proud of the softer matrix."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, np.pi / 3)
    spacing = 1.16
    e1 = (spacing * np.sin(angle), spacing * np.cos(angle))
    e2 = (spacing * np.sin(angle + np.pi / 3), spacing * np.cos(angle + np.pi / 3))
    # a slow warp bends the packing so it is hexagonal only locally
    wy = fbm(g.y * f32(0.05), g.x * f32(0.05), seed + 81, octaves=2) * f32(0.5)
    wx = fbm(g.y * f32(0.05) + f32(9.5), g.x * f32(0.05), seed + 82, octaves=2) * f32(0.5)
    cells = worley(g.y + wy, g.x + wx, seed + 83, jitter=0.05, basis=(e1, e2))
    # resin-rich pockets where fibres are missing; a fibre may reach past its own
    # lattice cell into a missing neighbour's, so the second-nearest counts too
    pocket = value_noise(g.y * f32(0.15), g.x * f32(0.15), seed + 84) * f32(0.35) + f32(0.02)
    fibre = ramp(f32(0.5) * (f32(0.97) + cells.value(2) * f32(0.06)) - cells.d1, 0.0, g.px)
    fibre *= cells.value(1) > pocket
    other = ramp(f32(0.5) * (f32(0.97) + cells.value2(2) * f32(0.06)) - cells.d2, 0.0, g.px)
    other *= cells.value2(1) > pocket
    np.maximum(fibre, other, out=fibre)
    f = Fields.filled(g.shape, z=0.25)
    f.z = f32(0.25) + fibre * f32(0.12)
    f.reflect = f32(0.28) + fibre * (f32(0.42) + (cells.value(3) - f32(0.5)) * f32(0.06))
    f.height = (1 - fibre) * f32(0.12)
    f.tint = fibre * (cells.value(4) - f32(0.5)) * f32(0.3)
    return f


def thin_film_lattice(g: Grid, seed: int) -> Fields:
    """Nanocrystalline film at lattice resolution (L = lattice fringe spacing,
    ~0.25 nm): grains of ~15 L, each showing one set of fringes, crossed fringes of
    a zone axis, or no fringes (off-zone or amorphous), with orientation and plane
    spacing per grain and contrast fading with local thickness."""
    cells = worley(g.y * f32(1 / 15.0), g.x * f32(1 / 15.0), seed, jitter=0.9)
    mode = cells.value(5)
    angle = cells.value(2) * f32(np.pi)
    spacing = np.where(cells.value(3) < f32(0.5), f32(1.0), f32(1.16)) * (f32(0.97) + cells.value(6) * f32(0.06))
    k = f32(2 * np.pi) / spacing
    v1 = (g.x * np.sin(angle) - g.y * np.cos(angle)) * k + cells.value(4) * f32(6.283)
    fringe = np.cos(v1)
    crossed = mode >= f32(0.5)
    a2 = angle + np.where(cells.value(7) < f32(0.5), f32(np.pi / 3), f32(np.pi / 2))
    v2 = (g.x * np.sin(a2) - g.y * np.cos(a2)) * k
    fringe = np.where(crossed, (fringe + np.cos(v2)) * f32(0.6), fringe)
    amp = f32(0.6) + value_noise(g.y * f32(0.2), g.x * f32(0.2), seed + 92) * f32(0.4)
    # a period under ~2.5 px cannot be resolved: fade instead of aliasing
    amp *= np.clip((spacing / f32(g.px) - 2.0) / 2.0, 0, 1)
    signal = fringe * amp
    amorphous = mode < f32(0.15)
    if amorphous.any():  # speckle only where it shows
        yy = np.broadcast_to(g.y, g.shape)[amorphous] * f32(1.4)
        signal[amorphous] = fbm(yy, g.x[amorphous] * f32(1.4), seed + 91, octaves=2) * f32(0.8)
    f = Fields.filled(g.shape, z=0.45)
    f.z = f32(0.45) + signal * f32(0.25)
    f.tint = (cells.value(1) - f32(0.5)) * f32(0.4)
    f.reflect = f32(0.5) + signal * f32(0.1)
    return f
