"""Per-image preprocessing parameters: fitted once, applied to every tile alike."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("SEM", "TEM", "optical", "default")
# Catalog and instrument spellings -> the method applied. Anything else gets "default".
_ALIASES = {"sem": "SEM", "tem": "TEM", "stem": "TEM", "optical": "optical", "light": "optical", "om": "optical"}


def method_for(modality: str | None) -> str:
    """The preprocessing method for a modality name ('SEM', 'stem', 'optical', ...)."""
    if modality is None:
        return "default"
    return _ALIASES.get(str(modality).strip().lower(), "default")


@dataclass(frozen=True)
class Background:
    """A smooth illumination field on a coarse grid of nodes, in level-0 coordinates.

    values: gy x gx node values (raw intensity units), row-major tuples so the value
    is hashable and immutable. Node (a, b) sits at level-0 edge coordinates
    (origin[0] + a * spacing[0], origin[1] + b * spacing[1]); between nodes the field is
    bilinear, beyond the outer nodes it is constant.
    """

    values: tuple[tuple[float, ...], ...]
    origin: tuple[float, float]
    spacing: tuple[float, float]

    def array(self) -> np.ndarray:
        return np.asarray(self.values, dtype=np.float64)

    def evaluate(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """The field at level-0 positions ys (H,) x xs (W,) -> H x W float64.

        Element-wise bilinear weights (no matrix products), so a pixel gets the same
        value bit for bit whichever tile it is evaluated in: each row is interpolated
        between node rows first (H x gx, from that row's position only), then along x.
        Two H x W temporaries at most, so a large block costs little beyond its output.
        """
        grid = self.array()
        a0, ta = _cell(ys, self.origin[0], self.spacing[0], grid.shape[0])
        b0, tb = _cell(xs, self.origin[1], self.spacing[1], grid.shape[1])
        a1, b1 = np.minimum(a0 + 1, grid.shape[0] - 1), np.minimum(b0 + 1, grid.shape[1] - 1)
        ta = ta[:, None]
        rows = (1 - ta) * grid[a0] + ta * grid[a1]  # H x gx
        out = rows[:, b0]
        out *= 1 - tb
        right = rows[:, b1]
        right *= tb
        out += right
        return out


def _cell(pos: np.ndarray, origin: float, spacing: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Node index below each position and the fraction towards the next, clamped to the grid."""
    g = np.clip((np.asarray(pos, dtype=np.float64) - origin) / spacing, 0.0, n - 1.0)
    i = np.minimum(np.floor(g).astype(np.int64), max(n - 2, 0))
    return i, g - i


@dataclass(frozen=True)
class PreprocessParams:
    """How to map one image's raw pixels to float32 [0, 1]; small, picklable, stored per image.

    method: 'SEM', 'TEM', 'optical' or 'default' (see `engine.preprocess.normalise`).
    low, high: raw values (after flattening, for optical) mapped to 0 and 1.
    background: optical illumination field (None for other methods); flattening divides
    by it and multiplies by `background_level`, which keeps raw intensity units.
    line_damping: 0..1, SEM scan-line offset removal (0 = off).
    level: the pyramid level the intensity statistics were sampled from (0 since they
    come from a strided sample of level 0; older parameters may name a coarse level).
    """

    method: str
    low: float
    high: float
    background: Background | None = None
    background_level: float = 1.0
    line_damping: float = 0.0
    level: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"preprocessing method {self.method!r} is not one of {METHODS}")
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.high > self.low):
            raise ValueError(f"preprocessing range low={self.low}, high={self.high} must be finite with high > low")
