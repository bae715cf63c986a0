"""OME-NGFF multiscale metadata: parse v0.4 and v0.5, build v0.5.

Only what grainflow needs is modelled: axes, the per-level scale and translation, the
label list and `image-label`. Spec: https://ngff.openmicroscopy.org/0.5/ (v0.5 keeps its
metadata under the `ome` key of zarr.json; v0.4 puts `multiscales` at the top of .zattrs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from engine.errors import MetadataError

# UDUNITS-2 names the spec allows for space axes (those a micrograph can carry, down to
# atomic-resolution STEM's picometres), with their size in nanometres.
SPACE_UNITS_NM = {
    "attometer": 1e-9,
    "femtometer": 1e-6,
    "picometer": 1e-3,
    "angstrom": 0.1,
    "nanometer": 1.0,
    "micrometer": 1e3,
    "millimeter": 1e6,
    "centimeter": 1e7,
    "inch": 2.54e7,
    "decimeter": 1e8,
    "foot": 3.048e8,
    "meter": 1e9,
}
# Abbreviations instruments write; normalised to the spec's names.
UNIT_ALIASES = {
    "pm": "picometer", "a": "angstrom", "å": "angstrom", "nm": "nanometer", "um": "micrometer", "µm": "micrometer",
    "μm": "micrometer", "micron": "micrometer", "mm": "millimeter", "cm": "centimeter", "dm": "decimeter",
    "m": "meter",
}
SPATIAL = ("y", "x")


def normalise_unit(unit: str, where: str | None = None) -> str:
    """A spatial unit as the spec names it ('nm' -> 'nanometer'); unknown units raise,
    naming `where` (the image or catalog row) when given."""
    name = UNIT_ALIASES.get(unit.strip().lower(), unit.strip().lower()) if isinstance(unit, str) else None
    if name not in SPACE_UNITS_NM:
        at = f"{where}: " if where else ""
        raise MetadataError(f"{at}unknown spatial unit {unit!r}; expected one of {sorted(SPACE_UNITS_NM)}")
    return name


def to_nanometres(value: float, unit: str) -> float:
    return value * SPACE_UNITS_NM[normalise_unit(unit)]


@dataclass(frozen=True)
class Axis:
    name: str
    type: str | None = None
    unit: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.type:
            out["type"] = self.type
        if self.unit:
            out["unit"] = self.unit
        return out


@dataclass(frozen=True)
class Level:
    """One pyramid level: its array path and its transform to physical coordinates."""

    path: str
    scale: tuple[float, ...]
    translation: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Multiscale:
    version: str
    axes: tuple[Axis, ...]
    levels: tuple[Level, ...]
    name: str | None = None

    def axis_index(self, name: str) -> int:
        return [a.name for a in self.axes].index(name)

    def spatial_unit(self, where: str) -> str:
        """The unit of y and x; grainflow measures in physical units, so one is required."""
        units = {self.axes[self.axis_index(n)].unit for n in SPATIAL}
        if len(units) != 1 or None in units:
            raise MetadataError(
                f"{where}: y and x axes need one shared spatial unit (e.g. 'nanometer'), found {sorted(map(str, units))}"
            )
        return normalise_unit(units.pop(), where)

    def pixel_size(self, level: int) -> tuple[float, float]:
        """(y, x) pixel size of `level` in `spatial_unit()`."""
        scale = self.levels[level].scale
        return (scale[self.axis_index("y")], scale[self.axis_index("x")])


def parse_multiscales(attrs: dict[str, Any], where: str) -> Multiscale:
    """The first multiscale image described by a group's attributes.

    `where` (the group URI) goes into every error message: metadata of the wrong shape
    or type (a list where an object belongs, a scale of strings) is a MetadataError too,
    and every level's scale must be positive and finite, its translation finite.
    """
    try:
        return _parse_multiscales(attrs, where)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise MetadataError(f"{where}: malformed 'multiscales' metadata ({type(exc).__name__}: {exc})") from None


def _parse_multiscales(attrs: dict[str, Any], where: str) -> Multiscale:
    if "ome" in attrs:
        ome = attrs["ome"]
        version = str(ome.get("version", ""))
        entries = ome.get("multiscales")
    else:
        entries = attrs.get("multiscales")
        version = str(entries[0].get("version", "")) if entries else ""
    if not entries:
        raise MetadataError(f"{where}: no 'multiscales' in the group attributes; not an OME-Zarr image")
    if version not in ("0.4", "0.5"):
        raise MetadataError(f"{where}: OME-NGFF version {version!r} is not supported (0.4 and 0.5 are)")
    ms = entries[0]
    try:
        axes = tuple(Axis(a["name"], a.get("type"), a.get("unit")) for a in ms["axes"])
    except (KeyError, TypeError) as exc:
        raise MetadataError(f"{where}: malformed 'axes' ({exc!r}); each axis needs a name") from None
    names = [a.name for a in axes]
    missing = [n for n in SPATIAL if n not in names]
    if missing:
        raise MetadataError(f"{where}: axes {names} lack spatial axis {missing}; a micrograph needs 'y' and 'x'")
    if names[-2:] != ["y", "x"]:
        raise MetadataError(f"{where}: axes {names} must end with 'y', 'x'")
    for axis in axes:
        if axis.name in SPATIAL and axis.type not in (None, "space"):
            raise MetadataError(f"{where}: axis {axis.name!r} has type {axis.type!r}, expected 'space'")
    levels = []
    for i, ds in enumerate(ms.get("datasets") or []):
        scale, translation = None, None
        for transform in ds.get("coordinateTransformations", []):
            if transform.get("type") == "scale":
                scale = tuple(float(v) for v in transform["scale"])
            elif transform.get("type") == "translation":
                translation = tuple(float(v) for v in transform["translation"])
        if scale is None or len(scale) != len(axes):
            raise MetadataError(f"{where}: dataset {i} ({ds.get('path')!r}) needs a scale with {len(axes)} values")
        levels.append(Level(str(ds["path"]), scale, translation))
    if not levels:
        raise MetadataError(f"{where}: 'multiscales' lists no datasets")
    levels = _with_shared_transforms(levels, ms.get("coordinateTransformations") or [], len(axes), where)
    for i, lv in enumerate(levels):
        if not all(math.isfinite(v) and v > 0 for v in lv.scale):
            raise MetadataError(f"{where}: dataset {i} ({lv.path!r}) scale {list(lv.scale)} must be positive and finite")
        if lv.translation is not None and not all(math.isfinite(v) for v in lv.translation):
            raise MetadataError(f"{where}: dataset {i} ({lv.path!r}) translation {list(lv.translation)} must be finite")
    return Multiscale(version, axes, tuple(levels), ms.get("name"))


def _with_shared_transforms(levels: list[Level], transforms: list[dict], n_axes: int, where: str) -> list[Level]:
    """Levels with the multiscale's own coordinateTransformations (applied after every
    dataset's, the spec says) folded in: scale multiplied, translation scaled and added."""
    if not transforms:
        return levels
    scale, shift = (1.0,) * n_axes, (0.0,) * n_axes
    for t in transforms:
        values = t.get("scale") if t.get("type") == "scale" else t.get("translation")
        if t.get("type") not in ("scale", "translation") or values is None or len(values) != n_axes:
            raise MetadataError(f"{where}: the multiscale's coordinateTransformations need scale/translation "
                                f"values for {n_axes} axes, got {t}")
        if t["type"] == "scale":
            scale = tuple(a * float(b) for a, b in zip(scale, values))
            shift = tuple(a * float(b) for a, b in zip(shift, values))
        else:
            shift = tuple(a + float(b) for a, b in zip(shift, values))
    out = []
    for lv in levels:
        translation = None
        if lv.translation is not None or any(shift):
            own = lv.translation or (0.0,) * n_axes
            translation = tuple(t * s + d for t, s, d in zip(own, scale, shift))
        out.append(Level(lv.path, tuple(v * s for v, s in zip(lv.scale, scale)), translation))
    return out


def multiscales_v05(
    *,
    name: str,
    unit: str,
    pixel_size: tuple[float, float],
    n_levels: int,
    centre_shift: bool,
) -> dict[str, Any]:
    """A v0.5 `multiscales` entry for a YX image whose level k is 2**k coarser.

    With `centre_shift` (each coarser pixel stands for its 2x2 block: the image's mean,
    the labels' most frequent value) level k's first pixel centre sits at (2**k - 1) / 2
    level-0 pixels, which the translation records; without it (levels that keep every
    second pixel, as grainflow's label levels did before) pixel 0 stays in place.
    """
    unit = normalise_unit(unit)
    datasets = []
    for k in range(n_levels):
        factor = 2**k
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [pixel_size[0] * factor, pixel_size[1] * factor]}]
        if centre_shift and k > 0:
            transforms.append({"type": "translation", "translation": [p * (factor - 1) / 2 for p in pixel_size]})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    axes = [Axis(n, "space", unit).to_json() for n in SPATIAL]
    return {"name": name, "axes": axes, "datasets": datasets}
