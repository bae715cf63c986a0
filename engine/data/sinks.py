"""Where a reprocessing job's results go: per-tile outputs, then per-image finishing.

Layout under the job's output URI ``<out>`` (any store URI; ``<id>`` is the image id,
percent-encoded when it holds characters a path cannot)::

    detections/image_id=<id>/tile-<level>-<y>-<x>.parquet   one row per detection (tile sink)
    errors/image_id=<id>/tile-<level>-<y>-<x>.parquet       one row per failed tile (tile sink)
    errors/image_id=<id>/image.parquet                      an image that could not be planned or prepared (job)
    ledger/<digest>.parquet                                 finished tiles (engine.data.ledger)
    objects/image_id=<id>/part-0.parquet                    stitched objects (finishing)
    tiles/image_id=<id>/part-0.parquet                      one row per tile (finishing)
    summary.parquet                                         one row per image (the driver)
    labels/<id>.ome.zarr/labels/<name>                      label images, when not beside the image

Tile files are named by the tile's key, so a tile done twice (a retried task, a killed
actor, a rerun) overwrites its own file and never adds rows. Read the partitioned
tables with `read_output` (it types `image_id` as a string).

**Per tile** (`WriteTileOutputs`, a Ray Data map_batches function after the ensemble):
for each result row (`engine.pipeline.results` columns plus the datasource's `origin`,
`scale`, `halo`) it writes the detections file (`DETECTION_SCHEMA`; the tile's own
values, the `TILE_META` JSON, ride in the file's Parquet metadata, so a tile without
detections still records its core area and probabilities; both carry the pixel moments
of every piece the tile painted in its core, which measure stitched objects whole
without the label images), the tile's core into the label images, and, once all tiles
of the batch are written, the batch's ledger file.
A row with an `error` gets an errors file (`ERROR_SCHEMA`: exception type, message and
the undecodable chunks' keys) instead and is not ledgered, so a rerun tries it again.
A row read with a reduced halo (`halo_reduced`, `engine.data.tile_read`: an undecodable
chunk beside its core) is written like any other, the reason in its `TILE_META`, but
not ledgered either: its detections lack that side's context and may differ from a
clean run's, so a rerun redoes it (again with a reduced halo while the chunk stays
bad; with the whole halo, and so a clean run's outputs, once it is repaired). Redoing a
tile overwrites its detections file and its label cores, so nothing is counted twice.

**Label images** (`LabelTarget`): two OME-Zarr label images per image, written
chunk-aligned from each tile's core so every chunk has exactly one writer:

- ``<name>`` (default ``predicted_defects``): instance ids, unique within the image:
  detection ``i`` (0-based, the row order of its tile's detections file, best score
  first) of the tile in grid row ``r``, column ``c`` is ``(r * n_cols + c) * id_stride +
  i + 1`` with ``id_stride`` the ensemble's ``max_det``; 0 is background. A tile also
  paints, beneath its own detections, the pixels in its core of objects other tiles own
  (foreign pieces, ids after its detections' in its range), so every object is whole
  in the image. The detections table carries each detection's `label_id`; the objects
  table lists all of an object's ids (`label_ids`: its pieces' and the foreign pieces'
  `finish_image` joined to it). uint32 when every id fits, else uint64.
- ``<name>_classes``: defect class + 1 (0 none) from every detection the tile saw, so
  classes join across core borders without gaps (`core_classes`).

They lie at the resolution of the pyramid level the tiles were read from (the level
nearest the model's pixel size; the job's metadata and each level's NGFF transforms say
which), with that level's chunks: its tile cores are whole chunks there. Tiles resampled
to the model's pixel size are mapped back to the level's pixels by nearest neighbour.
The job creates the arrays (no pixels) before any tile runs (`create_label_arrays`);
`finish_image` adds the pyramid (nearest-neighbour, chunk by chunk) and the NGFF
metadata, so on a first run a viewer sees the label image only once it is complete (a
resumed run rewrites chunks under the metadata its earlier run left).

**Per image** (`finish_image`, a Ray task per image after all tiles): stitches the
image's tile detections into objects in level-0 coordinates (`engine.data.objects`, the
online endpoint's rule too: pieces of a defect cut by a core border become one object,
measured whole from its pieces' moments, the same with label images or without; tiles
written before those were recorded are measured on the label image, where there is
one), writes the objects and
tiles tables, the label pyramid and metadata, removes files a previous run left for
tiles whose state changed, and returns the image's summary row (`SUMMARY_COLUMNS`).
Rerunning it rewrites the same files.

**Images that cannot be planned** (metadata unreadable, a pixel size the models cannot
be resampled to): the job writes one errors row for the image (`write_image_error`:
level, y and x null) and a summary row with no tiles (`unplanned_summary_row`), and goes
on with the others; `finish_image` removes that row once a rerun plans the image. An
image an earlier run finished and a rerun cannot plan keeps that run's tile outputs (and
ledger entries); only its summary row says it was not planned this time.
"""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.data.ledger import Ledger, put_file, table_bytes
from engine.data.objects import (DETECTION_SCHEMA, OBJECT_SCHEMA, TileDetections, WholeObjects, image_objects,
                                 stitch_objects, tile_detections)
