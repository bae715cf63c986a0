"""Composed augmentation pipelines, and the per-modality pipelines training uses.

The order inside a pipeline follows the order in which an instrument makes an image:
the scene is chosen (rotated, flipped, scaled) first, then the optics blur and light it,
the scan distorts it (SEM), the detector chain sets grey levels, and detector noise
comes last, so noise is never blurred, shifted or resampled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from engine.augment.base import Transform
from engine.augment.geometry import Dihedral, ScaleJitter
from engine.augment.noise import DOSE_RANGE, READ_NOISE_RANGE, ShotNoise
from engine.augment.registry import TRANSFORMS, create_transform
from engine.augment.sample import Sample
from engine.augment.scan import ScanDrift, ScanLineJitter
from engine.stores.catalog import MODALITIES

_SCAN = (ScanDrift, ScanLineJitter)


@dataclass(frozen=True)
class Compose:
    """Transforms applied in order with one Generator: (Sample, Generator) -> Sample.

    Refuses a Dihedral after a scan-artifact transform: a scan line must stay horizontal,
    so the scene is turned before the scan distorts it (Dihedral additionally refuses
    quarter turns of any image that carries scan lines).
    """

    transforms: tuple[Transform, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "transforms", tuple(self.transforms))
        scanned = False
        for t in self.transforms:
            if not isinstance(t, Transform):
                raise TypeError(f"Compose takes Transform objects; got {type(t).__name__}")
            if isinstance(t, Dihedral) and scanned:
                raise ValueError("Compose: 'dihedral' must come before 'scan_jitter'/'scan_drift'; "
                                 "rotating after the scan would turn scan lines off the horizontal")
            scanned = scanned or isinstance(t, _SCAN)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def run(self, sample: Sample, seed: int | Iterable[int]) -> Sample:
        """Apply with a fresh Generator from `seed` (an int, or ints such as (seed, epoch, index))."""
        return self(sample, np.random.default_rng(seed))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.transforms)

    def to_config(self) -> list[dict[str, Any]]:
        """[{"name": ..., field: value, ...}, ...]: what from_config (and YAML) takes."""
        out = []
        for t in self.transforms:
            d: dict[str, Any] = {"name": t.name}
            for f in dataclasses.fields(t):
                v = getattr(t, f.name)
                d[f.name] = sorted(v) if isinstance(v, frozenset) else list(v) if isinstance(v, tuple) else v
            out.append(d)
        return out

    @classmethod
    def from_config(cls, config: Iterable[Mapping[str, Any]]) -> Compose:
        items = []
        for i, entry in enumerate(config):
            entry = dict(entry)
            if "name" not in entry:
                raise KeyError(f"augmentation config entry {i} has no 'name'; "
                               f"valid names: {', '.join(sorted(TRANSFORMS))}")
            items.append(create_transform(entry.pop("name"), **entry))
        return cls(tuple(items))


def _sym(x: float, s: float) -> tuple[float, float]:
    """(1 / (1 + x s), 1 + x s): a log-symmetric factor range that is (1, 1) at s = 0."""
    return (1.0 / (1.0 + x * s), 1.0 + x * s)


def _common_head(material: str | None, s: float) -> list[Transform]:
    # zoom in only (ScaleJitter keep_shape); up to 1.25 at s = 1, inside the factor
    # sqrt(2) by which the pyramid level a model reads may differ from its pixel size
    return [Dihedral(material=material), ScaleJitter(p=0.5, factor_range=(1.0, 1.0 + 0.25 * s))]


def _intensity(s: float) -> Transform:
    return create_transform("intensity", p=0.8, gamma_range=_sym(0.4, s), contrast_range=_sym(0.4, s),
                            brightness_range=(-0.1 * s, 0.1 * s))


def _noise(modality: str, s: float) -> Transform:
    lo, hi = DOSE_RANGE[modality]
    # strength 0 -> only the highest dose; 1 -> the whole range down to the lowest
    return ShotNoise(p=0.8, dose_range=(hi * (lo / hi) ** s, hi),
                     read_noise_range=(0.0, READ_NOISE_RANGE[modality][1] * s))


def _sem(material: str | None, s: float) -> list[Transform]:
    return [*_common_head(material, s), _intensity(s),
            ScanDrift(p=0.5, drift_range_px=(0.0, 4.0 * s)),
            ScanLineJitter(p=0.5, sigma_range_px=(0.0, 0.5 * s), glitch_px=2.0 * s),
            _noise("SEM", s)]


def _tem(material: str | None, s: float) -> list[Transform]:
    return [*_common_head(material, s),
            create_transform("defocus", p=0.5, defocus_range_px=(100.0, 100.0 + 2400.0 * s),
                             fringe_range=(0.0, 0.3 * s)),
            create_transform("illumination", p=0.3, vignetting_range=(0.0, 0.15 * s),
                             gradient_range=(0.0, 0.1 * s)),
            _intensity(s), _noise("TEM", s)]


def _optical(material: str | None, s: float) -> list[Transform]:
    return [*_common_head(material, s),
            create_transform("diffraction", p=0.5, na_range=(0.95 - 0.7 * s, 0.95)),
            create_transform("illumination", p=0.5, vignetting_range=(0.0, 0.3 * s),
                             gradient_range=(0.0, 0.2 * s)),
            _intensity(s), _noise("optical", s)]


PIPELINES: dict[str, Callable[[str | None, float], list[Transform]]] = {
    "SEM": _sem, "TEM": _tem, "optical": _optical,
}
assert tuple(PIPELINES) == MODALITIES


def build_pipeline(modality: str, material: str | None = None, strength: float = 0.5) -> Compose:
    """The training augmentation for images of `modality` showing `material`.

    modality: "SEM", "TEM" or "optical": picks the physics (scan artifacts, defocus,
      diffraction and illumination) and the dose range.
    material: an engine.synth material name, for the rotations and flips its
      microstructure allows (augment.symmetry); None or an unknown name gets the
      conservative default (left-right mirror only).
    strength: 0..1; 0 is the identity (an empty pipeline), 1 the full physical ranges;
      magnitudes (dose reduction, blur, drift, zoom, gamma, ...) grow linearly with it.
    """
    if modality not in PIPELINES:
        raise ValueError(f"unknown modality {modality!r}; valid modalities: {', '.join(PIPELINES)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1]; got {strength}")
    if strength == 0.0:
        return Compose(())
    return Compose(tuple(PIPELINES[modality](material, float(strength))))
