"""Non-ferrous alloys: precipitation-hardened Al, alpha-beta Ti, Ni superalloy, and an
additively manufactured alloy. Lengths in units of each material's L."""

from __future__ import annotations

import numpy as np

from engine.synth.hashing import hash2, mix32, rehash, unit
from engine.synth.materials.base import Fields, Grid, groove, ramp
from engine.synth.materials.steels import grains, lamellae
from engine.synth.noise import fbm, worley

f32 = np.float32


def al_alloy_precipitates(g: Grid, seed: int) -> Fields:
    """Large Al grains (~60 L) full of fine precipitates (L = precipitate size, ~50 nm):
    round in some grains, in others needles along two perpendicular directions (theta'
    plates seen edge-on); precipitate-free zones along grain boundaries, with coarser
    particles on the boundaries themselves."""
    grain, edge = grains(g, seed, 60.0, warp=0.08)
    size = 3.2
    cells = worley(g.y * f32(1 / size), g.x * f32(1 / size), seed + 41)
    dy = (g.y * f32(1 / size) - cells.fy) * f32(size)
    dx = (g.x * f32(1 / size) - cells.fx) * f32(size)
    rods = grain.value(5) < f32(0.5)
    angle = grain.value(2) * f32(np.pi) + np.where(cells.value(3) < f32(0.5), f32(0), f32(np.pi / 2))
    c, s = np.cos(angle), np.sin(angle)
    a = dx * c + dy * s
    b = dy * c - dx * s
    r = (f32(0.35) + cells.value(4) * f32(0.3)) * np.where(rods, f32(0.45), f32(1.0))
    # theta' plates seen edge-on: thin needles, ~6x longer than thick
    aspect = np.where(rods, f32(1.0) / (f32(4.5) + cells.value(6) * f32(2.5)), f32(1.0))
    a *= aspect
    a *= a
    b *= b
    a += b
    dist = np.sqrt(a)
    present = cells.value(1) < f32(0.8)
    pfz = ramp(edge, 1.2, 0.4)  # precipitate-free zone near boundaries
    ppt = ramp(r - dist, 0.0, g.px) * present * pfz
    # coarser particles on the boundaries: evaluated only at the few pixels near one
    near = edge < f32(0.35)
    if near.any():
        yy = np.broadcast_to(g.y, g.shape)[near] * f32(1 / 3.0)
        gbp = worley(yy, g.x[near] * f32(1 / 3.0), seed + 43)
        gbppt = ramp(f32(0.7) - gbp.d1 * f32(3.0), 0.0, g.px) * (gbp.value(1) < f32(0.7))
        ppt[near] = np.maximum(ppt[near], gbppt)
    f = Fields.filled(g.shape, z=0.3)
    f.tint = grain.value(1) * f32(2) - f32(1)
    f.z = f32(0.3) + ppt * f32(0.5)
    f.height = groove(edge, max(0.3, g.px)) * f32(0.3) - ppt * f32(0.15)
    f.reflect = f32(0.85) - ppt * f32(0.4)
    return f


def ti_alpha_beta(g: Grid, seed: int) -> Fields:
    """Bimodal Ti-6Al-4V (L = alpha lath width, ~1 um): equiaxed primary alpha grains
    (~10 L) among transformed-beta regions of fine alpha laths separated by thin beta
    ribs, laths in colonies of a few orientations (basket weave)."""
    prior, edge = grains(g, seed, 10.0, warp=0.1)
    # primary alpha: globular grains, rounded where they meet transformed beta
    primary = (prior.value(5) < f32(0.5)) & (prior.d1 < f32(0.5) + prior.value(6) * f32(0.15))
    colonies, cedge = grains(g, seed + 2, 3.5, warp=0.2)
    angle = prior.value(2) * f32(np.pi) + np.floor(colonies.value(2) * f32(3)) * f32(np.pi / 3)
    spacing = f32(1.0) + colonies.value(3) * f32(0.5)
    beta = lamellae(g, angle, spacing, colonies.value(4), 0.18, seed + 6, bend=0.15)
    beta *= ~primary
    gb = groove(edge, max(0.08, 0.9 * g.px))
    f = Fields.filled(g.shape, z=0.4)
    f.tint = (prior.value(1) * f32(2) - f32(1)) * primary + (colonies.value(1) - f32(0.5)) * ~primary
    f.z = f32(0.4) + beta * f32(0.3)
    f.reflect = f32(0.84) + f.tint * f32(0.05) - beta * f32(0.55) - (~primary) * f32(0.08)
    f.height = beta * f32(0.3) + gb * f32(0.5)
    return f