from engine.errors import MetadataError
from engine.stores.id_names import id_file_stem
from engine.stores.uri import StoreLocation, resolve
from engine.tiling.grid import TileKey, TileSpec

DETECTIONS, ERRORS, OBJECTS, TILES = "detections", "errors", "objects", "tiles"
IMAGE_ERROR_FILE = "image.parquet"
SUMMARY_FILE = "summary.parquet"
LABELS_DIR = "labels"
DEFAULT_LABEL_NAME = "predicted_defects"
TILE_META = b"grainflow.tile"
_WRITE_THREADS = 8  # per batch: object-store writes are latency-bound

ERROR_SCHEMA = pa.schema([
    ("level", pa.int32()), ("y", pa.int64()), ("x", pa.int64()), ("modality", pa.string()),
    ("exception", pa.string()), ("message", pa.string()), ("chunk_keys", pa.list_(pa.string())),
])

TILE_SCHEMA = pa.schema([
    ("level", pa.int32()), ("y", pa.int64()), ("x", pa.int64()), ("status", pa.string()),
    ("core_x0", pa.float64()), ("core_y0", pa.float64()), ("core_x1", pa.float64()), ("core_y1", pa.float64()),
    ("n_defects", pa.int32()), ("core_area_mm2", pa.float64()), ("defect_density_per_mm2", pa.float64()),
    ("material", pa.string()), ("grade", pa.string()),
    ("material_probs", pa.list_(pa.float32())), ("grade_probs", pa.list_(pa.float32())), ("error", pa.string()),
    ("halo_reduced", pa.string()),
])
"""Per tile: status "done" or "error"; the core in level-0 pixels (NaN for error rows,
whose core the ensemble never saw); tile detections (before stitching) and density;
halo_reduced: for a done tile read without part of its halo (a bad chunk beside its
core), the sides and the failure; its outputs are this run's best, not a clean run's,
and a rerun redoes it (null otherwise)."""

SUMMARY_COLUMNS = (
    "image_id", "modality", "level", "level_pixel_size_y_nm", "level_pixel_size_x_nm", "pixel_size_nm",
    "tiles_planned", "tiles_done", "tiles_error", "tiles_halo_reduced", "complete",
    "core_area_mm2", "material", "material_prob", "grade", "grade_prob", "material_probs", "grade_probs",
    "n_detections", "n_defects", "defect_density_per_mm2", "defect_counts", "model_versions", "labels_uri",
)
"""Per image: level is the pyramid level read, level_pixel_size_y_nm / _x_nm its stored
(y, x) pixel size in nm, pixel_size_nm that of the tiles the models saw (square; the
level's pixels were resampled to it where the two differ);
tiles_halo_reduced: done tiles read without part of their halo (`TILE_SCHEMA`); complete:
every tile done with its whole halo, so the image's outputs are a clean run's;
material and grade are the argmax of the tiles' probabilities averaged
with core-area weights; n_defects counts stitched objects (defect_counts per class name,
JSON), density = n_defects / core area of the done tiles; model_versions is JSON."""


# ---------------------------------------------------------------------------- naming


def partition(image_id: str) -> str:
    """The hive partition folder of an image: ``image_id=<id>`` (percent-encoded)."""
    return f"image_id={id_file_stem(image_id)}"


def tile_file(level: int, y: int, x: int) -> str:
    return f"tile-{int(level)}-{int(y)}-{int(x)}.parquet"


def tile_location(out: StoreLocation, table: str, key: TileKey) -> StoreLocation:
    image_id, level, y, x = key
    return out.join(table, partition(image_id), tile_file(level, y, x))


