"""The one registry of augmentation transforms, by name, and its factory."""

from __future__ import annotations

from typing import Any

from engine.augment.base import Transform
from engine.augment.geometry import Dihedral, ScaleJitter
from engine.augment.intensity import IntensityMap
from engine.augment.noise import ShotNoise
from engine.augment.optics import DefocusBlur, DiffractionBlur, UnevenIllumination
from engine.augment.scan import ScanDrift, ScanLineJitter

TRANSFORMS: dict[str, type[Transform]] = {
    cls.name: cls
    for cls in (Dihedral, ScaleJitter, IntensityMap, ScanDrift, ScanLineJitter, DefocusBlur,
                DiffractionBlur, UnevenIllumination, ShotNoise)
}


def create_transform(name: str, **kwargs: Any) -> Transform:
    """The transform registered as `name`, built with `kwargs` (its dataclass fields).

    Lists (as YAML gives them) become tuples, and Dihedral's `ops` a frozenset.
    """
    if name not in TRANSFORMS:
        raise KeyError(f"unknown augmentation {name!r}; valid names: {', '.join(sorted(TRANSFORMS))}")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if "ops" in args and args["ops"] is not None:
        args["ops"] = frozenset(args["ops"])
    try:
        return TRANSFORMS[name](**args)
    except TypeError as e:
        raise TypeError(f"augmentation {name!r}: {e}") from None
