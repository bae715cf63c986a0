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
                               is tile[top:H - bottom, left:W - right]. Smaller than
                               asked at the image's edge, and 0 on a side whose halo
                               holds an undecodable chunk (the chunk's own tile is
                               the error row; its neighbours still complete)
origin         float64 (2,)    level-0 edge coordinates (y, x) of tile[0, 0]'s corner
scale          float64 (2,)    level-0 pixels per tile pixel (y, x): tile edge (u, v)
                               lies at level-0 origin + (u, v) * scale
pixel_size     float64         tile pixel size in nm (x axis)
pixel_size_y   float64         tile pixel size in nm (y axis; differs from x only
                               where the image's pixels are not square)
modality       str             the catalog's modality
extent0        int64 (2,)      (height, width) of the image's level 0, px: where its
                               last cores end (a coarser level's last pixel, or a
                               resampled grid's, reaches past it)
error          str or null     "<ExceptionType>: <message>" when the read failed; a
                               CorruptChunkError's message names the chunk keys
halo_reduced   str or null     why the tile has less halo than planned: the sides
                               dropped and the first failure, e.g. "top, left:
                               CorruptChunkError: ..."; null when the halo is whole
                               (as planned, clipped only at the image's edge). Such a
                               tile's outputs differ from a clean run's: the job
                               writes them but does not ledger the tile
=============  ==============  =====================================================
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import numpy as np
import pyarrow as pa

from engine.data.tile_plan import ReadSpec, block_layout, rects
from engine.preprocess.resample import cast_pixels, resample
from engine.stores.image import open_image
from engine.tiling.grid import TileSpec

COLUMNS = ("image_id", "level", "y", "x", "tile", "halo", "origin", "scale", "pixel_size", "pixel_size_y", "modality",
           "extent0", "error", "halo_reduced")


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
        read = [(t, failure, None) for t in tiles] if image is None else _read(image, tiles)
        rows = [_row(spec, t, p, reduced) for t, p, reduced in read]
        table = BlockAccessor.batch_to_block({name: [r[i] for r in rows] for i, name in enumerate(COLUMNS)})
        # A block without failures would type these as null; keep one schema for all blocks.
        for name in ("error", "halo_reduced"):
            table = table.set_column(table.schema.get_field_index(name), name,
                                     pa.array([r[COLUMNS.index(name)] for r in rows], pa.string()))
        yield table


def _read(image, tiles: list[TileSpec]) -> list[tuple[TileSpec, np.ndarray | Exception, str | None]]:
    """Each tile with its pixels, or with the exception that stopped its read, and why
    its halo is smaller than planned (None when it is not; see `_read_alone`).

    The block's tiles are read as one region (their halos overlap, so each chunk is
    fetched once) and sliced; only when that fails is each tile read alone, to find
    the tiles the bad chunks belong to.
    """
    regions = [t.read_region for t in tiles]
    y0, y1 = min(r[0] for r in regions), max(r[1] for r in regions)
    x0, x1 = min(r[2] for r in regions), max(r[3] for r in regions)
    try:
        union = image.read_region(tiles[0].level, y0, y1, x0, x1)
        return [(t, union[a - y0 : b - y0, c - x0 : d - x0], None) for t, (a, b, c, d) in zip(tiles, regions)]
    except Exception:
        return [_read_alone(image, t) for t in tiles]


def _read_alone(image, tile: TileSpec) -> tuple[TileSpec, np.ndarray | Exception, str | None]:
    """One tile; a bad chunk in its halo only costs that side of the halo, not the tile.

    Returns (the tile as read, its pixels or the exception, why its halo was reduced).
    The tile is an error only when its core cannot be read. Otherwise each halo strip
    (top and bottom spanning the full width, left and right the core's rows) is read on
    its own and a side whose strip fails gets halo 0, which the row's `halo` column
    records, so the chunk's owner alone carries the error. The third value then names
    the dropped sides and the first strip's failure ("top, left: <Type>: <message>"):
    detections made without that context can differ from a clean run's, so the job
    must not count the tile as finished for good.
    """
    level = tile.level
    try:
        return tile, image.read_region(level, *tile.read_region), None
    except Exception as exc:
        if not any(tile.halo):
            return tile, exc, None
        failure = exc
    try:
        core = image.read_region(level, *tile.core)
    except Exception:
        return tile, failure, None
    top, bottom, left, right = tile.halo
    ry0, ry1, rx0, rx1 = tile.read_region
    strips = {
        "top": (ry0, tile.y0, rx0, rx1), "bottom": (tile.y1, ry1, rx0, rx1),
        "left": (tile.y0, tile.y1, rx0, tile.x0), "right": (tile.y0, tile.y1, tile.x1, rx1),
    }
    got, lost = {}, {}
    for side, (a, b, c, d) in strips.items():
        if a < b and c < d:
            try:
                got[side] = image.read_region(level, a, b, c, d)
            except Exception as exc:
                lost[side] = exc
    halo = (top if "top" in got else 0, bottom if "bottom" in got else 0,
            left if "left" in got else 0, right if "right" in got else 0)
    reduced = replace(tile, halo=halo)
    out = np.empty(reduced.read_shape, core.dtype)
    t, b, lft, r = halo
    out[t : t + tile.height, lft : lft + tile.width] = core
    if lft:
        out[t : t + tile.height, :lft] = got["left"]
    if r:
        out[t : t + tile.height, lft + tile.width :] = got["right"]
    # top and bottom strips span the full read width; keep the columns still in the tile
    cols = slice(left - lft, left + tile.width + r)
    if t:
        out[:t] = got["top"][:, cols]
    if b:
        out[t + tile.height :] = got["bottom"][:, cols]
    why = None
    if lost:
        first = next(iter(lost.values()))
        why = f"{', '.join(lost)}: {type(first).__name__}: {first}"
    return reduced, out, why


def _row(spec: ReadSpec, tile: TileSpec, pixels: np.ndarray | Exception, halo_reduced: str | None = None) -> tuple:
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
            np.asarray(origin, np.float64), np.asarray(scale, np.float64), float(im.pixel_size_yx_nm[1]),
            float(im.pixel_size_yx_nm[0]), im.modality, np.asarray(im.level0_shape, np.int64), error,
            None if error else halo_reduced)


def _resampled(im, tile: TileSpec, pixels: np.ndarray | None, dtype: np.dtype):
    """The tile's own output pixels (plus output halo) sampled from its source read."""
    out = im.output
    x0, y0, x1, y1 = tile.core_level0()
    # A source side read without its halo (an undecodable chunk there) has no output
    # halo either: those pixels would only repeat the core's edge.
    first, shape, halo = out.tile_frame((y0, y1, x0, x1), tuple(bool(s) for s in tile.halo))
    origin = (first[0] * out.step[0], first[1] * out.step[1])
    if pixels is None:
        data = np.zeros((0, 0), dtype)
    else:
        ry0, _, rx0, _ = tile.read_region
        # Rounded to the image's own dtype first, as in an archive of that dtype alone:
        # the dataset's tile dtype may be wider (float32 beside float images).
        values = cast_pixels(resample(pixels, (ry0, rx0), tile.transform, out.step, first, shape), pixels.dtype)
        data = values.astype(dtype, copy=False)
    return data, halo, origin, out.step
