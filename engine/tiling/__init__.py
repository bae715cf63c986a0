"""Tile geometry: grids over pyramid levels, halos, chunk alignment, stitching.

Geometry only: nothing here reads or holds pixels.

- `transform`: level pixels -> level-0 pixels -> nanometres (`LevelTransform`);
- `grid`: `TileGrid` and the light `TileSpec`s it yields;
- `stitch`: per-tile boxes and masks -> per-image results in level-0 coordinates.
"""

from engine.tiling.grid import TileGrid, TileKey, TileSpec
from engine.tiling.stitch import (
    StitchedBoxes, StitchedGroups, TileBoxes, crop_to_core, nms, owned, stitch_boxes, stitch_groups,
    tile_boxes_to_level0, tile_core_level0, tile_read_level0,
)
from engine.tiling.transform import LevelTransform

__all__ = [
    "LevelTransform", "StitchedBoxes", "StitchedGroups", "TileBoxes", "TileGrid", "TileKey", "TileSpec",
    "crop_to_core", "nms", "owned", "stitch_boxes", "stitch_groups", "tile_boxes_to_level0", "tile_core_level0",
    "tile_read_level0",
]