def read_output(out: str | StoreLocation, table: str, *, image_id: str | None = None,
                columns: Sequence[str] | None = None) -> pa.Table:
    """A partitioned output table (`DETECTIONS`, `ERRORS`, `OBJECTS`, `TILES`) with its
    `image_id` column (a string); an empty table of the right schema when none exist.
    columns: only these, in this order (the others are not read)."""
    import pyarrow.dataset as ds

    schemas = {DETECTIONS: DETECTION_SCHEMA, ERRORS: ERROR_SCHEMA, OBJECTS: OBJECT_SCHEMA, TILES: TILE_SCHEMA}
    if table not in schemas:
        raise ValueError(f"unknown output table {table!r}; tables are {sorted(schemas)}")
    out = resolve(out)
    base = out.join(table) if image_id is None else out.join(table, partition(image_id))
    fs = base.filesystem()
    full = pa.schema([("image_id", pa.string()), *schemas[table]])
    files = sorted(p for p in fs.find(base.path) if p.endswith(".parquet")) if fs.exists(base.path) else []
    names = full.names if columns is None else list(columns)
    if not files:
        return full.empty_table().select(names)
    # Hive values are percent-decoded by pyarrow (segment_encoding="uri"), as `partition` encodes.
    part = ds.partitioning(pa.schema([("image_id", pa.string())]), flavor="hive")
    dataset = ds.dataset(files, schema=full, format="parquet", filesystem=_arrow_fs(fs), partitioning=part,
                         partition_base_dir=out.join(table).path)
    return dataset.to_table(columns=names)


def _arrow_fs(fs):
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


# ---------------------------------------------------------------------------- label images


@dataclass(frozen=True)
class LabelTarget:
    """Where and how one image's tiles write their label cores.

    root: the OME-Zarr group holding ``labels/`` (the image itself, or
    ``<out>/labels/<id>.ome.zarr``). tiles: the image's tile plan
    (`engine.data.tile_plan.ImageTiles`: grid, resampling, rows and columns).
    id_stride: ids reserved per tile (the ensemble's max_det). dtype: "uint32" or "uint64".
    image: the image's own location (for its metadata). note: why labels are not beside
    the image, when they are not. write: False keeps the ids (detections still get
    image-unique `label_id`s) but writes no label image.
    """

    image_id: str
    root: StoreLocation
    name: str
    tiles: Any  # ImageTiles
    id_stride: int
    dtype: str
    image: StoreLocation
    note: str = ""
    write: bool = True

    @property
    def classes_name(self) -> str:
        return f"{self.name}_classes"

    @property
    def names(self) -> tuple[str, str]:
        return (self.name, self.classes_name)

    @property
    def grid(self):
        return self.tiles.grid

    @property
    def uri(self) -> str:
        return self.root.join(LABELS_DIR, self.name).uri

    def spec(self, key: TileKey) -> tuple[int, TileSpec]:
        """(tile index in the grid, row-major; the tile's spec) of a ledger key."""
        rc = self.grid.index_of_key(tuple(key))
        if rc is None:
            raise KeyError(f"{self.image_id}: tile {tuple(key)} is not a tile of the planned grid")
        return rc[0] * self.grid.n_cols + rc[1], self.grid.tile_at(*rc)

    def base(self, key: TileKey) -> int:
        """Label id offset of a tile: its detection i gets base + i + 1."""
        return self.spec(key)[0] * self.id_stride


def label_dtype(n_tiles: int, id_stride: int) -> str:
    """uint32 when every id (at most n_tiles * id_stride) fits, else uint64."""
    return "uint32" if n_tiles * id_stride < 2**32 - 1 else "uint64"


def create_label_arrays(target: LabelTarget, *, overwrite: bool = False) -> None:
    """The label images' level-0 arrays (shape and chunks of the tiles' level; no pixels).

    An existing array of the same shape, chunks and dtype is kept (a resumed job writes
    into it) unless `overwrite`; anything else is replaced. A root that is a Zarr v2
    group (an NGFF 0.4 image) is refused with MetadataError before anything is written:
    opened as v3 it would get a zarr.json beside its .zgroup, which readers prefer, and
    the image would no longer open.
    """
    import zarr

    grid = target.grid
    try:
        existing = zarr.open_group(target.root.zarr_store(read_only=True), mode="r").metadata.zarr_format
    except FileNotFoundError:
        existing = None
    if existing not in (None, 3):
        raise MetadataError(f"{target.root}: a Zarr v{existing} image; label images are written beside Zarr v3 "
                            f"(NGFF 0.5) images only")
    group = zarr.open_group(target.root.zarr_store(read_only=False), mode="a", zarr_format=3)
    if target.root != target.image and "grainflow" not in group.attrs:
        group.attrs.update({"grainflow": {"source_image": target.image.uri, "image_id": target.image_id}})
    labels = group.require_group(LABELS_DIR)
    for name, dtype in ((target.name, target.dtype), (target.classes_name, "uint8")):
        node = labels.require_group(name)
        if not overwrite and "0" in node:
            arr = node["0"]
            if (tuple(arr.shape) == tuple(grid.shape) and tuple(arr.chunks) == tuple(grid.chunks)
                    and np.dtype(arr.dtype) == np.dtype(dtype)):
                continue
        # A fresh array: its metadata (multiscales) is written again by finishing.
        node.attrs.put({})
        node.create_array("0", shape=grid.shape, chunks=grid.chunks, dtype=dtype, fill_value=0,
                          dimension_names=["y", "x"], overwrite=True)


