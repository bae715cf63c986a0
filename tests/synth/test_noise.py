"""Noise primitives: Worley against brute force, value noise continuity, hashing."""

from __future__ import annotations

import numpy as np

from engine.synth.hashing import derive_seed, hash2, rehash, unit
from engine.synth.noise import fbm, value_noise, worley


def grid(h=40, w=50, scale=0.13, y0=-3.0, x0=7.0):
    y = (np.arange(h, dtype=np.float32) * np.float32(scale) + np.float32(y0))[:, None]
    x = np.broadcast_to((np.arange(w, dtype=np.float32) * np.float32(scale) + np.float32(x0))[None, :], (h, w)).copy()
    x += np.linspace(0, 0.2, h, dtype=np.float32)[:, None]  # scan rows shifted like an SEM's
    return y, x


class TestWorley:
    def test_matches_brute_force(self):
        y, x = grid()
        cells = worley(y, x, 123, third=True)
        cy = np.arange(-8, 6)[:, None]
        cx = np.arange(3, 18)[None, :]
        h = hash2(cy, cx, 123)
        py = (cy + 0.5 + (unit(rehash(h, 101)) - 0.5)).ravel()
        px = (cx + 0.5 + (unit(rehash(h, 102)) - 0.5)).ravel()
        d = np.sqrt((np.broadcast_to(y, x.shape)[..., None] - py) ** 2 + (x[..., None] - px) ** 2)
        order = np.sort(d, axis=-1)
        np.testing.assert_allclose(cells.d1, order[..., 0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cells.d2, order[..., 1], rtol=1e-5, atol=1e-5)
        # a point outside the 3x3 cells is at least 1 unit away: distances under 1 are exact
        near = order[..., 2] < 1
        np.testing.assert_allclose(cells.d3[near], order[..., 2][near], rtol=1e-5, atol=1e-5)
        assert (cells.d3 >= order[..., 2] - 1e-5).all()
        nearest = np.argmin(d, axis=-1)
        assert np.array_equal(cells.ident, h.ravel()[nearest])

    def test_edge_is_distance_to_the_bisector(self):
        y, x = grid()
        cells = worley(y, x, 5)
        assert (cells.edge() >= -1e-4).all()
        # on the boundary the two nearest points are equally far
        near = cells.edge() < 1e-3
        np.testing.assert_allclose(cells.d1[near], cells.d2[near], atol=3e-3)

    def test_independent_of_the_region_asked(self):
        y, x = grid(60, 60)
        whole = worley(y, x, 9)
        part = worley(y[20:40], x[20:40, 10:30], 9)
        assert np.array_equal(whole.d1[20:40, 10:30], part.d1)
        assert np.array_equal(whole.ident[20:40, 10:30], part.ident)


class TestValueNoise:
    def test_range_and_continuity(self):
        y, x = grid(100, 100, scale=0.05)
        n = value_noise(y, x, 1)
        assert n.dtype == np.float32 and 0 <= n.min() and n.max() < 1
        assert np.abs(np.diff(n, axis=1)).max() < 0.1  # 0.05 units per step: smooth
        f = fbm(y, x, 1, octaves=3)
        assert -1 <= f.min() and f.max() <= 1 and f.std() > 0.05

    def test_seeds_differ(self):
        y, x = grid()
        assert not np.array_equal(value_noise(y, x, 1), value_noise(y, x, 2))


def test_derive_seed_is_stable():
    # a digest, not Python's per-process salted hash(): the same in every process
    assert derive_seed(42, "material") == derive_seed(42, "material") != derive_seed(42, "scan")
    assert derive_seed(0, "x") == 2824521328
