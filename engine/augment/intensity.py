"""Intensity changes that keep a material's phases in their order of brightness."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from engine.augment.base import Transform, check_range, log_uniform
from engine.augment.sample import Sample

# Largest |brightness|: the mid-grey 0.5 moves at most this far, so it stays inside (0, 1).
MAX_BRIGHTNESS = 0.45


@dataclass(frozen=True)
class IntensityMap(Transform):
    """Brightness, contrast and gamma of the detector chain, as a strictly increasing map.

    Physics: the operator's brightness (offset) and contrast (gain) settings of the SE
    amplifier or camera, and a non-linear response (scintillator, film, display gamma),
    change grey levels but not which phase is brighter: contrast comes from atomic
    number, mass-thickness or reflectance, and a dark phase must stay darker than a
    bright one. So the map is strictly increasing and never clips.

    Training tiles are percentile-normalised (their p1 -> 0, p99 -> 1), which undoes any
    plain gain and offset, and they already span [0, 1], so an affine map could only
    shrink them. What another gain and offset leave after normalisation is where the
    mid-tones sit between the (softly) saturated ends; the map models that as a gain
    and an offset in logit space, after gamma:
        u = I ** gamma,
        logit(out) = contrast * logit(u) + logit(0.5 + brightness),
    i.e. out = u^c / (u^c + k (1 - u)^c) with k = (0.5 - brightness) / (0.5 + brightness).
    It keeps 0 -> 0 and 1 -> 1 (a tile's black and white points), sends mid-grey 0.5
    to 0.5 + brightness when gamma is 1, steepens the mid-tones by `contrast` (> 1: more
    contrast, the ends compressed; < 1: less). It is a function of the grey level alone,
    not of the tile's content, so two views of one region (fusion's detail and context,
    normalised with the same percentiles) map one grey level to the same output. No
    saturation, no inversion (no dark-field from a bright-field image).

    gamma_range: (min, max) of gamma, drawn log-uniformly, dimensionless.
    contrast_range: (min, max) gain on the logit of the grey level, drawn log-uniformly.
    brightness_range: (min, max) shift of mid-grey, fraction of full scale, within
      +-MAX_BRIGHTNESS.
    """

    name: ClassVar[str] = "intensity"
    gamma_range: tuple[float, float] = (0.7, 1.4)
    contrast_range: tuple[float, float] = (0.7, 1.4)
    brightness_range: tuple[float, float] = (-0.1, 0.1)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("IntensityMap", "gamma_range", self.gamma_range, lo=0.05, hi=20.0)
        check_range("IntensityMap", "contrast_range", self.contrast_range, lo=0.05, hi=20.0)
        check_range("IntensityMap", "brightness_range", self.brightness_range, lo=-MAX_BRIGHTNESS,
                    hi=MAX_BRIGHTNESS)

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        gamma = log_uniform(rng, self.gamma_range)
        contrast = log_uniform(rng, self.contrast_range)
        shift = float(rng.uniform(*self.brightness_range))
        out = monotonic_map(sample.image, gamma, contrast, shift)
        return sample.replace(image=out).logged(self.name, gamma=gamma, contrast=contrast, brightness=shift)


def monotonic_map(image: np.ndarray, gamma: float, contrast: float, brightness: float) -> np.ndarray:
    """The map of IntensityMap on an (H, W) float32 image in [0, 1]; float32 in [0, 1].

    A function of each pixel's grey level only (see IntensityMap for the formula).
    """
    if not -0.5 < brightness < 0.5:
        raise ValueError(f"monotonic_map: brightness must be in (-0.5, 0.5); got {brightness}")
    u = np.power(np.clip(image.astype(np.float64), 0.0, 1.0), gamma)
    k = (0.5 - brightness) / (0.5 + brightness)
    # u^c / (u^c + k (1 - u)^c): finite at both ends (0 -> 0, 1 -> 1), no logit of 0
    a = np.power(u, contrast)
    out = a / (a + k * np.power(1.0 - u, contrast))
    return out.astype(np.float32)