def core_to_level(target: LabelTarget, spec: TileSpec, core: np.ndarray) -> np.ndarray:
    """A tile's core mask (as the ensemble gives it) on the level's core pixels.

    Read at the level as it is, the core is already those pixels. Resampled, output
    pixel j of the core's window covers level-0 [j * step, (j + 1) * step): each level
    pixel takes the output pixel its centre falls in (nearest neighbour). At a core's
    far border that pixel can belong to the next tile's window (a window holds the
    output pixels that *start* in the core); the level pixel then takes its own
    window's nearest pixel, so a tile writes only what it computed.
    """
    core = np.asarray(core)
    out = target.tiles.output
    if out is None:
        if core.shape != (spec.height, spec.width):
            raise ValueError(f"{target.image_id} tile {spec.key}: core mask {core.shape} differs from the core "
                             f"{(spec.height, spec.width)}")
        return core
    x0, y0, x1, y1 = spec.core_level0()
    j0, j1, i0, i1 = out.core_window((y0, y1, x0, x1))
    if core.shape != (j1 - j0, i1 - i0):
        raise ValueError(f"{target.image_id} tile {spec.key}: core mask {core.shape} differs from its output "
                         f"window {(j1 - j0, i1 - i0)}")
    if core.size == 0:
        return np.zeros((spec.height, spec.width), core.dtype)
    t = spec.transform
    cy = np.array([t.to_level0(v + 0.5, 0)[0] for v in range(spec.y0, spec.y1)])
    cx = np.array([t.to_level0(0, u + 0.5)[1] for u in range(spec.x0, spec.x1)])
    rows = np.clip(np.floor(cy / out.step[0]).astype(np.int64) - j0, 0, core.shape[0] - 1)
    cols = np.clip(np.floor(cx / out.step[1]).astype(np.int64) - i0, 0, core.shape[1] - 1)
    return core[rows[:, None], cols[None, :]]


class _LabelArrays:
    """Open level-0 label arrays per image (opened on first use in each process)."""

    def __init__(self):
        self._open: dict[tuple[str, str], Any] = {}

    def get(self, target: LabelTarget, name: str):
        import zarr

        key = (target.image_id, name)
        if key not in self._open:
            group = zarr.open_group(target.root.zarr_store(read_only=False), mode="r+")
            self._open[key] = group[f"{LABELS_DIR}/{name}/0"]
        return self._open[key]


# ---------------------------------------------------------------------------- the tile sink


def _split_error(error: str) -> tuple[str, str, list[str]]:
    """"<Type>: <message>" -> (type, message, chunk keys named by a CorruptChunkError)."""
    kind, sep, message = str(error).partition(": ")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w.]*", kind):
        kind, message = "Error", str(error)
    chunks = []
    m = re.search(r"chunk (.+?) cannot be decoded", message)
    if m:
        chunks = [c.strip() for c in m.group(1).split(",") if c.strip()]
    return kind, message, chunks


