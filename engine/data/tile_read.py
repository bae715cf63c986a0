"""The worker side of a tile read task: open the image, read, yield blocks of rows.

Columns of every block (one row per tile):

=============  ==============  =====================================================
image_id       str             the catalog's image id
level          int32           pyramid level the pixels come from
y, x           int64           level-0 pixel of the tile core's top-left corner: the
                               tile's key (image_id, level, y, x) for ledgers and skips
tile           (H, W) array    core plus halo, the dataset's `tile_dtype`; raw values
                               (resampled tiles are rounded to it); (0, 0) on error
halo           int32 (4,)      (top, bottom, left, right) halo in tile pixels; the core
                               is tile[top:H - bottom, left:W - right]
origin         float64 (2,)    level-0 edge coordinates (y, x) of tile[0, 0]'s corner
scale          float64 (2,)    level-0 pixels per tile pixel (y, x): tile edge (u, v)
                               lies at level-0 origin + (u, v) * scale
pixel_size     float64         tile pixel size in nm (x axis)
modality       str             the catalog's modality
error          str or null     "<ExceptionType>: <message>" when the read failed; a
                               CorruptChunkError's message names the chunk keys
=============  ==============  =====================================================
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from engine.data.tile_plan import ReadSpec, block_layout, rects
from engine.preprocess.resample import cast_pixels, resample
from engine.stores.image import open_image
from engine.tiling.grid import TileSpec

COLUMNS = ("image_id", "level", "y", "x", "tile", "halo", "origin", "scale", "pixel_size", "modality", "error")


def read_tiles(spec: ReadSpec) -> Iterator:
    """Blocks (pyarrow tables) of at most `spec.block_tiles` rows each; see the module docstring."""
    from ray.data.block import BlockAccessor

    im = spec.tiles
    try:
        image = open_image(im.location)
    except Exception as exc:  # the image went away since planning: every tile is an error row
        image, failure = None, exc
    for block in rects(spec.rect, block_layout(spec.rect[1] - spec.rect[0], spec.rect[3] - spec.rect[2],
                                               spec.block_tiles)):
        tiles = [im.grid.tile_at(r, c) for r in range(block[0], block[1]) for c in range(block[2], block[3])
                 if (r, c) not in spec.skip]
        if not tiles:
            continue
        if image is None:
            pixels: list[np.ndarray | Exception] = [failure] * len(tiles)
        else:
            pixels = _read(image, tiles)
        rows = [_row(spec, t, p) for t, p in zip(tiles, pixels)]
        table = BlockAccessor.batch_to_block({name: [r[i] for r in rows] for i, name in enumerate(COLUMNS)})
        # A block without failures would type `error` as null; keep one schema for all blocks.
        yield table.set_column(table.schema.get_field_index("error"), "error",
                               pa.array([r[-1] for r in rows], pa.string()))


def _read(image, tiles: list[TileSpec]) -> list[np.ndarray | Exception]:
    """Each tile's read region; a failing tile gets its exception instead of pixels.

    The block's tiles are read as one region (their halos overlap, so each chunk is
    fetched once) and sliced; only when that fails is each tile read alone, to find
    which tiles the bad chunks belong to.
    """
    regions = [t.read_region for t in tiles]
    y0, y1 = min(r[0] for r in regions), max(r[1] for r in regions)
    x0, x1 = min(r[2] for r in regions), max(r[3] for r in regions)
    level = tiles[0].level
    try:
        union = image.read_region(level, y0, y1, x0, x1)
        return [union[a - y0 : b - y0, c - x0 : d - x0] for a, b, c, d in regions]
    except Exception:
        pass
    out: list[np.ndarray | Exception] = []
    for region in regions:
        try:
            out.append(image.read_region(level, *region))
        except Exception as exc:
            out.append(exc)
    return out


def _row(spec: ReadSpec, tile: TileSpec, pixels: np.ndarray | Exception) -> tuple:
    im = spec.tiles
    dtype = np.dtype(im.tile_dtype)
    y, x = tile.origin0
    error = None
    if isinstance(pixels, Exception):
        error = f"{type(pixels).__name__}: {pixels}"
    if im.output is None:
        f = tile.transform.factor
        data = np.zeros((0, 0), dtype) if error else np.ascontiguousarray(pixels, dtype=dtype)
        halo, origin, scale = tile.halo, tile.read_origin0, (float(f[0]), float(f[1]))
    else:
        data, halo, origin, scale = _resampled(im, tile, None if error else pixels, dtype)
    return (im.image_id, np.int32(tile.level), np.int64(y), np.int64(x), data, np.asarray(halo, np.int32),
            np.asarray(origin, np.float64), np.asarray(scale, np.float64), float(im.pixel_size_nm), im.modality, error)


def _resampled(im, tile: TileSpec, pixels: np.ndarray | None, dtype: np.dtype):
    """The tile's own output pixels (plus output halo) sampled from its source read."""
    out = im.output
    x0, y0, x1, y1 = tile.core_level0()
    window = out.core_window((y0, y1, x0, x1))
    top, bottom, left, right = out.halo_of(window)
    first = (window[0] - top, window[2] - left)
    shape = (window[1] - window[0] + top + bottom, window[3] - window[2] + left + right)
    origin = (first[0] * out.step[0], first[1] * out.step[1])
    if pixels is None:
        data = np.zeros((0, 0), dtype)
    else:
        ry0, _, rx0, _ = tile.read_region
        data = cast_pixels(resample(pixels, (ry0, rx0), tile.transform, out.step, first, shape), dtype)
    return data, (top, bottom, left, right), origin, out.step
