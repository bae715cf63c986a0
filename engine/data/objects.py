"""An image's objects from its tiles' detections: one rule for the batch job's finishing
and the online endpoint, so both report the same objects for the same tile results.

A tile's detections are a `DETECTION_SCHEMA` table plus the tile's own values (`meta`:
its core and read region in level-0 pixels, its core's area and class probabilities, the
foreign pieces it painted); `tile_detections` makes both from a `TileResult`.
`stitch_objects` merges pieces of a defect cut by a tile border (`engine.tiling.stitch`),
`join_foreign_pieces` adds the pieces other tiles painted of objects they do not own,
and `objects_table` writes one row per object (`OBJECT_SCHEMA`), measuring an object of
several pieces whole from its pieces' pixel moments (`PieceMoments`: each tile records
the moments of every piece it painted in its core, and the cores partition the image),
so with or without label images. Tiles written before the moments were recorded fall
back to a label image (`WholeObjects`: the job's label image in its store, or the
endpoint's tiles' cores in memory), or, without one, to the largest piece.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from engine.tiling.transform import LevelTransform

DETECTION_SCHEMA = pa.schema([
    ("level", pa.int32()), ("y", pa.int64()), ("x", pa.int64()),  # the tile's key (with image_id)
    ("detection", pa.int32()), ("label_id", pa.int64()),
    ("class", pa.int64()), ("class_name", pa.string()), ("score", pa.float64()),
    ("x0", pa.float64()), ("y0", pa.float64()), ("x1", pa.float64()), ("y1", pa.float64()),  # level-0 px
    ("x0_nm", pa.float64()), ("y0_nm", pa.float64()), ("x1_nm", pa.float64()), ("y1_nm", pa.float64()),
    ("mask_score", pa.float64()), ("mask_from_box", pa.bool_()),
    ("area_nm2", pa.float64()), ("area_um2", pa.float64()), ("equivalent_diameter_nm", pa.float64()),
    ("major_axis_nm", pa.float64()), ("minor_axis_nm", pa.float64()), ("aspect_ratio", pa.float64()),
    ("orientation_deg", pa.float64()), ("centroid_y", pa.float64()), ("centroid_x", pa.float64()),
    ("piece_px", pa.int64()), ("piece_cy", pa.float64()), ("piece_cx", pa.float64()),
    ("piece_syy", pa.float64()), ("piece_sxx", pa.float64()), ("piece_syx", pa.float64()),
])
"""Per detection: box corners in level-0 pixels (edge coordinates) and in nm from the
image's corner; measurements as `engine.pipeline.results`; centroid in level-0 pixels.

