"""The ensemble's tile results -> the JSON answer of POST /v1/analyze.

Coordinates: boxes are xyxy edge coordinates in level-0 pixels of the uploaded image
(`box_px`) and in nm from its top-left corner (`box_nm`); centroids (y, x) likewise.
Masks are run-length encoded per detection (`rle_encode`): the detection's pixels in
the tile core that reported it, cropped to their bounding rectangle, placed by
`origin_px` (level-0 (y, x) of the crop's corner) and `scale` (level-0 px per mask px).
The core's corner is where the tile's boxes put it (`core_corner`): for a tile
resampled to the models' pixel size, a fraction of a pixel off the tile's key.

Image-level material and grade follow the batch job's per-image summary
(`engine.data.sinks`): argmax of the tiles' probabilities averaged with core-area weights.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from engine.pipeline.results import MEASUREMENT_COLUMNS, TileResult


def rle_encode(mask: np.ndarray) -> list[int]:
    """(h, w) bool -> run lengths over the row-major pixels, starting with a run of
    False (possibly 0): [n_false, n_true, n_false, ...]; they add up to h * w."""
    flat = np.asarray(mask, bool).ravel()
    if flat.size == 0:
        return []
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return runs if not flat[0] else [0, *runs]


def rle_decode(counts: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Inverse of `rle_encode`: (h, w) bool."""
    flat = np.zeros(int(size[0]) * int(size[1]), bool)
    pos, value = 0, False
    for n in counts:
        if value:
            flat[pos : pos + n] = True
        pos += n
        value = not value
    return flat.reshape(int(size[0]), int(size[1]))


def paint_mask(canvas: np.ndarray, mask: dict[str, Any], value) -> np.ndarray:
    """Set `value` on the pixels of `canvas` (level-0, H x W of the uploaded image) that a
    detection's `mask` (its answer's "mask": origin_px, scale, size, counts) covers, and
    return `canvas`. Mask pixel (r, c) covers level-0 [oy + r sy, oy + (r + 1) sy) x
    [ox + c sx, ox + (c + 1) sx): each canvas pixel takes the mask pixel its centre falls
    in, so any scale (a bundle at another pixel size than the upload) places it right."""
    if not mask.get("counts"):
        return canvas
    (oy, ox), (sy, sx), (h, w) = mask["origin_px"], mask["scale"], mask["size"]
    decoded = rle_decode(mask["counts"], (h, w))
    y0, y1 = max(0, math.floor(oy)), min(canvas.shape[0], math.ceil(oy + h * sy))
    x0, x1 = max(0, math.floor(ox)), min(canvas.shape[1], math.ceil(ox + w * sx))
    if y1 <= y0 or x1 <= x0:
        return canvas
    rows = np.floor((np.arange(y0, y1) + 0.5 - oy) / sy).astype(np.int64)
    cols = np.floor((np.arange(x0, x1) + 0.5 - ox) / sx).astype(np.int64)
    inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
    hit = decoded[np.ix_(np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1))] & inside
    canvas[y0:y1, x0:x1][hit] = value
    return canvas


