"""Gatan DigitalMicrograph (.dm3, .dm4) and EMD (.emd: Velox and NCEM/Berkeley) via rosettasciio.

rosettasciio returns one dict per signal: ``data``, ``axes`` (name, scale, offset,
units, navigate), ``metadata`` and ``original_metadata``. An image is a signal with two
signal axes (navigate False); its navigation axes (a time series, a tilt series) are
planes, each ingested as its own image. Spectra and spectrum images are skipped and
noted; a file with no image at all is refused.

The pixel size is the signal axes' scale in their units. Reciprocal units (1/nm of a
diffraction pattern or FFT) are refused: grainflow measures real-space images. An axis
without units ('' or '<undefined>') is uncalibrated.

Modality is TEM (these are TEM/STEM formats) unless the metadata says SEM: DM's
``Microscope Info/Illumination Mode``, Velox's ``Instrument/InstrumentClass``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import IngestError
from engine.stores.ingest.base import (
    InstrumentImage,
    calibrated,
    json_safe_summary,
    length_unit_nm,
    native,
    parse_datetime,
    register_reader,
    to_grayscale,
)


def register() -> None:
    register_reader((".dm3", ".dm4"), "Gatan DigitalMicrograph", read_dm)
    register_reader((".emd",), "EMD (Velox, NCEM)", read_emd)


def read_dm(path: Path) -> Iterator[InstrumentImage]:
    """Yield the images of a DM3/DM4 file (thumbnails excluded by rosettasciio)."""
    from rsciio.digitalmicrograph import file_reader

    signals = _read(file_reader, path, "DigitalMicrograph")
    yield from _images(path, signals, "Gatan DigitalMicrograph", _dm_facts)


def read_emd(path: Path) -> Iterator[InstrumentImage]:
    """Yield the images of a Velox or NCEM EMD file; Velox spectrum data is not read."""
    from rsciio.emd import file_reader

    # 'images' keeps Velox from decoding EDS spectrum streams (slow, and needs `sparse`);
    # NCEM files ignore the option.
    signals = _read(lambda p: file_reader(p, select_type="images"), path, "EMD")
    yield from _images(path, signals, "EMD", _emd_facts)


def _read(reader, path: Path, kind: str) -> list[dict[str, Any]]:
    try:
        signals = reader(str(path))
    except Exception as exc:  # rosettasciio raises OSError, KeyError, struct.error, its own errors, ...
        raise IngestError(f"{path}: not a readable {kind} file ({type(exc).__name__}: {exc})") from None
    return list(signals or [])


def _images(path: Path, signals: list[dict[str, Any]], fmt: str, facts) -> Iterator[InstrumentImage]:
    where = str(path)
    found: list[tuple[np.ndarray, dict[str, Any], tuple | None, str | None, list[str]]] = []
    skipped: list[str] = []
    refusal: IngestError | None = None
    for index, signal in enumerate(signals):
        title = str((signal.get("metadata") or {}).get("General", {}).get("title") or f"signal {index}")
        axes = sorted(signal.get("axes") or [], key=lambda a: int(a.get("index_in_array", 0)))
        data = np.asarray(signal["data"])
        sig_axes = [i for i, a in enumerate(axes) if not a.get("navigate", False)]
        if len(sig_axes) != 2 or data.ndim != len(axes):
            skipped.append(f"{title!r}: {len(sig_axes)} signal axes (not an image)")
            continue
        try:
            cal = _axes_calibration(axes[sig_axes[0]], axes[sig_axes[1]], f"{where} ({title})")
        except IngestError as exc:
            refusal = refusal or exc
            skipped.append(f"{title!r}: {exc}")
            continue
        # Signal axes last, so every leading index is one plane.
        data = np.moveaxis(data, sig_axes, [-2, -1])
        planes = data.reshape((-1,) + data.shape[-2:])
        for k, plane in enumerate(planes):
            found.append((plane, signal, cal, title if len(planes) == 1 else f"{title}_{k}", []))
    if not found:
        if refusal is not None:
            raise refusal
        raise IngestError(f"{where}: no 2-D image in this {fmt} file ({'; '.join(skipped) or 'no signals'})")
    titles = [t for _, _, _, t, _ in found]
    use_titles = len(set(titles)) == len(titles) and all(t for t in titles)
    width = len(str(len(found) - 1))
    for index, (plane, signal, cal, title, notes) in enumerate(found):
        pixels, colour_note = _pixels(plane, where)
        modality, instrument, acquired = facts(signal)
        if skipped:
            notes = notes + [f"skipped: {s}" for s in skipped]
        part = None
        if len(found) > 1:
            part = _part_name(title) if use_titles else f"{index:0{width}d}"
        yield InstrumentImage(
            pixels=pixels, pixel_size=cal[0] if cal else None, unit=cal[1] if cal else None,
            modality=modality, instrument=instrument, acquired_at=acquired,
            metadata=json_safe_summary({
                "title": title,
                "metadata": signal.get("metadata") or {},
                "original_metadata": signal.get("original_metadata") or {},
            }),
            source_format=_format_name(fmt, signal), pixel_size_source=f"{fmt} axis scale and units" if cal else None,
            part=part, notes=tuple(notes + ([colour_note] if colour_note else [])),
        )


def _axes_calibration(y: dict[str, Any], x: dict[str, Any], where: str):
    """((y, x), unit) from two rosettasciio axis dicts, or None if uncalibrated."""
    fy, fx = length_unit_nm(_unit(y), where), length_unit_nm(_unit(x), where)
    if fy is None or fx is None:
        return None
    return calibrated(float(y["scale"]) * fy, float(x["scale"]) * fx, "nm", where)


def _unit(axis: dict[str, Any]) -> str:
    units = axis.get("units")
    return "" if units is None or str(units) == "<undefined>" else str(units)


def _pixels(plane: np.ndarray, where: str) -> tuple[np.ndarray, str | None]:
    """A plane as a native-order (y, x) array; DM's RGBA records become one channel."""
    if plane.dtype.names:
        names = [n for n in ("R", "G", "B", "A") if n in plane.dtype.names]
        if names[:3] != ["R", "G", "B"]:
            raise IngestError(f"{where}: structured pixel type {plane.dtype} is not an image")
        stacked = np.stack([plane[n] for n in names], axis=-1)
        gray, note = to_grayscale(stacked, where)
        return np.ascontiguousarray(native(gray)), note
    return np.ascontiguousarray(native(plane)), None