piece_*: the pixel moments of the detection's piece, its pixels in its own tile's core
label image (what the label image holds of it; the tiles' cores partition the image):
piece_px pixels of the tile (int64); piece_cy, piece_cx the mean of their centres in
level-0 edge coordinates (NaN for 0 pixels); piece_syy, piece_sxx, piece_syx the sums
over them of (y - cy)², (x - cx)² and (y - cy)(x - cx), level-0 px² (float64). Null in
files written before they were recorded."""

OBJECT_SCHEMA = pa.schema([
    ("object_id", pa.int64()), ("class", pa.int64()), ("class_name", pa.string()), ("score", pa.float64()),
    ("x0", pa.float64()), ("y0", pa.float64()), ("x1", pa.float64()), ("y1", pa.float64()),
    ("x0_nm", pa.float64()), ("y0_nm", pa.float64()), ("x1_nm", pa.float64()), ("y1_nm", pa.float64()),
    ("parts", pa.int64()), ("label_ids", pa.list_(pa.int64())),
    ("area_nm2", pa.float64()), ("area_um2", pa.float64()), ("equivalent_diameter_nm", pa.float64()),
    ("major_axis_nm", pa.float64()), ("minor_axis_nm", pa.float64()), ("aspect_ratio", pa.float64()),
    ("orientation_deg", pa.float64()), ("centroid_y", pa.float64()), ("centroid_x", pa.float64()),
])
"""Per stitched object (ids 0.. best score first). An object of several tile pieces
(`parts` > 1) has the union of their boxes, the best score and the pieces' label ids.
Such an object, and one its owner saw only in part (pieces other tiles painted grew its
box), is measured whole, with or without label images: each piece is the part of its
mask in its own tile's core, so the pieces tile the object without overlap, and the
sums of their pixel moments (`DETECTION_SCHEMA`'s piece_* columns, the tiles' foreign
pieces' in their metadata) are the whole object's; measured from those sums with the
rules of `engine.pipeline.measure`, at the tiles' pixel size, its measurements and
centroid are those of its whole mask. An object of one piece keeps its detection's
measurements (its whole mask as its tile saw it, core and halo).

Tiles written before the moments were recorded: such an object is measured on the label
image where the job wrote one; without one it gets an area-weighted centroid and the
shape measurements of its largest piece (a lower bound for the whole)."""


def class_name(c: int, class_names: Sequence[str]) -> str:
    """The name of class index `c` (its number for one the model does not name)."""
    return class_names[c] if 0 <= c < len(class_names) else str(c)


def json_floats(a) -> list[float | None]:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(a, np.float64).reshape(-1)]


def tile_detections(r, base: int, placement, class_names: Sequence[str]) -> tuple[pa.Table, dict[str, Any]]:
    """One tile's detections (`DETECTION_SCHEMA`, label ids from `base` + 1, with their
    pieces' moments) and its own values (core and read region in level-0 px, area,
    probabilities, foreign pieces and their moments, scale: the `TILE_META` the job
    writes beside them) from its `TileResult` r; placement: the tile's (origin, scale,
    halo) as the datasource gave them."""
    from engine.tiling.stitch import tile_core_level0, tile_read_level0

    n = r.n_defects
    b0, bn = r.boxes_level0.reshape(-1, 4), r.boxes_nm.reshape(-1, 4)
    names = [class_name(c, class_names) for c in r.classes.tolist()]
    cols = {
        "level": np.full(n, r.level, np.int32), "y": np.full(n, r.y, np.int64), "x": np.full(n, r.x, np.int64),
        "detection": np.arange(n, dtype=np.int32), "label_id": base + np.arange(n, dtype=np.int64) + 1,
        "class": r.classes.astype(np.int64), "class_name": names, "score": r.scores,
        "x0": b0[:, 0], "y0": b0[:, 1], "x1": b0[:, 2], "y1": b0[:, 3],
        "x0_nm": bn[:, 0], "y0_nm": bn[:, 1], "x1_nm": bn[:, 2], "y1_nm": bn[:, 3],
        "mask_score": r.mask_scores, "mask_from_box": r.mask_from_box,
        "area_nm2": r.area_nm2, "area_um2": r.area_um2, "equivalent_diameter_nm": r.equivalent_diameter_nm,
        "major_axis_nm": r.major_axis_nm, "minor_axis_nm": r.minor_axis_nm, "aspect_ratio": r.aspect_ratio,
        "orientation_deg": r.orientation_deg,
        "centroid_y": r.centroid_level0.reshape(-1, 2)[:, 0], "centroid_x": r.centroid_level0.reshape(-1, 2)[:, 1],
    }
    origin, scale, halo = placement
    h, w = r.core_labels.shape
    shape = (h + halo[0] + halo[1], w + halo[2] + halo[3])
    core = tile_core_level0(origin, scale, halo, shape)
    scale = (float(scale[0]), float(scale[1]))
    # every piece painted in the core: detections (ids 1..n), then foreign pieces
    moments = _core_moments(r.core_labels, n + len(r.foreign_classes), (core[1], core[0]), scale)
    for k, name in enumerate(PIECE_COLUMNS):
        cols[name] = moments[:n, k].astype(np.int64) if k == 0 else moments[:n, k]
    meta = {
        "level": r.level, "y": r.y, "x": r.x, "modality": r.modality, "pixel_size_nm": r.pixel_size_nm,
        "core_level0": list(core), "read_level0": list(tile_read_level0(origin, scale, shape)),
        "n_defects": n, "core_area_mm2": r.core_area_mm2,
        "defect_density_per_mm2": r.defect_density_per_mm2, "material": r.material, "grade": r.grade,
        "material_probs": json_floats(r.material_probs), "grade_probs": json_floats(r.grade_probs),
        "model_versions": r.model_versions, "label_base": base,
        # [label id, class, x0, y0, x1, y1] of each foreign piece painted in this core
        "foreign": [[base + n + k + 1, int(c), *map(float, b)]
                    for k, (c, b) in enumerate(zip(r.foreign_classes, r.foreign_boxes_level0.reshape(-1, 4)))],
        # their pixel moments, as the detections' piece_* columns (null: NaN), in that order
        "foreign_moments": [json_floats(m) for m in moments[n:]],
        "scale": list(scale),  # level-0 px per tile px (y, x): the pixel the moments count
    }
    return pa.table(cols, schema=DETECTION_SCHEMA), meta


PIECE_COLUMNS = ("piece_px", "piece_cy", "piece_cx", "piece_syy", "piece_sxx", "piece_syx")


def _core_moments(core_labels: np.ndarray, n_ids: int, corner, scale) -> np.ndarray:
    """(n_ids, 6) float64 moments of labels 1..n_ids of a tile's (h, w) core label image
    (`PIECE_COLUMNS`): pixels, mean centre in level-0 edge coordinates and m2 in level-0
    px²; corner: the core's level-0 (y, x), scale: level-0 px per tile px (y, x)."""
    from engine.pipeline.measure import label_moments

    count, centroid, m2 = label_moments(core_labels, n_ids)
    sy, sx = scale
    out = np.empty((n_ids, 6))
    out[:, 0] = count
    out[:, 1] = corner[0] + (centroid[:, 0] + 0.5) * sy
    out[:, 2] = corner[1] + (centroid[:, 1] + 0.5) * sx
    out[:, 3:] = m2 * np.array([sy * sy, sx * sx, sy * sx])
    return out


