"""Training samples planned from an archive's metadata: light specs, never pixels.

The driver reads the archive's catalog (one Parquet row per image), when labels are
wanted its ground truth (one Parquet row per defect instance), and each image's pyramid
metadata (its zarr.json files, never a pixel: `stored_pyramid`). From those it lays a
grid of tiles over every pyramid level a tile fits in and describes each tile as a
`SampleSpec`: which image, which level, where, with which class labels. A spec is a few
hundred bytes of plain values; the pixels are read later, inside a Ray task
(`engine.data.training_samples`), the way torchgeo's samplers yield boxes and leave
reading to the dataset.

Planning cost: besides the catalog, one small read per image, its group's zarr.json
(`pyramid_halves`: do the NGFF scales make level k 2**k times coarser, as the halving
pyramid engine.stores.pyramid writes?); the catalog cannot tell, and a foreign OME-Zarr
(valid NGFF) may have levels 3x coarser each, with shapes to match. Only an image whose
pixels are not square, or whose pyramid does not halve, has all its metadata read
(`pyramid_levels`: its group's and each level's zarr.json, as the batch job's planner
opens every image). PLAN_THREADS images at a time, since object stores answer small
reads slowly: at ~50 ms a read about 160 images plan per second, 10 000 in about a
minute.

Coordinates: (y, x) is a tile's top-left corner in pixels of its own pyramid level k
(level 0 = full resolution; in the halving pyramid `engine.stores.pyramid` builds, level
k has ceil(H / 2**k) x ceil(W / 2**k) pixels, each 2**k level-0 pixels a side). Ground-
truth boxes are level-0 pixels.

Square model pixels: an image whose pixels are not square (`engine.data.tile_plan.is_square`
of the catalog's y and x sizes, e.g. a fast-scan SEM's (10, 5) nm) reaches the models
square at inference (`engine.data.tile_plan.choose_square_pixels`: natively, the finer of
the read level's two sizes), so it is trained that way too: level k's tiles are laid on
the square grid of the finer of level k's two pixel sizes, as its NGFF transform gives
them (`engine.preprocess.resample.OutputGrid`: pixel j covers level-0
[j * step, (j + 1) * step) per axis), (y, x) and `tile` count those pixels, and the
reader resamples them from level k. Read as level pixels, a round pore would be
trained as a 1:2 ellipse and then met round. Square images (within SQUARE_WITHIN) plan
as before, on their level's own pixels, where level k is 2**k level-0 pixels a side (the
reader's context tiles, 2**context_offset times coarser, rely on that); a level of
another factor (a foreign pyramid's 3x) is laid on the square grid of its own pixel
size as for pixels that are not square, which resamples nothing where its pixels line
up with that grid (an integer factor, the NGFF block-centre translation).
"""

from __future__ import annotations

import math
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from engine.data.tile_plan import is_square
from engine.errors import GrainflowError
from engine.preprocess.resample import OutputGrid
from engine.stores.catalog import image_uri, read_catalog, read_table
from engine.stores.ngff import to_nanometres
from engine.stores.uri import StoreLocation, resolve

TRUTH_FILE = "ground_truth.parquet"  # engine.synth.truth.TRUTH_FILE; not imported to keep synth out of workers
MASK_KINDS = (None, "semantic", "instance")
NORMALISATIONS = ("tile", "image")  # engine.pipeline.inputs' modes a trained model can expect
ANCHORS = ("grid", "instances")
# anchor="instances": a defect is read at the finest level where its box fills at most
# this share of the tile's side, so the crop shows the whole defect and some context.
INSTANCE_FILL = 0.75
# Images whose metadata is read at once while planning: the reads are latency-bound
# (object stores), as in the batch job's planner (engine.data.datasource).
PLAN_THREADS = 8


class SamplePlanError(GrainflowError, ValueError):
    """A sample layout or an archive that cannot give the samples asked for."""


