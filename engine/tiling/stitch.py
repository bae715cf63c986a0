"""Stitching per-tile results into per-image results, in level-0 coordinates.

Boxes (all xyxy, edge coordinates, see `engine.tiling.transform`):

1. *Ownership*: a tile keeps a box only if the box's centre lies in its core (half-open
   ``[x0, x1) x [y0, y1)`` in level 0). Cores partition the image, so a defect the model
   sees twice (in one tile's core and in its neighbour's halo) is kept once.
2. *Border merge*: a defect cut by a core border can leave a piece in each tile whose
   centres fall on either side. Each tile saw its core and a halo around it, so a piece
   is *cut* only where it reaches the edge of what its tile read (within `touch` level-0
   pixels, or half that side's halo if more): a box that ends well inside the halo was
   seen whole there and is an object of its own, however close to the border. Cut
   pieces of one class on either side of a border line L, from tiles whose cores touch
   along L, pair up by their extents along L (both pieces cover the strip both tiles
   read, where a slanted defect's pieces overlap only partly): mutual best matches by
   IoU first, so two parallel cut scratches stay two objects; then a piece left over
   joins the piece across that holds most of its extent (the arms of a U whose bottom
   the other tile saw whole). Paired pieces are merged (their union, the higher score),
   transitively (union-find) across borders, so a defect cut at a corner into four
   pieces becomes one box.
3. *NMS*: class-aware greedy non-maximum suppression in level-0 coordinates removes
   what is left of duplicates (e.g. two full views of one defect centred on a border).

Masks: `crop_to_core` cuts a tile's mask to its core, so each tile writes only its own
chunk-aligned core and every output chunk has exactly one writer.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TileBoxes:
    """Detections of one tile, already mapped to level 0 (`TileSpec.boxes_to_level0`).

    core: the tile's core, level-0 xyxy (`TileSpec.core_level0()`).
    boxes: N x 4 float xyxy in level-0 pixels; scores: N floats; classes: N ints.
    read: what the tile read, core plus halo, level-0 xyxy (`TileSpec.read_level0()`);
    None: the core (no halo).
    """

    core: tuple[float, float, float, float]
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    read: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class StitchedBoxes:
    """One image's objects: boxes N x 4 float64 level-0 xyxy, scores N, classes N int64;
    parts: N ints, how many tile boxes were merged into each object."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    parts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.boxes)


def tile_boxes_to_level0(boxes: np.ndarray, origin, scale) -> np.ndarray:
    """N x 4 xyxy boxes in tile pixels -> level-0 xyxy float64, for a tile placed by
    `origin` (level-0 y, x of its top-left corner) and `scale` (level-0 pixels per tile
    pixel, y and x): the datasource's `origin` and `scale` columns."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    (oy, ox), (sy, sx) = origin, scale
    return b * np.array([sx, sy, sx, sy]) + np.array([ox, oy, ox, oy])


def tile_core_level0(origin, scale, halo, shape) -> tuple[float, float, float, float]:
    """The core (level-0 xyxy) of a tile of `shape` (H, W) read with `halo` and placed by
    `origin` and `scale` (see `tile_boxes_to_level0`): what `stitch_boxes` needs per tile."""
    (oy, ox), (sy, sx) = origin, scale
    top, bottom, left, right = (int(v) for v in halo)
    h, w = shape
    return (float(ox + left * sx), float(oy + top * sy), float(ox + (w - right) * sx), float(oy + (h - bottom) * sy))


def tile_read_level0(origin, scale, shape) -> tuple[float, float, float, float]:
    """What a tile of `shape` (H, W) placed by `origin` and `scale` read (core and halo),
    level-0 xyxy (see `tile_boxes_to_level0`)."""
    (oy, ox), (sy, sx) = origin, scale
    h, w = shape
    return (float(ox), float(oy), float(ox + w * sx), float(oy + h * sy))


def crop_to_core(array: np.ndarray, halo: tuple[int, int, int, int]) -> np.ndarray:
    """The core of a (..., H, W) tile array read with `halo` (top, bottom, left, right)."""
    top, bottom, left, right = (int(v) for v in halo)
    h, w = array.shape[-2:]
    if top + bottom > h or left + right > w:
        raise ValueError(f"halo {tuple(halo)} is larger than the tile {array.shape[-2:]}")
    return array[..., top : h - bottom, left : w - right]


def owned(boxes: np.ndarray, core: tuple[float, float, float, float]) -> np.ndarray:
    """Boolean mask of the boxes (N x 4 level-0 xyxy) whose centre lies in `core` (half
    open): one xyxy core, or N of them (N x 4), one per box."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    x0, y0, x1, y1 = np.asarray(core, dtype=np.float64).T
    return (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)


