"""Accuracy of the trained models on a held-out archive, and what training cost on this CPU.

    python benchmarks/accuracy.py [--train-images 32] [--val-images 16] [--size 512]
        [--det-epochs 10] [--det-imgsz 128] [--parts detector,classifier,fusion,segmenter]
        [--cls-epochs 2] [--fusion-epochs 2] [--sam-epochs 1] [--lr 1e-3] [--sam-lr 1e-3]
        [--lr-schedule cosine|constant]
        [--batch-size 16] [--sam-batch-size N] [--augment 0.5] [--workdir DIR] [--seed 0]

Trains on a synthetic archive (seed S) and evaluates on a held-out archive generated
with other seeds (S + 1000), so its images have other pixel sizes (drawn per image
from each material's range), other microstructures and other defects. Prints JSON:

- detector: YOLO (engine.training.detector) mAP@0.5 and mAP@0.5:0.95 on the held-out
  whole images, AP@0.5 per defect class and mAP@0.5 per material, the training wall
  time on this machine, and what it trained on; the model is picked by Ultralytics'
  validation on a split of the training archive, never on the held-out one;
- classifier: material and quality-grade accuracy on held-out tiles
  (engine.training.train("classifier", ...), Ray Train), and per held-out image
  ("per_image": the tiles' probabilities averaged over the image, as the job's
  per-image summary names its material and grade);
- fusion: the same two accuracies and the defect-segmentation IoU (defect pixels,
  any class) of the fusion model (fusion_tiny: detail + context views; fusion_tiny_px
  also reads each tile's pixel size, as resnet10t_px does);
- classifier_fusion_mean (when both run): material and grade accuracy, per tile and per
  image, of the two members' probabilities averaged, which is what the ensemble answers;
- segmenter: mean mask IoU of the small SAM (sam_tiny) on every held-out box, on the
  tile as the job sees it, per defect class, beside the prompt box filled, its
  inscribed ellipse and the true mask drawn through the model's own mask grid (what
  that grid can draw: `mask_grid_reference`) (engine.training.train("segmenter", ...);
  "tile_frame"). Meta's
  ViT-B fine-tuned: `--sam-model sam_vit_b --sam-init-weights sam_vit_b_01ec64.pth
  --sam-train-only sam.mask_decoder` (its released weights, decoder trained; a GPU).

For the Ray Train parts the held-out archive is the validation set of the run, so each
epoch's held-out metrics are in "curve" (the learning curve; figures are those of the
last epoch, never the best one, so nothing is selected on the held-out data). Held-out
metrics are computed with the model in eval mode: batch-norm layers use their running
statistics, which lag far behind the weights in the first few dozen optimizer steps;
a network that has taken only ~16 steps predicts one class for every held-out tile
even when its training batches are already half right, so short runs understate what
the weights have learnt.

Archives are generated once per set of arguments and reused (--workdir). The numbers
depend on the budget: the figures the issue asks for (mAP@0.5 >= 0.95, material accuracy
>= 0.98, mask IoU >= 0.85) need far longer runs than a CPU does in minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import json_stdout, work_folder  # noqa: E402

PARTS = ("detector", "classifier", "fusion", "segmenter")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-images", type=int, default=32)
    p.add_argument("--val-images", type=int, default=16, help="images of the held-out archive")
    p.add_argument("--size", type=int, default=512, help="image side, level-0 pixels")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="training archive seed; held-out uses seed + 1000")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    p.add_argument("--workdir", type=Path, default=None, help="archives and runs (default: a temporary folder)")
    det = p.add_argument_group("detector")
    det.add_argument("--det-model", default="yolov8n_tiny")
    det.add_argument("--det-epochs", type=int, default=10)
    det.add_argument("--det-imgsz", type=int, default=128)
    det.add_argument("--det-batch", type=int, default=16)
    det.add_argument("--det-background", type=float, default=0.5,
                     help="background tiles kept per defect tile (default 0.5; negative keeps all)")
    det.add_argument("--det-init-weights", default=None, metavar="FILE",
                     help="start from this detector checkpoint (e.g. an earlier run's detector.safetensors: "
                          "more epochs on it) instead of a random initialisation")
    cls = p.add_argument_group("classifier / fusion / segmenter (engine.training.train on Ray Train)")
    cls.add_argument("--cls-model", default="resnet10t")
    cls.add_argument("--cls-epochs", type=int, default=2)
    cls.add_argument("--fusion-model", default="fusion_tiny")
    cls.add_argument("--fusion-epochs", type=int, default=2)
    cls.add_argument("--sam-model", default="sam_tiny")
    cls.add_argument("--sam-epochs", type=int, default=1)
    cls.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    cls.add_argument("--batch-size", type=int, default=16, help="rows per worker per step")
    cls.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (classifier, fusion)")
    cls.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                     help="engine.training.schedule (cosine: 5%% warm-up, decay to 1%% of the rate)")
    cls.add_argument("--sam-lr", type=float, default=1e-3, help="AdamW learning rate (segmenter)")
    cls.add_argument("--sam-init-weights", default=None, metavar="FILE",
                     help="fine-tune the segmenter from these weights (Meta's sam_vit_b_01ec64.pth with "
                          "--sam-model sam_vit_b)")
    cls.add_argument("--sam-train-only", default=None, metavar="MODULE[,MODULE]",
                     help="train only these segmenter modules (e.g. sam.mask_decoder)")
    cls.add_argument("--sam-overrides", type=json.loads, default=None, metavar="JSON",
                     help='segmenter builder arguments replacing the config\'s, e.g. \'{"depth": 4, '
                          '"embed_dim": 128}\' (a deeper, wider sam_tiny)')
    cls.add_argument("--sam-batch-size", type=int, default=None,
                     help="rows per worker per step for the segmenter (default: --batch-size)")
    cls.add_argument("--augment", type=float, default=0.5, help="engine.augment strength, 0 = off")
    cls.add_argument("--inputs", choices=("tile", "image"), default="tile",
                     help="tile normalisation the Ray Train members train on (engine.training.train's inputs): each "
                          "tile's percentile stretch, or the image's engine.preprocess parameters")
    cls.add_argument("--max-samples-per-image", type=int, default=8)
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}; valid: {', '.join(PARTS)}")
    return args


def make_archive(path: Path, *, n_images: int, size: int, chunk: int, seed: int) -> dict:
    """Generate (or reuse, when made with the same arguments) an archive; describe it."""
    import pandas as pd

    from engine.synth.archive import generate_archive

    spec = {"n_images": n_images, "size": size, "chunk": chunk, "seed": seed}
    marker = path / "benchmark-spec.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == spec):
        started = time.perf_counter()
        generate_archive(path, **spec)
        marker.write_text(json.dumps(spec))
        spec["generate_seconds"] = round(time.perf_counter() - started, 1)
    catalog = pd.read_parquet(path / "catalog.parquet")
    truth = pd.read_parquet(path / "ground_truth.parquet")
    return {
        **spec, "path": str(path), "materials": int(catalog["material"].nunique()),
        "modalities": sorted(catalog["modality"].unique().tolist()),
        "pixel_size_nm": {m: [round(float(g.min()), 3), round(float(g.max()), 3)]
                          for m, g in catalog.groupby("material")["pixel_size_x"]},
        "defects": {k: int(v) for k, v in truth["defect_class"].value_counts().sort_index().items()},
    }


def _finite(d):
    """NaN -> None, recursively, so the JSON is strict."""
    if isinstance(d, dict):
        return {k: _finite(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_finite(v) for v in d]
    if isinstance(d, float):
        return None if not math.isfinite(d) else round(d, 4)
    return d


def detector_part(args, train: Path, held_out: Path, out: Path) -> dict:
    """Train YOLO on `train` (model selection on a split of it), evaluate on `held_out`."""
    import engine.models as M
    from engine.training.detector import evaluate_detector, train_detector

    result = train_detector(
        train, out_dir=out, model=args.det_model, epochs=args.det_epochs, imgsz=args.det_imgsz,
        batch=args.det_batch, val_fraction=0.15, seed=args.seed,
        background_ratio=None if args.det_background < 0 else args.det_background,
        init_weights=args.det_init_weights,
    )
    detector = M.load_model(result.checkpoint, expected_sha256=result.sha256)
    started = time.perf_counter()
    ev = evaluate_detector(detector, held_out)
    return {
        "model": args.det_model, "epochs": args.det_epochs, "imgsz": args.det_imgsz, "batch": args.det_batch,
        "train_tiles": result.train_tiles, "train_images": len(result.train_images),
        "device": result.device, "train_seconds": round(result.train_seconds, 1),
        "best_epoch": result.best_epoch, "init": result.init,
        "held_out": {
            "mAP50": ev.map50, "mAP50-95": ev.map50_95, "per_class_AP50": ev.per_class_ap50,
            "per_material_mAP50": ev.per_material_map50, "targets": ev.targets, "images": ev.images,
            "evaluate_seconds": round(time.perf_counter() - started, 1),
        },
        "train_split_val": {"mAP50": result.metrics.get("mAP50"), "images": len(result.val_images)},
        "checkpoint": result.checkpoint,
    }


# Per-epoch figures kept in each part's learning curve ("curve"), where the task has them.
CURVE_KEYS = ("train_loss", "train_material_acc", "val_material_acc", "val_grade_acc", "val_defect_iou",
              "train_mask_iou", "val_mask_iou", "train_samples_per_s")


def _ray_train(family: str, model: str, epochs: int, args, train: Path, held_out: Path, out: Path,
               lr: float, batch_size: int, **warm_start) -> dict:
    from engine.training import train as ray_train
    from engine.training.schedule import steps_per_epoch

    result = ray_train(family, model, str(train), storage_path=out, epochs=epochs, num_workers=args.workers,
                       val_archive=str(held_out), seed=args.seed, max_samples_per_image=args.max_samples_per_image,
                       batch_size=batch_size, lr=lr, lr_schedule=args.lr_schedule, augment=args.augment,
                       keep_checkpoints=1, inputs=args.inputs, **warm_start,
                       tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    last = result.metrics
    curve = [{k: h[k] for k in ("epoch", *CURVE_KEYS) if k in h} for h in result.history]
    return {"model": model, "epochs": epochs, "workers": args.workers, "batch_size_per_worker": batch_size,
            "lr": lr, "lr_schedule": args.lr_schedule, "augment": args.augment, "inputs": args.inputs,
            **warm_start,
            "optimizer_steps": epochs * steps_per_epoch(result.train_samples, args.workers, batch_size),
            "train_samples": result.train_samples, "val_samples": result.val_samples,
            "train_seconds": round(result.seconds, 1), "checkpoint_path": result.checkpoint_path,
            "held_out": {k.removeprefix("val_"): v for k, v in last.items() if k.startswith("val_")},
            "train_last_epoch": {k.removeprefix("train_"): v for k, v in last.items() if k.startswith("train_")},
            "curve": curve}


def classifier_part(args, train, held_out, out) -> dict:
    r = _ray_train("classifier", args.cls_model, args.cls_epochs, args, train, held_out, out, args.lr,
                   args.batch_size)
    r["material_accuracy"] = r["held_out"].get("material_acc")
    r["grade_accuracy"] = r["held_out"].get("grade_acc")
    r["probs"] = held_out_probs(args, "classifier", args.cls_model, train, held_out, r["checkpoint_path"])
    r["per_image"] = probs_accuracy(r["probs"])
    return r


def fusion_part(args, train, held_out, out) -> dict:
    r = _ray_train("fusion", args.fusion_model, args.fusion_epochs, args, train, held_out, out, args.lr,
                   args.batch_size)
    r["material_accuracy"] = r["held_out"].get("material_acc")
    r["grade_accuracy"] = r["held_out"].get("grade_acc")
    r["defect_iou"] = r["held_out"].get("defect_iou")
    r["probs"] = held_out_probs(args, "fusion", args.fusion_model, train, held_out, r["checkpoint_path"])
    r["per_image"] = probs_accuracy(r["probs"])
    return r


def held_out_probs(args, family: str, model_name: str, train: Path, held_out: Path,
                   checkpoint_dir: str) -> dict:
    """The trained model's softmax on every held-out tile (Ray Train's validation tiles,
    all levels), read one at a time on this process: {"material"|"grade": {tile key:
    probabilities (n,) float32}}, "truth": {head: {tile key: class index, -1 unknown}};
    a tile key is (image_id, level, y, x, tile side), the same for every member."""
    import numpy as np
    import torch

    from engine.models import load_model
    from engine.training.tasks import make_task

    model = load_model(Path(checkpoint_dir) / "model.safetensors").eval()
    layout, rows = held_out_rows(args, family, model_name, train, held_out)
    collate = make_task(family).collate(layout, epoch=0, seed=args.seed, augment_strength=0.0)
    probs = {"material": {}, "grade": {}}
    truth = {"material": {}, "grade": {}}
    with torch.no_grad():
        for spec, row in rows:
            key = (spec.image_id, spec.level, spec.y, spec.x, spec.tile)
            batch = collate({k: np.asarray([v]) if np.ndim(v) == 0 or isinstance(v, str)
                             else np.asarray(v)[None] for k, v in row.items()})
            views = [batch["image"], batch["context"]] if "context" in batch else [batch["image"]]
            out = model(*views, pixel_size_nm=batch["pixel_size_nm"])
            for head in probs:
                probs[head][key] = torch.softmax(out[head], -1)[0].numpy()
                truth[head][key] = int(batch[head][0])
    return {**probs, "truth": truth}


def probs_accuracy(tile_probs: dict) -> dict:
    """Material and grade accuracy per held-out tile and per held-out *image* from
    `held_out_probs`' output (or the mean of several members'). Per image: the tiles'
    probabilities averaged over the image, argmax — how the job's per-image summary names
    an image's material and grade (engine.data.sinks averages its tiles' probabilities).
    Tile-level accuracy of one member is also Ray Train's "held_out" figure; the image
    figure is the one a user reads in the summary."""
    import numpy as np

    from engine.models.labels import material_names

    result = {}
    by_image: dict[str, dict[str, list]] = {}
    for head in ("material", "grade"):
        truth = tile_probs["truth"][head]
        known = [k for k in tile_probs[head] if truth[k] >= 0]
        result[f"{head}_tile_accuracy"] = (round(float(np.mean([int(tile_probs[head][k].argmax()) == truth[k]
                                                                  for k in known])), 4) if known else math.nan)
        by_image[head] = {}
        for k in known:
            by_image[head].setdefault(k[0], []).append(k)
        right = [int(np.mean([tile_probs[head][k] for k in keys], axis=0).argmax()) == truth[keys[0]]
                 for keys in by_image[head].values()]
        result[f"{head}_accuracy"] = round(float(np.mean(right)), 4) if right else math.nan
    result["images"] = len({k[0] for k in tile_probs["material"]})
    result["tiles"] = len(tile_probs["material"])
    # which images are wrong, and how many of their tiles: errors of one material or a spread
    names, probs, truth = material_names(), tile_probs["material"], tile_probs["truth"]["material"]
    result["material_by_image"] = {
        i: {"material": names[truth[keys[0]]],
            "named": names[int(np.mean([probs[k] for k in keys], axis=0).argmax())],
            "tiles_right": round(float(np.mean([int(probs[k].argmax()) == truth[k] for k in keys])), 3)}
        for i, keys in sorted(by_image["material"].items())}
    return result


def members_mean(*members: dict) -> dict:
    """The mean of several members' `held_out_probs` on the tiles they all scored: what
    the ensemble (engine.pipeline.ensemble) answers, the classifier's and the fusion
    model's material and grade probabilities averaged."""
    import numpy as np

    shared = set.intersection(*(set(m["material"]) for m in members))
    mean = {head: {k: np.mean([m[head][k] for m in members], axis=0) for k in shared}
            for head in ("material", "grade")}
    mean["truth"] = {head: {k: members[0]["truth"][head][k] for k in shared} for head in ("material", "grade")}
    return mean