def conform_detections(table: pa.Table) -> pa.Table:
    """A tile's detections as `DETECTION_SCHEMA`, columns a file written before they
    existed (the piece_* moments) null."""
    if table.schema.equals(DETECTION_SCHEMA):
        return table
    cols = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in DETECTION_SCHEMA]
    return pa.Table.from_arrays(cols, schema=DETECTION_SCHEMA)


@dataclass
class TileDetections:
    """One tile's detections: key (level, y, x), table (`DETECTION_SCHEMA`), meta (the
    tile's values, `tile_detections`)."""

    key: tuple[int, int, int]
    table: pa.Table
    meta: dict[str, Any]


@dataclass(frozen=True)
class _TileArrays:
    """The tiles' detections and placement as arrays, one entry per tile: boxes (N_t, 4)
    level-0 xyxy, scores (N_t,), classes (N_t,) int64, cores and reads level-0 xyxy (a
    tile file from before read regions were recorded: its core, as read without halo)."""

    boxes: list
    scores: list
    classes: list
    cores: list
    reads: list

    @classmethod
    def of(cls, tiles: Sequence[TileDetections]) -> _TileArrays:
        def column(tb: pa.Table, names, dtype) -> np.ndarray:
            return np.stack([tb[c].to_numpy(zero_copy_only=False) for c in names], axis=1).astype(dtype)

        return cls([column(t.table, ("x0", "y0", "x1", "y1"), np.float64) for t in tiles],
                   [t.table["score"].to_numpy(zero_copy_only=False) for t in tiles],
                   [t.table["class"].to_numpy(zero_copy_only=False).astype(np.int64) for t in tiles],
                   [tuple(t.meta["core_level0"]) for t in tiles],
                   [tuple(t.meta.get("read_level0") or t.meta["core_level0"]) for t in tiles])


def stitch_objects(tiles: Sequence[TileDetections], *, iou_threshold: float = 0.5,
                   arrays: _TileArrays | None = None):
    """Objects from the tiles' detections (`engine.tiling.stitch_groups`: the rule of
    `stitch_boxes`), keeping which detections each object was made of.

    Returns (boxes (K, 4) level-0 xyxy, scores (K,), classes (K,), members: K arrays of
    row indices into the concatenated detections), objects best score first. arrays: the
    tiles' `_TileArrays`, when the caller has them already.
    """
    from engine.tiling.stitch import stitch_groups

    a = arrays or _TileArrays.of(tiles)
    got = stitch_groups(a.boxes, a.scores, a.classes, a.cores, a.reads, iou_threshold=iou_threshold)
    o = got.objects
    return o.boxes, o.scores, o.classes, got.members


