"""Kernel Inception Distance (Binkowski et al. 2018) on any feature extractor's features.

KID is the squared maximum mean discrepancy between two feature sets under the cubic
polynomial kernel k(x, y) = (x . y / d + 1) ** 3, estimated without bias and averaged
over random subsets. Unlike FID it is unbiased at small sample counts, which is what a
per-class gate on tens of samples has. (torchmetrics' KernelInceptionDistance computes
the same on Inception features; it is not a dependency here and the features are ours.)
"""

from __future__ import annotations

import numpy as np


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between feature sets x (m x d) and y (n x d), m, n >= 2."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(x: np.ndarray, y: np.ndarray, *, subsets: int = 20, subset_size: int = 50, seed: int = 0) -> float:
    """Mean unbiased MMD^2 over `subsets` random subsets of min(subset_size, m, n) rows of
    each set. NaN when either set has fewer than 2 rows (nothing to estimate)."""
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        return float("nan")
    k = min(subset_size, m, n)
    rng = np.random.default_rng(seed)
    return float(np.mean([polynomial_mmd2(x[rng.choice(m, k, replace=False)], y[rng.choice(n, k, replace=False)])
                          for _ in range(subsets)]))


def null_quantile(x: np.ndarray, quantile: float = 0.95, *, splits: int = 50, seed: int = 0) -> float:
    """The `quantile` of KID between two random disjoint halves of one feature set x
    (n x d), over `splits` random splits: how far apart two draws of the same
    distribution come out at this size, the distance a sample set drawn like x stays
    within. Halves of x are smaller than x, and KID between smaller sets varies more,
    so this errs towards accepting. NaN when x has fewer than 4 rows (two a half)."""
    n = len(x)
    if n < 4:
        return float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for i in range(splits):
        order = rng.permutation(n)
        values.append(kid(x[order[:n // 2]], x[order[n // 2:]], seed=seed + i))
    return float(np.quantile(values, quantile))
