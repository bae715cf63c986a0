"""Planning tile reads from metadata: which level, which tiles, grouped into read tasks.

Everything here runs on the driver and touches metadata only (the catalog and each
image's zarr.json files). Its cost grows with the number of read tasks, not tiles: a
`ReadSpec` names a rectangle of tile indices of one image's `TileGrid`, never a list of
tiles, so planning a petabyte image is as cheap as planning a small one.

Level choice: the level whose pixel size is nearest the model's target (log scale,
`MultiscaleImage.nearest_level`) is read as it is when it is within `tolerance` (a
factor, e.g. 1.5) of the target. Otherwise tiles are resampled to the target pixel size
(`engine.preprocess.resample`) from the coarsest level still finer than the target
(downsampling with anti-aliasing keeps detail), or from level 0 when even level 0 is
coarser than the target (upsampling). Levels are compared by their x pixel size.

Square model pixels: an image whose level-0 pixels are not square (y and x sizes
differing by more than SQUARE_WITHIN, e.g. a fast-scan SEM's (10, 5) nm) is always
resampled, since a round pore read at such pixels is a 1:2 ellipse to a detector
(`choose_square_pixels`):
- with a target pixel size, to the target on both axes, from the coarsest level no
  coarser than the target along either axis (downsampling never drops detail along the
  finer axis), else from level 0 (upsampling);
- for native pixels (tolerance math.inf: the nearest level read as it is, the job's and
  the endpoint's mode when the models record no pixel size), to the finer of that
  level's two sizes, from that level: the coarser axis is upsampled and no detail is
  dropped (the geometric mean, the coarser size, or the x size where x is the coarser
  axis, would each drop detail along the finer axis).
Tiles still carry their origin and (y, x) scale in level-0 pixels, so boxes, masks and
measurements come back in the image's own pixels and nm. Square images (and those
within SQUARE_WITHIN) plan as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from engine.errors import GrainflowError
from engine.preprocess.resample import OutputGrid
from engine.stores.ngff import to_nanometres
from engine.tiling.grid import TileGrid, TileKey
from engine.tiling.transform import LevelTransform

Rect = tuple[int, int, int, int]  # r0, r1, c0, c1: grid rows and columns, half open
# Largest tile edge (px) a read task may hold, read or delivered (a 16384^2 uint16 tile is
# 512 MiB): a source tile beyond it means the image's pyramid ends far finer than the
# target pixel size; a delivered one, that its pixels are far coarser than the target
# (upsampling; often a pixel size recorded in the wrong unit).
MAX_TILE_EDGE = 16384


class PlanningError(GrainflowError):
    """An image whose tiles cannot be planned at the asked pixel size."""


# A pyramid level within this factor of the target pixel size is read as stored (the
# batch job's, the endpoint's and detector training's default; `choose_level`).
DEFAULT_TOLERANCE = 1.5

# Pixels whose y and x sizes differ by less than this factor are read as square: a 1%
# stretch changes no detector's answer, and a TIFF's rational resolutions round.
SQUARE_WITHIN = 1.01


def is_square(size_y_nm: float, size_x_nm: float) -> bool:
    """Whether pixels of (y, x) size (nm, or any one unit) are square to the models,
    within SQUARE_WITHIN."""
    return max(size_y_nm, size_x_nm) <= SQUARE_WITHIN * min(size_y_nm, size_x_nm)


def pixel_size_text(size_y: float, size_x: float) -> str:
    """A pixel size for messages: "5" (square) or "10 x 5 (y x x)"."""
    return f"{size_x:.6g}" if is_square(size_y, size_x) else f"{size_y:.6g} x {size_x:.6g} (y x x)"


def _check(target_nm: float, tolerance: float) -> None:
    """ValueError unless target_nm (nm) and tolerance (a factor) can choose a level."""
    if not (target_nm > 0 and math.isfinite(target_nm)):
        raise ValueError(f"target pixel size must be a positive number of nm, got {target_nm!r}")
    if not tolerance >= 1:
        raise ValueError(f"level tolerance is a factor >= 1, got {tolerance!r}")


def choose_level(image, target_nm: float, tolerance: float) -> tuple[int, bool]:
    """(level, resample) for a target pixel size in nm; see the module docstring."""
    _check(target_nm, tolerance)
    sizes = [to_nanometres(lv.pixel_size[1], image.unit) for lv in image.levels]
    nearest = image.nearest_level(target_nm, "nanometer")
    ratio = sizes[nearest] / target_nm
    if max(ratio, 1 / ratio) <= tolerance:
        return nearest, False
    finer = [i for i, s in enumerate(sizes) if s <= target_nm]
    return (max(finer, key=lambda i: sizes[i]) if finer else 0), True


def choose_square_pixels(image, target_nm: float, tolerance: float) -> tuple[int, float] | None:
    """(level, square output pixel size in nm) for an image whose level-0 pixels are not
    square (the module docstring's rule); None for square ones (`choose_level` applies).
    tolerance math.inf means native pixels: `target_nm` then only picks the level."""
    if is_square(*LevelTransform.from_image(image, 0).level_pixel_size_nm):
        return None
    transforms = [LevelTransform.from_image(image, k) for k in range(len(image.levels))]
    if math.isinf(tolerance):
        level = choose_level(image, target_nm, tolerance)[0]
        return level, min(transforms[level].level_pixel_size_nm)
    _check(target_nm, tolerance)
    finer = [k for k, t in enumerate(transforms) if max(t.level_pixel_size_nm) <= target_nm]
    return (max(finer, key=lambda k: min(transforms[k].level_pixel_size_nm)) if finer else 0), float(target_nm)


@dataclass(frozen=True)
class ImageTiles:
    """The planned tiles of one image: the grid they come from and how they are delivered.

    grid: tiles of the source level (cores chunk-aligned, halo in level pixels).
    output: the target-pixel-size grid when tiles are resampled, else None.
    n_rows, n_cols: grid rows and columns planned (a resampled grid's last row or column
    is dropped when it owns no output pixel).
    tile_dtype: the dtype of the `tile` column (shared by all images of a dataset).
    level0_shape: (y, x) pixels of the image's level 0: where the last cores end (a
    coarser level's last pixel, or a resampled grid's, can reach past it).
    """

    image_id: str
    location: object  # StoreLocation: pickles as a small value
    modality: str
    grid: TileGrid
    output: OutputGrid | None
    n_rows: int
    n_cols: int
    tile_dtype: str
    level0_shape: tuple[int, int]

    @property
    def n_tiles(self) -> int:
        return self.n_rows * self.n_cols

    @property
    def pixel_size_nm(self) -> float:
        """x pixel size of the delivered tiles in nm."""
        return self.pixel_size_yx_nm[1]

    @property
    def pixel_size_yx_nm(self) -> tuple[float, float]:
        """(y, x) pixel size of the delivered tiles in nm (they differ where the image's do)."""
        t = self.grid.transform
        if self.output is not None:
            return (self.output.step[0] * t.pixel_size_nm[0], self.output.step[1] * t.pixel_size_nm[1])
        return t.level_pixel_size_nm

    @property
    def tile_bytes(self) -> int:
        """Bytes of one full tile as delivered (core and halo), for task sizing."""
        th, tw = self.grid.tile
        g = self.grid.halo
        if self.output is not None:
            fy, fx = self.grid.transform.factor
            th, tw = th * fy / self.output.step[0], tw * fx / self.output.step[1]
            g = self.output.halo
        return max(1, int((th + 2 * g) * (tw + 2 * g) * np.dtype(self.tile_dtype).itemsize))


def plan_image(image, image_id: str, location, modality: str, *, target_nm: float, tolerance: float,
               tile_size: int | None, halo: int, tile_dtype: str) -> ImageTiles:
    """Plan one image: level, grid and (if needed) resampling, from its metadata.

    tile_size and halo are in pixels of the delivered tiles (the output pixel size when
    resampling); the core is rounded up to whole chunks of the source level. Images of
    non-square pixels are resampled to square ones (module docstring).
    """
    square = choose_square_pixels(image, target_nm, tolerance)
    if square is None:
        level, resampled = choose_level(image, target_nm, tolerance)
        output_nm = target_nm
    else:
        (level, output_nm), resampled = square, True
    info = image.levels[level]
    transform = LevelTransform.from_image(image, level)
    level_sizes = pixel_size_text(*transform.level_pixel_size_nm)
    output = None
    if resampled:
        output = OutputGrid.for_image(image.shape, transform.pixel_size_nm, output_nm, halo)
        m = (output.step[0] / transform.factor[0], output.step[1] / transform.factor[1])
        want = (info.chunks if tile_size is None else (math.ceil(tile_size * m[0]), math.ceil(tile_size * m[1])))
        level_halo = output.source_halo(transform)
    else:
        want = info.chunks if tile_size is None else (tile_size, tile_size)
        level_halo = halo
    tile = tuple(max(1, math.ceil(w / c)) * c for w, c in zip(want, info.chunks))
    if max(tile) + 2 * level_halo > MAX_TILE_EDGE:
        raise PlanningError(
            f"{image_id}: a tile at {output_nm:.6g} nm per pixel would read {tile[0]} x {tile[1]} px of level "
            f"{level} ({level_sizes} nm per pixel): the image's pyramid ends too fine "
            f"for that pixel size; add coarser levels or ask for a finer pixel size")
    if output is not None:
        fy, fx = transform.factor
        coarser_nm = transform.level_pixel_size_nm[1] if square is None else max(transform.level_pixel_size_nm)
        edge = max(min(tile[0] * fy / output.step[0], output.extent[0]),
                   min(tile[1] * fx / output.step[1], output.extent[1]))
        if edge + 2 * output.halo > MAX_TILE_EDGE:
            raise PlanningError(
                f"{image_id}: a tile resampled to {output_nm:.6g} nm per pixel would be {edge:.6g} px wide: the "
                f"image's level {level} pixels ({level_sizes} nm) are "
                f"{coarser_nm / output_nm:.6g}x coarser than that; check its recorded pixel "
                f"size or ask for a coarser one")
    grid = TileGrid(image_id, level, info.shape, info.chunks, tile, level_halo, transform)
    n_rows, n_cols = grid.n_rows, grid.n_cols
    if output is not None:
        # Only the last row / column can own no output pixel (every other core spans
        # at least one output step).
        last = grid.tile_at(n_rows - 1, n_cols - 1)
        x0, y0, x1, y1 = last.core_level0()
        j0, j1, i0, i1 = output.core_window((y0, y1, x0, x1))
        n_rows -= j0 == j1 and n_rows > 1
        n_cols -= i0 == i1 and n_cols > 1
    return ImageTiles(image_id, location, modality, grid, output, int(n_rows), int(n_cols), tile_dtype,
                      tuple(int(v) for v in image.shape))


@dataclass(frozen=True)
class ReadSpec:
    """One read task: a rectangle of one image's tiles, described, not listed.

    rect: grid rows [r0, r1) x columns [c0, c1). skip: (row, col) of tiles in the rect
    that are already done. block_tiles: most tiles per block the task yields (memory).
    """

    tiles: ImageTiles
    rect: Rect
    skip: frozenset[tuple[int, int]] = frozenset()
    block_tiles: int = 1

    @property
    def n_tiles(self) -> int:
        r0, r1, c0, c1 = self.rect
        return (r1 - r0) * (c1 - c0) - len(self.skip)


def layout(n_rows: int, n_cols: int, per: int) -> tuple[int, int]:
    """(rows, cols) of the rectangles that cut an n_rows x n_cols grid into about `per` tiles each.

    Whole rows while a row fits, else pieces of one row. The number of rectangles is at
    most about n_rows * n_cols / per, each holding up to about 2 * per tiles.
    """
    per = max(1, int(per))
    if n_cols <= per:
        n_rects = math.ceil(n_rows * n_cols / per)
        return (math.ceil(n_rows / n_rects), n_cols)
    pieces = math.ceil(n_cols / per)
    return (1, math.ceil(n_cols / pieces))


def block_layout(n_rows: int, n_cols: int, per: int) -> tuple[int, int]:
    """Like `layout`, but a rectangle never holds more than `per` tiles (a memory bound)."""
    per = max(1, int(per))
    if n_cols <= per:
        return (max(1, per // n_cols), n_cols)
    return (1, per)


def rects(rect: Rect, size: tuple[int, int]) -> Iterator[Rect]:
    """Cut `rect` into rectangles of at most `size` (rows, cols), row-major."""
    r0, r1, c0, c1 = rect
    rh, cw = size
    for r in range(r0, r1, rh):
        for c in range(c0, c1, cw):
            yield (r, min(r + rh, r1), c, min(c + cw, c1))


def plan_reads(images: Iterable[ImageTiles], *, target_bytes: int, max_tasks: int,
               skip: Iterable[TileKey] = ()) -> list[ReadSpec]:
    """Read tasks of about `target_bytes` each (at most about `max_tasks` in all).

    When `target_bytes` would give more than `max_tasks` tasks, tasks grow instead: a
    task then yields several blocks of about `target_bytes`, so worker memory stays
    bounded either way. Tiles in `skip` are left out; a task with nothing left is dropped.
    Cost: O(images + tasks + len(skip)).
    """
    images = list(images)
    if target_bytes < 1 or max_tasks < 1:
        raise ValueError(f"target_bytes ({target_bytes}) and max_tasks ({max_tasks}) must be positive")
    total = sum(im.n_tiles for im in images)
    floor_per = math.ceil(total / max_tasks) if total else 1
    skipped = _skip_by_image(images, skip)
    specs: list[ReadSpec] = []
    for im in images:
        block = max(1, target_bytes // im.tile_bytes)
        per = max(block, floor_per)
        size = layout(im.n_rows, im.n_cols, per)
        done_by_task: dict[tuple[int, int], set[tuple[int, int]]] = {}
        for row, col in skipped.get(im.image_id, ()):
            done_by_task.setdefault((row // size[0], col // size[1]), set()).add((row, col))
        for rect in rects((0, im.n_rows, 0, im.n_cols), size):
            done = frozenset(done_by_task.get((rect[0] // size[0], rect[2] // size[1]), ()))
            spec = ReadSpec(im, rect, done, int(block))
            if spec.n_tiles > 0:
                specs.append(spec)
    return specs


def _skip_by_image(images: list[ImageTiles], skip: Iterable[TileKey]) -> dict[str, list[tuple[int, int]]]:
    """Skip keys -> (row, col) per image; keys of other levels or images are ignored."""
    by_id = {im.image_id: im for im in images}
    out: dict[str, list[tuple[int, int]]] = {}
    for key in skip:
        im = by_id.get(key[0])
        if im is None:
            continue
        rc = im.grid.index_of_key(tuple(key))
        if rc is not None and rc[0] < im.n_rows and rc[1] < im.n_cols:
            out.setdefault(im.image_id, []).append(rc)
    return out