@dataclass(frozen=True)
class SampleLayout:
    """What one training sample looks like.

    tile: side of the (detail) tile in pixels of its level.
    context_tile: side of the context tile (fusion models), in pixels of level
      k + context_offset, centred on the detail tile (engine.models.fusion's geometry);
      None for single-view models.
    context_offset: pyramid levels between detail and context (2: 4x the pixel size).
    mask: None (no labels), "semantic" (per-pixel defect class, 0 = background) or
      "instance" (per-pixel instance id, plus tight boxes per instance: SAM prompts).
    levels: pyramid levels to sample; None takes every level that holds a whole tile,
      so a model sees each specimen at several pixel sizes.
    stride: grid step in pixels (default: `tile`, non-overlapping tiles).
    require_instances: keep only tiles that ground truth says contain a defect (a SAM
      sample without a box has nothing to learn from).
    max_per_image: at most this many tiles per image, a seeded random subset (None: all).
    anchor: "grid" (tiles on a regular grid) or "instances" (one tile per ground-truth
      instance, centred on its box, at the finest allowed level where the box spans at
      most INSTANCE_FILL of the tile; the spec lists only that instance: defect crops
      for generative models). Crops may reach past the image edge (read padded).
    normalisation: how tiles reach the model (engine.pipeline.inputs' modes): "tile"
      (each tile's own percentile stretch) or "image" (the image's engine.preprocess
      parameters, fitted once per image: every tile of an image treated alike).
    """

    tile: int
    context_tile: int | None = None
    context_offset: int = 2
    mask: str | None = None
    levels: tuple[int, ...] | None = None
    stride: int | None = None
    require_instances: bool = False
    max_per_image: int | None = None
    anchor: str = "grid"
    normalisation: str = "tile"

    def __post_init__(self) -> None:
        if self.anchor not in ANCHORS:
            raise SamplePlanError(f"SampleLayout.anchor {self.anchor!r} is not one of {ANCHORS}")
        if self.anchor == "instances" and self.context_tile is not None:
            raise SamplePlanError("SampleLayout: anchor='instances' crops have no context tile")
        if not isinstance(self.tile, int) or self.tile < 8:
            raise SamplePlanError(f"SampleLayout.tile must be an integer >= 8 pixels, got {self.tile!r}")
        if self.normalisation not in NORMALISATIONS:
            raise SamplePlanError(f"SampleLayout.normalisation {self.normalisation!r} is not one of {NORMALISATIONS}")
        if self.mask not in MASK_KINDS:
            raise SamplePlanError(f"SampleLayout.mask {self.mask!r} is not one of {MASK_KINDS}")
        if self.levels is not None:
            object.__setattr__(self, "levels", tuple(int(v) for v in self.levels))
            if any(v < 0 for v in self.levels):
                raise SamplePlanError(f"SampleLayout.levels must be >= 0, got {self.levels}")
        stride = self.step
        if stride < 1:
            raise SamplePlanError(f"SampleLayout.stride must be >= 1, got {stride}")
        if self.context_tile is not None:
            # engine.models.fusion.context_origin needs whole context pixels: the detail
            # tile's corner and centre must land on the coarser grid.
            d = self.context_offset
            if d < 1:
                raise SamplePlanError(f"SampleLayout.context_offset must be >= 1, got {d}")
            if self.tile % 2 ** (d + 1) or stride % 2**d or self.context_tile % 2 or self.context_tile < 2:
                raise SamplePlanError(
                    f"SampleLayout: with context_offset {d} the tile ({self.tile}) must be a multiple of "
                    f"{2 ** (d + 1)}, the stride ({stride}) a multiple of {2**d} and the context tile "
                    f"({self.context_tile}) even, so the context tile starts on a whole pixel"
                )
        if self.max_per_image is not None and self.max_per_image < 1:
            raise SamplePlanError(f"SampleLayout.max_per_image must be >= 1, got {self.max_per_image}")

    @property
    def step(self) -> int:
        return self.tile if self.stride is None else int(self.stride)