FOREIGN_HELD = 0.5  # share of a foreign piece inside its owner's detection, both cut to what both tiles read


def join_foreign_pieces(tiles: Sequence[TileDetections], boxes: np.ndarray, members,
                        arrays: _TileArrays | None = None):
    """Each tile's foreign pieces (its core's share of objects other tiles own) joined to
    the object they belong to. The owner is the tile whose core holds the piece's centre;
    both tiles saw the region their reads share, and there the piece and the owner's
    detection of that defect are the same pixels. So, both boxes cut to that region, the
    piece joins the owner's detection of its class that holds at least FOREIGN_HELD of
    it, the one holding most of it and overlapping it best (containment plus IoU: a
    slanted scratch's box holds a piece of its end, but so may a small defect's box
    beside it, which the IoU then tells apart), and with it that detection's object.

    members: per object, row indices into the tiles' detections concatenated (as
    `stitch_objects` returns them); arrays: the tiles' `_TileArrays`, when the caller has
    them. Returns (boxes grown to hold their pieces' shares of their tiles' cores (K, 4), the pieces' label ids per object, whether each box grew:
    its owners did not see all of it). A piece whose owner reported no such detection
    (it missed it, called it another class, or its tile failed) joins none: its pixels
    keep an id that no object lists.
    """
    from engine.tiling.stitch import box_iou, owned

    boxes = np.array(boxes, np.float64).reshape(-1, 4)
    joined: list[list[int]] = [[] for _ in range(len(boxes))]
    grown = np.zeros(len(boxes), bool)
    if not len(boxes) or not any(t.meta.get("foreign") for t in tiles):
        return boxes, joined, grown
    object_of = {int(row): j for j, rows in enumerate(members) for row in rows}
    offsets = np.cumsum([0] + [t.table.num_rows for t in tiles])
    a = arrays or _TileArrays.of(tiles)
    cores, reads = np.array(a.cores, np.float64), np.array(a.reads, np.float64)
    for mine, t in enumerate(tiles):
        for label_id, cls, *piece in t.meta.get("foreign", ()):
            piece = np.asarray(piece, np.float64)
            owner = np.flatnonzero(owned(np.broadcast_to(piece, cores.shape), cores))
            if len(owner) != 1:
                continue
            u = int(owner[0])
            same = a.classes[u] == int(cls)
            if not same.any():
                continue
            rows, theirs = offsets[u] + np.flatnonzero(same), a.boxes[u][same]
            seen = (np.maximum(reads[mine, :2], reads[u, :2]), np.minimum(reads[mine, 2:], reads[u, 2:]))
            mine_b, theirs_b = _clip(piece, seen), _clip(theirs, seen)
            iou = box_iou(mine_b, theirs_b)
            held = _area(_clip(theirs_b, (mine_b[:2], mine_b[2:]))) / max(_area(mine_b), 1e-9)
            score = np.where(held >= FOREIGN_HELD, held + iou, -1.0)
            k = int(np.argmax(score))
            j = object_of.get(int(rows[k]))
            if score[k] < 0 or j is None:
                continue
            joined[j].append(int(label_id))
            # what the piece adds is its share of this tile's core (where it is painted);
            # beyond, it ends where this tile's read did
            share = _clip(piece, (cores[mine, :2], cores[mine, 2:]))
            before = boxes[j].copy()
            boxes[j, :2] = np.minimum(boxes[j, :2], share[:2])
            boxes[j, 2:] = np.maximum(boxes[j, 2:], share[2:])
            grown[j] |= bool((boxes[j] != before).any())
    return boxes, joined, grown


def _area(b: np.ndarray) -> np.ndarray:
    """Areas of xyxy boxes (..., 4); 0 for empty ones."""
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def _clip(b: np.ndarray, region) -> np.ndarray:
    """xyxy boxes (..., 4) cut to `region` ((x0, y0), (x1, y1))."""
    return np.concatenate([np.maximum(b[..., :2], region[0]), np.minimum(b[..., 2:], region[1])], axis=-1)


