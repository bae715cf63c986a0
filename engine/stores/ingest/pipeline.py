"""Instrument files in, OME-Zarr images and catalog rows out.

Decisions (the CLI's `grainflow ingest` documents the same):

- Pixel size: the file's own calibration is used; an explicit `pixel_size` (CLI
  --pixel-size/--unit) overrides it for every file of the batch. The image's attributes
  record `pixel_size_source` ('argument' or where in the file it came from) and, when
  both existed, the file's value, and a differing file value is logged as a warning.
  Without either, the file is refused with an IngestError saying to pass --pixel-size.
- Modality: the same rule; the file's (SEM for FEI/Zeiss TIFF, TEM for DM/EMD unless
  they say SEM) or an explicit `modality`, else refused (pass --modality).
- Stored unit: nanometer, or micrometer for pixels of 1 µm and over.
- Image ids: the file stem (an OME-Zarr folder's name less .ome.zarr or .zarr) with
  anything outside [A-Za-z0-9._-] replaced by '_', plus '_<part>' for a file holding
  several images (a stack's plane index, an EMD detector name, a bioformats2raw
  series). The catalog's `source` (and the image's `source` attribute) is the file's
  resolved full path. Ingesting the same file (the same full path) again replaces its
  image and catalog row; a different file whose stem collides (a.tif and a.dm3, or
  img001.tif of two session folders, in one batch or in two) gets '-2', '-3', ...
  An image recorded by an older grainflow with only its file name is never assumed to
  be the file being ingested: it is kept, and a warning names the new id.
- Memory: a TIFF plane over `tiff_planes.STREAM_BYTES` decoded (a stitched mosaic)
  is read, checked and written a band of chunk rows at a time; smaller images are
  read whole. Both give the same pixels and checksum. An OME-Zarr image's level 0 is
  always read in bands (engine.stores.ingest.ome_zarr).
- Re-ingest is safe: the new image is written beside the old one and swapped in when
  complete (engine.stores.writer); the catalog is upserted right after that swap, and
  only then is the old image deleted. A kill between the swap and the upsert leaves
  the old image set aside, kept with a warning (engine.stores.staging), not deleted.
- Concurrent ingests into one archive on local disk are safe: a new image id is taken
  under a lock (engine.stores.locks) held until its image is in place, an id whose
  folder already holds another file's image is passed over, and catalog upserts take
  a lock, so each process's images and rows are kept. Ingests of the same file take
  turns: each holds a lock on the file (by its full path) from reading it until its
  rows are catalogued, so the second replaces the first's image and row rather than
  adding an image `<stem>-2` of the same file. A folder that holds this same file but
  has no catalog row (its ingest was killed) is replaced, not duplicated.
- On S3 (and memory://) there are no locks: two ingests into one archive at once may
  pick one id for files of the same name (one image then overwrites the other) and one
  may lose the other's catalog rows. s3fs and moto do offer create-if-absent writes
  (If-None-Match), but not every S3-compatible server honours them, and a marker left
  by a killed writer would never be released. Run one ingest per S3 archive at a time.
- A hard kill (SIGKILL, OOM) can leave hidden `.<image>.partial-*` and `.replaced-*`
  folders. Each ingest into a local archive first removes (or puts back) the ones whose
  writer is gone, told by a lock the writer held (engine.stores.staging has the rule);
  a live writer's are kept, in whatever container or PID namespace it runs.
- A batch goes on past a bad file: good files are written and catalogued, then
  IngestBatchError (an IngestError) lists every failed file with its reason. The catalog
  is upserted every few files, after each image that replaced one, and when the batch
  ends or breaks, so an interrupted batch keeps what it finished.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import GrainflowError, IngestError, MetadataError
from engine.stores.catalog import (
    CATALOG_FILE,
    IMAGES_DIR,
    MODALITIES,
    CatalogRow,
    image_uri,
    read_table,
    relative_image_path,
    upsert_catalog,
)
from engine.stores.dtypes import check_pixel_dtype
from engine.stores.ingest.bands import BandedPlane, as_banded
from engine.stores.ingest.base import InstrumentImage, calibrated, reader_for
from engine.stores.locks import Lock, lock_for, lock_for_source
from engine.stores.ngff import to_nanometres
from engine.stores.staging import remove_stale_siblings
from engine.stores.uri import StoreLocation, resolve
from engine.stores.writer import DEFAULT_CHUNK, ImageWriter

logger = logging.getLogger(__name__)

# Catalog upserts rewrite the whole Parquet file; every few files bounds both the cost
# and what an interrupted batch could leave uncatalogued.
FLUSH_EVERY = 16


@dataclass(frozen=True)
class IngestFailure:
    """One file that could not be ingested and why (the error's own message)."""

    path: str
    error: str
    error_type: str
    exception: GrainflowError | None = field(default=None, compare=False, repr=False)


class IngestBatchError(IngestError):
    """Some files of a batch failed; the others were written and catalogued.

    `failures` lists the failed files; `rows` the catalog rows that were written.
    """

    def __init__(self, failures: Sequence[IngestFailure], rows: Sequence[CatalogRow], total: int):
        self.failures = tuple(failures)
        self.rows = tuple(rows)
        lines = "\n".join(f"  {f.error}" for f in self.failures)  # each error names its file
        super().__init__(
            f"{len(self.failures)} of {total} files could not be ingested "
            f"({len(self.rows)} image{'' if len(self.rows) == 1 else 's'} from the others were written "
            f"and catalogued):\n{lines}"
        )


@dataclass
class _Batch:
    archive: StoreLocation
    override: tuple[tuple[float, float], str] | None
    modality: str | None
    material: str | None
    chunk: int
    existing: dict[str, str | None]  # image id -> recorded source of the archive's images
    taken: set[str] = field(default_factory=set)
    pending: list[CatalogRow] = field(default_factory=list)  # written, not yet upserted
    # Source locks of files whose rows are pending (see `_lock_source`), released by `_flush`.
    held: list[Lock] = field(default_factory=list)


def read_instrument_images(path: str | Path) -> Iterator[InstrumentImage]:
    """Every image in an instrument file, or in an OME-Zarr image folder, read by the
    reader registered for its extension (a folder: for its format).

    Raises IngestError naming the path for an unknown extension, a missing file, or a
    folder no format claims (a folder of TIFFs) at once; errors inside the file (or an
    OME-Zarr folder) surface while iterating.
    """
    path = Path(path)
    reader = reader_for(path)  # a folder gets a reader only if a folder format claims it
    if not (path.is_file() or path.is_dir()):
        raise IngestError(f"{path}: no such file")
    return reader(path)


def read_instrument_file(path: str | Path) -> InstrumentImage:
    """The first (usually only) image of an instrument file."""
    images = read_instrument_images(path)
    try:
        return next(images)
    except StopIteration:
        raise IngestError(f"{path}: file holds no image") from None
    finally:
        close = getattr(images, "close", None)  # a generator holds the file open until closed
        if close is not None:
            close()


def ingest_files(
    paths: Sequence[str | Path],
    archive: str | StoreLocation,
    *,
    pixel_size: float | None = None,
    unit: str | None = None,
    modality: str | None = None,
    material: str | None = None,
    chunk: int = DEFAULT_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> list[CatalogRow]:
    """Write each file's images to `<archive>/images/<id>.ome.zarr` and upsert their catalog rows.

    `pixel_size` (in `unit`, default nanometres) and `modality` override what the files
    say; `material` labels every image. `chunk` is the Zarr chunk edge in pixels.
    `progress(1)` is called after each file, ingested or failed (the convention of
    engine.synth's generate_archive). A path given twice is ingested once.

    Returns the rows written, in input order. If any file failed, raises IngestBatchError
    listing them after the others were written and catalogued; when only one file was
    given, its own error is raised instead (IngestError, UnsupportedDtypeError, ...).
    """
    if not int(chunk) >= 16:
        raise IngestError(f"chunk: {chunk} px is too small; give an edge of at least 16 px (default 512)")
    archive = resolve(archive)
    for leftover in remove_stale_siblings(archive.join(IMAGES_DIR)):
        logger.info("removed %s, left by a writer that was killed", leftover)
    batch = _Batch(
        archive=archive, override=_explicit_pixel_size(pixel_size, unit), modality=_explicit_modality(modality),
        material=material, chunk=int(chunk), existing=_existing_sources(archive),
    )
    rows: list[CatalogRow] = []
    failures: list[IngestFailure] = []
    unique = list(dict.fromkeys(Path(p).expanduser().resolve() for p in paths))
    total = len(unique)
    try:
        for path in unique:
            written: list[CatalogRow] = []
            source_lock = _lock_source(path, batch)
            try:
                _ingest_file(path, batch, written)
            except GrainflowError as exc:
                error = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
                failures.append(IngestFailure(str(path), error, type(exc).__name__, exc))
                logger.debug("ingest failed: %s", error)  # raised or returned below; the CLI prints it once
            finally:
                # Images of a multi-image file written before a failure are kept.
                rows.extend(written)
                if batch.pending:  # the file stays locked until its rows are catalogued
                    batch.held.append(source_lock)
                else:
                    source_lock.release()
            if len(batch.pending) >= FLUSH_EVERY:
                _flush(batch)
            if progress is not None:
                progress(1)
    finally:
        _flush(batch)
    if failures and total == 1:
        raise failures[0].exception
    if failures:
        raise IngestBatchError(failures, rows, total)
    return rows


def _flush(batch: _Batch) -> None:
    """Catalog the pending rows, then let other ingests have their files."""
    try:
        if batch.pending:
            upsert_catalog(batch.archive, batch.pending)
            batch.pending.clear()
    finally:
        while batch.held:
            batch.held.pop().release()


def _lock_source(path: Path, batch: _Batch) -> Lock:
    """Take the lock on ingesting `path` into this archive, waiting while another ingest
    has it; the caller holds it until the file's rows are catalogued.

    Before waiting, this batch catalogues its pending rows and lets go of the files it
    holds, so two batches that each wait for a file the other holds cannot deadlock.
    After waiting, the catalog is read again: the other ingest recorded the file's
    image there, which this one then replaces (`_unique_id`).
    """
    lock = lock_for_source(batch.archive.join(IMAGES_DIR), str(path))
    if lock.acquire(blocking=False):
        return lock
    _flush(batch)
    lock.acquire()
    batch.existing.update(_existing_sources(batch.archive))
    return lock


def _ingest_file(path: Path, batch: _Batch, written: list[CatalogRow]) -> None:
    for image in read_instrument_images(path):
        where = f"{path}" + (f" (image {image.part})" if image.part else "")
        check_pixel_dtype(image.pixels.dtype, where)
        if image.pixels.ndim != 2 or min(image.pixels.shape) < 1:
            raise IngestError(f"{where}: pixels of shape {image.pixels.shape} are not a 2-D image")
        pixel_size, unit, attrs = _pixel_size(image, batch, where)
        modality = _modality(image, batch, where)
        source = str(path)  # resolved by ingest_files: how a later run recognises this file
        attributes = {
            "modality": modality,
            "modality_source": "argument" if batch.modality else "file",
            "instrument": image.instrument,
            "source": source,
            "source_format": image.source_format,
            "part": image.part,
            "material": batch.material,
            **attrs,
            "acquired_at": image.acquired_at.isoformat() if image.acquired_at else None,
            "notes": list(image.notes),
            "original_metadata": image.metadata,
        }
        image_id, lock = _unique_id(path, image.part, batch)
        try:
            writer = _write_pixels(
                image_uri(batch.archive, image_id), as_banded(image.pixels), where, pixel_size=pixel_size, unit=unit,
                chunk=batch.chunk, attributes=attributes, name=image_id, keep_replaced=True,
            )
        finally:
            lock.release()  # the image is in place (or nothing was written): its folder now keeps the id
        info = writer.info
        row = CatalogRow(
            image_id=image_id, uri=relative_image_path(image_id), modality=modality,
            pixel_size_y=info.pixel_size[0], pixel_size_x=info.pixel_size[1], unit=info.unit,
            height=info.shape[0], width=info.shape[1], dtype=info.dtype, levels=info.levels, chunk=info.chunk,
            checksum=info.checksum, material=batch.material, instrument=image.instrument,
            acquired_at=image.acquired_at, source=source,
        )
        written.append(row)
        batch.pending.append(row)
        batch.existing[image_id] = source
        if info.replaced is not None:
            # The catalog describes the new image before the old one goes: until then a
            # kill leaves the old one set aside, where the next ingest keeps it.
            _flush(batch)
            try:
                writer.remove_replaced()
            except OSError as exc:  # the new image is written and catalogued: only space is lost
                logger.warning("could not delete the replaced image %s: %s", info.replaced, exc)


def _write_pixels(uri: StoreLocation, plane: BandedPlane, where: str, **writer_args: Any) -> ImageWriter:
    """Write `plane` as the image at `uri` a band of chunk rows at a time, so a large
    TIFF plane is never held whole; return the closed writer (its `info` says what was
    written). NaN or infinite values abort it with an IngestError (an image already at
    `uri` is left as it was)."""
    bad = 0
    with ImageWriter(uri, shape=plane.shape, dtype=plane.dtype, **writer_args) as writer:
        y = 0
        for band in plane.bands(writer.chunk):
            if band.dtype.kind == "f":
                bad += int(band.size - np.count_nonzero(np.isfinite(band)))
            if not bad:  # once refused, the rest is only counted, for the message
                writer.write_tile(y, 0, band)
            y += band.shape[0]
        if bad:
            raise IngestError(f"{where}: {bad} pixels are NaN or infinite; a micrograph's values must be finite "
                              f"(preprocessing and the models cannot use them)")
        if y != plane.shape[0]:
            raise IngestError(f"{where}: the file gave {y} rows of pixels, not the {plane.shape[0]} it declares")
    return writer


def _pixel_size(image: InstrumentImage, batch: _Batch, where: str) -> tuple[tuple[float, float], str, dict[str, Any]]:
    """The (y, x) pixel size and unit to store, and the attributes that explain it."""
    from_file = image.pixel_size is not None and image.unit is not None
    if batch.override is None:
        if not from_file:
            why = f"; {image.calibration_note}" if image.calibration_note else ""
            raise IngestError(
                f"{where}: no pixel size in the file's metadata ({image.source_format or 'unknown format'}{why}); "
                "pass --pixel-size (and --unit, default nm) to give one"
            )
        return image.pixel_size, image.unit, {"pixel_size_source": image.pixel_size_source or "file"}
    size, unit = batch.override
    attrs: dict[str, Any] = {"pixel_size_source": "argument"}
    if from_file:
        attrs["file_pixel_size"] = list(image.pixel_size)
        attrs["file_unit"] = image.unit
        attrs["file_pixel_size_source"] = image.pixel_size_source
        given = [to_nanometres(v, unit) for v in size]
        found = [to_nanometres(v, image.unit) for v in image.pixel_size]
        if not all(math.isclose(g, f, rel_tol=1e-6) for g, f in zip(given, found)):
            logger.warning(
                "%s: --pixel-size %g %s overrides the file's %g x %g %s (%s)", where, size[1], unit,
                image.pixel_size[0], image.pixel_size[1], image.unit, image.pixel_size_source,
            )
    return size, unit, attrs


def _modality(image: InstrumentImage, batch: _Batch, where: str) -> str:
    if batch.modality is not None:
        return batch.modality
    if image.modality in MODALITIES:
        return image.modality
    raise IngestError(f"{where}: the file does not say which modality it is; pass --modality {'|'.join(MODALITIES)}")


def _explicit_pixel_size(pixel_size: float | None, unit: str | None) -> tuple[tuple[float, float], str] | None:
    if pixel_size is None:
        if unit is not None:
            raise IngestError(f"--unit {unit} given without --pixel-size; give both, or neither to use the files' own")
        return None
    try:
        value = float(pixel_size)
    except (TypeError, ValueError):
        raise IngestError(f"--pixel-size {pixel_size!r} is not a number") from None
    cal = calibrated(value, value, unit or "nm", "--unit")
    if cal is None or not (math.isfinite(value) and value > 0):
        raise IngestError(f"--pixel-size {pixel_size!r} {unit or 'nm'}: must be a positive length")
    return cal


def _explicit_modality(modality: str | None) -> str | None:
    if modality is None:
        return None
    for name in MODALITIES:
        if modality.strip().lower() == name.lower():
            return name
    raise IngestError(f"--modality {modality!r} is not one of {', '.join(MODALITIES)}")


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitise_id(text: str) -> str:
    """A store-safe image id: [A-Za-z0-9._-], no leading dot or dash, never empty."""
    clean = _UNSAFE.sub("_", text).strip("_")
    clean = clean.lstrip(".-") or "image"
    return clean[:128]


def _unique_id(path: Path, part: str | None, batch: _Batch) -> tuple[str, Lock]:
    """The file's image id and the lock that reserves it until its image is written.

    The id the archive already has for this file (same full path), else the first of
    '<stem>', '<stem>-2', '<stem>-3', ... that neither this batch, the catalog nor a
    concurrent ingest has taken (see `_reserve`)."""
    stem = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = path.stem
    base = sanitise_id(stem + (f"_{part}" if part else ""))
    source = str(path)
    variant = re.compile(re.escape(base) + r"(?:-([0-9]+))?")
    ours = sorted(
        (int(m.group(1) or 1), image_id) for image_id, recorded in batch.existing.items()
        if recorded == source and image_id not in batch.taken and (m := variant.fullmatch(image_id))
    )
    if ours:
        candidate = ours[0][1]
        lock = lock_for(image_uri(batch.archive, candidate))
        lock.acquire()  # another ingest of this same file: wait for it, then replace its image
    else:
        candidate, n = base, 1
        while True:
            if candidate not in batch.taken and candidate not in batch.existing:
                lock = _reserve(batch.archive, candidate, source)
                if lock is not None:
                    break
            n += 1
            candidate = f"{base}-{n}"
        if batch.existing.get(base) == path.name:
            logger.warning(
                "%s: the archive's image %r came from a file of this name whose folder was not recorded "
                "(an older grainflow); it is kept, and this file is ingested as %r", path, base, candidate,
            )
    batch.taken.add(candidate)
    return candidate, lock


def _reserve(archive: StoreLocation, image_id: str, source: str) -> Lock | None:
    """Lock `image_id` for the ingest of `source` if it is free, else None.

    Free means no other ingest holds its lock and no folder is there, or the folder holds
    `source`'s own image: one written by an ingest killed before its catalog upsert, or
    by a concurrent ingest of the same file that has not upserted yet. The catalog this
    batch read at its start misses both, and the images of other processes' ingests.
    """
    target = image_uri(archive, image_id)
    lock = lock_for(target)
    if not lock.acquire(blocking=False):
        return None
    fs = target.filesystem()
    fs.invalidate_cache(target.path)  # s3fs caches listings: another writer may have added it since
    if not fs.exists(target.path) or _recorded_source(target) == source:
        return lock
    lock.release()
    return None


def _recorded_source(image: StoreLocation) -> str | None:
    """The `source` attribute an ingest stored in the image's root zarr.json, if any."""
    try:
        meta = json.loads(image.filesystem().cat_file(image.join("zarr.json").path))
        return meta["attributes"]["grainflow"]["source"]
    except (OSError, ValueError, KeyError, TypeError):  # no image there, or not one ingest wrote
        return None


def _existing_sources(archive: StoreLocation) -> dict[str, str | None]:
    """image_id -> recorded source of the archive's catalog ({} for a new archive): the
    file's full path, or only its name for images ingested by older versions."""
    location = archive.join(CATALOG_FILE)
    if not location.exists():
        return {}
    try:
        table = read_table(location)
    except MetadataError as exc:
        raise IngestError(f"{archive}: its catalog cannot be read, so ingest would overwrite it: {exc}") from None
    if "image_id" not in table.column_names:
        return {}
    sources = table.column("source").to_pylist() if "source" in table.column_names else [None] * table.num_rows
    return dict(zip(table.column("image_id").to_pylist(), sources))