class WriteTileOutputs:
    """Ray Data map_batches function: write each result row's outputs, then the ledger.

    out: the job's output URI. labels: image_id -> `LabelTarget` (None or a missing image:
    no label images). class_names: the detector's classes (for `class_name`).
    Returns one small row per tile (image_id, level, y, x, ok, n_defects, halo_reduced):
    what the driver counts; no pixels go back. A row's optional `halo_reduced` column
    (`engine.data.tile_read`) keeps a done tile out of the ledger (module doc).

    Pass an instance (not the class): it runs as Ray tasks, which Ray retries on failure;
    a retried batch rewrites the same files and the same ledger file.
    """

    def __init__(self, out: str | StoreLocation, *, labels: Mapping[str, LabelTarget] | None = None,
                 class_names: Sequence[str] = ()):
        self.out = resolve(out)
        self.labels = dict(labels or {})
        self.class_names = tuple(class_names)
        self._arrays: _LabelArrays | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = None  # open arrays stay in their process
        return state

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        from engine.pipeline.results import error_text, from_columns

        if self._arrays is None:
            self._arrays = _LabelArrays()
        # An all-null error column comes back from Arrow as float NaN: that means no error.
        batch = dict(batch)
        batch["error"] = np.array([error_text(e) for e in batch["error"]], dtype=object)
        results = from_columns(batch)
        placement = [(np.asarray(batch["origin"][i], np.float64), np.asarray(batch["scale"][i], np.float64),
                      tuple(int(v) for v in np.asarray(batch["halo"][i]).reshape(4))) for i in range(len(results))]
        reduced = [error_text(v) for v in batch.get("halo_reduced", [None] * len(results))]
        with ThreadPoolExecutor(max_workers=min(_WRITE_THREADS, max(1, len(results)))) as pool:
            list(pool.map(lambda args: self._write(*args), zip(results, placement, reduced)))
        # A tile read with a reduced halo is written but not finished: a rerun redoes it.
        done = [r for r, why in zip(results, reduced) if r.error is None and why is None]
        # Last: only now are this batch's tiles complete.
        Ledger(self.out).record([(r.image_id, r.level, r.y, r.x) for r in done], [r.n_defects for r in done])
        return {
            "image_id": np.array([r.image_id for r in results], dtype=object),
            "level": np.array([r.level for r in results], np.int32),
            "y": np.array([r.y for r in results], np.int64), "x": np.array([r.x for r in results], np.int64),
            "ok": np.array([r.error is None for r in results], bool),
            "n_defects": np.array([r.n_defects for r in results], np.int32),
            "halo_reduced": np.array([r.error is None and why is not None for r, why in zip(results, reduced)], bool),
        }

    def _write(self, r, placement, halo_reduced: str | None = None) -> None:
        key = (r.image_id, r.level, r.y, r.x)
        if r.error is not None:
            kind, message, chunks = _split_error(r.error)
            table = pa.table({"level": [r.level], "y": [r.y], "x": [r.x], "modality": [r.modality],
                              "exception": [kind], "message": [message], "chunk_keys": [chunks]}, schema=ERROR_SCHEMA)
            put_file(tile_location(self.out, ERRORS, key), table_bytes(table))
            target = self.labels.get(r.image_id)
            if target is not None and target.write:
                # A tile an interrupted run wrote (not yet in the ledger) that fails now:
                # its old label ids must not outlive its detections.
                y0, y1, x0, x1 = target.spec(key)[1].core
                for name in (target.name, target.classes_name):
                    self._arrays.get(target, name)[y0:y1, x0:x1] = 0
            return
        target = self.labels.get(r.image_id)
        base = 0
        if target is not None:
            index, spec = target.spec(key)
            base = index * target.id_stride
            ids = r.n_defects + len(r.foreign_classes)  # its detections, then the foreign pieces it paints
            if ids > target.id_stride:
                raise ValueError(f"{r.image_id} tile {key}: {r.n_defects} detections and {len(r.foreign_classes)} "
                                 f"foreign pieces exceed the {target.id_stride} label ids reserved per tile")
            if target.write:
                self._write_labels(target, spec, r, base)
        table, meta = tile_detections(r, base, placement, self.class_names)
        meta["halo_reduced"] = halo_reduced
        table = table.replace_schema_metadata({TILE_META: json.dumps(meta, sort_keys=True).encode()})
        put_file(tile_location(self.out, DETECTIONS, key), table_bytes(table))

    def _write_labels(self, target: LabelTarget, spec: TileSpec, r, base: int) -> None:
        y0, y1, x0, x1 = spec.core
        local = core_to_level(target, spec, r.core_labels)
        ids = np.where(local > 0, local.astype(np.uint64) + np.uint64(base), 0).astype(target.dtype)
        classes = core_to_level(target, spec, r.core_classes).astype(np.uint8)
        self._arrays.get(target, target.name)[y0:y1, x0:x1] = ids
        self._arrays.get(target, target.classes_name)[y0:y1, x0:x1] = classes

# ---------------------------------------------------------------------------- per-image finishing


def _read_tile(location: StoreLocation) -> tuple[pa.Table, dict[str, Any]]:
    with location.filesystem().open(location.path, "rb") as f:
        table = pq.read_table(f)
    meta = json.loads((table.schema.metadata or {}).get(TILE_META, b"{}"))
    return table.replace_schema_metadata(None), meta


