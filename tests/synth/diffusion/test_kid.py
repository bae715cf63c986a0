"""KID: unbiased MMD^2 with the cubic polynomial kernel."""

from __future__ import annotations

import numpy as np

from engine.synth.diffusion.kid import kid, null_quantile, polynomial_mmd2


class TestKID:
    def test_matches_the_definition(self):
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))

        def k(a, b):
            return (a @ b / 3 + 1) ** 3

        xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
        yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
        xy = sum(k(a, b) for a in x for b in y) / 20
        assert np.isclose(polynomial_mmd2(x, y), xx + yy - 2 * xy)

    def test_same_distribution_is_near_zero_and_a_shift_is_not(self):
        rng = np.random.default_rng(1)
        a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
        shifted = rng.normal(size=(200, 8)) + 1.0
        same, far = kid(a, b), kid(a, shifted)
        assert abs(same) < 0.05
        assert far > 10 * max(abs(same), 1e-3)
        assert kid(a, a + 0.5) < far  # grows with the shift

    def test_too_few_rows_is_nan(self):
        assert np.isnan(kid(np.zeros((1, 4)), np.zeros((5, 4))))


class TestNullQuantile:
    def test_a_draw_of_the_same_distribution_stays_within_it_and_a_shifted_one_does_not(self):
        # the gate's reference: how far two draws of the real crops of a class lie apart
        rng = np.random.default_rng(2)
        real = rng.normal(size=(200, 8))
        threshold = null_quantile(real, 0.95, seed=0)
        assert threshold > 0
        same = [kid(rng.normal(size=(60, 8)), real, seed=i) for i in range(10)]
        assert sum(v > threshold for v in same) <= 2
        # a shift far smaller than the distance to another class (here: 3 apart) exceeds it
        other_class = rng.normal(size=(200, 8)) + 3.0
        shifted = rng.normal(size=(60, 8)) + 0.5
        assert threshold < kid(shifted, real) < kid(real, other_class)

    def test_deterministic_per_seed_and_nan_below_four_rows(self):
        x = np.random.default_rng(3).normal(size=(30, 4))
        assert null_quantile(x, seed=1) == null_quantile(x, seed=1)
        assert np.isnan(null_quantile(x[:3]))