@dataclass(frozen=True)
class SampleSpec:
    """One training sample, planned: where to read it and what its labels are.

    image_uri: the OME-Zarr image (absolute URI). level, y, x: the detail tile's level
    and top-left corner in level pixels (in square model pixels when `resampled`);
    tile: its side. context_tile: 0 for none, else the context tile's side at level +
    context_offset. material / material_index, grade_index: the image's catalog labels
    (-1 where unknown or unlabelled). pixel_size_nm: edge of one pixel of this level
    (of the square model pixels when `resampled`), nm. seed: the sample's own seed
    (augmentation draws). instance_ids / instance_classes: ground-truth instances whose
    level-0 box meets the tile, and each one's segmentation class (1-based; 0 is
    background). step_y, step_x: level-0 pixels per tile pixel along y and x when the
    image's pixels are not square and the tile is resampled to square ones of
    pixel_size_nm from `level` (module docstring); 0.0 where the tile is the level's
    own pixels.
    """

    image_id: str
    image_uri: str
    level: int
    y: int
    x: int
    tile: int
    modality: str
    pixel_size_nm: float
    material: str | None = None
    material_index: int = -1
    grade_index: int = -1
    context_tile: int = 0
    context_offset: int = 2
    seed: int = 0
    instance_ids: tuple[int, ...] = field(default=())
    instance_classes: tuple[int, ...] = field(default=())
    step_y: float = 0.0
    step_x: float = 0.0

    @property
    def resampled(self) -> bool:
        """Whether the tile is resampled to square pixels (the image's are not square)."""
        return self.step_y > 0

    def to_row(self) -> dict[str, Any]:
        """A plain dict (lists, str, int, float) for ray.data.from_items."""
        row = asdict(self)
        row["instance_ids"] = list(self.instance_ids)
        row["instance_classes"] = list(self.instance_classes)
        row["material"] = self.material or ""
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> SampleSpec:
        """Inverse of to_row; numpy scalars and arrays (a Ray batch's row) are accepted."""
        kw = {}
        for f in fields(cls):
            v = row[f.name]
            if f.name in ("instance_ids", "instance_classes"):
                kw[f.name] = tuple(int(i) for i in np.asarray(v if v is not None else [], dtype=np.int64).ravel())
            elif f.name in ("image_id", "image_uri", "modality"):
                kw[f.name] = str(v)
            elif f.name == "material":
                kw[f.name] = str(v) or None
            elif f.name in ("pixel_size_nm", "step_y", "step_x"):
                kw[f.name] = float(v)
            else:
                kw[f.name] = int(v)
        return cls(**kw)


def level_shape(height: int, width: int, level: int) -> tuple[int, int]:
    """(h, w) of pyramid level `level` of an H x W image: each level halves, rounding up."""
    h, w = int(height), int(width)
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


@dataclass(frozen=True)
class PyramidLevel:
    """One stored pyramid level as its NGFF metadata gives it: shape (h, w) pixels;
    factor (y, x) level-0 pixels per level pixel (2**k in a halving pyramid);
    pixel_size_yx_nm (y, x) nm (engine.tiling's `LevelTransform`, what the batch job
    plans with)."""

    shape: tuple[int, int]
    factor: tuple[float, float]
    pixel_size_yx_nm: tuple[float, float]


def level_grid(height: int, width: int, pixel_size_yx_nm: tuple[float, float], level: int,
               stored: PyramidLevel | None = None) -> tuple[tuple[float, float], tuple[int, int], float, bool]:
    """How tiles of `level` of an H x W image of level-0 (y, x) pixel size (nm) are laid.

    Returns (step, extent, pixel_size_nm, resampled): step, (y, x) level-0 pixels per
    tile pixel; extent, (h, w) tile pixels covering the image; pixel_size_nm, a tile
    pixel's edge. stored: the level as its metadata gives it (`pyramid_levels`); None
    assumes the halving pyramid engine.stores.pyramid writes (and needs level 0 for
    pixels that are not square). Square pixels of a level 2**level level-0 pixels a
    side: the level's own, step (2**level, 2**level) (ints), extent the level's shape.
    Others (pixels not square, or a level of another factor): square pixels of the
    finer of the level's two sizes (engine.data.tile_plan.choose_square_pixels' native
    rule), on the image's global `OutputGrid` at that size.
    """
    py, px = (float(v) for v in pixel_size_yx_nm)
    f = 2**level
    halves = stored is None or tuple(stored.factor) == (f, f)
    if is_square(py, px) and halves:
        shape = level_shape(height, width, level) if stored is None else tuple(int(v) for v in stored.shape)
        return (f, f), shape, px * f, False
    if stored is None:
        if level:
            raise ValueError(f"level_grid: level {level} of an image of non-square pixels ({py:.6g} x {px:.6g} nm) "
                             "needs the level as its metadata gives it (stored, see pyramid_levels): a pyramid "
                             "need not halve")
        size = min(py, px)
    else:
        size = float(min(stored.pixel_size_yx_nm))
    grid = OutputGrid.for_image((int(height), int(width)), (py, px), size)
    return grid.step, grid.extent, size, True