def _num(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def core_corner(tile) -> tuple[float, float]:
    """Level-0 (y, x) of the corner of a tile's core (a `TileInput`): its origin plus the
    top and left halo in tile pixels, the placement its boxes get
    (`engine.tiling.stitch.tile_core_level0`). The tile's key (y, x) is this corner only
    where the tile is not resampled: a resampled core starts a fraction of a pixel off it."""
    (oy, ox), (sy, sx) = tile.origin, tile.scale
    top, _, left, _ = tile.halo
    return float(oy + top * sy), float(ox + left * sx)


def _rle_mask(sel: np.ndarray, corner_of, scale) -> dict[str, Any]:
    """The answer's RLE mask of the True pixels of `sel` (h, w): cropped to their extent,
    placed at `corner_of(y, x)` (level-0 (y, x) of pixel (y, x)'s corner), `scale`
    level-0 px per mask px (y, x)."""
    ys, xs = np.nonzero(sel)
    if len(ys) == 0:
        return {"origin_px": None, "scale": None, "size": [0, 0], "counts": []}
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    top, left = corner_of(y0, x0)
    return {"origin_px": [float(top), float(left)], "scale": [float(scale[0]), float(scale[1])],
            "size": [int(y1 - y0), int(x1 - x0)], "counts": rle_encode(sel[y0:y1, x0:x1])}


def _mask_of(r: TileResult, j: int, scale: tuple[float, float], corner: tuple[float, float]) -> dict[str, Any]:
    top, left = float(corner[0]), float(corner[1])
    sy, sx = float(scale[0]), float(scale[1])
    return _rle_mask(r.core_labels == j + 1, lambda y, x: (top + y * sy, left + x * sx), (sy, sx))


def detections(r: TileResult, class_names: Sequence[str], scale: tuple[float, float],
               corner: tuple[float, float]) -> list[dict[str, Any]]:
    """The detections of one tile; scale: level-0 px per tile px (y, x), the tile's;
    corner: level-0 (y, x) of its core's corner (`core_corner`)."""
    from engine.data.objects import class_name

    out = []
    for j in range(r.n_defects):
        c = int(r.classes[j])
        d = {
            "tile": [int(r.y), int(r.x)],
            "class_id": c,
            "class": class_name(c, class_names),
            "score": float(r.scores[j]),
            "box_px": [float(v) for v in r.boxes_level0[j]],
            "box_nm": [float(v) for v in r.boxes_nm[j]],
            "mask_score": _num(r.mask_scores[j]),
            "mask_from_box": bool(r.mask_from_box[j]),
            "centroid_px": [_num(v) for v in r.centroid_level0[j]],
            "mask": _mask_of(r, j, scale, corner),
        }
        for name in MEASUREMENT_COLUMNS:
            d[name] = _num(getattr(r, name)[j])
        out.append(d)
    return out


def _weighted(results: Sequence[TileResult], key: str, n: int) -> np.ndarray:
    from engine.data.sinks import _weighted_probs  # the job's rule, so both agree

    metas = [{key: [float(v) for v in getattr(r, key)], "core_area_mm2": r.core_area_mm2} for r in results]
    return _weighted_probs(metas, key, n)


def analysis(results: Sequence[TileResult], tiles: Sequence[Any], *, class_names: Sequence[str],
             materials: Sequence[str], grades: Sequence[str]) -> dict[str, Any]:
    """The part of the answer that comes from the tile results (model versions, material,
    grade, summary, detections with RLE masks, tile errors): a few kB where the results'
    label images are MBs, so the last model stage sends this, not the results.
    tiles: the `TileInput`s the results came from, in order: their scale and core corner
    (`core_corner`) place the masks as the boxes are placed."""
    if len(results) != len(tiles):
        raise ValueError(f"analysis: {len(results)} results of {len(tiles)} tiles; give the tile of each result")
    ok = [(r, t) for r, t in zip(results, tiles) if r.ok]
    dets = [d for r, t in ok for d in detections(r, class_names, t.scale, core_corner(t))]
    found = objects([r for r, _ in ok], [t for _, t in ok], class_names)
    ok = [r for r, _ in ok]
    area = float(sum(r.core_area_mm2 for r in ok))
    mp = _weighted(ok, "material_probs", len(materials))
    gp = _weighted(ok, "grade_probs", len(grades))
    has_m, has_g = len(mp) and np.isfinite(mp).all(), len(gp) and np.isfinite(gp).all()
    versions = dict(results[0].model_versions) if results else {}
    return {
        "model": {"bundle": versions.get("bundle"), "versions": versions},
        "material": {"name": materials[int(np.argmax(mp))] if has_m else None,
                     "probs": {m: float(p) for m, p in zip(materials, mp)} if has_m else {}},
        "grade": {"name": grades[int(np.argmax(gp))] if has_g else None,
                  "probs": {g: float(p) for g, p in zip(grades, gp)} if has_g else {}},
        "summary": {"n_defects": len(found), "n_detections": len(dets), "area_mm2": area,
                    "defect_density_per_mm2": len(found) / area if area > 0 else None,
                    "tiles": len(results), "tiles_failed": len(results) - len(ok)},
        "detections": dets,
        "objects": found,
        "tile_errors": [{"tile": [int(r.y), int(r.x)], "error": r.error} for r in results if not r.ok],
    }


def objects(results: Sequence[TileResult], tiles: Sequence[Any], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The image's defects as the batch job reports them (`engine.data.objects.image_objects`):
    pieces of a defect cut by a tile border stitched into one object, the pieces other
    tiles painted of it joined, and an object of several pieces measured whole on the
    tiles' cores side by side. Best score first; `detections`: indices into the answer's
    detections (the results' detections in order) it was made of. results, tiles: the
    successful tiles' results and their `TileInput`s (one image: one scale)."""
    from engine.data.objects import (
        TileDetections, TileLabels, WholeObjects, class_name, image_objects, tile_detections,
    )

    if not results:
        return []
    # each tile's label ids after the previous tiles' detections and foreign pieces
    bases = np.cumsum([0] + [r.n_defects + len(r.foreign_classes) for r in results])[:-1]
    tiled = [TileDetections((r.level, r.y, r.x), *tile_detections(r, int(base), (t.origin, t.scale, t.halo),
                                                                   class_names))
             for r, t, base in zip(results, tiles, bases)]
    level0_nm = tiles[0].level0_pixel_size_nm  # every tile of an image shares it
    labels = TileLabels([r.core_labels for r in results], [core_corner(t) for t in tiles], tiles[0].scale, bases)
    whole = WholeObjects(labels, labels.transform(level0_nm))
    table = image_objects(tiled, class_names, level0_nm, whole)
    row_of = {int(i): k for k, i in enumerate(np.concatenate([t.table["label_id"].to_numpy() for t in tiled]))}
    out = []
    for o in table.to_pylist():
        c, box = int(o["class"]), [o[k] for k in ("x0", "y0", "x1", "y1")]
        d = {"class_id": c, "class": class_name(c, class_names), "score": float(o["score"]), "box_px": box,
             "box_nm": [o[k] for k in ("x0_nm", "y0_nm", "x1_nm", "y1_nm")],
             "parts": int(o["parts"]), "detections": [row_of[i] for i in o["label_ids"] if i in row_of],
             "centroid_px": [_num(o["centroid_y"]), _num(o["centroid_x"])],
             "mask": _object_mask(whole, box, o["label_ids"])}
        for name in MEASUREMENT_COLUMNS:
            d[name] = _num(o[name])
        out.append(d)
    return out


def _object_mask(whole, box, label_ids) -> dict[str, Any]:
    """The RLE mask (as a detection's) of every pixel of one object: its pieces in their
    own tiles' cores and the parts other tiles painted of it."""
    ly0, lx0, mask = whole.mask(box, label_ids)
    return _rle_mask(mask, lambda y, x: whole.transform.to_level0(ly0 + y, lx0 + x), whole.transform.factor)


def image_info(pixels: np.ndarray, *, format: str, sha256: str, modality: str,
               pixel_size_yx_nm: tuple[float, float], pixel_size_source: str, level: int,
               level_pixel_size_yx_nm: tuple[float, float]) -> dict[str, Any]:
    """The answer's "image" (`engine.serving.schemas.ImageInfo`): the upload's (H, W)
    `pixels` as decoded, its (y, x) pixel size (nm) and where that came from, and the
    pyramid level the models' tiles were read at with their (y, x) pixel size (nm).
    Each size is reported as `pixel_size_nm` (x, the one number of square pixels) and
    `pixel_size_y_nm`."""
    h, w = pixels.shape
    return {"height": int(h), "width": int(w), "dtype": str(pixels.dtype), "format": format, "sha256": sha256,
            "modality": modality, "pixel_size_nm": float(pixel_size_yx_nm[1]),
            "pixel_size_y_nm": float(pixel_size_yx_nm[0]), "pixel_size_source": pixel_size_source,
            "level": int(level), "level_pixel_size_nm": float(level_pixel_size_yx_nm[1]),
            "level_pixel_size_y_nm": float(level_pixel_size_yx_nm[0])}


def respond(analysed: dict[str, Any], *, image: dict[str, Any], alias: str, request_id: str,
            timings_ms: dict[str, float], batch_sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """The JSON body of a successful POST /v1/analyze (`engine.serving.schemas.AnalyzeResponse`)
    from `analysis(...)` and what the ingress knows of the request (image: `image_info`);
    batch_sizes: requests per model stage's batch."""
    return {
        "request_id": request_id,
        "image": image,
        **analysed,
        "model": {"alias": alias, **analysed["model"]},
        "timings_ms": {k: round(v, 3) for k, v in timings_ms.items()},
        "batch_sizes": {k: int(v) for k, v in (batch_sizes or {}).items()},
    }


def build_response(results: Sequence[TileResult], tiles: Sequence[Any], *,
                   class_names: Sequence[str], materials: Sequence[str], grades: Sequence[str],
                   image: dict[str, Any], alias: str, request_id: str, timings_ms: dict[str, float],
                   batch_sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """`respond(analysis(...))` in one call, for a caller that holds the results."""
    return respond(analysis(results, tiles, class_names=class_names, materials=materials, grades=grades),
                   image=image, alias=alias, request_id=request_id, timings_ms=timings_ms, batch_sizes=batch_sizes)