class PieceMoments:
    """The pixel moments of every piece the tiles painted in their cores, by label id:
    their detections' (`DETECTION_SCHEMA` piece_* columns) and their foreign pieces'
    (meta ``foreign_moments``), in level-0 units; the moments of an object's pieces
    summed are its whole mask's, as the cores partition the image.

    rows: label id -> (6,) float64 (`PIECE_COLUMNS`); scale: level-0 px per tile px (y, x),
    the pixel the moments count (None: the tiles disagree or did not record it).
    """

    def __init__(self, rows: dict[int, np.ndarray], scale: tuple[float, float] | None):
        self.rows, self.scale = rows, scale

    @classmethod
    def of(cls, tiles: Sequence[TileDetections]) -> PieceMoments:
        """Of the tiles' detections; a tile written before moments were recorded adds none."""
        found: list[tuple[int, np.ndarray]] = []
        scales = {tuple(float(v) for v in t.meta["scale"]) for t in tiles if t.meta.get("scale")}
        for t in tiles:
            tb = t.table
            if tb.num_rows and all(c in tb.column_names for c in PIECE_COLUMNS):
                m = np.stack([tb[c].to_numpy(zero_copy_only=False).astype(np.float64) for c in PIECE_COLUMNS], 1)
                found += [(int(i), row) for i, row in zip(tb["label_id"].to_numpy(zero_copy_only=False), m)]
            foreign, moments = t.meta.get("foreign") or [], t.meta.get("foreign_moments")
            if moments is not None and len(moments) == len(foreign):
                found += [(int(i), np.array([np.nan if v is None else v for v in row], np.float64))
                          for (i, *_), row in zip(foreign, moments)]
        # ids are unique in an image where tiles were given their bases (a sink without
        # label targets gives none): an id twice names no one piece, so none is kept
        ids, times = np.unique([i for i, _ in found], return_counts=True)
        twice = set(ids[times > 1].tolist())
        return cls({i: row for i, row in found if i not in twice}, scales.pop() if len(scales) == 1 else None)

    def __call__(self, label_ids, pixel_nm) -> tuple[Any, tuple[float, float]] | None:
        """(Measurements of the object made of pieces `label_ids`, its centroid in level-0
        edge coordinates (y, x)), measured at the tiles' pixel size (pixel_nm: the level-0
        (y, x) pixel size, nm); None when a piece's moments are unknown or it has no pixels."""
        from engine.pipeline.measure import measure_moments, pool_moments

        if self.scale is None or not len(label_ids) or any(int(i) not in self.rows for i in label_ids):
            return None
        m = np.stack([self.rows[int(i)] for i in label_ids])
        if not np.isfinite(m[:, [0, 3, 4, 5]]).all():
            return None  # a tile file written before the moments (its columns null)
        n, centroid, m2 = pool_moments(m[:, 0], m[:, 1:3], m[:, 3:])
        if n == 0:
            return None
        sy, sx = self.scale
        # level-0 px² back to tile px²: the tile pixel is the one measured, as each
        # detection's own measurements are (its pixel-square term is that pixel's)
        tile_m2 = m2 / np.array([sy * sy, sx * sx, sy * sx])
        got = measure_moments([n], centroid[None], tile_m2[None], (pixel_nm[0] * sy, pixel_nm[1] * sx))
        return got, (float(centroid[0]), float(centroid[1]))


