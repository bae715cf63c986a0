"""What a format reader returns, and the one registry that maps paths to readers.

A reader takes a local path and yields `InstrumentImage`s: one for an ordinary
micrograph, several for a file that holds a stack or several detectors' images. Readers
report what the file says (pixel size, modality, ...) and leave decisions about missing
values to `engine.stores.ingest.pipeline`, which knows the user's arguments.

Files are matched by extension; folders (an OME-Zarr image is one) by a test each folder
format registers. Any other folder is refused with a hint to pass its files: giving ingest
a folder of TIFFs is a common slip.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import IngestError
from engine.stores.ingest.bands import BandedPlane


@dataclass(frozen=True, eq=False)
class InstrumentImage:
    """One 2-D micrograph as an instrument file describes it.

    `pixels`: (y, x) array, native byte order, dtype as stored (RGB already reduced to
    one channel, see `to_grayscale`); for a plane too large to decode whole (a stitched
    mosaic), a `BandedPlane` that decodes it a band of rows at a time (`np.asarray`
    decodes it whole). `pixel_size`: (y, x) size of one pixel in `unit`
    (a UDUNITS name: 'nanometer' or 'micrometer'), or None when the file carries no
    calibration. `modality`: 'SEM', 'TEM' or 'optical' when the file says, else None.
    `acquired_at`: timezone-aware; instruments write wall-clock time without a zone, which
    is taken as UTC. `metadata`: a JSON-safe summary of the file's own metadata.
    `part`: which image of a multi-image file this is (plane index or detector name), None
    when the file holds one image. `notes`: conversions applied on the way in.
    `calibration_note`: why a pixel size the file seems to give was not taken (a
    screen/print dpi, ...), so a refusal for want of a pixel size can say so; else None.
    """

    pixels: np.ndarray | BandedPlane
    pixel_size: tuple[float, float] | None
    unit: str | None
    modality: str | None = None
    instrument: str | None = None
    acquired_at: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source_format: str = ""
    pixel_size_source: str | None = None
    part: str | None = None
    notes: tuple[str, ...] = ()
    calibration_note: str | None = None


Reader = Callable[[Path], Iterator[InstrumentImage]]


@dataclass(frozen=True)
class FolderFormat:
    """A format whose images are folders. `claims(folder)` says whether a folder is one
    (it may say yes to a folder the reader then refuses with a reason: a Zarr folder
    without NGFF metadata); `suffixes` are the names such folders usually end with
    ('.zarr'), so a missing or file-shaped one gets a message of its own."""

    name: str
    suffixes: tuple[str, ...]
    claims: Callable[[Path], bool]
    reader: Reader


_READERS: dict[str, tuple[str, Reader]] = {}
_FOLDER_FORMATS: list[FolderFormat] = []
_BUILTINS_LOADED = False
# Entries of a refused folder looked at to suggest a pattern: enough for any session
# folder, bounded for one holding a million tiles.
_FOLDER_SAMPLE = 10_000


def register_reader(extensions: tuple[str, ...], format_name: str, reader: Reader) -> None:
    """Make `reader` handle files whose lower-cased suffix is one of `extensions` ('.tif')."""
    for ext in extensions:
        _READERS[ext.lower()] = (format_name, reader)


def register_folder_reader(
    format_name: str, suffixes: tuple[str, ...], claims: Callable[[Path], bool], reader: Reader
) -> None:
    """Make `reader` handle folders for which `claims(folder)` is true; formats registered
    earlier are asked first."""
    _FOLDER_FORMATS.append(FolderFormat(format_name, tuple(s.lower() for s in suffixes), claims, reader))


def supported_extensions() -> tuple[str, ...]:
    """File extensions with a reader ('.tif', ...); folder formats are not files and not listed."""
    _ensure_builtin_readers()
    return tuple(sorted(_READERS))


def reader_for(path: Path) -> Reader:
    """The reader for `path`: a folder's by the folder formats' tests, a file's by extension.

    IngestError for a folder no format claims (pass its files), a missing or file-shaped
    path named like a folder format ('x.zarr'), and an unknown extension (listing the known).
    """
    _ensure_builtin_readers()
    if path.is_dir():
        for fmt in _FOLDER_FORMATS:
            if fmt.claims(path):
                return fmt.reader
        raise IngestError(f"{path} is a folder; pass its files (e.g. {path / ('*' + _likely_suffix(path))})")
    suffix = path.suffix.lower()
    entry = _READERS.get(suffix)
    if entry is not None:
        return entry[1]
    for fmt in _FOLDER_FORMATS:
        if suffix in fmt.suffixes:
            if path.exists():
                raise IngestError(f"{path}: a file, but an {fmt.name} is a folder (a zipped store: unzip it first)")
            raise IngestError(f"{path}: no such folder")
    known = ", ".join(f"{ext} ({name})" for ext, (name, _) in sorted(_READERS.items()))
    folders = "".join(f", and folders: {fmt.name}" for fmt in _FOLDER_FORMATS)
    raise IngestError(
        f"{path}: unknown file type {path.suffix or '(no extension)'!r}; grainflow ingests {known}{folders}"
    )


def _likely_suffix(folder: Path) -> str:
    """The most common suffix in `folder` that ingest reads (a file's extension, a folder
    format's name ending), for the hint a refused folder gets; '.tif' when there is none."""
    counts: dict[str, int] = {}
    folder_suffixes = {s for fmt in _FOLDER_FORMATS for s in fmt.suffixes}
    try:
        with os.scandir(folder) as entries:
            for n, entry in enumerate(entries):
                if n >= _FOLDER_SAMPLE:
                    break
                suffix = os.path.splitext(entry.name)[1].lower()
                if suffix in _READERS or suffix in folder_suffixes:
                    counts[suffix] = counts.get(suffix, 0) + 1
    except OSError:  # unreadable: the hint falls back to the common case
        pass
    return max(sorted(counts), key=counts.__getitem__) if counts else ".tif"


def _ensure_builtin_readers() -> None:
    # The built-in readers register themselves on first use rather than at import, so
    # importing engine.stores.ingest stays cheap and free of side effects.
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        from engine.stores.ingest import ome_zarr, rsciio_formats, tiff

        earlier = dict(_READERS)
        tiff.register()
        rsciio_formats.register()
        _READERS.update(earlier)  # a reader registered before first use wins over a built-in
        ome_zarr.register()  # appended: folder formats registered before first use are asked first
        _BUILTINS_LOADED = True


# Length units instruments write, in nanometres. Wider than engine.stores.ngff's table
# (pm, inch) because files use them; what is stored is always nanometer or micrometer.
_LENGTH_NM = {
    "pm": 1e-3, "picometer": 1e-3, "picometre": 1e-3,
    "a": 0.1, "å": 0.1, "angstrom": 0.1, "ang": 0.1,
    "nm": 1.0, "nanometer": 1.0, "nanometre": 1.0,
    "um": 1e3, "µm": 1e3, "μm": 1e3, "micron": 1e3, "microns": 1e3, "micrometer": 1e3, "micrometre": 1e3,
    "mm": 1e6, "millimeter": 1e6, "millimetre": 1e6,
    "cm": 1e7, "centimeter": 1e7, "centimetre": 1e7,
    "m": 1e9, "meter": 1e9, "metre": 1e9,
    "in": 2.54e7, "inch": 2.54e7,
}
# What an uncalibrated axis says about itself.
_NO_UNIT = {"", "px", "pixel", "pixels", "<undefined>", "undefined", "none", "t.b.d."}


def length_unit_nm(unit: str | None, where: str) -> float | None:
    """Size of one `unit` in nanometres; None for an uncalibrated axis ('', 'px').

    A unit that is not a length (1/nm of a diffraction pattern, eV of a spectrum) gets an
    IngestError naming `where`: grainflow ingests real-space images only.
    """
    key = (unit or "").strip().lower()
    if key in _NO_UNIT:
        return None
    if key in _LENGTH_NM:
        return _LENGTH_NM[key]
    compact = key.replace(" ", "")
    reciprocal = compact.startswith("1/") or "^-1" in compact or "\u207b\u00b9" in compact
    hint = " (a reciprocal length: a diffraction pattern or FFT)" if reciprocal else ""
    raise IngestError(
        f"{where}: axis unit {unit!r} is not a length{hint}; grainflow ingests real-space "
        f"images with pixel sizes in {', '.join(('pm', 'Å', 'nm', 'µm', 'mm', 'm'))}"
    )


def calibrated(size_y: float, size_x: float, unit: str | None, where: str) -> tuple[tuple[float, float], str] | None:
    """((y, x), unit) with the unit grainflow stores, or None when uncalibrated.

    Sizes become nanometres, or micrometres when a pixel is 1 µm or larger (optical
    images), so stored numbers stay readable. Non-positive or non-finite sizes count as
    uncalibrated: instruments write 0 or 1 'pixel' when they know nothing.
    """
    factor = length_unit_nm(unit, where)
    if factor is None:
        return None
    try:
        y_nm, x_nm = float(size_y) * factor, float(size_x) * factor
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) and v > 0 for v in (y_nm, x_nm)):
        return None
    if min(y_nm, x_nm) >= 1e3:
        return (y_nm / 1e3, x_nm / 1e3), "micrometer"
    return (y_nm, x_nm), "nanometer"


