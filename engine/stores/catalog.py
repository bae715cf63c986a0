"""The archive catalog: one Parquet row per image, read by jobs instead of listing a store.

Layout of an archive (any store URI)::

    <archive>/catalog.parquet          this table
    <archive>/images/<image_id>.ome.zarr
    <archive>/ground_truth.parquet     synthetic archives only (engine.synth)

`uri` is relative to the archive root, so an archive can be copied between disk and S3
as it is.

Writers on local disk take a lock (engine.stores.locks) around each catalog update, so
concurrent upserts from several processes keep every row. On S3 there is no such lock:
two upserts at once may lose the rows of the one that wrote first (see
engine.stores.ingest.pipeline).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import InvalidURIError, MetadataError
from engine.stores.id_names import id_file_stem
from engine.stores.locks import lock_for
from engine.stores.uri import StoreLocation, resolve

CATALOG_FILE = "catalog.parquet"
IMAGES_DIR = "images"
MODALITIES = ("SEM", "TEM", "optical")

# A file name's limit in bytes on Linux's file systems (NAME_MAX), and most others.
MAX_NAME_BYTES = 255
# What the reprocessing job adds to a percent-encoded image id in a file name
# (engine.data.sinks, engine.pipeline.job): the longest is a preprocessing parameters
# file being written, `<id>.json.<pid>.tmp` (`put_file`; a pid has at most 7 digits);
# `image_id=<id>` partitions and `<id>.ome.zarr` label images add less.
JOB_NAME_EXTRA_BYTES = max(len(".json") + len(".4194304.tmp"), len("image_id="), len(".ome.zarr"))
MAX_ENCODED_ID_BYTES = MAX_NAME_BYTES - JOB_NAME_EXTRA_BYTES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogRow:
    """One image. Pixel sizes are level 0, in `unit` (a UDUNITS name, e.g. 'nanometer')."""

    image_id: str
    uri: str
    modality: str
    pixel_size_y: float
    pixel_size_x: float
    unit: str
    height: int
    width: int
    dtype: str
    levels: int
    chunk: int
    checksum: str
    material: str | None = None
    quality_grade: str | None = None
    instrument: str | None = None
    acquired_at: datetime | None = None
    source: str | None = None
    seed: int | None = None


SCHEMA = pa.schema([
    ("image_id", pa.string()), ("uri", pa.string()), ("modality", pa.string()),
    ("pixel_size_y", pa.float64()), ("pixel_size_x", pa.float64()), ("unit", pa.string()),
    ("height", pa.int64()), ("width", pa.int64()), ("dtype", pa.string()),
    ("levels", pa.int32()), ("chunk", pa.int32()), ("checksum", pa.string()),
    ("material", pa.string()), ("quality_grade", pa.string()), ("instrument", pa.string()),
    ("acquired_at", pa.timestamp("us", tz="UTC")), ("source", pa.string()), ("seed", pa.int64()),
])
assert [f.name for f in dataclasses.fields(CatalogRow)] == SCHEMA.names


def image_uri(archive: StoreLocation, image_id: str) -> StoreLocation:
    return archive.join(IMAGES_DIR, f"{image_id}.ome.zarr")


def relative_image_path(image_id: str) -> str:
    return f"{IMAGES_DIR}/{image_id}.ome.zarr"


def write_table(location: StoreLocation, table: pa.Table) -> None:
    """Write a Parquet file in one put, so a reader sees the old file or the new one, never half."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs = location.filesystem()
    fs.makedirs(location.parent().path, exist_ok=True)
    if location.scheme == "file":
        # A name of this writer's own: two writers of one table must not share a temp file.
        tmp = f"{location.path}.{os.getpid()}-{threading.get_ident()}.tmp"
        with fs.open(tmp, "wb") as f:
            f.write(buf.getvalue())
        fs.mv(tmp, location.path)
    else:
        fs.pipe_file(location.path, buf.getvalue())


