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
# Signal of a tile's black (0) as a fraction of its white (1), in detector counts.
# Training tiles are percentile-normalised (engine.data.training_samples.normalise_tile:
# the tile's p1 -> 0, p99 -> 1), which throws this offset away; a real detector still
# counts quanta in the darkest phase of a micrograph (a dark matrix, an etched grain,
# thick foil), typically a tenth to a half of the brightest phase's.
BLACK_LEVEL_RANGE = (0.1, 0.5)


@dataclass(frozen=True)
class ShotNoise(Transform):
    """Poisson-Gaussian noise: re-image the sample at a dose of `dose` quanta per pixel.

    Physics: the detector counts electrons (SEM, TEM) or photoelectrons (optical camera).
    The tile's grey levels are not counts: 0 and 1 are its black and white points, and
    0 still carries signal. So the noise is added in physical units: grey level I goes
    to the signal J = b + I (1 - b) (fraction of the white level; b the black level,
    drawn), a pixel collects Poisson(dose * J) quanta, the read-out adds Gaussian noise
    of sigma `read_noise` (fraction of the white level), and the same affine maps back:
        out = (Poisson(dose * J) / dose + Normal(0, read_noise^2) - b) / (1 - b),
        E[out | I] = I,   Var[out | I] = (J / dose + read_noise^2) / (1 - b)^2.
    Only then is `out` clipped to [0, 1], because Sample images are float32 in [0, 1]
    (the same clip normalise_tile applies beyond a tile's p1 / p99). The mean is
    unbiased wherever the noise stays inside [0, 1]; within a few sigma of 0 or 1 (the
    tile's ~1 % clipped tails) the clip pulls it inwards, as it would for a real
    noisier acquisition normalised the same way. The input is treated as the noise-free
    expectation; a real micrograph already carries its own noise, so this imitates an
    acquisition at a dose at most as high as the original's.

    dose_range: quanta per pixel at the white level, (min, max), drawn log-uniformly;
      None uses the modality's DOSE_RANGE. read_noise_range: sigma as a fraction of the
      white level, drawn uniformly; None uses READ_NOISE_RANGE.
    black_level_range: (min, max) of b, fraction of the white level in [0, 1), drawn
      uniformly (see BLACK_LEVEL_RANGE).
    """

    name: ClassVar[str] = "shot_noise"
    dose_range: tuple[float, float] | None = None
    read_noise_range: tuple[float, float] | None = None
    black_level_range: tuple[float, float] = BLACK_LEVEL_RANGE

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dose_range is not None:
            check_range("ShotNoise", "dose_range", self.dose_range, lo=1e-6)
        if self.read_noise_range is not None:
            check_range("ShotNoise", "read_noise_range", self.read_noise_range, lo=0.0, hi=1.0)
        check_range("ShotNoise", "black_level_range", self.black_level_range, lo=0.0, hi=0.95)

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        dose = log_uniform(rng, self.dose_range or DOSE_RANGE[sample.modality])
        read = float(rng.uniform(*(self.read_noise_range or READ_NOISE_RANGE[sample.modality])))
        black = float(rng.uniform(*self.black_level_range))
        out = poisson_gaussian(sample.image, dose, read, rng, black_level=black)
        return sample.replace(image=out).logged(self.name, dose=dose, read_noise=read, black_level=black)


def poisson_gaussian(image: np.ndarray, dose: float, read_noise: float, rng: np.random.Generator, *,
                     black_level: float) -> np.ndarray:
    """(H, W) float32 grey levels in [0, 1] -> the same re-imaged with noise (see ShotNoise).

    dose: quanta per pixel at the white level; read_noise: sigma, fraction of the white
    level; black_level: signal at grey 0, fraction of the white level, in [0, 1).
    Returns float32 in [0, 1], clipped only after mapping back to grey levels.
    """
    b = float(black_level)
    gain = 1.0 - b  # grey level -> signal: J = b + I * gain
    signal = b + image.astype(np.float64) * gain
    noisy = rng.poisson(signal * dose) / dose
    if read_noise > 0:
        noisy = noisy + rng.normal(0.0, read_noise, size=image.shape)
    out = ((noisy - b) / gain).astype(np.float32)
    return np.clip(out, 0.0, 1.0, out=out)
