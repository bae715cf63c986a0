"""`ZarrTileDatasource`: every tile of an archive's OME-Zarr images as a Ray dataset.

    ds = ray.data.read_datasource(ZarrTileDatasource("s3://lab/archive", target_pixel_size_nm=20.0, halo=32))

The driver plans from metadata only (`engine.data.tile_plan`): the catalog, then each
image's zarr.json files; no pixel is read there. Each read task is a `ReadSpec` (an
image, a level and a rectangle of tile indices, with any tiles to skip) bound as a
default argument of its read function; the task opens the store itself and yields
blocks of tiles (`engine.data.tile_read`, which documents the columns). A tile whose
core cannot be read becomes a row with an empty tile and an `error` naming the bad
chunk; the task goes on (a bad chunk in a neighbour's halo only trims that halo).

Resuming: pass the keys of finished tiles as `skip`, each ``(image_id, level, y, x)``
with y, x the level-0 pixel of the core's top-left corner, exactly the `image_id`,
`level`, `y`, `x` columns of the rows this datasource yields.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping

import numpy as np
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from engine.data.tile_plan import DEFAULT_TOLERANCE, ImageTiles, ReadSpec, plan_image, plan_reads
from engine.data.tile_read import read_tiles
from engine.errors import GrainflowError, MetadataError
from engine.stores.catalog import CATALOG_FILE, id_name_problem, read_catalog, row_problems
from engine.stores.image import MultiscaleImage, open_image
from engine.stores.uri import IMAGE_LINK_DEPTH, StoreLocation, escaping_link, resolve
from engine.tiling.grid import TileKey

DEFAULT_TARGET_BYTES = 64 * 2**20
DEFAULT_MAX_TASKS = 20_000


class ZarrTileDatasource(Datasource):
    """Chunk-aligned tiles (with halo) of every image in an archive, at a target pixel size.

    archive: the archive's URI (its catalog.parquet lists the images).
    target_pixel_size_nm: the model's pixel size; each image is read at its nearest
        pyramid level, or resampled when no level is within `tolerance` (a factor).
    tile_size: core edge in delivered pixels, rounded up to whole chunks of the source
        level (None: one chunk). halo: pixels of context around each core (clipped at
        the image's edge).
    target_bytes: bytes of tiles per read task and per block; max_tasks caps the number
        of tasks (tasks then grow, blocks do not).
    skip: keys of tiles already done, see the module docstring.
    image_ids: read only these images (default: the whole catalog).
    tile_dtype: dtype of the `tile` column; default the common dtype of the images
        (uint8 and uint16 images give uint16): one dataset has one tile type.
    on_image_error: "raise": an image whose metadata cannot be read or whose tiles
        cannot be planned stops planning; "record": it is left out and `failed()` says
        why (what the reprocessing job uses). Errors that are not the image's (a store
        that cannot be reached) stop planning either way, as do image ids too long for
        the job's output file names (`engine.stores.catalog.id_name_problem`): the job
        could not even record those images as failed.

    An image must lie inside the archive: one whose folder (or a folder in it, see
    `engine.stores.uri.IMAGE_LINK_DEPTH`) is a symbolic link leading outside the archive
    on local disk cannot be planned, so the job neither reads it nor writes label images
    into it.
    """

    def __init__(self, archive, *, target_pixel_size_nm: float, tile_size: int | None = None, halo: int = 0,
                 target_bytes: int = DEFAULT_TARGET_BYTES, max_tasks: int = DEFAULT_MAX_TASKS,
                 tolerance: float = DEFAULT_TOLERANCE, skip: Iterable[TileKey] | None = None,
                 image_ids: Iterable[str] | None = None, tile_dtype: str | None = None,
                 storage_options: dict[str, Any] | None = None, on_image_error: str = "raise"):
        super().__init__()
        self.archive = resolve(archive, storage_options=storage_options)
        self.target_pixel_size_nm = float(target_pixel_size_nm)
        if tile_size is not None and tile_size < 1:
            raise ValueError(f"tile_size must be positive, got {tile_size}")
        if halo < 0:
            raise ValueError(f"halo must be >= 0, got {halo}")
        self.tile_size, self.halo = tile_size, int(halo)
        self.target_bytes, self.max_tasks, self.tolerance = int(target_bytes), int(max_tasks), float(tolerance)
        self.skip = frozenset(tuple(k) for k in (skip or ()))
        self.image_ids = None if image_ids is None else tuple(image_ids)
        self.tile_dtype = tile_dtype
        if on_image_error not in ("raise", "record"):
            raise ValueError(f"on_image_error must be 'raise' or 'record', got {on_image_error!r}")
        self.on_image_error = on_image_error
        self._images: list[ImageTiles] | None = None
        self._failed: dict[str, GrainflowError] = {}
        self._excluded: dict[str, GrainflowError] = {}  # found unusable after planning (`exclude`)

    def get_name(self) -> str:
        return "ZarrTiles"

    def images(self) -> list[ImageTiles]:
        """The per-image plans (computed once, from metadata)."""
        if self._images is None:
            self._images = self._plan_images()
        return self._images

    def failed(self) -> dict[str, GrainflowError]:
        """image_id -> why it could not be opened or planned (on_image_error="record");
        those images are left out of `images()`."""
        self.images()
        return dict(self._failed)

    def exclude(self, failures: Mapping[str, GrainflowError]) -> None:
        """Leave these images out from now on (a later step found them unusable, e.g. their
        preprocessing could not be fitted): they move from `images()` to `failed()`."""
        self._excluded.update(failures)
        if self._images is not None:
            self._images = [im for im in self._images if im.image_id not in self._excluded]
            self._failed.update(failures)

    def _plan_images(self) -> list[ImageTiles]:
        catalog = read_catalog(self.archive)
        if self.image_ids is not None:
            unknown = sorted(set(self.image_ids) - set(catalog["image_id"]))
            if unknown:
                raise MetadataError(f"{self.archive}: images {unknown} are not in the catalog")
            catalog = catalog[catalog["image_id"].isin(self.image_ids)]
        too_long = [p for p in map(id_name_problem, catalog["image_id"]) if p]
        if too_long:  # before any work: the job would fail writing them, after computing every tile
            shown = "; ".join(too_long[:5]) + (f"; and {len(too_long) - 5} more" if len(too_long) > 5 else "")
            raise MetadataError(f"{self.archive.join(CATALOG_FILE)}: {len(too_long)} image id(s) too long: {shown}. "
                                f"Give these images shorter ids in the catalog (their folders are found by "
                                f"their uri, which can stay); no image was processed")
        rows = catalog[["image_id", "uri", "modality", "pixel_size_x", "pixel_size_y", "unit", "dtype"]].to_dict(
            "records")
        # A row with impossible values (a pixel size of 0, an unknown unit or modality, a
        # uri outside the archive) is that image's error, not the job's.
        locations = [self._attempt(self._location)(r) for r in rows]
        # Metadata reads are latency-bound on object stores: overlap them.
        with ThreadPoolExecutor(max_workers=8) as pool:
            opened = list(pool.map(self._attempt(_open_checked), locations, rows))
        readable = [im for im in opened if not isinstance(im, GrainflowError)]
        dtype = self.tile_dtype or (str(np.result_type(*[im.dtype for im in readable])) if readable else "uint16")
        plan = self._attempt(plan_image)
        plans = [
            image if isinstance(image, GrainflowError) else
            plan(image, r["image_id"], loc, r["modality"], target_nm=self.target_pixel_size_nm,
                 tolerance=self.tolerance, tile_size=self.tile_size, halo=self.halo, tile_dtype=dtype)
            for image, r, loc in zip(opened, rows, locations)
        ]
        self._failed = {r["image_id"]: p for p, r in zip(plans, rows) if isinstance(p, GrainflowError)}
        self._failed.update(self._excluded)
        return [p for p in plans if not isinstance(p, GrainflowError) and p.image_id not in self._excluded]

    def _location(self, row: dict) -> StoreLocation:
        """Where the catalog row's image lies; MetadataError naming the row when its values
        cannot be planned with (`engine.stores.catalog.row_problems`)."""
        problems = row_problems(row)
        if problems:
            raise MetadataError(f"{self.archive.join(CATALOG_FILE)}: row {row['image_id']!r}: {'; '.join(problems)}")
        location = self.archive.join(row["uri"])
        # join() compares path text: a linked folder passes it wherever it leads, and the
        # job would read that image and write its label images there.
        escape = escaping_link(location, self.archive, depth=IMAGE_LINK_DEPTH)
        if escape is not None:
            link, target = escape
            raise MetadataError(f"image {row['image_id']!r}: {link} is a symbolic link to {target}, outside the "
                                f"archive {self.archive}; an archive's images must lie inside it (copy the image "
                                f"into the archive instead of linking to it)")
        return location

    def _attempt(self, fn):
        """fn, returning its GrainflowError (MetadataError, PlanningError) instead of
        raising it when errors are recorded: one image with unreadable metadata or an
        impossible pixel size should not stop a job over thousands (the job records it
        and goes on). Anything else (a store that cannot be reached, credentials, a bug)
        is no fault of the image and still stops planning."""
        if self.on_image_error == "raise":
            return fn

        def attempt(*args, **kwargs):
            if args and isinstance(args[0], GrainflowError):  # an earlier step's error for this image
                return args[0]
            try:
                return fn(*args, **kwargs)
            except GrainflowError as exc:
                return exc

        return attempt

    def read_specs(self) -> list[ReadSpec]:
        return plan_reads(self.images(), target_bytes=self.target_bytes, max_tasks=self.max_tasks, skip=self.skip)

    def estimate_inmemory_data_size(self) -> int:
        return int(sum(im.n_tiles * im.tile_bytes for im in self.images()))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        # `parallelism` is not used: the task count follows target_bytes and max_tasks,
        # which are what bound worker memory and planning cost.
        tasks = []
        for spec in self.read_specs():
            meta = BlockMetadata(num_rows=spec.n_tiles, size_bytes=int(spec.n_tiles * spec.tiles.tile_bytes),
                                 input_files=None, exec_stats=None)
            tasks.append(ReadTask(lambda spec=spec: read_tiles(spec), meta, per_task_row_limit=per_task_row_limit))
        return tasks

    def __getstate__(self):
        # The plan is driver state; a copy on a worker replans if it ever needs to.
        state = dict(self.__dict__)
        state["_images"], state["_failed"] = None, {}
        return state


def _open_checked(location: StoreLocation, row: dict) -> MultiscaleImage:
    """The image at `location`, refused (MetadataError) when its stored dtype is not the
    one its catalog row says: the job casts each image's tiles from the catalog's dtype."""
    image = open_image(location)
    if np.dtype(image.dtype) != np.dtype(row["dtype"]):  # '<u2' is uint16
        raise MetadataError(f"{location}: stored as {image.dtype} but the catalog says {row['dtype']}; "
                            f"correct the catalog's dtype for image {row['image_id']!r}")
    return image
