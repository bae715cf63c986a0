"""End to end: a detector trained here, the job over a held-out archive on disk and in an
S3 bucket (moto), and the job's stitched objects checked against the archive's ground truth.

The detector is the tiny YOLO config trained for a few epochs on a small synthetic
archive (the rest of the ensemble is untrained: SAM's masks are cut to the boxes, and
material/grade are not checked here). What a few CPU epochs learn is bounded: pores and
voids (compact, high-contrast blobs) are found; cracks, scratches and inclusions mostly
not yet (engine.pipeline.demo_models documents the measurements). So the threshold is on
pores and voids, and on the precision of the job's best-scored objects: tolerant, but a
detector that learned nothing, a job that loses or duplicates tiles, or boxes mapped to
the wrong level-0 coordinates all fail it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from engine.data.sinks import OBJECTS, SUMMARY_FILE, read_output
from engine.pipeline import EnsembleConfig
from engine.pipeline.job import reprocess

TRAIN = dict(n_images=6, seed=3, size=1024, chunk=512)
VALIDATION = dict(n_images=3, seed=98, size=1024, chunk=512)  # picks Ultralytics' best epoch
HELD_OUT = dict(n_images=3, seed=99, size=1024, chunk=512)
EPOCHS = 10
# A short warm-up (Ultralytics' default is 3 epochs, most of a short run). Validation is a
# separate archive (too few defects in a fifth of six images), and the checkpoint kept is
# the best epoch on it. Measured 2026-12-05 with one optimizer step per batch (the
# trainer's default `nbs`): held-out pore AP50 0.81, void 0.58; this test's figures below.
# Before that default (one step per epoch on this archive) the same run scored anywhere
# from recall 0.15 / precision 0.13 to 0.81 / 0.94 depending on the process it ran in.
HYPERPARAMETERS = {"warmup_epochs": 0.5}
LEARNED = ("pore", "void")
IOU = 0.3
CONF = 0.02  # a briefly trained detector's scores are low, and their scale varies run to run
# Judged without a score threshold: the job's best-scored objects, as many as half the
# held-out defects (31 here). Measured 2026-12-06, same archives, 10 epochs, this file
# run alone (repeated runs give the same figures; the 0.85 / 0.97 recorded here on
# 2026-12-05 was not reproduced that way): recall / precision of the best 31 were
# 0.67 / 0.71 at d5ed09c, 0.74 / 0.77 at b4b4a88-acf0110, 0.63 / 0.65 from ca4e425 (the
# flip kept through Ultralytics' close_mosaic rebuild). The detector's trajectory moves
# with its augmentation; at the lowest, precision has one object to spare. An untrained
# detector reports nothing near the defects.
TOP_FRACTION = 0.5
MIN_RECALL = 0.4      # of held-out pores and voids
MIN_PRECISION = 0.6   # of those best objects, any class


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session):
    """(registry, ref) of a bundle whose detector was trained here on TRAIN."""
    from engine.pipeline.bundle import load_member, register_ensemble
    from engine.pipeline.demo_models import untrained_tiny_models
    from engine.registry import ModelRegistry
    from engine.synth.archive import generate_archive
    from engine.training.detector import train_detector

    root = tmp_path_factory.mktemp("e2e-train")
    generate_archive(root / "train", **TRAIN)
    generate_archive(root / "validation", **VALIDATION)
    registry = ModelRegistry(f"sqlite:///{root}/m.db")
    result = train_detector(root / "train", out_dir=root / "detector", epochs=EPOCHS, background_ratio=0.5,
                            val_archive=root / "validation", hyperparameters=HYPERPARAMETERS, evaluate=False, register_as="e2e-detector", registry=registry)
    version = registry.get(result.registered)
    detector = load_member("detector", version, registry.fetch(version))
    models = untrained_tiny_models(0)
    models = type(models)(detector=detector, segmenter=models.segmenter, classifier=models.classifier)
    register_ensemble(registry, models, "e2e", workdir=root / "bundle")
    return registry, "e2e@production"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    from engine.synth.archive import generate_archive

    path = tmp_path_factory.mktemp("e2e-held-out") / "archive"
    generate_archive(path, **HELD_OUT)
    return path


@pytest.fixture(scope="module")
def local_run(trained, held_out, tmp_path_factory):
    registry, ref = trained
    out = tmp_path_factory.mktemp("e2e-run") / "out"
    result = reprocess(str(held_out), str(out), ref, registry=registry, config=EnsembleConfig(conf=CONF), labels="out")
    return out, result


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a (N, 4) and b (M, 4), both (y0, x0, y1, x1) -> (N, M)."""
    y0 = np.maximum(a[:, None, 0], b[None, :, 0])
    x0 = np.maximum(a[:, None, 1], b[None, :, 1])
    y1 = np.minimum(a[:, None, 2], b[None, :, 2])
    x1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def score_against_truth(objects: pd.DataFrame, truth: pd.DataFrame) -> dict[str, float]:
    """Recall of the LEARNED classes and precision of all objects, per image, at IoU >= IOU
    (class-agnostic: the check is that defects are found where they are)."""
    found = total = true_pos = reported = 0
    for image_id, gt in truth.groupby("image_id"):
        pred = objects[objects.image_id == image_id]
        gt_boxes = gt[["y0", "x0", "y1", "x1"]].to_numpy(float)
        pred_boxes = pred[["y0", "x0", "y1", "x1"]].to_numpy(float)
        iou = box_iou(gt_boxes, pred_boxes) if len(pred_boxes) else np.zeros((len(gt_boxes), 0))
        learned = gt.defect_class.isin(LEARNED).to_numpy()
        hit = iou.max(axis=1) >= IOU if iou.shape[1] else np.zeros(len(gt_boxes), bool)
        found += int((hit & learned).sum())
        total += int(learned.sum())
        true_pos += int((iou.max(axis=0) >= IOU).sum()) if len(gt_boxes) else 0
        reported += len(pred_boxes)
    return {"recall": found / max(total, 1), "precision": true_pos / max(reported, 1),
            "learned_defects": total, "objects": reported}


