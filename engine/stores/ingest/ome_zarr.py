"""OME-Zarr images (NGFF v0.4 on Zarr v2, v0.5 on Zarr v3) as ingest sources.

An OME-Zarr image is a folder: bioformats2raw, ome-zarr-py and other archives write
them. One is recognised by its metadata (a Zarr group whose attributes hold NGFF
`multiscales`), whatever the folder is called; a folder named `*.zarr` that is not one
gets a message saying what it is instead.

What is taken: level 0 of the first multiscale, read a band of chunk rows at a time
(`BandedPlane`), so a large image is never held whole; the archive's writer then builds
its own pyramid and checksum, as for any other file. The pixel size is level 0's scale
(the multiscale's own transform folded in, as `engine.stores.ngff` reads it) in the y
and x axes' units; axes without a unit count as uncalibrated, so --pixel-size is needed,
as for a TIFF without calibration (the engine's `open_image`, which a job uses, needs a
unit to measure in, so this reader uses its parts: `open_group`, `parse_multiscales`,
`open_reader`). Axes other than y and x must have size 1: a multichannel image, a
z-stack or a time series is refused, naming the axis. An image grainflow wrote keeps its
recorded modality, instrument and acquisition time; a foreign image has no modality
(NGFF has no field for it), so --modality is needed. Label images are refused, and an
image's own `labels/` are not copied (noted).

A bioformats2raw layout (a root group with `bioformats2raw.layout`, an `OME/` group and
the images as series `0/`, `1/`, ..., or the paths OME's `series` attribute lists) is
read as one image per series, like a multi-image TIFF. Every series is checked before
the first is yielded, so a layout with one unsupported series fails whole. HCS plates
are refused with the path of one field's image to pass instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from engine.errors import IngestError, MetadataError
from engine.stores.image import chunk_grid, open_group
from engine.stores.ingest.bands import BandedPlane
from engine.stores.ingest.base import (
    InstrumentImage,
    as_utc,
    calibrated,
    json_safe_summary,
    length_unit_nm,
    native,
    register_folder_reader,
)
from engine.stores.ngff import SPACE_UNITS_NM, Multiscale, normalise_unit, parse_multiscales
from engine.stores.pixels import open_reader
from engine.stores.uri import StoreLocation, resolve

FORMAT_NAME = "OME-Zarr image (NGFF 0.4, 0.5)"
SUFFIXES = (".zarr",)
# Files that make a folder a Zarr node: v3, then v2's group, attributes and array.
_ZARR_METADATA = ("zarr.json", ".zgroup", ".zattrs", ".zarray")
# Bytes read per band (rounded to whole rows of chunks): reads large enough that their
# overhead vanishes, small next to memory whatever the image's size.
_READ_BYTES = 4 << 20
# What an extra axis of size > 1 makes of an image, by NGFF axis type (else by name).
_AXIS_KINDS = {"channel": "a multichannel image", "time": "a time series", "space": "a z-stack"}
_AXIS_NAMES = {"c": "channel", "t": "time", "z": "space"}


def register() -> None:
    register_folder_reader(FORMAT_NAME, SUFFIXES, is_zarr_folder, read_ome_zarr)


def is_zarr_folder(folder: Path) -> bool:
    """Whether `folder` is a Zarr node (it holds Zarr metadata) or is named like one
    (`*.zarr`); `read_ome_zarr` then says whether it is an image it can ingest."""
    return folder.suffix.lower() in SUFFIXES or any((folder / name).is_file() for name in _ZARR_METADATA)


def read_ome_zarr(path: Path) -> Iterator[InstrumentImage]:
    """Yield the image of an OME-Zarr folder, or each series of a bioformats2raw layout."""
    attrs = _attributes(path)
    ome = attrs.get("ome", attrs)
    if "bioformats2raw.layout" in ome:
        sources = _bioformats2raw_series(path, ome)
        layout = "bioformats2raw layout"
    elif "multiscales" in ome:
        sources = [(None, path)]
        layout = None
    else:
        raise IngestError(_not_an_image(path, ome))
    series = [_Series.open(folder, part, layout) for part, folder in sources]
    for one in series:
        yield one.image()


@dataclass(frozen=True)
class _Series:
    """One multiscale image, checked, with level 0's array and what its metadata says."""

    location: StoreLocation
    where: str
    part: str | None
    multiscale: Multiscale
    level0: zarr.Array
    attributes: dict[str, Any]
    notes: tuple[str, ...]
    layout: str | None

    @classmethod
    def open(cls, folder: Path, part: str | None, layout: str | None) -> _Series:
        where = str(folder)
        location = resolve(folder)
        try:
            group = open_group(location)
            attributes = dict(group.attrs)
            multiscale = parse_multiscales(attributes, where)
        except MetadataError as exc:
            raise IngestError(f"{where}: not an OME-Zarr image grainflow can read: {exc}") from None
        ome = attributes.get("ome", attributes)
        if "image-label" in ome:
            raise IngestError(
                f"{where}: a label image (NGFF 'image-label': segment ids, not intensities); "
                f"pass the micrograph it labels ({folder.parent.parent}) instead"
            )
        level = multiscale.levels[0]
        try:
            array = group[level.path]
        except (KeyError, ValueError, TypeError):
            raise IngestError(f"{where}: level 0 ({level.path!r}) is listed in 'multiscales' but no array "
                              "is stored there; the image is incomplete") from None
        if not isinstance(array, zarr.Array):
            raise IngestError(f"{where}: level 0 ({level.path!r}) is a group, not an array")
        names = [a.name for a in multiscale.axes]
        if array.ndim != len(names):
            raise IngestError(f"{where}: level 0 has {array.ndim} dimensions but the axes are {names}")
        _refuse_extra_axes(multiscale, array.shape, where)
        if min(array.shape[-2:]) < 1:
            raise IngestError(f"{where}: level 0 is empty (shape {tuple(array.shape)})")
        notes = [f"level 0 of {len(multiscale.levels)} read from OME-Zarr (NGFF {multiscale.version})"]
        if len(names) > 2:
            notes.append(f"axes {', '.join(names[:-2])} of size 1 dropped")
        if "labels" in group:
            notes.append("its labels/ group was not ingested")
        return cls(location, where, part, multiscale, array, attributes, tuple(notes), layout)

    def image(self) -> InstrumentImage:
        ours = self.attributes.get("grainflow") or {}
        calibration, note = _calibration(self.multiscale, self.where)
        fmt = f"OME-Zarr (NGFF {self.multiscale.version}" + (f", {self.layout})" if self.layout else ")")
        return InstrumentImage(
            pixels=self._banded(),
            pixel_size=calibration[0] if calibration else None,
            unit=calibration[1] if calibration else None,
            modality=ours.get("modality"),
            instrument=ours.get("instrument"),
            acquired_at=_timestamp(ours.get("acquired_at")),
            metadata=json_safe_summary(self.attributes),
            source_format=fmt,
            pixel_size_source="NGFF multiscales: level 0 scale" if calibration else None,
            part=self.part,
            notes=self.notes,
            calibration_note=note,
        )

    def _banded(self) -> BandedPlane:
        """Level 0 as a plane read in bands of whole rows of stored objects (shards, else
        chunks: each is then fetched once), about `_READ_BYTES` each."""
        height, width = (int(v) for v in self.level0.shape[-2:])
        dtype = np.dtype(self.level0.dtype)
        chunk_rows = chunk_grid(self.level0)[0]
        rows = chunk_rows * max(1, _READ_BYTES // max(1, chunk_rows * width * dtype.itemsize))
        location, array, path, where = self.location, self.level0, self.multiscale.levels[0].path, self.where

        def blocks() -> Iterator[np.ndarray]:
            reader = open_reader(location, array, path)
            for y0 in range(0, height, rows):
                y1 = min(height, y0 + rows)
                try:
                    [band] = reader.read_regions([(y0, y1, 0, width)])
                except Exception as exc:  # codecs and stores raise assorted types
                    raise IngestError(f"{where}: rows {y0}-{y1} of level 0 cannot be read "
                                      f"({type(exc).__name__}: {exc}); a chunk may be missing or corrupt") from None
                yield native(band)

        return BandedPlane((height, width), dtype.newbyteorder("="), blocks)


def _refuse_extra_axes(multiscale: Multiscale, shape: tuple[int, ...], where: str) -> None:
    """An IngestError naming the first axis other than y and x whose size is over 1."""
    for axis, size in zip(multiscale.axes[:-2], shape[:-2]):
        if size == 1:
            continue
        kind = _AXIS_KINDS.get(axis.type or _AXIS_NAMES.get(axis.name, ""), f"an image with a {axis.name!r} axis")
        raise IngestError(
            f"{where}: {kind} (axis {axis.name!r} has size {size}); grainflow ingests single-channel 2-D "
            f"micrographs: save the plane you want as its own image (OME-Zarr or TIFF) and ingest that"
        )


def _calibration(multiscale: Multiscale, where: str) -> tuple[tuple[tuple[float, float], str] | None, str | None]:
    """((y, x) pixel size, stored unit) of level 0, or (None, why) when uncalibrated."""
    units = [multiscale.axes[multiscale.axis_index(n)].unit for n in ("y", "x")]
    size_y, size_x = multiscale.pixel_size(0)
    if not all(units):
        return None, (f"its y and x axes carry no unit (NGFF axis 'unit'), so its scale {size_y:g} x {size_x:g} "
                      "is in unknown units")
    nm_y, nm_x = (_nm_per(unit, where) for unit in units)
    if nm_y is None or nm_x is None:
        return None, f"its axes' units ({units[0]!r}, {units[1]!r}) are not lengths"
    return calibrated(size_y * nm_y, size_x * nm_x, "nm", where), None


def _nm_per(unit: str, where: str) -> float | None:
    """Nanometres per `unit`: NGFF's UDUNITS names first (femtometer ... foot), then the
    abbreviations instruments write ('um', 'Å'); None for a pixel unit."""
    try:
        return SPACE_UNITS_NM[normalise_unit(unit)]
    except MetadataError:
        return length_unit_nm(unit, f"{where}: axis unit")


def _timestamp(value: Any) -> datetime | None:
    try:
        return as_utc(datetime.fromisoformat(value)) if isinstance(value, str) else None
    except ValueError:
        return None


def _attributes(folder: Path) -> dict[str, Any]:
    """The Zarr group attributes of `folder` (v3 zarr.json, else v2 .zattrs); an
    IngestError saying what the folder is when it is no Zarr group."""
    v3 = _json(folder / "zarr.json")
    if v3 is not None:
        if v3.get("node_type") == "array":
            raise IngestError(_an_array(folder))
        return dict(v3.get("attributes") or {})
    if (folder / ".zarray").is_file():
        raise IngestError(_an_array(folder))
    v2 = _json(folder / ".zattrs")
    if v2 is not None or (folder / ".zgroup").is_file():
        return dict(v2 or {})
    raise IngestError(
        f"{folder} is a folder but holds no Zarr metadata (zarr.json for NGFF v0.5, .zattrs for v0.4), so it is "
        f"not an OME-Zarr image; pass an OME-Zarr image folder, or the instrument files in this one"
    )


def _json(path: Path) -> dict[str, Any] | None:
    """`path` parsed as a JSON object; None when absent. Unreadable JSON is an IngestError."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IngestError(f"{path}: unreadable Zarr metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, dict):
        raise IngestError(f"{path}: Zarr metadata must be a JSON object, found {type(value).__name__}")
    return value


def _an_array(folder: Path) -> str:
    parent = folder.parent
    try:
        ome = _attributes(parent)
        is_level = "multiscales" in ome.get("ome", ome)
    except IngestError:
        is_level = False
    if is_level:
        return f"{folder} is one pyramid level (a Zarr array) of the OME-Zarr image {parent}; pass {parent}"
    return f"{folder} is a Zarr array, not an OME-Zarr image (a group with NGFF 'multiscales' metadata)"


def _not_an_image(folder: Path, ome: dict[str, Any]) -> str:
    if "plate" in ome or "well" in ome:
        example = folder / "<row>" / "<column>" / "<field>"
        wells = (ome.get("plate") or {}).get("wells") or []
        if wells and isinstance(wells[0], dict) and wells[0].get("path"):
            example = folder / str(wells[0]["path"]) / "0"
        elif "well" in ome:
            example = folder / "0"
        kind = "an HCS plate" if "plate" in ome else "an HCS well"
        return f"{folder} is {kind}, not one image; pass one field's image folder (e.g. {example})"
    return (f"{folder} is a Zarr group without OME-NGFF 'multiscales' metadata, so not an OME-Zarr image; "
            f"grainflow ingests OME-Zarr images of NGFF v0.4 and v0.5")


def _bioformats2raw_series(root: Path, ome: dict[str, Any]) -> list[tuple[str | None, Path]]:
    """(part, folder) of each image of a bioformats2raw layout; part is None when it holds one.

    The series are the paths `OME/`'s `series` attribute lists, else the consecutive
    groups 0/, 1/, ... (the layout's rule, NGFF 0.4 "bf2raw").
    """
    if "plate" in ome:
        raise IngestError(_not_an_image(root, ome))
    listed = None
    if (root / "OME").is_dir():
        try:
            meta = _attributes(root / "OME")
            listed = meta.get("ome", meta).get("series")
        except IngestError:
            listed = None
    if isinstance(listed, list) and listed:
        paths = [str(p) for p in listed]
    else:
        paths = []
        while (root / str(len(paths))).is_dir():
            paths.append(str(len(paths)))
    if not paths:
        raise IngestError(f"{root}: a bioformats2raw layout without images (no series 0/ and no OME 'series' list)")
    missing = [p for p in paths if not (root / p).is_dir()]
    if missing:
        raise IngestError(f"{root}: bioformats2raw series {missing} are listed but missing; the conversion may be "
                          f"incomplete")
    if len(paths) == 1:
        return [(None, root / paths[0])]
    return [(path, root / path) for path in paths]