def read_table(location: StoreLocation) -> pa.Table:
    fs = location.filesystem()
    if not fs.exists(location.path):
        raise MetadataError(f"{location}: no such table")
    try:
        with fs.open(location.path, "rb") as f:
            return pq.read_table(f)
    except (pa.ArrowInvalid, OSError) as exc:
        raise MetadataError(f"{location}: not a readable Parquet file: {exc}") from None


def write_catalog(archive: str | StoreLocation, rows: Iterable[CatalogRow]) -> StoreLocation:
    """Replace the catalog of `archive` with `rows` (sorted by image id)."""
    archive = resolve(archive)
    location = archive.join(CATALOG_FILE)
    table = _catalog_table(archive, rows)
    with lock_for(location):
        write_table(location, table)
    return location


def _catalog_table(archive: StoreLocation, rows: Iterable[CatalogRow]) -> pa.Table:
    """`rows` checked (unique ids, known modalities) as a table of SCHEMA, sorted by image id."""
    records = sorted((dataclasses.asdict(r) for r in rows), key=lambda r: r["image_id"])
    ids = [r["image_id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{archive}: duplicate image ids in catalog rows")
    for r in records:
        if r["modality"] not in MODALITIES:
            raise ValueError(f"image {r['image_id']!r}: modality {r['modality']!r} is not one of {MODALITIES}")
    return pa.Table.from_pylist(records, schema=SCHEMA)


def upsert_catalog(archive: str | StoreLocation, rows: Iterable[CatalogRow]) -> StoreLocation:
    """Add rows to the catalog, replacing rows with the same image id.

    Columns beyond `CatalogRow`'s (a synthetic archive's provenance, ...) are kept for
    the rows not replaced, and are null for the new ones.
    """
    archive = resolve(archive)
    location = archive.join(CATALOG_FILE)
    new = {r.image_id: r for r in rows}
    with lock_for(location):  # another process's upsert between our read and write would be lost
        _merge_into(archive, location, new)
    return location


def _merge_into(archive: StoreLocation, location: StoreLocation, new: dict[str, CatalogRow]) -> None:
    """Read the catalog at `location`, put `new` (by image id) into it, write it back."""
    before = read_table(location) if location.exists() else None
    old = [] if before is None else [CatalogRow(**_from_record(rec)) for rec in before.to_pylist()]
    merged = {r.image_id: r for r in old} | new
    table = _catalog_table(archive, merged.values())
    extra = [] if before is None else [n for n in before.column_names if n not in SCHEMA.names]
    if extra:  # matched by image id in Python: Arrow's join takes no list or struct columns
        kept = {rec["image_id"]: rec for rec in before.select(["image_id", *extra]).to_pylist()
                if rec["image_id"] not in new}
        ids = table.column("image_id").to_pylist()
        for name in extra:
            values = [kept.get(i, {}).get(name) for i in ids]
            table = table.append_column(before.schema.field(name), pa.array(values, type=before.schema.field(name).type))
    write_table(location, table)


def read_catalog(archive: str | StoreLocation) -> pd.DataFrame:
    """The catalog as a DataFrame with the columns of `CatalogRow`."""
    archive = resolve(archive)
    location = archive.join(CATALOG_FILE)
    if not location.exists():
        raise MetadataError(f"{archive}: no {CATALOG_FILE}; not a grainflow archive (make one with `grainflow synth` or `grainflow ingest`)")
    table = read_table(location)
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    if missing:
        raise MetadataError(f"{location}: catalog lacks columns {missing}")
    # Nullable integer columns (seed) stay integers; missing strings read as NA.
    nullable = {pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype()}
    frame = table.select(SCHEMA.names).to_pandas(types_mapper=nullable.get)
    # Every output is keyed by image id: rows without one, or two rows of one, are a
    # catalog no job can run on.
    ids = frame["image_id"]
    empty = [i for i, v in enumerate(ids) if not isinstance(v, str) or not v.strip()]
    if empty:
        raise MetadataError(f"{location}: rows {empty[:5]}{' ...' if len(empty) > 5 else ''} have no image_id")
    dup = sorted(ids[ids.duplicated()].unique())
    if dup:
        raise MetadataError(f"{location}: duplicate image ids {dup[:5]}{' ...' if len(dup) > 5 else ''}")
    return frame


def remove_catalogued_images(archive: str | StoreLocation) -> list[str]:
    """Delete the images the catalog of `archive` lists, then the catalog; return the
    URIs of the images deleted. This is how an archive is replaced (`grainflow synth
    --overwrite`), so no image of the old archive is left behind unlisted.

    Only `<archive>/images/*.ome.zarr` folders are deleted: a row whose uri points
    anywhere else (a hand-edited catalog) is skipped with a warning, and whatever the
    catalog does not list (the user's own files) is left alone. An unreadable catalog
    raises MetadataError before anything is deleted.
    """
    archive = resolve(archive)
    location = archive.join(CATALOG_FILE)
    table = read_table(location)
    if "uri" not in table.column_names:
        raise MetadataError(f"{location}: the catalog has no uri column, so which folders are its images is unknown")
    images, fs = archive.join(IMAGES_DIR), archive.filesystem()
    fs.invalidate_cache(archive.path)  # s3fs caches listings: they may predate this archive's images
    removed = []
    for uri in table.column("uri").to_pylist():
        try:
            image = archive.join(uri) if isinstance(uri, str) and uri.strip() else None
        except InvalidURIError:
            image = None
        if image is None or image.parent() != images or not image.name.endswith(".ome.zarr"):
            logger.warning("%s: not deleting %r, which is not an image folder under %s/", location, uri, IMAGES_DIR)
            continue
        if fs.exists(image.path):
            fs.rm(image.path, recursive=True)
            removed.append(image.uri)
    fs.rm_file(location.path)
    return removed


def row_problems(row: dict[str, Any]) -> list[str]:
    """What is wrong with one catalog row's values (empty when nothing): its modality,
    pixel sizes, unit, uri (a path inside the archive) and dtype, each named with the
    value found, so a job can record the image and go on with the others."""
    import math

    from engine.stores.dtypes import check_pixel_dtype
    from engine.stores.ngff import normalise_unit

    problems = []
    if row.get("modality") not in MODALITIES:
        problems.append(f"modality {row.get('modality')!r} is not one of {', '.join(MODALITIES)}")
    for name in ("pixel_size_x", "pixel_size_y"):
        v = row.get(name)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            problems.append(f"{name} {v!r} must be a positive number")
    for name, check in (("unit", normalise_unit), ("dtype", lambda v: check_pixel_dtype(v, "dtype"))):
        try:
            check(row.get(name))
        except Exception as exc:  # unknown unit, not a dtype numpy knows, one grainflow does not keep
            problems.append(f"{name} {row.get(name)!r}: {str(exc).removeprefix('dtype: ')}")
    uri = row.get("uri")
    if not isinstance(uri, str) or not uri.strip():
        problems.append(f"uri {uri!r} must name the image's path in the archive")
    elif "://" in uri or uri.startswith("/") or ".." in uri.replace("\\", "/").split("/"):
        problems.append(f"uri {uri!r} must be a path inside the archive, relative to it")
    return problems


def encoded_id_bytes(image_id: str) -> int:
    """Bytes of `id_file_stem(image_id)`: 3 per byte of UTF-8 outside [A-Za-z0-9_.~-],
    so 9 per CJK character."""
    return len(id_file_stem(image_id))


def id_name_problem(image_id: str) -> str | None:
    """Why the reprocessing job cannot name its outputs after `image_id` (None when it
    can): percent-encoded, it is longer than a file name may be (`MAX_ENCODED_ID_BYTES`).
    The job could not even record such an image as failed, so it refuses the catalog."""
    size = encoded_id_bytes(image_id)
    if size <= MAX_ENCODED_ID_BYTES:
        return None
    return (f"image id {image_id!r} is {size} bytes percent-encoded in the job's output file names, more than "
            f"the {MAX_ENCODED_ID_BYTES} that fit a file name of {MAX_NAME_BYTES} bytes")


def _from_record(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in SCHEMA.names}
