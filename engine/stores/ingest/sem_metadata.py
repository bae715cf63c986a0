"""SEM vendor metadata in TIFF tags: FEI / Thermo Fisher and Zeiss.

tifffile parses both tags into dicts (`TiffFile.fei_metadata`, `TiffFile.sem_metadata`);
this module turns those dicts into the few facts ingest needs. Vendor metadata is the
instrument's own calibration and wins over the generic TIFF resolution tags.

FEI/Thermo Fisher (tags 34680 FEI_SFEG, 34682 FEI_HELIOS): INI-style text,
``[Scan] PixelWidth=2.5e-09`` in metres; ``[System] SystemType``; ``[User] Date/Time``;
``[Image] ResolutionX/ResolutionY`` is the scanned frame, which excludes the data bar
the microscope software pastes below the image.

Zeiss SmartSEM (tag 34118 CZ_SEM): ``AP_IMAGE_PIXEL_SIZE`` / ``Image Pixel Size = 3.1 nm``
(older software: ``AP_PIXEL_SIZE``); ``AP_DATE``, ``AP_TIME``; ``SV_SERIAL_NUMBER``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from engine.stores.ingest.base import calibrated, parse_datetime


@dataclass(frozen=True)
class VendorCalibration:
    """What a vendor tag says. `pixel_size` is (y, x) in `unit`; `image_rows` is the height
    of the scanned frame when the stored image is taller (a data bar below it)."""

    vendor: str
    pixel_size: tuple[float, float] | None
    unit: str | None
    pixel_size_source: str | None
    instrument: str | None
    acquired_at: datetime | None
    image_rows: int | None = None
    modality: str = "SEM"


def from_fei(meta: dict[str, Any], shape: tuple[int, int], where: str) -> VendorCalibration:
    """Calibration from parsed FEI_SFEG/FEI_HELIOS text; `shape` is the stored (y, x) shape."""
    scan = meta.get("Scan") or meta.get("EScan") or {}
    cal, source = None, None
    if _positive(scan.get("PixelWidth")) and _positive(scan.get("PixelHeight")):
        cal = calibrated(scan["PixelHeight"], scan["PixelWidth"], "m", where)
        source = "FEI metadata [Scan] PixelWidth/PixelHeight (m)"
    image = meta.get("Image") or {}
    if cal is None:
        # FIB images and some exports lack [Scan]: field width over the scanned pixel count.
        for beam in ("EBeam", "IRBeam", "IBeam"):
            section = meta.get(beam) or {}
            if _positive(section.get("HFW")) and _positive(image.get("ResolutionX")):
                vfw, rows = section.get("VFW"), image.get("ResolutionY")
                px = float(section["HFW"]) / float(image["ResolutionX"])
                py = float(vfw) / float(rows) if _positive(vfw) and _positive(rows) else px
                cal = calibrated(py, px, "m", where)
                source = f"FEI metadata [{beam}] HFW/[Image] ResolutionX (m)"
                break
    system = meta.get("System") or {}
    instrument = _text(system.get("SystemType")) or _text(system.get("Type"))
    user = meta.get("User") or {}
    acquired = parse_datetime(_text(user.get("Date")), _text(user.get("Time")))
    image_rows = None
    if _positive(image.get("ResolutionY")) and _positive(image.get("ResolutionX")):
        rows, cols = int(float(image["ResolutionY"])), int(float(image["ResolutionX"]))
        if rows < shape[0] and cols == shape[1]:
            image_rows = rows
    return VendorCalibration(
        vendor="FEI", pixel_size=cal[0] if cal else None, unit=cal[1] if cal else None,
        pixel_size_source=source if cal else None, instrument=instrument, acquired_at=acquired,
        image_rows=image_rows,
    )


def from_zeiss(meta: dict[str, Any], shape: tuple[int, int], where: str) -> VendorCalibration:
    """Calibration from a parsed CZ_SEM tag (tifffile: {'ap_key': (label, value[, unit])})."""
    cal, source = None, None
    for key in ("ap_image_pixel_size", "ap_pixel_size"):
        entry = meta.get(key)
        if isinstance(entry, tuple) and len(entry) >= 3 and _positive(entry[1]):
            cal = calibrated(entry[1], entry[1], str(entry[2]), where)
            if cal is not None:
                source = f"Zeiss metadata {key.upper()} ({entry[2]})"
                break
    if cal is None:
        # Undocumented but long-standing: the unlabelled header's 4th number is the pixel
        # size in metres at 1024 pixels across (rosettasciio reads it the same way).
        header = meta.get("")
        if isinstance(header, tuple) and len(header) > 3 and _positive(header[3]) and shape[1] > 0:
            px = float(header[3]) * 1024 / shape[1]
            cal = calibrated(px, px, "m", where)
            source = "Zeiss metadata header scale (m at 1024 px)" if cal else None
    acquired = parse_datetime(_value(meta.get("ap_date")), _value(meta.get("ap_time")))
    instrument = _value(meta.get("sv_instrument_id")) or _value(meta.get("sv_serial_number"))
    return VendorCalibration(
        vendor="Zeiss", pixel_size=cal[0] if cal else None, unit=cal[1] if cal else None,
        pixel_size_source=source, instrument=f"Zeiss {instrument}" if instrument else "Zeiss SEM",
        acquired_at=acquired,
    )


def _positive(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _value(entry: Any) -> str | None:
    """The value of a Zeiss (label, value[, unit]) entry as text."""
    if isinstance(entry, tuple) and len(entry) >= 2:
        return " ".join(str(v) for v in entry[1:]).strip() or None
    return None
