"""Intensity changes that keep a material's phases in their order of brightness."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from engine.augment.base import Transform, check_range, log_uniform
from engine.augment.sample import Sample


@dataclass(frozen=True)
class IntensityMap(Transform):
    """Brightness, contrast and gamma of the detector chain, as a strictly increasing map.

    Physics: the operator's brightness (offset) and contrast (gain) settings of the SE
    amplifier or camera, and a non-linear response (scintillator, film, display gamma),
    change grey levels but not which phase is brighter: contrast comes from atomic
    number, mass-thickness or reflectance, and a dark phase must stay darker than a
    bright one. So the map is strictly increasing and never clips: the image's range
    [a, b] goes to [a', b'] inside [0, 1] by
        out = a' + (b' - a') * ((I - a) / (b - a)) ** gamma,
    with span b' - a' = min(1, contrast * (b - a)) and centre moved by `brightness`,
    then pushed back inside [0, 1]. No saturation, no inversion (no dark-field from a
    bright-field image).

    gamma_range: (min, max) of gamma, drawn log-uniformly, dimensionless.
    contrast_range: (min, max) factor on the grey-level span, drawn log-uniformly.
    brightness_range: (min, max) shift of the span's centre, fraction of full scale.
    """

    name: ClassVar[str] = "intensity"
    gamma_range: tuple[float, float] = (0.7, 1.4)
    contrast_range: tuple[float, float] = (0.7, 1.4)
    brightness_range: tuple[float, float] = (-0.1, 0.1)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("IntensityMap", "gamma_range", self.gamma_range, lo=0.05, hi=20.0)
        check_range("IntensityMap", "contrast_range", self.contrast_range, lo=0.01, hi=100.0)
        check_range("IntensityMap", "brightness_range", self.brightness_range, lo=-1.0, hi=1.0)

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        gamma = log_uniform(rng, self.gamma_range)
        contrast = log_uniform(rng, self.contrast_range)
        shift = float(rng.uniform(*self.brightness_range))
        out = monotonic_map(sample.image, gamma, contrast, shift)
        return sample.replace(image=out).logged(self.name, gamma=gamma, contrast=contrast, brightness=shift)


def monotonic_map(image: np.ndarray, gamma: float, contrast: float, brightness: float) -> np.ndarray:
    """The map of IntensityMap on an (H, W) float32 image in [0, 1]; float32 in [0, 1]."""
    a, b = float(image.min()), float(image.max())
    if b - a <= 1e-6:
        # a flat image has no phases to order: only the brightness shift applies
        return np.clip(image + np.float32(brightness), 0.0, 1.0).astype(np.float32)
    span = min(1.0, contrast * (b - a))
    lo = 0.5 * (a + b) + brightness - 0.5 * span
    lo = min(max(lo, 0.0), 1.0 - span)
    t = (image.astype(np.float64) - a) / (b - a)
    out = lo + span * np.power(t, gamma)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
