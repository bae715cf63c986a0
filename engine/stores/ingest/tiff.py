"""TIFF micrographs through tifffile, with the pixel size from the best evidence in the file.

Where the pixel size comes from, first match wins:

1. SEM vendor tags: FEI/Thermo Fisher (34680, 34682) or Zeiss (34118); see sem_metadata.
2. OME-XML: ``Pixels/@PhysicalSizeX|Y`` with their units (default µm, as the schema says).
3. ImageJ: the ``unit`` in the ImageJ description; XResolution/YResolution then count
   pixels per that unit.
4. Generic XResolution/YResolution with ResolutionUnit inch, centimetre (or tifffile's
   millimetre/micrometre). Resolution is pixels *per* unit, so a pixel is 1/resolution.

3 and 4 are the same tags, and image software fills them with its screen or print
setting whatever the image shows: 72, 96, 150, 200, 240, 300, 600 or 1200 per inch, the
same numbers per centimetre, or a dpi converted to centimetres (72 dpi = 28.35 /cm).
Those, and a "pixel" over 1 mm, count as no pixel size, with a note saying so
(`InstrumentImage.calibration_note`): the user must pass --pixel-size.

Layout: every image of the file is ingested: each series (tifffile's grouping of pages
of one shape), and each plane of a stack (pages, Z, T, channels), becomes its own
image, numbered in file order. Reduced-resolution pages (thumbnails, pyramid levels)
are skipped with a note. RGB(A) is reduced to one channel (see base.to_grayscale); palette-colour
and other colour spaces are refused. MinIsWhite integer images are inverted so bright
means high signal, as in every other format (a float image has no white point to invert
about and is kept as stored). A data bar below an FEI image is cut off when
the FEI metadata says how tall the scanned frame is. Pixels are read, converted and
cut in `tiff_planes`, which reads a large plane (a stitched mosaic) in bands.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import tifffile

from engine.errors import IngestError
from engine.stores.ingest.base import (
    InstrumentImage,
    as_utc,
    calibrated,
    json_safe_summary,
    length_unit_nm,
    parse_datetime,
    register_reader,
)
from engine.stores.ingest.sem_metadata import VendorCalibration, from_fei, from_zeiss
from engine.stores.ingest.tiff_planes import Conversion, SeriesRef, plane_loaders

EXTENSIONS = (".tif", ".tiff")
# Screen and print resolutions (per inch, or the same numbers per cm) that editors,
# scanners and office programs write; no micrograph calibration lands on them exactly.
_DISPLAY_DPI = (72.0, 96.0, 150.0, 200.0, 240.0, 300.0, 600.0, 1200.0)
_CM_PER_INCH = 2.54
_RESUNIT_NAMES = {2: "inch", 3: "cm", 4: "mm", 5: "µm"}
_MAX_PIXEL_NM = 1e6  # 1 mm: larger "pixels" are page-layout resolutions, not calibrations


def register() -> None:
    register_reader(EXTENSIONS, "TIFF", read_tiff)


@dataclass(frozen=True)
class _Calibration:
    """Everything the TIFF says about its pixels; `note` explains an ignored calibration."""

    pixel_size: tuple[float, float] | None = None
    unit: str | None = None
    source: str | None = None
    modality: str | None = None
    instrument: str | None = None
    acquired_at: datetime | None = None
    image_rows: int | None = None
    note: str | None = None


@dataclass(frozen=True)
class _Found:
    pixel_size: tuple[float, float]
    unit: str
    source: str


@dataclass(frozen=True)
class _Series:
    """One series to ingest, with what its first page says about all its planes."""

    series: tifffile.TiffPageSeries
    ref: SeriesRef
    calibration: _Calibration
    conversion: Conversion
    metadata: dict[str, Any]
    notes: tuple[str, ...]


def read_tiff(path: Path) -> Iterator[InstrumentImage]:
    """Yield each (y, x) plane of every full-resolution series of a TIFF file, in file order."""
    where = str(path)
    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises TiffFileError, struct.error, ValueError, ...
        raise IngestError(f"{where}: not a readable TIFF file ({type(exc).__name__}: {exc})") from None
    with tif:
        try:
            all_series = tif.series
            if not all_series:
                raise IngestError(f"{where}: TIFF file holds no readable image; it may be truncated or corrupt")
            kept, skipped = _image_series(all_series, where)
            # Every series is checked before the first image is yielded, so a file with an
            # unsupported one fails whole rather than half ingested.
            layouts = [_layout(tif, ref, series, k, len(kept), skipped, where) for k, (ref, series) in enumerate(kept)]
        except IngestError:
            raise
        except Exception as exc:  # malformed tags surface here, in assorted types
            raise IngestError(f"{where}: unreadable TIFF structure or metadata ({type(exc).__name__}: {exc})") from None
        planes = [
            (layout, load)
            for layout in layouts
            for load in plane_loaders(path, layout.series, layout.ref, layout.conversion, where)
        ]
        count = len(planes)
        for index, (layout, load) in enumerate(planes):
            cal = layout.calibration
            try:
                pixels, plane_notes = load()
            except IngestError:
                raise
            except Exception as exc:  # codecs and truncated files raise assorted types
                raise IngestError(
                    f"{where}: pixel data of plane {index} cannot be decoded ({type(exc).__name__}: {exc}); "
                    "the file may be truncated or corrupt"
                ) from None
            yield InstrumentImage(
                pixels=pixels, pixel_size=cal.pixel_size, unit=cal.unit,
                modality=cal.modality, instrument=cal.instrument, acquired_at=cal.acquired_at,
                metadata=layout.metadata, source_format=_format_name(tif), pixel_size_source=cal.source,
                part=None if count == 1 else f"{index:0{len(str(count - 1))}d}",
                notes=layout.notes + tuple(plane_notes), calibration_note=cal.note,
            )


def image_levels(all_series: list[tifffile.TiffPageSeries]) -> list[tuple[SeriesRef, tifffile.TiffPageSeries]]:
    """The series (and pyramid levels) of a TIFF that are images in their own right, in
    file order, with where each is: every level whose first page is not flagged
    reduced-resolution (NewSubfileType bit 0), SubIFD levels left out, and none with
    fewer pixels than the first kept (a preview or overview written without the flag:
    its tags are often copied from the main image, so its pixel size would be wrong).
    The batch ingest makes each an image; the endpoint analyses the first
    (`engine.serving.decode`).
    """
    full = [(SeriesRef(i, k), level) for i, series in enumerate(all_series)
            for k, level in enumerate(series.levels)  # levels[0] is the series itself
            if not (level.keyframe.is_reduced or (k > 0 and level.keyframe.is_subifd))]
    if not full:
        return []
    first = _pixel_count(full[0][1])
    return [(ref, level) for ref, level in full if _pixel_count(level) >= first]


def _pixel_count(series: tifffile.TiffPageSeries) -> int:
    page = series.keyframe
    return int(page.imagelength) * int(page.imagewidth)


def _image_series(all_series: list[tifffile.TiffPageSeries],
                  where: str) -> tuple[list[tuple[SeriesRef, tifffile.TiffPageSeries]], int]:
    """`image_levels`, and how many levels (previews, thumbnails, pyramid levels) were
    left out; IngestError when none is left."""
    kept = image_levels(all_series)
    if not kept:
        raise IngestError(f"{where}: TIFF file holds only reduced-resolution (thumbnail) images")
    return kept, sum(len(series.levels) for series in all_series) - len(kept)


def _layout(tif: tifffile.TiffFile, ref: SeriesRef, series: tifffile.TiffPageSeries, k: int, n: int,
            skipped: int, where: str) -> _Series:
    """Series `k` of the `n` to ingest, checked: calibration, photometric, metadata, notes."""
    page = series.keyframe
    cal, vendor_meta = _calibration(tif, page, _shape_yx(series, where), where, ref, first=k == 0)
    photometric = int(page.photometric)
    if photometric == tifffile.PHOTOMETRIC.PALETTE:
        raise IngestError(f"{where}: palette-colour TIFF is not supported; export the micrograph as grayscale")
    if photometric not in (0, 1, 2, 6):  # MINISWHITE, MINISBLACK, RGB, YCBCR
        raise IngestError(
            f"{where}: TIFF photometric interpretation {photometric} is not supported; "
            "export the micrograph as grayscale or RGB"
        )
    notes = [] if cal.note is None else [cal.note]
    if n > 1:
        notes.append(f"series {k + 1} of {n} in the file ({'x'.join(map(str, series.shape))} {series.axes})")
    if skipped:
        notes.append(f"{skipped} smaller or reduced-resolution page series (previews, thumbnails, pyramid levels) "
                     "of the file not ingested")
    conversion = Conversion(photometric, cal.image_rows)
    return _Series(series, ref, cal, conversion, _summary(tif, page, vendor_meta), tuple(notes))


def _shape_yx(series: tifffile.TiffPageSeries, where: str) -> tuple[int, int]:
    axes = series.axes
    if "Y" not in axes or "X" not in axes:
        raise IngestError(f"{where}: TIFF series has axes {axes!r}; a micrograph needs Y and X")
    return int(series.shape[axes.index("Y")]), int(series.shape[axes.index("X")])


def _calibration(tif: tifffile.TiffFile, page, shape: tuple[int, int], where: str, ref: SeriesRef,
                 *, first: bool) -> tuple[_Calibration, dict]:
    """The best pixel-size evidence for series `ref` of the file (its key page `page`),
    and the vendor metadata dict (or {}). Evidence about the file's image (vendor and
    ImageJ metadata) is taken for the `first` image only; another image takes its own
    OME-XML Image (by series index) or its own page's resolution tags."""
    vendor: VendorCalibration | None = None
    vendor_meta: dict[str, Any] = {}
    if first and tif.is_fei:
        vendor_meta = {"FEI": tif.fei_metadata or {}}
        vendor = from_fei(vendor_meta["FEI"], shape, where)
    elif first and tif.is_sem:
        vendor_meta = {"CZ_SEM": tif.sem_metadata or {}}
        vendor = from_zeiss(vendor_meta["CZ_SEM"], shape, where)
    ome = _ome_root(tif)
    tag_time = as_utc(page.datetime) if page.datetime else None
    facts = dict(
        modality=vendor.modality if vendor else None,
        instrument=(vendor.instrument if vendor else None) or _tag_text(page, "Model"),
        acquired_at=(vendor.acquired_at if vendor else None) or _ome_acquired(ome) or tag_time,
        image_rows=vendor.image_rows if vendor else None,
    )
    if vendor is not None and vendor.pixel_size is not None:
        return _Calibration(vendor.pixel_size, vendor.unit, vendor.pixel_size_source, **facts), vendor_meta
    found = (_from_ome(ome, ref.series if ref.level == 0 else None, where)
             or (_from_imagej(tif, page, where) if first else None) or _from_resolution_tags(page, where))
    if isinstance(found, _Found):
        return _Calibration(found.pixel_size, found.unit, found.source, **facts), vendor_meta
    return _Calibration(**facts, note=found), vendor_meta