def pyramid_halves(image: str | StoreLocation, n_levels: int) -> bool:
    """Whether the first `n_levels` levels of the OME-Zarr image at `image` are each 2**k
    level-0 pixels a side (along y and x) by its NGFF scales, as in the pyramid
    engine.stores.pyramid writes. Reads the group's metadata only (one zarr.json)."""
    from engine.stores.image import open_group
    from engine.stores.ngff import parse_multiscales

    location = resolve(image)
    multiscale = parse_multiscales(dict(open_group(location).attrs), str(location))
    if len(multiscale.levels) < n_levels:
        return False
    y0, x0 = multiscale.pixel_size(0)
    return all(math.isclose(y / y0, 2**k, rel_tol=1e-9) and math.isclose(x / x0, 2**k, rel_tol=1e-9)
               for k, (y, x) in ((k, multiscale.pixel_size(k)) for k in range(n_levels)))


def pyramid_levels(image: str | StoreLocation) -> list[PyramidLevel]:
    """Each readable pyramid level of the OME-Zarr image at `image`, as its metadata
    (zarr.json files, no pixels) gives it: shape, factor and pixel size from the NGFF
    coordinate transforms, as the batch job reads them."""
    from engine.stores.image import open_image
    from engine.tiling.transform import LevelTransform

    opened = open_image(image)
    out = []
    for k, info in enumerate(opened.levels):
        transform = LevelTransform.from_image(opened, k)
        out.append(PyramidLevel(tuple(int(v) for v in info.shape), tuple(transform.factor),
                                transform.level_pixel_size_nm))
    return out


def sample_seed(seed: int, image_id: str, level: int, y: int, x: int) -> int:
    """A stable 31-bit seed per sample, the same on every machine and run."""
    return zlib.crc32(f"{seed}/{image_id}/{level}/{y}/{x}".encode()) & 0x7FFFFFFF


def read_truth(archive: str | StoreLocation) -> pd.DataFrame | None:
    """The archive's ground-truth table (one row per defect instance), or None if absent."""
    location = resolve(archive).join(TRUTH_FILE)
    if not location.exists():
        return None
    return read_table(location).to_pandas()


def _index(value: Any, names: Sequence[str], what: str, image_id: str) -> int:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return -1
    try:
        return list(names).index(str(value))
    except ValueError:
        raise SamplePlanError(
            f"image {image_id!r}: {what} {value!r} is not one the model knows ({', '.join(names)})"
        ) from None


def plan_samples(
    archive: str | StoreLocation,
    layout: SampleLayout,
    *,
    materials: Sequence[str],
    grades: Sequence[str],
    defect_classes: Sequence[str] = (),
    seed: int = 0,
    image_ids: Iterable[str] | None = None,
) -> list[SampleSpec]:
    """Specs of every sample `layout` lays over the archive, ordered by image, level, y, x.

    Reads the catalog, when the layout wants masks or instances the ground truth, and
    each image's pyramid metadata (`stored_pyramid`, PLAN_THREADS images at a time: the
    module docstring's planning cost); never a pixel. `materials`, `grades` and
    `defect_classes` are the model's label orders (its config's); a catalog label
    outside them is an error naming the image. `image_ids` restricts the plan to those
    images.
    """
    archive = resolve(archive)
    catalog = read_catalog(archive)
    if image_ids is not None:
        wanted = set(image_ids)
        catalog = catalog[catalog["image_id"].isin(wanted)]
    truth = None
    if layout.mask is not None or layout.require_instances or layout.anchor == "instances":
        truth = read_truth(archive)
        if truth is None:
            raise SamplePlanError(
                f"{archive}: no {TRUTH_FILE}; a layout with masks (mask={layout.mask!r}) needs the "
                "ground truth's instance classes"
            )
    by_image = {} if truth is None else {k: g for k, g in truth.groupby("image_id", sort=False)}
    rng = np.random.default_rng([int(seed), 0x5A3])
    rows = list(catalog.itertuples(index=False))
    with ThreadPoolExecutor(max_workers=PLAN_THREADS) as pool:
        pyramids = list(pool.map(lambda row: stored_pyramid(archive, row), rows))
    specs: list[SampleSpec] = []
    for row, pyramid in zip(rows, pyramids):
        specs.extend(_plan_image(archive, row, pyramid, layout, by_image.get(row.image_id), materials, grades,
                                 defect_classes, seed, rng))
    return specs


