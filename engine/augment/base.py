"""The Transform base class: a frozen, picklable callable (Sample, Generator) -> Sample.

Transforms are frozen dataclasses so a pipeline pickles to Ray workers by value and two
equal configurations compare equal. Randomness comes only from the Generator passed in,
so a seed fixes the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from engine.augment.sample import Sample


@dataclass(frozen=True)
class Transform:
    """Applies `apply` with probability `p`.

    The coin is tossed on every call, applied or not. A transform that fires draws its
    own parameters from the same generator, so the draws a later transform sees do
    depend on whether an earlier one fired; a seed still reproduces the whole chain.
    """

    name: ClassVar[str] = "transform"
    p: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"{type(self).__name__}.p must be a probability in [0, 1]; got {self.p}")

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        fire = rng.random() < self.p
        if not fire:
            return sample
        return self.apply(sample, rng)

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        raise NotImplementedError


def check_range(owner: str, field: str, bounds: tuple[float, float], lo: float = -np.inf,
                hi: float = np.inf) -> None:
    """Raise a clear error unless `bounds` is (a, b) with lo <= a <= b <= hi."""
    if len(bounds) != 2 or not (lo <= bounds[0] <= bounds[1] <= hi):
        raise ValueError(f"{owner}.{field} must be (min, max) with {lo} <= min <= max <= {hi}; got {bounds}")


def log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """A draw uniform in log between positive bounds (scale parameters: dose, zoom)."""
    a, b = bounds
    return float(np.exp(rng.uniform(np.log(a), np.log(b)))) if a != b else float(a)
