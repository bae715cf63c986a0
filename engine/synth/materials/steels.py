"""Steels: ferrite grains, pearlite colonies, lath martensite. Lengths in units of L."""

from __future__ import annotations

import numpy as np

from engine.synth.hashing import mix32, unit
from engine.synth.materials.base import Fields, Grid, groove, ramp
from engine.synth.noise import fbm, value_noise, worley

f32 = np.float32
TAU = f32(2 * np.pi)


def grains(g: Grid, seed: int, size: float = 1.0, warp: float = 0.12):
    """Voronoi grains of mean diameter ~`size` units; a low-frequency warp curves the
    boundaries slightly, as surface tension does in real grain structures.

    Returns the cells and the distance to the nearest boundary in units, float32 (h, w).
    """
    inv = f32(1.0 / size)
    y, x = g.y * inv, g.x * inv
    if warp:
        y = y + (value_noise(y * f32(0.8), x * f32(0.8), seed + 11) - f32(0.5)) * f32(2 * warp)
        x = x + (value_noise(y * f32(0.8) + f32(40.5), x * f32(0.8), seed + 12) - f32(0.5)) * f32(2 * warp)
    cells = worley(y, x, seed)
    edge = cells.edge()
    edge *= f32(size)
    return cells, edge


def lamellae(g: Grid, angle: np.ndarray, spacing: np.ndarray, phase: np.ndarray, fraction: float,
             seed: int, bend: float = 0.5) -> np.ndarray:
    """Fraction (0..1, float32) of the thinner phase of a lamellar aggregate.

    angle, spacing (units), phase (periods): per pixel, usually constant per colony.
    `bend` is how many periods the lamellae wander over a colony. When a period spans too
    few pixels to resolve, the contrast fades to the mean instead of aliasing.
    """
    periods_px = spacing / f32(g.px)
    if float(periods_px.max()) <= 2.0:  # nothing resolvable: skip the work
        return np.full(g.shape, f32(fraction))
    v = g.x * np.sin(angle) - g.y * np.cos(angle)
    v /= spacing
    v += phase
    v += fbm(g.y * f32(0.12), g.x * f32(0.12), seed, octaves=2) * f32(bend * 3)
    frac = v - np.floor(v)
    t = np.abs(frac - f32(0.5))  # 0.5 at the lamella centre
    out = ramp(t, 0.5 - fraction / 2, 1.0 / np.maximum(periods_px, 1.0))
    # resolving power: periods under ~2.5 px are averaged away
    resolve = np.clip((periods_px - 2.0) / 2.0, 0, 1)
    out *= resolve
    out += (1 - resolve) * f32(fraction)
    return out


def ferritic_steel(g: Grid, seed: int) -> Fields:
    """Equiaxed polygonal ferrite grains (L = grain diameter), nital-etched boundaries dark.

    Each grain etches to a slightly different depth and brightness (orientation-dependent
    attack).
    """
    cells, edge = grains(g, seed)
    gb = groove(edge, max(0.015, 1.0 * g.px))  # ~0.3 um groove, never under a pixel
    tint = cells.value(1) * f32(2) - f32(1)
    f = Fields.filled(g.shape, z=0.62)
    f.tint = tint
    f.height = gb * f32(0.8) + tint * f32(0.03)
    f.reflect = f32(0.84) + tint * f32(0.05)
    return f


def pearlite(g: Grid, seed: int, colony: float, ferrite_fraction: float = 0.0):
    """Pearlite colonies of `colony` units with lamellae of spacing ~1 unit.

    Returns (cementite fraction, colony boundary profile, per-colony tint, proeutectoid
    ferrite mask), float32 (h, w) each.
    """
    cells, edge = grains(g, seed, colony, warp=0.15)
    angle = cells.value(2) * f32(np.pi)
    # a section cuts lamellae at an angle, so the apparent spacing varies per colony
    spacing = f32(0.8) + cells.value(3) * f32(0.8)
    cem = lamellae(g, angle, spacing, cells.value(4), 0.22, seed + 5, bend=0.25)
    ferrite = (cells.value(5) < f32(ferrite_fraction)).astype(np.float32)
    cem *= 1 - ferrite
    gb = groove(edge, max(0.15, 1.0 * g.px))
    return cem, gb, cells.value(1) * f32(2) - f32(1), ferrite


