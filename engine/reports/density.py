"""Where an image's stitched defects lie: one count per tile core, for the density maps.

The maps count the same thing as the report's tables: stitched objects (a defect cut by
tile borders is one object), each once, in the tile holding its centroid (level-0
pixels). A tile's own detections would count a defect once per tile that saw a piece of
it, and each tile's halo again, so a map of them disagrees with the tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from engine.data.sinks import OBJECTS, TILES, read_output
from engine.reports.run import Run


@dataclass(frozen=True)
class TileCounts:
    """One image's objects counted per tile.

    tiles: its tiles table (`engine.data.sinks.TILE_SCHEMA` rows) plus ``n_objects``
    (int64: objects counted in the tile) and ``object_density_per_mm2`` (float64,
    n_objects per mm² of the tile's core; NaN for a tile that is not done). moved:
    objects whose centroid lay in no done tile's core (a failed tile's, or a core's far
    edge), counted in the nearest done core. unplaced: objects with no position at all
    (not counted). The image's objects are n_objects' sum plus unplaced.
    """

    tiles: pd.DataFrame
    moved: int = 0
    unplaced: int = 0

    @property
    def total(self) -> int:
        return int(self.tiles["n_objects"].sum())


def tile_object_counts(tiles: pd.DataFrame, centroids_yx: np.ndarray) -> TileCounts:
    """Count objects per tile by centroid.

    tiles: one image's tiles table (`engine.data.sinks.TILE_SCHEMA` rows: key y, x and
    the core in level-0 px, status, core_area_mm2). centroids_yx: (N, 2) float64 object
    centroids (y, x) in level-0 px (NaN where an object has none). Every object with a
    position is counted exactly once when any tile is done, so the counts add up to the
    image's stitched defects.
    """
    t = tiles.reset_index(drop=True).copy()
    n = np.zeros(len(t), np.int64)
    done = (t["status"] == "done").to_numpy() & t[["core_y0", "core_x0", "core_y1", "core_x1"]].notna().all(
        axis=1).to_numpy()
    c = np.asarray(centroids_yx, np.float64).reshape(-1, 2)
    placed = np.isfinite(c).all(axis=1)
    unplaced = int((~placed).sum())
    c = c[placed]
    moved = 0
    if len(c) and done.any():
        idx = np.flatnonzero(done)
        y0, x0, y1, x1 = (t.loc[idx, k].to_numpy(np.float64) for k in ("core_y0", "core_x0", "core_y1", "core_x1"))
        owner = np.full(len(c), -1, np.int64)
        # cores do not overlap, so at most one holds a centroid; done one tile at a time
        # (tiles per image are few compared with objects)
        for j in range(len(idx)):
            inside = (owner < 0) & (c[:, 0] >= y0[j]) & (c[:, 0] < y1[j]) & (c[:, 1] >= x0[j]) & (c[:, 1] < x1[j])
            owner[inside] = j
        lost = np.flatnonzero(owner < 0)
        moved = len(lost)
        for k in lost:  # on a core's far edge, or in a failed tile: the nearest done core
            dy = np.maximum(np.maximum(y0 - c[k, 0], c[k, 0] - y1), 0)
            dx = np.maximum(np.maximum(x0 - c[k, 1], c[k, 1] - x1), 0)
            owner[k] = int(np.argmin(dy * dy + dx * dx))
        n[idx] = np.bincount(owner, minlength=len(idx))
    t["n_objects"] = n
    area = t["core_area_mm2"].to_numpy(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t["object_density_per_mm2"] = np.where(done & (area > 0), n / area, np.nan)
    if not done.any():
        unplaced += len(c)  # no done tile to count them in
    return TileCounts(t, moved, unplaced)


def image_tile_counts(run: Run, image_id: str) -> TileCounts:
    """`tile_object_counts` of one image of the run, from its tiles and objects tables;
    an object without a centroid (no measured mask) is placed at its box's centre."""
    tiles = read_output(run.out, TILES, image_id=image_id).to_pandas()
    o = read_output(run.out, OBJECTS, image_id=image_id, columns=["centroid_y", "centroid_x", "y0", "x0", "y1", "x1"])
    col = {k: o[k].to_numpy(zero_copy_only=False).astype(np.float64) for k in o.column_names}
    cy = np.where(np.isfinite(col["centroid_y"]), col["centroid_y"], (col["y0"] + col["y1"]) / 2)
    cx = np.where(np.isfinite(col["centroid_x"]), col["centroid_x"], (col["x0"] + col["x1"]) / 2)
    return tile_object_counts(tiles, np.stack([cy, cx], axis=1))


__all__ = ["TileCounts", "image_tile_counts", "tile_object_counts"]
