"""YOLO defect-detector training on an archive, locally or as a Ray task.

    from engine.training.detector import train_detector, train_detector_on_ray, evaluate_detector
    result = train_detector("archive/", out_dir="runs/det", model="yolov8n_tiny", epochs=10)
    result.metrics["mAP50"], result.checkpoint            # safetensors, reloads via engine.models
    ev = evaluate_detector(engine.models.load_model(result.checkpoint), "held_out/")

The archive is fed to Ultralytics' trainer tile by tile from its OME-Zarr images (no
exported dataset): see `dataset.ArchiveTileDataset` and `trainer.ArchiveDetectionTrainer`.
Importing this package does not import Ultralytics; the functions do, after
`engine.runtime.configure_offline()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.training.detector.tiles import ArchiveLabelError, TrainingTile, plan_tiles, split_images

if TYPE_CHECKING:
    from engine.training.detector.evaluate import DetectionEvaluation
    from engine.training.detector.train import DetectorTrainingResult


def train_detector(archive, **kwargs: Any) -> DetectorTrainingResult:
    """See `engine.training.detector.train.train_detector`."""
    from engine.training.detector.train import train_detector as run

    return run(archive, **kwargs)


def train_detector_on_ray(archive, **kwargs: Any) -> DetectorTrainingResult:
    """See `engine.training.detector.ray_task.train_detector_on_ray`."""
    from engine.training.detector.ray_task import train_detector_on_ray as run

    return run(archive, **kwargs)


def evaluate_detector(detector, archive, **kwargs: Any) -> DetectionEvaluation:
    """See `engine.training.detector.evaluate.evaluate_detector`."""
    from engine.training.detector.evaluate import evaluate_detector as run

    return run(detector, archive, **kwargs)


__all__ = [
    "ArchiveLabelError", "TrainingTile", "evaluate_detector", "plan_tiles", "split_images",
    "train_detector", "train_detector_on_ray",
]
