"""Detection accuracy on whole images of an archive: AP per class and per material.

The detector sees each image the way the pipeline will: at one pyramid level, in tiles
with a halo, predictions kept where their centre falls in the tile's own (core) part
and put together in image pixels. They are compared with the archive's ground-truth
boxes, whole (not cut by tiles), with Ultralytics' matching rule (a prediction, in
order of score, takes the unclaimed box of its class it overlaps most, per IoU
threshold) and Ultralytics' `ap_per_class` (COCO's 101-point interpolated AP), so the
figures read like those of Ultralytics' validator; as there, a flawless detector scores
0.995 (the precision envelope ends at recall 1 with precision 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from engine.stores.uri import StoreLocation, resolve
from engine.training.detector.pixels import ImageCache
from engine.training.detector.tiles import grid_starts, image_entries, image_truth, read_ground_truth

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


def _owned(starts: list[int], size: int, length: int) -> list[tuple[float, float]]:
    """The part of each tile along one axis that owns detections: from the middle of the
    overlap with the previous tile to the middle of the overlap with the next one."""
    cuts = [0.0] + [(starts[i] + size + starts[i + 1]) / 2 for i in range(len(starts) - 1)] + [float(length)]
    return list(zip(cuts[:-1], cuts[1:]))


def predict_image(detector, reader: ImageCache, image: StoreLocation, level: int, shape: tuple[int, int], *,
                  tile: int = 1024, halo: int = 128, batch: int = 4, conf: float = 0.001, iou: float = 0.7,
                  max_det: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detections in one image: (N x 4 float32 xyxy in pixels of `level`, N scores, N classes),
    sorted by score.

    Tiles of side `tile` overlap by 2 * `halo`; a detection is kept by the tile whose
    owned part holds its centre, so a defect up to ~`halo` pixels across that a tile edge
    cuts is reported once, whole, by a neighbour. Images up to `tile` are one tile.
    """
    h, w = shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = grid_starts(h, th, min(2 * halo, th - 1)), grid_starts(w, tw, min(2 * halo, tw - 1))
    own_y, own_x = _owned(ys, th, h), _owned(xs, tw, w)
    windows = [(y0, x0, oy, ox) for y0, oy in zip(ys, own_y) for x0, ox in zip(xs, own_x)]
    boxes, scores, classes = [], [], []
    for i in range(0, len(windows), batch):
        part = windows[i:i + batch]
        pixels = reader.get(image).read_regions(level, [(y0, y0 + th, x0, x0 + tw) for y0, x0, _, _ in part])
        for (y0, x0, (oy0, oy1), (ox0, ox1)), det in zip(part, detector.predict(np.stack(pixels), conf=conf, iou=iou,
                                                                                max_det=max_det)):
            b = det.boxes + np.array([x0, y0, x0, y0], np.float32)
            cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
            keep = (cy >= oy0) & (cy < oy1) & (cx >= ox0) & (cx < ox1)
            boxes.append(b[keep])
            scores.append(det.scores[keep])
            classes.append(det.classes[keep])
    b, s, c = np.concatenate(boxes), np.concatenate(scores), np.concatenate(classes)
    order = np.argsort(-s, kind="stable")
    return b[order], s[order], c[order]


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
                      pixel_size_nm: float | None = None, tile: int = 1024, halo: int = 128, batch: int = 4,
                      conf: float = 0.001, iou: float = 0.7, max_det: int = 300) -> DetectionEvaluation:
    """AP@0.5 (and 0.5:0.95) of `detector` on the images of `archive`, per class and per material.

    detector: an engine.models `Detector`; image_ids: a subset (default all catalog
    images); pixel_size_nm: read each image at the level nearest it (default level 0,
    the scale engine.synth sizes defects in). conf is low on purpose (0.001, as
    Ultralytics validates): AP integrates over every score.
    """
    from engine.runtime import configure_offline

    configure_offline()
    archive = resolve(archive)
    names = tuple(detector.names)
    class_index = {n: i for i, n in enumerate(names)}
    truth = read_ground_truth(archive)
    reader = ImageCache()
    tps, confs, pcls, tcls, pmat, tmat = [], [], [], [], [], []
    entries = image_entries(archive, image_ids=image_ids, pixel_size_nm=pixel_size_nm)
    for entry in entries:
        t = image_truth(truth, entry, class_index)
        true_boxes, true_cls = t.boxes, t.classes
        boxes, scores, classes = predict_image(detector, reader, entry.image, entry.level, entry.shape, tile=tile,
                                               halo=halo, batch=batch, conf=conf, iou=iou, max_det=max_det)
        tps.append(match_predictions(boxes, classes, true_boxes, true_cls))
        confs.append(scores)
        pcls.append(classes)
        tcls.append(true_cls)
        material = entry.material or "unknown"
        pmat.append(np.full(len(scores), material, object))
        tmat.append(np.full(len(true_cls), material, object))
    if not entries:
        raise ValueError(f"{archive}: no images to evaluate")
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