def objects_of(out) -> pd.DataFrame:
    table = read_output(out, OBJECTS).to_pandas()
    return table.sort_values(["image_id", "object_id"]).reset_index(drop=True)


class TestEndToEnd:
    def test_objects_match_ground_truth(self, local_run, held_out):
        out, result = local_run
        assert result.errors == 0 and result.tiles_done == result.tiles_total > 0
        truth = pd.read_parquet(held_out / "ground_truth.parquet")
        best = objects_of(out).sort_values("score", ascending=False, kind="stable").head(int(len(truth) * TOP_FRACTION))
        score = score_against_truth(best, truth)
        assert score["learned_defects"] >= 5, score  # the archive holds enough to judge by
        assert score["recall"] >= MIN_RECALL, score
        assert score["precision"] >= MIN_PRECISION, score
        summary = pd.read_parquet(out / SUMMARY_FILE)
        assert summary.complete.all() and set(summary.image_id) == set(truth.image_id)
        per_image = objects_of(out).groupby("image_id").size()
        assert summary.set_index("image_id").n_defects.to_dict() == per_image.reindex(summary.image_id, fill_value=0).to_dict()

    def test_archive_and_outputs_in_a_bucket(self, local_run, held_out, trained, s3_bucket, s3_endpoint):
        """The same job with archive and outputs on S3 (Ray workers reach moto through the
        AWS_* variables they inherited): the same objects as the run on disk."""
        import s3fs

        registry, ref = trained
        fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
        fs.put(str(held_out) + "/", f"{s3_bucket}/archive/", recursive=True)
        out = f"{s3_bucket}/runs/r1"
        result = reprocess(f"{s3_bucket}/archive", out, ref, registry=registry, config=EnsembleConfig(conf=CONF))
        local_out, local_result = local_run
        assert (result.tiles_done, result.errors, result.objects) == (
            local_result.tiles_done, local_result.errors, local_result.objects)
        pd.testing.assert_frame_equal(objects_of(out), objects_of(local_out))
        with fs.open(f"{out}/{SUMMARY_FILE}", "rb") as f:
            remote = pd.read_parquet(f)
        assert remote.labels_uri.str.startswith(f"{s3_bucket}/archive/").all()  # beside each image in the bucket
        local = pd.read_parquet(local_out / SUMMARY_FILE)
        pd.testing.assert_frame_equal(remote.drop(columns="labels_uri"), local.drop(columns="labels_uri"))
