"""Detector noise: Poisson shot noise at a dose plus Gaussian read noise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from engine.augment.base import Transform, check_range, log_uniform
from engine.augment.sample import Sample

# Quanta per pixel at full-scale signal that instruments of each kind record. SEM: a
# secondary-electron image at ~10-100 pA and us dwell times; TEM: low-dose work
# (beam-sensitive specimens) up to a comfortable bright-field exposure; optical: a
# scientific camera's well, a few thousand to tens of thousands of photoelectrons.
DOSE_RANGE = {"SEM": (20.0, 1000.0), "TEM": (5.0, 500.0), "optical": (300.0, 20000.0)}
# Gaussian read/amplifier noise sigma, fraction of full scale.
READ_NOISE_RANGE = {"SEM": (0.0, 0.02), "TEM": (0.0, 0.01), "optical": (0.0, 0.01)}


@dataclass(frozen=True)
class ShotNoise(Transform):
    """Poisson-Gaussian noise: re-image the sample at a dose of `dose` quanta per pixel.

    Physics: the detector counts electrons (SEM, TEM) or photoelectrons (optical camera);
    at signal I (fraction of full scale) a pixel collects Poisson(dose * I) quanta, and
    the read-out adds Gaussian noise of sigma `read_noise`. So
        out = Poisson(dose * I) / dose + Normal(0, read_noise^2),
        Var[out | I] = I / dose + read_noise^2,
    clipped to [0, 1] (the ADC's range). The input is treated as the noise-free
    expectation; a real micrograph already carries its own noise, so this imitates an
    acquisition at a dose at most as high as the original's.

    dose_range: quanta per pixel at full scale, (min, max), drawn log-uniformly; None
      uses the modality's DOSE_RANGE. read_noise_range: sigma as a fraction of full scale,
      drawn uniformly; None uses READ_NOISE_RANGE.
    """

    name: ClassVar[str] = "shot_noise"
    dose_range: tuple[float, float] | None = None
    read_noise_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dose_range is not None:
            check_range("ShotNoise", "dose_range", self.dose_range, lo=1e-6)
        if self.read_noise_range is not None:
            check_range("ShotNoise", "read_noise_range", self.read_noise_range, lo=0.0, hi=1.0)

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        dose = log_uniform(rng, self.dose_range or DOSE_RANGE[sample.modality])
        read = float(rng.uniform(*(self.read_noise_range or READ_NOISE_RANGE[sample.modality])))
        out = poisson_gaussian(sample.image, dose, read, rng)
        return sample.replace(image=out).logged(self.name, dose=dose, read_noise=read)


def poisson_gaussian(image: np.ndarray, dose: float, read_noise: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float32 in [0, 1] -> the same with Poisson(dose * I) / dose + N(0, read_noise^2)."""
    counts = rng.poisson(image.astype(np.float64) * dose)
    out = (counts / dose).astype(np.float32)
    if read_noise > 0:
        out += rng.normal(0.0, read_noise, size=image.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0, out=out)