def stitch_boxes(tiles, *, iou_threshold: float = 0.5, touch: float = 1.0) -> StitchedBoxes:
    """Per-tile detections (an iterable of `TileBoxes`) -> one set of objects for the image.

    touch: how close (level-0 pixels) a box edge must come to the edge of what its tile
    read to count as cut, at least (see the module doc).
    """
    boxes, scores, classes, cores, reads = [], [], [], [], []
    for t in tiles:
        b = np.asarray(t.boxes, dtype=np.float64).reshape(-1, 4)
        boxes.append(b)
        scores.append(np.asarray(t.scores, dtype=np.float64).reshape(-1))
        classes.append(np.asarray(t.classes, dtype=np.int64).reshape(-1))
        cores.append(t.core)
        reads.append(t.core if t.read is None else t.read)
    merged = stitch_groups(boxes, scores, classes, cores, reads, iou_threshold=iou_threshold, touch=touch)
    return merged.objects


@dataclass(frozen=True)
class StitchedGroups:
    """`StitchedBoxes` and which input boxes each object was made of.

    members: one int64 array per object, indices into the tiles' boxes concatenated in
    input order (every box, owned or not)."""

    objects: StitchedBoxes
    members: list


def stitch_groups(boxes, scores, classes, cores, reads, *, iou_threshold: float = 0.5,
                  touch: float = 1.0) -> StitchedGroups:
    """The stitching rule of the module doc over per-tile arrays.

    boxes[t]: N_t x 4 level-0 xyxy of tile t; scores[t], classes[t]: N_t; cores[t],
    reads[t]: tile t's core and read region, level-0 xyxy. Objects best score first.
    """
    sizes = [len(np.asarray(b).reshape(-1, 4)) for b in boxes]
    if not sum(sizes):
        empty = StitchedBoxes(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))
        return StitchedGroups(empty, [])
    b = np.concatenate([np.asarray(v, np.float64).reshape(-1, 4) for v in boxes])
    s = np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in scores])
    c = np.concatenate([np.asarray(v, np.int64).reshape(-1) for v in classes])
    tile = np.repeat(np.arange(len(sizes)), sizes)
    k = np.asarray(cores, np.float64).reshape(-1, 4)[tile]
    r = np.asarray(reads, np.float64).reshape(-1, 4)[tile]
    rows = np.flatnonzero(owned(b, k))
    b, s, c, k, r, tile = b[rows], s[rows], c[rows], k[rows], r[rows], tile[rows]
    groups = _border_groups(b, c, k, r, tile, touch=touch)
    mb, ms, mc, parts = _merge_groups(b, s, c, groups)
    _, inverse = np.unique(groups, return_inverse=True)
    keep = nms(mb, ms, mc, iou_threshold)
    members = [rows[np.flatnonzero(inverse == g)] for g in keep]
    return StitchedGroups(StitchedBoxes(mb[keep], ms[keep], mc[keep], parts[keep]), members)


HALO_TOUCH = 0.5  # of a side's halo: how far short of the read edge a cut piece's box may end
CONTAINED = 0.5  # share of a leftover piece's extent along the border inside another piece's