def held_out_rows(args, family: str, model_name: str, train: Path, held_out: Path, overrides: dict | None = None):
    """(layout, iterator of (spec, row)): every held-out training sample as Ray Train's
    validation plans and reads it (for the model built with `overrides`), read one at a
    time on this process."""
    from engine.data.training_samples import ReadSamples
    from engine.training.trainer import plan_training

    layout, _, specs = plan_training(family, model_name, str(train), val_archive=str(held_out),
                                     max_samples_per_image=args.max_samples_per_image, num_workers=args.workers,
                                     seed=args.seed, inputs=args.inputs, overrides=overrides)
    reader = ReadSamples(layout.mask, layout.normalisation)
    return layout, ((spec, reader.read(spec)) for spec in specs)


def segmenter_part(args, train, held_out, out) -> dict:
    warm_start = {"init_weights": args.sam_init_weights,
                  "train_only": [m for m in (args.sam_train_only or "").split(",") if m],
                  "overrides": args.sam_overrides}
    r = _ray_train("segmenter", args.sam_model, args.sam_epochs, args, train, held_out, out, args.sam_lr,
                   args.sam_batch_size or args.batch_size, **warm_start)
    r["tile_frame"] = tile_frame_mask_iou(args, train, held_out, r.pop("checkpoint_path"))
    r["mean_mask_iou"] = r["tile_frame"]["model_mean_iou"]
    return r