def _format_name(fmt: str, signal: dict[str, Any]) -> str:
    if fmt != "EMD":
        return fmt
    return "EMD (Velox)" if "BinaryResult" in (signal.get("original_metadata") or {}) else "EMD (NCEM)"


def _part_name(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-") or "image"


_SEM = re.compile(r"\bSEM\b", re.IGNORECASE)


def _dm_facts(signal: dict[str, Any]) -> tuple[str, str | None, datetime | None]:
    """(modality, instrument, acquired_at) from a DM signal's own ImageTags."""
    tags = _get(signal.get("original_metadata") or {}, "ImageList", "TagGroup0", "ImageTags") or {}
    info = tags.get("Microscope Info") or {}
    mode = str(info.get("Illumination Mode") or "")
    modality = "SEM" if "SEM" in mode.upper() and "STEM" not in mode.upper() else "TEM"
    instrument = _text(info.get("Name")) or _text(info.get("Microscope")) or _text(_get(tags, "Session Info", "Microscope"))
    databar = tags.get("DataBar") or {}
    acquired = parse_datetime(databar.get("Acquisition Date"), databar.get("Acquisition Time"))
    return modality, instrument, acquired


def _emd_facts(signal: dict[str, Any]) -> tuple[str, str | None, datetime | None]:
    """(modality, instrument, acquired_at) from Velox or NCEM original metadata."""
    om = signal.get("original_metadata") or {}
    velox = om.get("Instrument") or {}
    instrument = _text(velox.get("InstrumentModel")) or _text(velox.get("InstrumentClass"))
    if instrument is None:
        instrument = _text((om.get("microscope") or {}).get("name"))  # NCEM layout
    text = " ".join(str(v) for v in (velox.get("InstrumentClass"), velox.get("InstrumentModel")) if v)
    modality = "SEM" if _SEM.search(text) else "TEM"
    acquired = None
    stamp = _get(om, "Acquisition", "AcquisitionStartDatetime", "DateTime")
    if stamp is not None:
        try:  # Velox writes seconds since the Unix epoch, which is UTC by definition
            acquired = datetime.fromtimestamp(float(stamp), tz=timezone.utc)
        except (TypeError, ValueError, OverflowError, OSError):
            acquired = None
    return modality, instrument, acquired


def _get(tree: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).strip()
    return text or None