def ni_superalloy(g: Grid, seed: int) -> Fields:
    """Cuboidal gamma-prime precipitates (L = cube edge, ~0.3 um) in narrow gamma
    channels, the cubes' edges aligned with each grain's <100> directions; a grain
    boundary crosses now and then (grains ~50 L)."""
    grain, edge = grains(g, seed, 50.0, warp=0.05)
    angle = grain.value(2) * f32(np.pi / 2)
    c, s = np.cos(angle), np.sin(angle)
    period = f32(1.2)
    # rows of cubes wander a little (coherency strains, local rafting)
    wu = fbm(g.y * f32(0.15), g.x * f32(0.15), seed + 52, octaves=2) * f32(0.35)
    wv = fbm(g.y * f32(0.15) + f32(7.7), g.x * f32(0.15), seed + 53, octaves=2) * f32(0.35)
    u = (g.x * c + g.y * s) / period + wu
    v = (g.y * c - g.x * s) / period + wv
    iu, iv = np.floor(u), np.floor(v)
    h = mix32(hash2(iu.astype(np.int32), iv.astype(np.int32), seed + 51) ^ grain.ident)
    # rounded squares, |a|^6 + |b|^6 < r^6, with a little size and position scatter
    a = np.abs(u - iu - f32(0.5) - (unit(rehash(h, 1)) - f32(0.5)) * f32(0.14))
    b = np.abs(v - iv - f32(0.5) - (unit(rehash(h, 2)) - f32(0.5)) * f32(0.14))
    # cubes are often slightly rectangular
    stretch = f32(1) + (unit(rehash(h, 4)) - f32(0.5)) * f32(0.3)
    a *= stretch
    b /= stretch
    a *= a
    a *= a * a
    b *= b
    b *= b * b
    a += b
    norm = a ** f32(1 / 6)
    r = f32(0.3) + unit(rehash(h, 3)) * f32(0.12)
    cube = ramp(r - norm, 0.0, g.px / 1.18)
    cube *= ramp(edge, 0.4, 0.3)
    f = Fields.filled(g.shape, z=0.62)
    f.tint = grain.value(1) * f32(2) - f32(1)
    f.z = f32(0.62) - cube * f32(0.15)
    f.height = cube * f32(0.3) + groove(edge, max(0.15, g.px)) * f32(0.4)
    f.reflect = f32(0.8) - cube * f32(0.2)
    return f


def am_alloy(g: Grid, seed: int) -> Fields:
    """Laser powder-bed fused alloy (L = solidification cell, ~0.8 um): overlapping
    melt-pool arcs (tracks ~45 L wide in layers ~22 L thick, each pool cut by later
    ones), columnar grains growing epitaxially across pool boundaries, and a fine
    cellular substructure inside the grains."""
    layer, track = 22.0, 45.0
    k0 = np.floor(g.y / f32(layer))
    best = np.full(g.shape, -np.inf, np.float32)  # deposition order of the latest pool
    fusion = np.full(g.shape, np.inf, np.float32)
    pool = np.zeros(g.shape, np.uint32)
    for dk in (0, -1):
        k = k0 + f32(dk)
        ki = k.astype(np.int32)
        offset = unit(hash2(ki, 0, seed + 61))
        j0 = np.floor(g.x / f32(track) - offset)
        for dj in (-1, 0, 1, 2):
            j = j0 + f32(dj)
            hp = hash2(ki, j.astype(np.int32), seed + 62)
            cx = (j + offset + f32(0.5)) * f32(track)
            a = f32(track * 0.62) * (f32(0.9) + unit(rehash(hp, 1)) * f32(0.2))
            depth = f32(layer * 1.6) * (f32(0.85) + unit(rehash(hp, 2)) * f32(0.3))
            ry = (g.y - k * f32(layer)) / depth
            rx = (g.x - cx) / a
            rr = np.sqrt(ry * ry + rx * rx)
            inside = (ry >= 0) & (rr < 1)
            # later layers (smaller k, nearer the top) and later tracks win; scan
            # direction alternates between layers
            order = -k * f32(1000) + np.where(ki % 2 == 0, j, -j)
            win = inside & (order > best)
            np.copyto(best, order, where=win)
            np.copyto(fusion, (f32(1) - rr) * np.minimum(a, depth), where=win)
            np.copyto(pool, hp, where=win)
    # columnar grains, elongated along the build direction (y), growing across pools
    gy = g.y * f32(1 / 12.0)
    gx = g.x * f32(1 / 4.0)
    grains_ = worley(gy, gx, seed + 63)
    cells = worley(g.y * f32(1 / 1.0), g.x * f32(1 / 0.8), seed + 64)
    cell_wall = groove(cells.edge(), max(0.08, 0.7 * g.px))
    fl = groove(fusion, max(0.6, 1.5 * g.px))
    gb = groove(grains_.edge() * f32(4.0), max(0.2, g.px))
    tint = unit(mix32(grains_.ident ^ (pool & np.uint32(0xFF)))) * f32(2) - f32(1)
    f = Fields.filled(g.shape, z=0.55)
    f.tint = tint
    # solute segregates to cell walls: heavier (bright in BSE) and etched
    f.z = f32(0.55) + cell_wall * f32(0.2)
    f.height = cell_wall * f32(0.25) + fl * f32(0.5) + gb * f32(0.3) + tint * f32(0.03)
    f.reflect = f32(0.78) + tint * f32(0.06) - cell_wall * f32(0.15) - fl * f32(0.25)
    return f
