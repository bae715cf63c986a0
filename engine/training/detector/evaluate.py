"""Detection accuracy on whole images of an archive: AP per class and per material.

The detector sees each image the way the pipeline does: at one pyramid level, cut by
engine.tiling's `TileGrid` into chunk-aligned cores read with a halo, and its per-tile
boxes put together with engine.tiling's `stitch_boxes` (a box belongs to the core that
holds its centre; pieces of one defect cut by a core border are merged; NMS) in
level-0 pixels. An image the batch job resamples for a model of the evaluated pixel
size (`engine.training.detector.tiles.job_read`: its pixels are not square, or no level
is within the job's tolerance of that size) is seen as the job and the endpoint deliver
it (`engine.data.tile_plan.plan_image`): resampled to square pixels of exactly that
size (native pixels, the finer of level 0's two sizes, when none is given), the
detector's boxes mapped back to level 0 per axis. They are compared with the
archive's ground-truth boxes, whole (not cut by tiles), with Ultralytics' matching rule
(a prediction, in order of score, takes the unclaimed box of its class it overlaps
most, per IoU threshold) and Ultralytics' `ap_per_class` (COCO's 101-point
interpolated AP), so the figures read like those of Ultralytics' validator; as there,
a flawless detector scores 0.995 (the precision envelope ends at recall 1 with
precision 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from engine.stores.uri import StoreLocation, resolve
from engine.training.detector.pixels import ImageCache
from engine.training.detector.tiles import (
    image_entries, image_truth, job_read, job_target, read_ground_truth, truth_by_image,
)

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


@dataclass(frozen=True)
class DetectionEvaluation:
    """AP of a detector on an archive. NaN where there is nothing to measure.

    map50 / map50_95: mean over the classes that have ground truth of AP at IoU 0.5 /
    averaged over IoU 0.5:0.95; per_class_ap50: {class: AP50} for classes with ground
    truth; per_material_map50: {material: mean AP50 over the classes present in that
    material's images}; per_material_class_ap50: {material: {class: AP50}};
    targets: {class: number of ground-truth boxes}; images: images evaluated;
    predictions: detections scored; pixel_size_nm: the pixel size asked for (None: level 0).
    """

    map50: float
    map50_95: float
    per_class_ap50: dict[str, float]
    per_material_map50: dict[str, float]
    per_material_class_ap50: dict[str, dict[str, float]]
    targets: dict[str, int]
    images: int
    predictions: int
    pixel_size_nm: float | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict (NaN stays NaN; json.dumps writes it as NaN)."""
        return asdict(self)


def match_predictions(pred_boxes: np.ndarray, pred_cls: np.ndarray, true_boxes: np.ndarray,
                      true_cls: np.ndarray, thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """Which predictions are true positives, per IoU threshold.

    pred_boxes: N x 4 xyxy, sorted by score (highest first); pred_cls: N; true_boxes:
    M x 4 xyxy; true_cls: M. Returns N x T bool. Greedy in score order: each prediction
    takes the unclaimed target of its class with the highest IoU (Ultralytics' rule).
    """
    n, t = len(pred_boxes), len(thresholds)
    correct = np.zeros((n, t), bool)
    if n == 0 or len(true_boxes) == 0:
        return correct
    iou = box_iou(np.asarray(true_boxes, np.float64), np.asarray(pred_boxes, np.float64))
    iou = iou * (np.asarray(true_cls)[:, None] == np.asarray(pred_cls)[None, :])
    claimed = np.zeros((len(true_boxes), t), bool)
    for j in np.flatnonzero((iou >= thresholds.min()).any(0)):
        available = np.where(claimed, 0.0, iou[:, j, None])
        k = available.argmax(0)
        correct[j] = available[k, np.arange(t)] >= thresholds
        claimed[k, np.arange(t)] |= correct[j]
    return correct


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in `a` (M x 4 xyxy) with every box in `b` (N x 4): M x N."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def grid_tile(chunks: tuple[int, int], tile: int) -> tuple[int, int]:
    """The core size for a wanted side `tile`: the largest multiple of each chunk side
    not above it (at least one chunk), as engine.tiling's grids require."""
    return tuple(max(c, (tile // c) * c) for c in chunks)


def predict_image(detector, reader: ImageCache, image_id: str, image: StoreLocation, level: int, *,
                  pixel_size_nm: float | None = None, tile: int = 1024, halo: int = 64, batch: int = 4,
                  conf: float = 0.001, iou: float = 0.7, max_det: int = 300
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detections in one image: (N x 4 float64 xyxy in level-0 pixels, N scores, N int64
    classes), sorted by score.

    The level is cut into cores of about `tile` pixels (chunk multiples) read with
    `halo` pixels of context on each side; tiles of one read shape go to the detector
    `batch` at a time. An image up to `tile` pixels a side is one tile. An image the
    batch job resamples for a model of `pixel_size_nm` (`job_read`: pixels that are not
    square, or no level within the job's tolerance) is planned and resampled as the job
    does (`level` must be the level the job reads it from, as `image_entries` picks it;
    `tile` and `halo` then count its square pixels; `predict_resampled`).
    """
    from engine.tiling import TileBoxes, TileGrid, stitch_boxes

    img = reader.get(image)
    if job_read(img, level, pixel_size_nm)[1] is not None:
        found = predict_resampled(detector, reader, image_id, image, level, pixel_size_nm=pixel_size_nm, tile=tile,
                                  halo=halo, batch=batch, conf=conf, iou=iou, max_det=max_det)
    else:
        grid = TileGrid.from_image(img, image_id, level, tile=grid_tile(img.levels[level].chunks, tile), halo=halo)
        by_shape: dict[tuple[int, int], list] = {}
        for spec in grid:
            by_shape.setdefault(spec.read_shape, []).append(spec)
        found = []
        for group in by_shape.values():
            for part in (group[i:i + batch] for i in range(0, len(group), batch)):
                pixels = img.read_regions(level, [spec.read_region for spec in part])
                dets = detector.predict(np.stack(pixels), conf=conf, iou=iou, max_det=max_det)
                found.extend(TileBoxes(spec.core_level0(), spec.boxes_to_level0(d.boxes), d.scores, d.classes,
                                       spec.read_level0())
                             for spec, d in zip(part, dets))
    stitched = stitch_boxes(found, iou_threshold=iou)
    order = np.argsort(-stitched.scores, kind="stable")
    return stitched.boxes[order], stitched.scores[order], stitched.classes[order].astype(np.int64)


def predict_resampled(detector, reader: ImageCache, image_id: str, image: StoreLocation, level: int, *,
                      pixel_size_nm: float | None = None, tile: int, halo: int, batch: int, conf: float,
                      iou: float, max_det: int) -> list:
    """Per-tile detections (engine.tiling `TileBoxes`, level-0 xyxy) of an image the batch
    job resamples (`job_read`), on the tiles it reads from `level` for a model of
    `pixel_size_nm` (`job_target`).

    The plan is the job's (`engine.data.tile_plan.plan_image`: square pixels of exactly
    `pixel_size_nm`, or of the level's finer size when None, cores of about `tile` and a
    `halo` of such pixels); each tile's pixels are the job's resampling of the level
    (`engine.data.training_samples.read_resampled`, as detector training reads them),
    and its boxes go back to level 0 with the grid's (y, x) step, as the pipeline's
    (`tile_boxes_to_level0`).
    """
    from engine.data.tile_plan import plan_image
    from engine.tiling import TileBoxes, tile_boxes_to_level0, tile_core_level0, tile_read_level0

    img = reader.get(image)
    target_nm, tolerance = job_target(img, level, pixel_size_nm)
    planned = plan_image(img, image_id, image, "", target_nm=target_nm, tolerance=tolerance, tile_size=tile,
                         halo=halo, tile_dtype=str(img.dtype))
    if planned.grid.level != level or planned.output is None:
        raise RuntimeError(f"{image_id}: the batch job's plan reads level {planned.grid.level} "
                           f"(resampled: {planned.output is not None}), not level {level} resampled")
    out = planned.output
    by_shape: dict[tuple[int, int], list] = {}
    for row in range(planned.n_rows):
        for col in range(planned.n_cols):
            x0, y0, x1, y1 = planned.grid.tile_at(row, col).core_level0()
            first, shape, (top, bottom, left, right) = out.tile_frame((y0, y1, x0, x1))
            if shape[0] == top + bottom or shape[1] == left + right:  # the core owns no output pixel
                continue
            by_shape.setdefault(shape, []).append((first, (top, bottom, left, right)))
    found = []
    for shape, group in by_shape.items():
        for part in (group[i:i + batch] for i in range(0, len(group), batch)):
            pixels = [reader.read_resampled(image, level, out.step, first, shape) for first, _ in part]
            dets = detector.predict(np.stack(pixels), conf=conf, iou=iou, max_det=max_det)
            for (first, tile_halo), d in zip(part, dets):
                origin = (first[0] * out.step[0], first[1] * out.step[1])
                found.append(TileBoxes(tile_core_level0(origin, out.step, tile_halo, shape),
                                       tile_boxes_to_level0(d.boxes, origin, out.step), d.scores, d.classes,
                                       tile_read_level0(origin, out.step, shape)))
    return found


def _ap50(tp, conf, pred_cls, target_cls, names) -> tuple[dict[str, float], dict[str, float]]:
    """{class: AP50}, {class: AP50-95} for the classes present in `target_cls`."""
    from ultralytics.utils.metrics import ap_per_class

    if len(target_cls) == 0:
        return {}, {}
    out = ap_per_class(tp, conf, pred_cls, target_cls)
    ap, classes = out[5], out[6]
    return ({names[int(c)]: float(ap[i, 0]) for i, c in enumerate(classes)},
            {names[int(c)]: float(ap[i].mean()) for i, c in enumerate(classes)})


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else math.nan


def evaluate_detector(detector, archive: str | StoreLocation, *, image_ids: list[str] | None = None,
                      pixel_size_nm: float | None = None, tile: int = 1024, halo: int = 64, batch: int = 4,
                      conf: float = 0.001, iou: float = 0.7, max_det: int = 300) -> DetectionEvaluation:
    """AP@0.5 (and 0.5:0.95) of `detector` on the images of `archive`, per class and per material.

    detector: an engine.models `Detector`; image_ids: a subset (default all catalog
    images); pixel_size_nm: the model's pixel size: each image is read as the batch job
    reads it for such a model (`image_entries`: a square one at the level nearest it
    when that is within the job's tolerance, else, and for pixels that are not square,
    resampled to exactly that size; default level 0, the scale engine.synth sizes
    defects in); tile, halo: the grid (`predict_image`).
    conf is low on purpose (0.001, as Ultralytics validates): AP integrates over every
    score. Boxes are compared in level-0 pixels.
    """
    from engine.runtime import configure_offline

    configure_offline()
    archive = resolve(archive)
    names = tuple(detector.names)
    class_index = {n: i for i, n in enumerate(names)}
    truth = truth_by_image(read_ground_truth(archive))
    reader = ImageCache()
    tps, confs, pcls, tcls, pmat, tmat = [], [], [], [], [], []
    entries = image_entries(archive, image_ids=image_ids, pixel_size_nm=pixel_size_nm)
    if not entries:
        raise ValueError(f"{archive}: no images to evaluate")
    for entry in entries:
        gt = image_truth(truth, replace(entry, scale=(1.0, 1.0)), class_index)  # level-0 boxes
        true_boxes, true_cls = gt.boxes, gt.classes
        boxes, scores, classes = predict_image(detector, reader, entry.image_id, entry.image, entry.level,
                                               pixel_size_nm=pixel_size_nm, tile=tile, halo=halo, batch=batch,
                                               conf=conf, iou=iou, max_det=max_det)
        tps.append(match_predictions(boxes, classes, true_boxes, true_cls))
        confs.append(scores)
        pcls.append(classes)
        tcls.append(true_cls)
        material = entry.material or "unknown"
        pmat.append(np.full(len(scores), material, object))
        tmat.append(np.full(len(true_cls), material, object))
    tp, cf, pc, tc = (np.concatenate(x) for x in (tps, confs, pcls, tcls))
    pm, tm = np.concatenate(pmat), np.concatenate(tmat)
    ap50, ap = _ap50(tp, cf, pc, tc, names)
    per_material = {}
    for material in sorted(set(e.material or "unknown" for e in entries)):
        p, t = pm == material, tm == material
        per_material[material] = _ap50(tp[p], cf[p], pc[p], tc[t], names)[0]
    return DetectionEvaluation(
        map50=_mean(ap50.values()), map50_95=_mean(ap.values()), per_class_ap50=ap50,
        per_material_map50={m: _mean(v.values()) for m, v in per_material.items()},
        per_material_class_ap50=per_material,
        targets={names[c]: int((tc == c).sum()) for c in sorted(set(tc.tolist()))},
        images=len(entries), predictions=len(cf), pixel_size_nm=pixel_size_nm,
    )