def pearlitic_steel(g: Grid, seed: int) -> Fields:
    """Pearlite colonies (L = lamellar spacing): alternating ferrite and cementite
    lamellae whose orientation and apparent spacing change from colony to colony, with
    a few grains of proeutectoid ferrite. Nital etches ferrite, leaving cementite proud.
    """
    cem, gb, tint, ferrite = pearlite(g, seed, colony=14.0, ferrite_fraction=0.12)
    f = Fields.filled(g.shape, z=0.6)
    f.tint = tint * f32(0.6)
    # colony boundaries are not etched as grooves, only where the lamellae change
    f.height = (1 - cem) * f32(0.35) * (1 - ferrite) + gb * f32(0.12)
    f.reflect = f32(0.82) - cem * f32(0.25) + ferrite * f32(0.06)
    f.z = f32(0.6) - cem * f32(0.04)
    return f


def martensite(g: Grid, seed: int) -> Fields:
    """Lath martensite (L = lath width): prior austenite grains (~30 L) split into
    packets (~8 L) of parallel laths, broken along their length into needles whose ends
    are staggered; each lath etches to its own shade.
    """
    pag, pag_edge = grains(g, seed, 30.0, warp=0.1)
    packets, pk_edge = grains(g, seed + 1, 8.0, warp=0.2)
    # packets in one prior grain take one of a few habit-plane variants of its orientation
    variant = np.floor(packets.value(2) * f32(3)).astype(np.float32)
    angle = pag.value(2) * f32(np.pi) + variant * f32(np.pi / 3) + (packets.value(3) - f32(0.5)) * f32(0.2)
    width = f32(1.0) + pag.value(4) * f32(0.6)
    c, s = np.cos(angle), np.sin(angle)
    u = g.x * c + g.y * s
    v = g.x * s - g.y * c
    v /= width
    lath = np.floor(v)
    pkid = mix32(packets.ident ^ pag.ident)
    h_lath = mix32(lath.astype(np.int32).astype(np.uint32) * np.uint32(0x9E3779B1) ^ pkid)
    length = f32(5.0) + unit(h_lath) * f32(9.0)
    u = u / length + unit(mix32(h_lath ^ np.uint32(7)))
    seg = np.floor(u)
    h_needle = mix32(h_lath ^ seg.astype(np.int32).astype(np.uint32) * np.uint32(0x85EBCA6B))
    shade = unit(h_needle)
    # lath boundaries across the laths and needle ends along them
    across = np.abs(v - lath - f32(0.5))
    along = np.abs(u - seg - f32(0.5)) * length / width
    lb = groove(f32(0.5) - across, max(0.12, 0.8 * g.px / float(width.min())))
    lb = np.maximum(lb, groove(f32(0.5) * length / width - along, 0.5) * f32(0.6))
    boundary = np.maximum(groove(pag_edge, max(0.3, 1.2 * g.px)), groove(pk_edge, max(0.15, 0.8 * g.px)) * f32(0.6))
    f = Fields.filled(g.shape, z=0.6)
    f.tint = shade * f32(2) - f32(1)
    # laths temper differently: carbide density shows as backscatter contrast
    f.z = f32(0.45) + shade * f32(0.3)
    # nital barely marks prior austenite boundaries; the laths' relief dominates
    f.height = shade * f32(0.4) + lb * f32(0.15) + boundary * f32(0.25)
    f.reflect = f32(0.4) + shade * f32(0.5) - lb * f32(0.08)
    return f
