"""The material registry: twelve microstructures with their physical scale and the
instruments they are plausibly imaged with.

`length_nm` is each material's characteristic length (see its render function's
docstring for which feature that is); `feature_px` is the range of that length in
pixels, so a material's pixel size follows from physics rather than being free.
"""

from __future__ import annotations

from engine.synth.errors import SynthArgumentError
from engine.synth.materials import alloys, cast_irons, nonmetals, steels
from engine.synth.materials.base import Fields, Grid, Material

_REGISTRY: dict[str, Material] = {}


def _register(name, length_nm, feature_px, modalities, render) -> None:
    doc = (render.__doc__ or "").strip().split("\n\n")[0]
    _REGISTRY[name] = Material(name, float(length_nm), tuple(map(float, feature_px)), tuple(modalities), render,
                               " ".join(doc.split()))


_register("ferritic_steel", 15_000, (10, 120), ("optical", "SEM"), steels.ferritic_steel)
_register("pearlitic_steel", 450, (4, 30), ("SEM", "optical"), steels.pearlitic_steel)
_register("martensite", 500, (3, 40), ("optical", "SEM"), steels.martensite)
_register("al_alloy_precipitates", 50, (3, 30), ("TEM", "SEM"), alloys.al_alloy_precipitates)
_register("ti_alpha_beta", 1_000, (4, 40), ("optical", "SEM"), alloys.ti_alpha_beta)
_register("ni_superalloy", 300, (6, 80), ("SEM", "TEM"), alloys.ni_superalloy)
_register("grey_cast_iron", 4_000, (3, 30), ("optical", "SEM"), cast_irons.grey_cast_iron)
_register("nodular_cast_iron", 30_000, (10, 220), ("optical", "SEM"), cast_irons.nodular_cast_iron)
_register("porous_ceramic", 2_000, (8, 60), ("SEM", "optical"), nonmetals.porous_ceramic)
_register("fibre_composite", 7_000, (8, 60), ("optical", "SEM"), nonmetals.fibre_composite)
_register("thin_film_lattice", 0.25, (8, 30), ("TEM",), nonmetals.thin_film_lattice)
_register("am_alloy", 800, (4, 40), ("SEM", "optical"), alloys.am_alloy)

MATERIALS: tuple[str, ...] = tuple(_REGISTRY)


def get_material(name: str) -> Material:
    """The registered material `name`; an unknown name raises SynthArgumentError (a
    ValueError) listing the valid ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise SynthArgumentError(f"unknown material {name!r}; valid materials: {', '.join(MATERIALS)}") from None


__all__ = ["MATERIALS", "Fields", "Grid", "Material", "get_material"]