def _ome_root(tif: tifffile.TiffFile) -> ET.Element | None:
    if not tif.is_ome or not tif.ome_metadata:
        return None
    try:
        return ET.fromstring(tif.ome_metadata)
    except ET.ParseError:
        return None


def _ome_element(root: ET.Element | None, name: str) -> ET.Element | None:
    """The first element called `name` in any OME namespace."""
    if root is None:
        return None
    return next((e for e in root.iter() if e.tag == name or e.tag.endswith("}" + name)), None)


def _ome_acquired(root: ET.Element | None) -> datetime | None:
    date = _ome_element(root, "AcquisitionDate")
    return parse_datetime(date.text) if date is not None else None


def _from_ome(root: ET.Element | None, index: int | None, where: str) -> _Found | None:
    """Pixel size from the `index`-th OME Image's Pixels (tifffile's series follow the
    Images in order); None for a pyramid level (index None) or without one."""
    images = [] if root is None or index is None else [
        e for e in root.iter() if e.tag == "Image" or e.tag.endswith("}Image")]
    pixels = _ome_element(images[index], "Pixels") if index is not None and index < len(images) else None
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    # Units default to µm (OME schema) and y may have its own, so both go through nm.
    x_unit = pixels.get("PhysicalSizeXUnit", "µm")
    y_unit = pixels.get("PhysicalSizeYUnit", "µm") if pixels.get("PhysicalSizeY") is not None else x_unit
    x_factor, y_factor = length_unit_nm(x_unit, where), length_unit_nm(y_unit, where)
    if x_factor is None or y_factor is None:
        return None
    try:
        x_nm = float(pixels.get("PhysicalSizeX")) * x_factor
        y_nm = float(pixels.get("PhysicalSizeY", pixels.get("PhysicalSizeX"))) * y_factor
    except ValueError:
        return None
    cal = calibrated(y_nm, x_nm, "nm", where)
    return None if cal is None else _Found(cal[0], cal[1], f"OME-XML PhysicalSizeX/Y ({x_unit})")