class WholeObjects:
    """Objects of several pieces measured on a label image (instance ids): the pixels
    holding any of the pieces' label ids around the object's box. `objects_table` needs
    it only for tiles written before their pieces' moments were; the endpoint cuts each
    object's mask from it (`mask`).

    labels: (H, W) integer ids at one level's pixels, anything sliceable with a `shape`
    (the job's label image in its store, `TileLabels` for the endpoint's tiles);
    transform: that level's `engine.tiling.transform.LevelTransform`.
    """

    PAD = 8  # level pixels around the box: a mask may reach a little past its prompt box

    def __init__(self, labels, transform):
        self.array = labels
        self.transform = transform

    def mask(self, box, label_ids) -> tuple[int, int, np.ndarray]:
        """(y, x) of a window around level-0 xyxy `box` in the label image's pixels, and
        the (h, w) bool mask of the pixels there holding any of `label_ids`."""
        x0, y0, x1, y1 = box
        (ly0, lx0), (ly1, lx1) = self.transform.from_level0(y0, x0), self.transform.from_level0(y1, x1)
        h, w = self.array.shape
        ly0, lx0 = max(0, int(math.floor(ly0)) - self.PAD), max(0, int(math.floor(lx0)) - self.PAD)
        ly1, lx1 = min(h, int(math.ceil(ly1)) + self.PAD), min(w, int(math.ceil(lx1)) + self.PAD)
        return ly0, lx0, np.isin(self.array[ly0:ly1, lx0:lx1], np.asarray(label_ids, np.int64))

    def __call__(self, box, label_ids) -> tuple[Any, tuple[float, float]]:
        """(Measurements of one object, its centroid in level-0 edge coordinates (y, x))."""
        from engine.pipeline.measure import measure_masks

        ly0, lx0, mask = self.mask(box, label_ids)
        m = measure_masks(mask[None], self.transform.level_pixel_size_nm)
        cy, cx = m.centroid[0]
        return m, self.transform.to_level0(ly0 + cy + 0.5, lx0 + cx + 0.5)


class TileLabels:
    """Tiles' core label images side by side as one label image over their grid, with ids
    unique in the image (each tile's ids offset by its base, as the job's label image
    holds them), assembled only where sliced: for tiles held in memory (the endpoint).

    cores: per tile (h_t, w_t) integer labels (0 background, detection j is j + 1, then
    the foreign pieces); corners: level-0 (y, x) of each core's corner; scale: level-0 px
    per tile px (y, x), the same for every tile; bases: per tile, the offset of its ids.
    """

    def __init__(self, cores: Sequence[np.ndarray], corners, scale, bases):
        scale = np.asarray(scale, np.float64).reshape(2)
        corners = np.asarray(corners, np.float64).reshape(-1, 2)
        self.cores, self.bases = list(cores), [int(b) for b in bases]
        self.scale = (float(scale[0]), float(scale[1]))
        # a resampled image's pixels may start a fraction of a level-0 pixel off its corner
        first = corners.min(axis=0) if len(corners) else np.zeros(2)
        shift = first - np.round(first / scale) * scale
        self.shift = (float(shift[0]), float(shift[1]))
        self.at = np.round((corners - shift) / scale).astype(np.int64)  # (T, 2) each core's (y, x) in the grid
        self.end = self.at + np.array([c.shape for c in self.cores], np.int64).reshape(-1, 2)  # (T, 2)
        self.shape = tuple(int(v) for v in self.end.max(axis=0)) if len(self.cores) else (0, 0)

    def transform(self, level0_pixel_size_nm) -> LevelTransform:
        """The grid's placement: level-0 px = grid px * scale + shift."""
        return LevelTransform(factor=self.scale, shift=self.shift,
                              pixel_size_nm=tuple(float(v) for v in level0_pixel_size_nm))

    def __getitem__(self, key) -> np.ndarray:
        ys, xs = key
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        out = np.zeros((max(y1 - y0, 0), max(x1 - x0, 0)), np.int64)
        # only the cores the window meets (an object's window meets a few of many tiles)
        hits = np.flatnonzero((self.at[:, 0] < y1) & (self.end[:, 0] > y0) & (self.at[:, 1] < x1) & (self.end[:, 1] > x0))
        for t in hits:
            (ty, tx), core, base = self.at[t], self.cores[t], self.bases[t]
            a0, a1 = max(y0, ty), min(y1, ty + core.shape[0])
            b0, b1 = max(x0, tx), min(x1, tx + core.shape[1])
            piece = core[a0 - ty : a1 - ty, b0 - tx : b1 - tx].astype(np.int64)
            out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = np.where(piece > 0, piece + base, 0)
        return out