def stored_pyramid(archive: StoreLocation, row) -> list[PyramidLevel] | None:
    """The pyramid levels of a catalog row's image as its metadata gives them
    (`pyramid_levels`), or None where the catalog tells them: square pixels and a pyramid
    that halves (`pyramid_halves`, one small read)."""
    location = image_uri(archive, row.image_id)
    square = is_square(to_nanometres(float(row.pixel_size_y), str(row.unit)),
                       to_nanometres(float(row.pixel_size_x), str(row.unit)))
    if square and pyramid_halves(location, int(row.levels)):
        return None
    return pyramid_levels(location)


def _plan_image(archive, row, pyramid, layout, truth, materials, grades, defect_classes, seed, rng
                ) -> list[SampleSpec]:
    material_index = _index(row.material, materials, "material", row.image_id)
    grade_index = _index(row.quality_grade, grades, "quality grade", row.image_id)
    pixel_size_yx = (to_nanometres(float(row.pixel_size_y), str(row.unit)),
                     to_nanometres(float(row.pixel_size_x), str(row.unit)))
    uri = image_uri(archive, row.image_id).uri
    if pyramid is None:  # the catalog tells all (square pixels, a halving pyramid)
        pyramid = [None] * int(row.levels)
    n_levels = len(pyramid)
    levels = range(n_levels) if layout.levels is None else [v for v in layout.levels if v < n_levels]
    grids = {v: level_grid(row.height, row.width, pixel_size_yx, v, pyramid[v]) for v in levels}
    boxes = classes = ids = None
    if truth is not None and len(truth):
        boxes = truth[["y0", "x0", "y1", "x1"]].to_numpy(np.int64)
        ids = truth["instance_id"].to_numpy(np.int64)
        classes = np.array([_index(c, defect_classes, "defect class", row.image_id) + 1
                            for c in truth["defect_class"]], np.int64)
    if layout.anchor == "instances":
        out = _instance_crops(row, layout, grids, boxes, ids, classes, material_index, grade_index, uri, seed)
    else:
        out = _grid_tiles(row, layout, grids, boxes, ids, classes, material_index, grade_index, uri, seed)
    if layout.max_per_image is not None and len(out) > layout.max_per_image:
        keep = np.sort(rng.choice(len(out), layout.max_per_image, replace=False))
        out = [out[i] for i in keep]
    return out


def _steps(grid) -> dict[str, float]:
    """SampleSpec's step_y / step_x for a `level_grid` (0.0: the level's own pixels)."""
    (sy, sx), _, _, resampled = grid
    return {"step_y": float(sy), "step_x": float(sx)} if resampled else {}