def _from_imagej(tif: tifffile.TiffFile, page, where: str) -> _Found | str | None:
    """Pixel size from the ImageJ unit and X/YResolution; a note when it is no calibration."""
    meta = tif.imagej_metadata if tif.is_imagej else None
    if not meta or "unit" not in meta:
        return None
    # ImageJ escapes µ in its description text.
    unit = str(meta["unit"]).replace("\\u00B5", "µ").replace("\\u00b5", "µ")
    return _from_resolution(page, unit, f"ImageJ unit {unit!r} with X/YResolution", where)


def _from_resolution_tags(page, where: str) -> _Found | str | None:
    """Pixel size from X/YResolution and ResolutionUnit; a note when it is no calibration."""
    unit_code = int(page.tags.valueof(296, default=2))
    if unit_code not in _RESUNIT_NAMES:
        return None
    unit = _RESUNIT_NAMES[unit_code]
    return _from_resolution(page, unit, f"TIFF XResolution/YResolution (pixels per {unit})", where)


def _from_resolution(page, unit: str, source: str, where: str) -> _Found | str | None:
    """X/YResolution read as pixels per `unit`: the pixel size found, a note (str) saying
    why it is a display/print setting and not a calibration, or None (no usable tags)."""
    sizes = _pixel_sizes_from_resolution(page)
    if sizes is None:
        return None
    cal = calibrated(sizes[0], sizes[1], unit, where)
    if cal is None:
        return None
    per_unit = (1 / sizes[0], 1 / sizes[1])
    unit_nm = length_unit_nm(unit, where)
    dpi = [_display_dpi(r, unit_nm) for r in per_unit]
    if None not in dpi:
        return (f"resolution {per_unit[1]:g}x{per_unit[0]:g} pixels per {unit}: a screen/print setting "
                f"({dpi[1]:g} dpi) that image software writes, not a calibration; ignored")
    size_nm = max(cal[0]) * (1e3 if cal[1] == "micrometer" else 1.0)
    if size_nm > _MAX_PIXEL_NM:
        return f"resolution {per_unit[1]:g} pixels per {unit} gives {size_nm / 1e6:g} mm pixels: a page layout, not a calibration; ignored"
    return _Found(cal[0], cal[1], source)