def _border_groups(boxes, classes, cores, reads, tiles, *, touch: float) -> np.ndarray:
    """Union-find group id per box, joining pieces of one defect cut by core borders."""
    parent = np.arange(len(boxes))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    # A box is cut on a side when it reaches the edge of what its tile read there; a
    # detector's box of a cut object may end a little short of it (half the halo). An
    # object seen whole ends inside the halo, and even one taken for cut there merges
    # only with a cut piece of the neighbour that it overlaps.
    reach = np.maximum(touch, HALO_TOUCH * np.abs(reads - cores))
    cut_hi = boxes[:, 2:] >= reads[:, 2:] - reach[:, 2:]  # right (x), bottom (y)
    cut_lo = boxes[:, :2] <= reads[:, :2] + reach[:, :2]  # left (x), top (y)
    # Bucket cut boxes by the border line they are cut at, the side they come from and
    # their tile: only boxes on opposite sides of one line can be pieces of one defect.
    # Neighbours compute a shared border in different float expressions (resampled tiles:
    # origin + n * a non-integer scale), so lines are matched to within LINE_TOLERANCE px.
    line_ids = {"x": _line_ids(cores[:, [0, 2]]), "y": _line_ids(cores[:, [1, 3]])}
    sides: dict[tuple, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for axis, a in (("x", 0), ("y", 1)):
        ids = line_ids[axis]
        for i in np.flatnonzero(cut_hi[:, a]):
            sides[(axis, ids[i, 1])][0].append(int(i))
        for i in np.flatnonzero(cut_lo[:, a]):
            sides[(axis, ids[i, 0])][1].append(int(i))
    for (axis, _), (before, after) in sides.items():
        if not before or not after:
            continue
        # one tile on each side at a time (a line runs along many tiles), and only tiles
        # whose cores meet along the line: pieces of others cannot be one defect
        lo, hi = (1, 3) if axis == "x" else (0, 2)  # along the line: y for a vertical one
        ga, gb = _by_tile(np.array(before, np.int64), tiles), _by_tile(np.array(after, np.int64), tiles)
        ka, kb = cores[[g[0] for g in ga]], cores[[g[0] for g in gb]]
        meet = (ka[:, None, lo] <= kb[None, :, hi]) & (kb[None, :, lo] <= ka[:, None, hi])
        for i, j in zip(*np.nonzero(meet)):
            _pair_pieces(boxes, classes, ga[i], gb[j], axis, join)
    return np.array([find(i) for i in range(len(boxes))], dtype=np.int64)


def _by_tile(pieces: np.ndarray, tiles: np.ndarray) -> list[np.ndarray]:
    """`pieces` (box indices) grouped by their tile, tiles in increasing order."""
    tile_ids, which = np.unique(tiles[pieces], return_inverse=True)
    return [pieces[which == k] for k in range(len(tile_ids))]


def _pair_pieces(boxes, classes, a, b, axis: str, join) -> None:
    """Join the cut pieces `a` of one tile with the cut pieces `b` of a neighbour whose
    core meets it along one border line (`axis` "x": a vertical line).

    Each piece covers the strip both tiles read, so a defect's two pieces overlap along
    the line there, but a slanted one's only partly. First, mutual best matches by IoU of
    their extents along the line (a diagonal scratch's pieces; two parallel scratches
    stay two). Then a piece left over joins the piece across that holds most of its
    extent (one arm of a U whose bottom the other tile saw whole)."""
    lo, hi = (1, 3) if axis == "x" else (0, 2)  # along the line: y for a vertical one
    ba, bb = boxes[a][:, None, :], boxes[b][None, :, :]
    overlap = np.minimum(ba[..., hi], bb[..., hi]) - np.maximum(ba[..., lo], bb[..., lo])
    length_a, length_b = ba[..., hi] - ba[..., lo], bb[..., hi] - bb[..., lo]
    ok = (classes[a][:, None] == classes[b][None, :]) & (overlap > 0)
    if not ok.any():
        return
    iou = np.where(ok, overlap / np.maximum(length_a + length_b - overlap, 1e-9), -1.0)
    best_b, best_a = iou.argmax(axis=1), iou.argmax(axis=0)
    paired_a, paired_b = np.zeros(len(a), bool), np.zeros(len(b), bool)
    for i, j in enumerate(best_b):
        if iou[i, j] > 0 and best_a[j] == i:
            join(a[i], b[j])
            paired_a[i] = paired_b[j] = True
    contained_a = np.where(ok, overlap / np.maximum(length_a, 1e-9), 0.0)  # of a's extent, inside b's
    contained_b = np.where(ok, overlap / np.maximum(length_b, 1e-9), 0.0)
    for i in np.flatnonzero(~paired_a):
        held = contained_a[i] >= CONTAINED
        if held.any():
            join(a[i], b[int(np.argmax(np.where(held, iou[i], -1.0)))])
    for j in np.flatnonzero(~paired_b):
        held = contained_b[:, j] >= CONTAINED
        if held.any():
            join(b[j], a[int(np.argmax(np.where(held, iou[:, j], -1.0)))])


LINE_TOLERANCE = 1e-6  # level-0 px: border coordinates closer than this are one line


def _line_ids(edges: np.ndarray) -> np.ndarray:
    """An integer id per border coordinate (same shape as `edges`), equal for coordinates
    within LINE_TOLERANCE of each other (runs of sorted values closer than it)."""
    flat = edges.ravel()
    if flat.size == 0:
        return np.zeros(edges.shape, np.int64)
    order = np.argsort(flat, kind="stable")
    run = np.concatenate([[0], np.cumsum(np.diff(flat[order]) > LINE_TOLERANCE)])
    ids = np.empty(flat.size, np.int64)
    ids[order] = run
    return ids.reshape(edges.shape)


def _merge_groups(boxes, scores, classes, groups):
    ids, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    n = len(ids)
    out = np.empty((n, 4))
    out[:, :2] = np.inf
    out[:, 2:] = -np.inf
    np.minimum.at(out[:, 0], inverse, boxes[:, 0])
    np.minimum.at(out[:, 1], inverse, boxes[:, 1])
    np.maximum.at(out[:, 2], inverse, boxes[:, 2])
    np.maximum.at(out[:, 3], inverse, boxes[:, 3])
    best = np.full(n, -np.inf)
    np.maximum.at(best, inverse, scores)
    cls = np.zeros(n, np.int64)
    cls[inverse] = classes  # one class per group: merging is class-aware
    return out, best, cls, counts.astype(np.int64)


def box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of M boxes (M x 4)."""
    ix = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float = 0.5) -> np.ndarray:
    """Indices of the boxes kept by class-aware greedy NMS, best score first.

    Candidates for suppression are found through boxes sorted by x0 (a box can only
    overlap boxes whose x0 lies within the widest box's width of its own), so an image
    with many objects costs about N log N, not N**2.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    classes = np.asarray(classes).reshape(-1)
    kept: list[int] = []
    for cls in np.unique(classes):
        idx = np.nonzero(classes == cls)[0]
        b = boxes[idx]
        by_x = np.argsort(b[:, 0], kind="stable")
        x0_sorted = b[by_x, 0]
        widest = float((b[:, 2] - b[:, 0]).max()) if len(b) else 0.0
        alive = np.ones(len(idx), bool)
        for i in np.lexsort((idx, -scores[idx])):  # score descending, index breaks ties
            if not alive[i]:
                continue
            kept.append(int(idx[i]))
            lo = np.searchsorted(x0_sorted, b[i, 0] - widest, "left")
            hi = np.searchsorted(x0_sorted, b[i, 2], "right")
            cand = by_x[lo:hi]
            cand = cand[alive[cand] & (cand != i)]
            if len(cand):
                alive[cand[box_iou(b[i], b[cand]) > iou_threshold]] = False
    kept.sort(key=lambda j: (-scores[j], j))
    return np.array(kept, dtype=np.int64)