def _instance_crops(row, layout, grids, boxes, ids, classes, material_index, grade_index, uri, seed
                    ) -> list[SampleSpec]:
    """One tile per instance, centred on its box (SampleLayout.anchor == "instances")."""
    out: list[SampleSpec] = []
    levels = list(grids)
    if boxes is None or not levels:
        return out
    t = layout.tile
    for box, iid, cls in zip(boxes, ids, classes):
        h, w = int(box[2] - box[0]), int(box[3] - box[1])
        # the box's longer side in tile pixels of each level (level-0 pixels / step)
        level = next((v for v in levels if max(h / grids[v][0][0], w / grids[v][0][1]) <= INSTANCE_FILL * t),
                     levels[-1])
        (sy, sx), _, pixel_size_nm, _ = grids[level]
        cy, cx = (box[0] + box[2]) / (2 * sy), (box[1] + box[3]) / (2 * sx)
        y, x = int(round(cy - t / 2)), int(round(cx - t / 2))
        out.append(SampleSpec(
            image_id=str(row.image_id), image_uri=uri, level=level, y=y, x=x, tile=t,
            modality=str(row.modality), pixel_size_nm=pixel_size_nm,
            material=None if material_index < 0 else str(row.material),
            material_index=material_index, grade_index=grade_index, context_tile=0,
            context_offset=layout.context_offset, seed=sample_seed(seed, f"{row.image_id}#{int(iid)}", level, y, x),
            instance_ids=(int(iid),), instance_classes=(int(cls),), **_steps(grids[level]),
        ))
    return out


def _grid_tiles(row, layout, grids, boxes, ids, classes, material_index, grade_index, uri, seed
                ) -> list[SampleSpec]:
    """Tiles on a regular grid over every level (SampleLayout.anchor == "grid")."""
    out = []
    for level, grid in grids.items():
        (sy, sx), (h, w), pixel_size_nm, _ = grid
        t, s = layout.tile, layout.step
        for y in range(0, h - t + 1, s):
            for x in range(0, w - t + 1, s):
                inst_ids: tuple[int, ...] = ()
                inst_classes: tuple[int, ...] = ()
                if boxes is not None:
                    # level-0 footprint of the tile, half open, against half-open boxes
                    y0, y1, x0, x1 = y * sy, (y + t) * sy, x * sx, (x + t) * sx
                    hit = (boxes[:, 0] < y1) & (boxes[:, 2] > y0) & (boxes[:, 1] < x1) & (boxes[:, 3] > x0)
                    inst_ids = tuple(int(i) for i in ids[hit])
                    inst_classes = tuple(int(c) for c in classes[hit])
                if layout.require_instances and not inst_ids:
                    continue
                out.append(SampleSpec(
                    image_id=str(row.image_id), image_uri=uri, level=level, y=y, x=x, tile=t,
                    modality=str(row.modality), pixel_size_nm=pixel_size_nm,
                    material=None if material_index < 0 else str(row.material),
                    material_index=material_index, grade_index=grade_index,
                    context_tile=layout.context_tile or 0, context_offset=layout.context_offset,
                    seed=sample_seed(seed, str(row.image_id), level, y, x),
                    instance_ids=inst_ids, instance_classes=inst_classes, **_steps(grid),
                ))
    return out


def split_specs(specs: Sequence[SampleSpec], val_fraction: float, *, seed: int = 0,
                min_each: int = 1) -> tuple[list[SampleSpec], list[SampleSpec]]:
    """(train, val): a seeded random `val_fraction` of the specs held out, order kept.

    Tiles of the same images end up on both sides, so validation measures fit, not
    generalisation to new specimens (hold out a whole archive for that). Each side gets
    at least `min_each` specs (one per training worker, so none iterates nothing).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise SamplePlanError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(specs)
    if val_fraction == 0.0:
        return list(specs), []
    n_val = max(math.ceil(val_fraction * n), min_each)
    if n - n_val < min_each:
        raise SamplePlanError(
            f"{n} samples cannot be split into train and validation with at least {min_each} each "
            f"(val_fraction {val_fraction}); use a larger archive, smaller tiles or val_fraction=0"
        )
    val_idx = set(np.random.default_rng([int(seed), 0x7A1]).choice(n, n_val, replace=False).tolist())
    return [s for i, s in enumerate(specs) if i not in val_idx], [s for i, s in enumerate(specs) if i in val_idx]


__all__ = [
    "PLAN_THREADS", "PyramidLevel", "SampleLayout", "SamplePlanError", "SampleSpec", "level_grid", "level_shape",
    "plan_samples", "pyramid_halves", "pyramid_levels", "read_truth", "sample_seed", "split_specs",
    "stored_pyramid",
]