def as_utc(value: datetime | None) -> datetime | None:
    """`value` with a zone; naive instrument times are taken as UTC (files carry no zone)."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def parse_datetime(date: object, time: object = None) -> datetime | None:
    """A date (and separate time) as instruments write them ('03/14/2024', '10:11:12 AM';
    '15 Mar 2024', '14:22:01'; ISO 8601), or None. No date gives None: a time alone would
    be dated today by the parser."""
    date_text = str(date).strip() if date is not None else ""
    if not date_text:
        return None
    text = f"{date_text} {str(time).strip()}" if time is not None and str(time).strip() else date_text
    from dateutil import parser  # a dependency of pandas and rosettasciio

    try:
        return as_utc(parser.parse(text))
    except (ValueError, OverflowError):
        return None


def native(pixels: np.ndarray) -> np.ndarray:
    """`pixels` in native byte order: stored dtypes are compared as native types."""
    if not pixels.dtype.isnative:
        return pixels.astype(pixels.dtype.newbyteorder("="))
    return pixels


# ITU-R BT.709 luma, as scikit-image's rgb2gray uses; in 1/10000 for exact integer sums.
_LUMA = np.array([0.2125, 0.7154, 0.0721])
_LUMA_INT = np.array([2125, 7154, 721])
# Pixels converted at a time: the arithmetic's temporaries stay a few MB
# however large the image (whole, a 6000 x 6000 RGB took 1.2 GB in float64).
_BLOCK_PIXELS = 1 << 18


def to_grayscale(rgb: np.ndarray, where: str, *, equal_channels: bool | None = None) -> tuple[np.ndarray, str]:
    """A (y, x, 3|4) colour image as (y, x) in the same dtype, and a note saying what was done.

    Micrographs saved as RGB usually have three equal channels (a grayscale detector
    image exported as colour); those lose nothing and keep one channel. Other colour
    images (optical micrographs, false-colour maps) become BT.709 luma: for integer
    types computed exactly and rounded half up, for floats in float32 (float64 for
    float64 input). Alpha is dropped. Works in blocks of rows, so memory beyond the
    output is bounded.

    `equal_channels`: whether the whole image's channels are equal, when the caller
    knows (an image converted band by band is checked whole first, see
    `has_equal_channels`, so that every band is converted alike); None checks `rgb`.
    """
    if rgb.ndim != 3 or rgb.shape[-1] not in (3, 4):
        raise IngestError(f"{where}: expected a (y, x, 3|4) colour image, got shape {rgb.shape}")
    channels = rgb[..., :3]
    if equal_channels is None:
        equal_channels = has_equal_channels(rgb)
    if equal_channels:
        return np.ascontiguousarray(channels[..., 0]), "RGB with three equal channels: kept one channel"
    out = np.empty(rgb.shape[:2], rgb.dtype)
    for b in _row_blocks(rgb):
        out[b] = _luma(channels[b])
    return out, "RGB converted to grayscale (BT.709 luma: 0.2125 R + 0.7154 G + 0.0721 B)"


def has_equal_channels(rgb: np.ndarray) -> bool:
    """Whether R, G and B of a (y, x, 3|4) image are equal everywhere (checked in blocks)."""
    return all(_equal_channels(rgb[b]) for b in _row_blocks(rgb))


def _row_blocks(rgb: np.ndarray) -> list[slice]:
    rows = max(1, _BLOCK_PIXELS // max(1, rgb.shape[1]))
    return [slice(y, y + rows) for y in range(0, rgb.shape[0], rows)]


def _equal_channels(block: np.ndarray) -> bool:
    return bool(np.array_equal(block[..., 0], block[..., 1]) and np.array_equal(block[..., 0], block[..., 2]))


def _luma(block: np.ndarray) -> np.ndarray:
    """BT.709 luma of a (rows, x, 3) block, in the block's dtype."""
    if np.issubdtype(block.dtype, np.integer):
        # Integer sums in 1/10000: exact, so rounding never depends on float error.
        # int32 holds 10000 * 65535; wider types need int64.
        acc = np.int32 if block.dtype.itemsize <= 2 else np.int64
        total = block.astype(acc) @ _LUMA_INT.astype(acc)
        info = np.iinfo(block.dtype)
        return np.clip((total + 5000) // 10000, info.min, info.max).astype(block.dtype)
    work = np.float64 if block.dtype.itemsize >= 8 else np.float32
    return (block.astype(work) @ _LUMA.astype(work)).astype(block.dtype)


def json_safe_summary(metadata: Any, *, max_entries: int = 400, max_text: int = 200) -> dict[str, Any]:
    """Nested instrument metadata flattened to {'a.b.c': scalar}, JSON-safe and bounded.

    Keeps the first `max_entries` leaves and cuts strings at `max_text` characters, so a
    file with a huge tag tree cannot bloat the image's zarr.json. Arrays become a shape note.
    """
    out: dict[str, Any] = {}

    def leaf(value: Any) -> Any:
        if isinstance(value, (np.generic,)):
            value = value.item()
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, (bool, int, float)) or value is None:
            return value
        if isinstance(value, np.ndarray):
            if value.size <= 8:
                return [leaf(v) for v in value.ravel().tolist()]
            return f"<array {value.dtype} {tuple(value.shape)}>"
        if isinstance(value, datetime):
            return value.isoformat()
        text = str(value)
        return text if len(text) <= max_text else text[:max_text] + "..."

    def walk(prefix: str, value: Any) -> None:
        if len(out) >= max_entries:
            return
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (list, tuple)) and len(value) <= 16 and any(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        elif isinstance(value, (list, tuple)):
            out[prefix] = [leaf(v) for v in value[:16]] + (["..."] if len(value) > 16 else [])
        else:
            out[prefix] = leaf(value)

    walk("", metadata)
    return out