def mask_grid_reference(model, truth, box):
    """The true mask as the segmenter's own logit grid draws it: cropped to the box's
    window (or the whole tile without box zoom) at the encoder's input size S, averaged
    down to the grid SAM's decoder predicts (4x its embedding grid: S/4 with 16-px
    patches), placed back on the tile as the model's logits are (bilinear), and cut at
    one half. An estimate of what that grid can draw, not a strict bound (a model may
    put its logits' zero crossings elsewhere). truth: H x W bool; box: xyxy tile px.
    Returns H x W bool."""
    import numpy as np
    import torch
    from torch.nn import functional as F

    from engine.models import box_zoom
    from engine.models.segmenter import SamOutput

    t = torch.from_numpy(truth.astype(np.float32))[None, None]
    s, low = model.img_size, model.sam.prompt_encoder.mask_input_size[0]
    if model.zoom is None:
        h, w = model.input_size(*truth.shape)
        grid = F.avg_pool2d(F.interpolate(t, (h, w), mode="area"), s // low, ceil_mode=True)
        grid = F.pad(grid, (0, low - grid.shape[-1], 0, low - grid.shape[-2]))
        windows = None
    else:
        windows = model.zoom.windows(torch.tensor([box], dtype=torch.float32))
        grid = F.avg_pool2d(box_zoom.crop(t, torch.zeros(1, dtype=torch.int64), windows, s), s // low)
    # The model's own placement of low-res logits on the tile (`Segmenter.tile_logits`).
    logits = model.tile_logits(SamOutput(grid - 0.5, grid.new_zeros(1, 1), windows), truth.shape)
    return (logits[0] > 0).numpy()


def tile_frame_mask_iou(args, train: Path, held_out: Path, checkpoint_dir: str) -> dict:
    """Mean mask IoU on every held-out box, measured on the tile as the job sees it
    (`Segmenter.segment`), overall and per defect class, beside masks that need no model:
    the prompt box filled and the ellipse inscribed in it, what a segmenter must beat to
    have learnt anything beyond its prompt; and the true mask drawn through the model's
    mask grid (`mask_grid_reference`). (Ray Train's val_mask_iou scores at most 16 boxes per tile,
    and with box zoom in each box's window.)"""
    import numpy as np

    from engine.models import load_model
    from engine.models.labels import defect_class_names

    model = load_model(Path(checkpoint_dir) / "model.safetensors").eval()
    names = defect_class_names()
    _, rows = held_out_rows(args, "segmenter", args.sam_model, train, held_out, args.sam_overrides)
    scores: dict[str, dict[str, list[float]]] = {}  # guess -> class -> IoUs
    for _, row in rows:
        mask = np.asarray(row["mask"])
        boxes = np.asarray(row["boxes"], np.float32).reshape(-1, 4)
        (seg,) = model.segment(np.asarray(row["image"])[None], [boxes])
        yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]] + 0.5  # pixel centres
        for (x0, y0, x1, y1), k, c, predicted in zip(boxes, row["instance_ids"], row["classes"], seg.masks):
            truth = mask == k
            box = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
            ellipse = ((xx - (x0 + x1) / 2) / max((x1 - x0) / 2, 0.5)) ** 2 \
                + ((yy - (y0 + y1) / 2) / max((y1 - y0) / 2, 0.5)) ** 2 <= 1
            grid = mask_grid_reference(model, truth, (x0, y0, x1, y1))
            for guess, m in (("model", predicted), ("box", box), ("ellipse", ellipse), ("mask_grid", grid)):
                iou = float((m & truth).sum() / max(1, (m | truth).sum()))
                scores.setdefault(guess, {}).setdefault(names[int(c) - 1], []).append(iou)  # classes are 1-based
    mean = lambda v: round(float(np.mean(v)), 4)  # noqa: E731
    out = {f"{g}_mean_iou": mean([x for v in per.values() for x in v]) for g, per in scores.items()}
    out["per_class"] = {c: {g: mean(scores[g][c]) for g in scores} | {"boxes": len(scores["model"][c])}
                        for c in sorted(scores.get("model", {}))}
    out["boxes"] = sum(len(v) for v in scores.get("model", {}).values())
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    from engine.runtime import configure_offline

    configure_offline()
    work, tmp = work_folder(args.workdir, "grainflow-accuracy-")
    with json_stdout():
        report = run(args, work)
    print(json.dumps(report, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return report


def run(args, work: Path) -> dict:
    started = time.perf_counter()
    archives = {
        "train": make_archive(work / "train", n_images=args.train_images, size=args.size, chunk=args.chunk,
                              seed=args.seed),
        "held_out": make_archive(work / "held_out", n_images=args.val_images, size=args.size, chunk=args.chunk,
                                 seed=args.seed + 1000),
    }
    report = {
        "benchmark": "accuracy", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]},
        "archives": archives,
    }
    train, held_out = work / "train", work / "held_out"
    runs = work / "runs"
    if "detector" in args.parts:
        report["detector"] = detector_part(args, train, held_out, runs / "detector")
    if {"classifier", "fusion", "segmenter"} & set(args.parts):
        import ray

        if not ray.is_initialized():
            # Four logical CPUs on a small machine: Ray Train's workers and Ray Data's read
            # tasks each hold a slot, and two slots would starve the data pipeline.
            ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        if "classifier" in args.parts:
            report["classifier"] = classifier_part(args, train, held_out, runs / "classifier")
        if "fusion" in args.parts:
            report["fusion"] = fusion_part(args, train, held_out, runs / "fusion")
        if "segmenter" in args.parts:
            report["segmenter"] = segmenter_part(args, train, held_out, runs / "segmenter")
        members = [report[p].pop("probs") for p in ("classifier", "fusion") if p in report]
        if len(members) == 2:  # what the ensemble answers: the two members' probabilities averaged
            report["classifier_fusion_mean"] = probs_accuracy(members_mean(*members))
    report["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    return _finite(report)


if __name__ == "__main__":
    main()