def objects_table(detections: pa.Table, boxes, scores, classes, members, class_names, pixel_nm,
                   whole: WholeObjects | None = None, foreign_ids=None, grown=None,
                   pieces: PieceMoments | None = None) -> pa.Table:
    """One `OBJECT_SCHEMA` row per object (boxes (K, 4) level-0 xyxy, scores, classes and
    members as `stitch_objects` returns them) from the tiles' detections concatenated.
    pixel_nm: (y, x) level-0 pixel size, nm. An object of several pieces, or one that
    foreign pieces grew (grown (K,) bool; foreign_ids: their label ids per object,
    `join_foreign_pieces`), is measured whole from its pieces' moments (`pieces`), or,
    where a piece's are unknown (an older tile file), on the label image `whole`."""
    area = detections["area_nm2"].to_numpy(zero_copy_only=False) if detections.num_rows else np.zeros(0)
    rows: dict[str, list] = {name: [] for name in OBJECT_SCHEMA.names}
    shape_cols = ("area_nm2", "area_um2", "equivalent_diameter_nm", "major_axis_nm", "minor_axis_nm",
                  "aspect_ratio", "orientation_deg")
    col = {name: detections[name].to_numpy(zero_copy_only=False) for name in
           (*shape_cols, "centroid_y", "centroid_x", "label_id")} if detections.num_rows else {}
    py, px = pixel_nm
    for j, (box, score, cls, rows_j) in enumerate(zip(boxes, scores, classes, members)):
        rows_j = np.sort(rows_j)
        a = np.nan_to_num(area[rows_j], nan=0.0)
        largest = rows_j[int(np.argmax(a))] if len(rows_j) else None
        w = a if a.sum() > 0 else np.ones(len(rows_j))
        rows["object_id"].append(j)
        rows["class"].append(int(cls))
        rows["class_name"].append(class_name(int(cls), class_names))
        rows["score"].append(float(score))
        for name, v in zip(("x0", "y0", "x1", "y1"), box):
            rows[name].append(float(v))
        for name, v, p in zip(("x0_nm", "y0_nm", "x1_nm", "y1_nm"), box, (px, py, px, py)):
            rows[name].append(float(v) * p)
        rows["parts"].append(int(len(rows_j)))
        ids = [int(v) for v in col["label_id"][rows_j]] if len(rows_j) else []
        ids += foreign_ids[j] if foreign_ids else []
        rows["label_ids"].append(ids)
        # Pieces from several tiles, or an object its owner saw only in part (foreign
        # pieces grew its box): measured whole from what the tiles painted of it. The
        # moments first: no label image to read, and measured at the tiles' pixels like
        # every detection (a label image of a resampled level holds a nearest-neighbour
        # copy of them); identical to the label image's measurement otherwise.
        if len(rows_j) > 1 or (grown is not None and grown[j]):
            got = pieces(ids, pixel_nm) if pieces is not None else None
            if got is None and whole is not None:
                got = whole(box, ids)
            if got is not None and got[0].area_px[0] > 0:
                m, centroid = got
                for name in shape_cols:
                    rows[name].append(float(getattr(m, name)[0]))
                for name, v in zip(("centroid_y", "centroid_x"), centroid):
                    rows[name].append(float(v))
                continue
        for name in shape_cols:
            rows[name].append(float(col[name][largest]) if largest is not None else math.nan)
        for name in ("centroid_y", "centroid_x"):
            rows[name].append(float(np.average(col[name][rows_j], weights=w)) if len(rows_j) else math.nan)
    return pa.table(rows, schema=OBJECT_SCHEMA)


def image_objects(tiles: Sequence[TileDetections], class_names: Sequence[str], pixel_nm,
                  whole: WholeObjects | None = None, *, iou_threshold: float = 0.5) -> pa.Table:
    """An image's objects (`OBJECT_SCHEMA`) from its tiles' detections: stitched across
    tile borders, joined with the foreign pieces, measured whole from the pieces' moments
    (for tiles written before those were recorded: on `whole`, where given)."""
    tiles = [TileDetections(t.key, conform_detections(t.table), t.meta) for t in tiles]
    arrays = _TileArrays.of(tiles)  # for both steps
    boxes, scores, classes, members = stitch_objects(tiles, iou_threshold=iou_threshold, arrays=arrays)
    boxes, foreign_ids, grown = join_foreign_pieces(tiles, boxes, members, arrays)
    detections = pa.concat_tables([t.table for t in tiles]) if tiles else DETECTION_SCHEMA.empty_table()
    return objects_table(detections, boxes, scores, classes, members, list(class_names), pixel_nm, whole,
                         foreign_ids, grown, PieceMoments.of(tiles))