def _display_dpi(per_unit: float, unit_nm: float | None) -> float | None:
    """The screen/print dpi that a resolution of `per_unit` pixels per unit (of `unit_nm`
    nm) is, or None. Per cm, software writes the dpi number itself or converts it."""
    if unit_nm is None:
        return None
    if math.isclose(unit_nm, _CM_PER_INCH * 1e7):
        readings = (per_unit,)
    elif math.isclose(unit_nm, 1e7):
        readings = (per_unit, per_unit * _CM_PER_INCH)
    else:
        return None
    return next((d for d in _DISPLAY_DPI for r in readings if math.isclose(r, d, rel_tol=1e-4)), None)


def _pixel_sizes_from_resolution(page) -> tuple[float, float] | None:
    """(y, x) size of a pixel in the resolution unit, from the rational tags as stored."""
    xres, yres = page.tags.get(282), page.tags.get(283)
    if xres is None:
        return None
    x = _rational(xres.value)
    y = _rational(yres.value) if yres is not None else x
    if not x or not y or x <= 0 or y <= 0:
        return None
    return (1.0 / y, 1.0 / x)


def _rational(value: Any) -> float | None:
    try:
        if isinstance(value, tuple):
            num, den = value
            return float(num) / float(den) if den else None
        return float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def _tag_text(page, name: str) -> str | None:
    tag = page.tags.get(name)
    if tag is None or not isinstance(tag.value, str):
        return None
    return tag.value.strip() or None


def _format_name(tif: tifffile.TiffFile) -> str:
    names = (("fei", "TIFF (FEI/Thermo Fisher)"), ("sem", "TIFF (Zeiss SEM)"), ("ome", "OME-TIFF"), ("imagej", "TIFF (ImageJ)"))
    for flag, name in names:
        if getattr(tif, f"is_{flag}", False):
            return name
    return "TIFF"


def _summary(tif: tifffile.TiffFile, page, vendor_meta: dict[str, Any]) -> dict[str, Any]:
    tags: dict[str, Any] = {}
    names = ("ImageDescription", "Software", "DateTime", "Make", "Model", "XResolution", "YResolution", "ResolutionUnit")
    for name in names:
        tag = page.tags.get(name)
        if tag is not None:
            value = tag.value
            tags[name] = value.name if hasattr(value, "name") else value
    meta: dict[str, Any] = {"TIFF": tags, **vendor_meta}
    if tif.is_imagej and tif.imagej_metadata:
        meta["ImageJ"] = tif.imagej_metadata
    return json_safe_summary(meta)