def _list_tile_files(out: StoreLocation, table: str, image_id: str) -> dict[tuple[int, int, int], StoreLocation]:
    base = out.join(table, partition(image_id))
    fs = base.filesystem()
    if not fs.exists(base.path):
        return {}
    found = {}
    for p in fs.ls(base.path, detail=False):
        m = re.fullmatch(r"tile-(\d+)-(\d+)-(\d+)\.parquet", p.rsplit("/", 1)[-1])
        if m:
            found[tuple(int(v) for v in m.groups())] = base.join(m.group(0))
    return found


def _weighted_probs(metas: Sequence[dict], key: str, n: int) -> np.ndarray:
    acc, total = np.zeros(n), 0.0
    for m in metas:
        p = np.array([np.nan if v is None else v for v in m[key]], np.float64)
        area = m.get("core_area_mm2")
        if len(p) != n or not np.isfinite(p).all() or area is None or not np.isfinite(area):
            continue
        acc += area * p
        total += area
    return acc / total if total > 0 else np.full(n, np.nan)


def write_label_pyramid(target: LabelTarget, class_names: Sequence[str],
                        provenance: Mapping[str, Any] | None = None) -> int:
    """Coarser levels of both label images (each pixel its 2x2 block's most frequent label,
    `engine.stores.pyramid.downsample_labels`, chunk by chunk) and their NGFF metadata,
    placed like the image's level they were written at; `provenance`
    (e.g. the job's output and bundle) goes into their `grainflow` attributes. Returns
    the number of levels."""
    import zarr

    from engine.stores.image import open_image
    from engine.stores.ngff import multiscales_v05
    from engine.stores.pyramid import n_levels_for, write_next_level

    image = open_image(target.image)
    level = target.grid.level
    ms = image.multiscale
    iy, ix = ms.axis_index("y"), ms.axis_index("x")
    lv = ms.levels[level]
    pixel = (lv.scale[iy], lv.scale[ix])
    shift = (lv.translation[iy], lv.translation[ix]) if lv.translation else (0.0, 0.0)
    group = zarr.open_group(target.root.zarr_store(read_only=False), mode="r+")
    labels = group[LABELS_DIR]
    n = 1
    for name in target.names:
        node = labels[name]
        finer = node["0"]
        n = n_levels_for(tuple(finer.shape), int(max(finer.chunks)))
        for k in range(1, n):
            coarser = node.create_array(str(k), shape=((finer.shape[0] + 1) // 2, (finer.shape[1] + 1) // 2),
                                        chunks=finer.chunks, dtype=finer.dtype, fill_value=0,
                                        dimension_names=["y", "x"], overwrite=True)
            write_next_level(finer, coarser, labels=True)
            finer = coarser
        # a coarser label pixel stands for its whole block, as the image's mean does: its
        # centre shifts by half a block, on top of where the source level's pixel 0 sits
        meta = multiscales_v05(name=name, unit=image.unit, pixel_size=pixel, n_levels=n, centre_shift=True)
        if any(shift):
            for ds in meta["datasets"]:
                transforms = ds["coordinateTransformations"]
                if transforms[-1]["type"] == "translation":
                    transforms[-1]["translation"] = [t + s for t, s in zip(transforms[-1]["translation"], shift)]
                else:
                    transforms.append({"type": "translation", "translation": list(shift)})
        image_label: dict[str, Any] = {"source": {"image": "../../"}}
        if name == target.classes_name:
            image_label["properties"] = [{"label-value": i + 1, "class": c} for i, c in enumerate(class_names)]
        node.attrs.update({"ome": {"version": "0.5", "multiscales": [meta], "image-label": image_label},
                           "grainflow": {"source_level": level, "image_id": target.image_id,
                                         **dict(provenance or {})}})
    attrs = dict(labels.attrs)
    ome = dict(attrs.get("ome", {}))
    names = list(ome.get("labels", []))
    names += [nm for nm in target.names if nm not in names]
    labels.attrs.update({"ome": {**ome, "version": "0.5", "labels": names}})
    return n


def finish_image(out: str | StoreLocation, plan, done: Sequence[tuple[int, int, int]], *,
                 label_target: LabelTarget | None = None, class_names: Sequence[str] = (),
                 materials: Sequence[str] = (), grades: Sequence[str] = (),
                 provenance: Mapping[str, Any] | None = None, iou_threshold: float = 0.5) -> dict[str, Any]:
    """One image after all its tiles ran: objects, tiles table, labels; its summary row.

    plan: the image's `engine.data.tile_plan.ImageTiles`. done: (level, y, x) of its
    finished tiles (ledgered, or done by this run with a reduced halo), the only
    detection files read. Every errors file of a tile not in
    `done` is current (a job runs every tile not ledgered), an errors file of a done tile
    is stale and removed, as is a detections file of a tile not done (an earlier run's).
    provenance: recorded in the label images' attributes. Idempotent: a second call
    writes the same files.
    """
    out = resolve(out)
    image_id = plan.image_id
    done_set = {tuple(int(v) for v in k) for k in done}
    done = sorted(done_set)
    error_files = _list_tile_files(out, ERRORS, image_id)
    errors = sorted(k for k in error_files if k not in done_set)
    with ThreadPoolExecutor(max_workers=_WRITE_THREADS) as pool:
        read = list(pool.map(lambda k: _read_tile(tile_location(out, DETECTIONS, (image_id, *k))), done))
        error_rows = list(pool.map(lambda k: _read_tile(error_files[k])[0], errors))
    tiles = [TileDetections(k, t, m) for k, (t, m) in zip(done, read)]
    whole = None
    if label_target is not None and label_target.write:
        import zarr

        labels = zarr.open_array(label_target.root.join(LABELS_DIR, label_target.name, "0")
                                 .zarr_store(read_only=True), mode="r")
        whole = WholeObjects(labels, label_target.grid.transform)
    objects = image_objects(tiles, class_names, tuple(plan.grid.transform.pixel_size_nm), whole,
                            iou_threshold=iou_threshold)
    put_file(out.join(OBJECTS, partition(image_id), "part-0.parquet"), table_bytes(objects))
    put_file(out.join(TILES, partition(image_id), "part-0.parquet"), table_bytes(_tiles_table(tiles, errors, error_rows)))

    fs = out.filesystem()
    for k in sorted(set(error_files) & done_set):
        fs.rm(error_files[k].path)
    unplanned = out.join(ERRORS, partition(image_id), IMAGE_ERROR_FILE)
    if fs.exists(unplanned.path):  # an earlier run could not plan this image; this one did
        fs.rm(unplanned.path)
    for k, loc in _list_tile_files(out, DETECTIONS, image_id).items():
        if k not in done_set:
            fs.rm(loc.path)

    labels_uri = ""
    if label_target is not None and label_target.write:
        write_label_pyramid(label_target, class_names, provenance)
        labels_uri = label_target.uri
    metas = [t.meta for t in tiles]
    n_reduced = sum(1 for m in metas if m.get("halo_reduced"))
    mp = _weighted_probs(metas, "material_probs", len(materials))
    gp = _weighted_probs(metas, "grade_probs", len(grades))
    area = float(sum(m["core_area_mm2"] for m in metas if m.get("core_area_mm2") is not None))
    classes = objects["class"].to_numpy(zero_copy_only=False)
    counts = {name: int(np.sum(classes == i)) for i, name in enumerate(class_names)}
    versions = next((m["model_versions"] for m in metas if m.get("model_versions")), {})
    has_m = len(mp) > 0 and bool(np.isfinite(mp).all())
    has_g = len(gp) > 0 and bool(np.isfinite(gp).all())
    level_nm = plan.grid.transform.level_pixel_size_nm
    return {
        "image_id": image_id, "modality": plan.modality, "level": int(plan.grid.level),
        "level_pixel_size_y_nm": float(level_nm[0]), "level_pixel_size_x_nm": float(level_nm[1]),
        "pixel_size_nm": float(plan.pixel_size_nm), "tiles_planned": int(plan.n_tiles), "tiles_done": len(done),
        "tiles_error": len(errors), "tiles_halo_reduced": n_reduced,
        "complete": len(done) == int(plan.n_tiles) and not n_reduced, "core_area_mm2": area,
        "material": materials[int(np.argmax(mp))] if has_m else "",
        "material_prob": float(np.max(mp)) if has_m else math.nan,
        "grade": grades[int(np.argmax(gp))] if has_g else "",
        "grade_prob": float(np.max(gp)) if has_g else math.nan,
        "material_probs": [float(v) for v in mp], "grade_probs": [float(v) for v in gp],
        "n_detections": sum(t.table.num_rows for t in tiles), "n_defects": objects.num_rows,
        "defect_density_per_mm2": float(objects.num_rows / area) if area > 0 else math.nan,
        "defect_counts": json.dumps(counts, sort_keys=True), "model_versions": json.dumps(versions, sort_keys=True),
        "labels_uri": labels_uri,
    }


def _tiles_table(tiles: Sequence[TileDetections], errors, error_rows) -> pa.Table:
    rows = []
    for t in tiles:
        m = t.meta
        x0, y0, x1, y1 = m["core_level0"]
        rows.append({"level": t.key[0], "y": t.key[1], "x": t.key[2], "status": "done", "core_x0": x0, "core_y0": y0,
                     "core_x1": x1, "core_y1": y1, "n_defects": m["n_defects"], "core_area_mm2": m["core_area_mm2"],
                     "defect_density_per_mm2": m["defect_density_per_mm2"], "material": m["material"],
                     "grade": m["grade"], "material_probs": [math.nan if v is None else v for v in m["material_probs"]],
                     "grade_probs": [math.nan if v is None else v for v in m["grade_probs"]], "error": None,
                     "halo_reduced": m.get("halo_reduced")})
    for k, e in zip(errors, error_rows):
        msg = e.to_pylist()[0]
        rows.append({"level": k[0], "y": k[1], "x": k[2], "status": "error", "core_x0": math.nan,
                     "core_y0": math.nan, "core_x1": math.nan, "core_y1": math.nan, "n_defects": 0,
                     "core_area_mm2": math.nan, "defect_density_per_mm2": math.nan, "material": "", "grade": "",
                     "material_probs": [], "grade_probs": [], "error": f"{msg['exception']}: {msg['message']}",
                     "halo_reduced": None})
    rows.sort(key=lambda r: (r["level"], r["y"], r["x"]))
    return pa.Table.from_pylist(rows, schema=TILE_SCHEMA)


def write_image_error(out: str | StoreLocation, image_id: str, modality: str, error: BaseException) -> None:
    """The errors row of an image the job could not plan or prepare (level, y, x null)."""
    row = {"level": None, "y": None, "x": None, "modality": modality, "exception": type(error).__name__,
           "message": str(error), "chunk_keys": []}
    put_file(resolve(out).join(ERRORS, partition(image_id), IMAGE_ERROR_FILE),
             table_bytes(pa.Table.from_pylist([row], schema=ERROR_SCHEMA)))


def unplanned_summary_row(image_id: str, modality: str) -> dict[str, Any]:
    """The summary row of an image the job could not plan: no tiles, not complete."""
    return {**dict.fromkeys(SUMMARY_COLUMNS), "image_id": image_id, "modality": modality, "tiles_planned": 0,
            "tiles_done": 0, "tiles_error": 0, "tiles_halo_reduced": 0, "complete": False, "core_area_mm2": 0.0,
            "material": "", "grade": "",
            "material_probs": [], "grade_probs": [], "n_detections": 0, "n_defects": 0, "defect_counts": "{}",
            "model_versions": "{}", "labels_uri": ""}


def summary_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """The summary rows of `finish_image`, sorted by image id, as a table."""
    schema = pa.schema([
        ("image_id", pa.string()), ("modality", pa.string()), ("level", pa.int32()),
        ("level_pixel_size_y_nm", pa.float64()), ("level_pixel_size_x_nm", pa.float64()), ("pixel_size_nm", pa.float64()),
        ("tiles_planned", pa.int64()), ("tiles_done", pa.int64()), ("tiles_error", pa.int64()),
        ("tiles_halo_reduced", pa.int64()), ("complete", pa.bool_()), ("core_area_mm2", pa.float64()),
        ("material", pa.string()),
        ("material_prob", pa.float64()), ("grade", pa.string()), ("grade_prob", pa.float64()),
        ("material_probs", pa.list_(pa.float64())), ("grade_probs", pa.list_(pa.float64())),
        ("n_detections", pa.int64()), ("n_defects", pa.int64()), ("defect_density_per_mm2", pa.float64()),
        ("defect_counts", pa.string()), ("model_versions", pa.string()), ("labels_uri", pa.string()),
    ])
    assert tuple(schema.names) == SUMMARY_COLUMNS
    return pa.Table.from_pylist(sorted(rows, key=lambda r: r["image_id"]), schema=schema)


__all__ = [
    "DEFAULT_LABEL_NAME", "DETECTIONS", "DETECTION_SCHEMA", "ERRORS", "ERROR_SCHEMA", "IMAGE_ERROR_FILE",
    "LabelTarget", "OBJECTS", "OBJECT_SCHEMA", "SUMMARY_COLUMNS", "SUMMARY_FILE", "TILES", "TILE_SCHEMA",
    "WriteTileOutputs",
    "core_to_level", "create_label_arrays", "finish_image", "label_dtype", "partition", "read_output",
    "stitch_objects", "summary_table", "tile_file", "tile_location", "unplanned_summary_row", "write_image_error",
    "write_label_pyramid",
]
