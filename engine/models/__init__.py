"""Model architectures and factories, and checkpoint I/O that never runs code from a file.

    from engine.models import create_model, list_models
    det = create_detector("yolov8n_tiny")         # Detector: .predict(tiles) -> Detections
    sam = create_segmenter("sam_vit_b", checkpoint="sam_vit_b_01ec64.pth")
    clf = create_classifier("resnet10t")          # forward(x) -> {"material", "grade"}
    fus = create_fusion("fusion_tiny")            # forward(detail, context) -> {..., "segmentation"}
    dif = create_diffusion("ddpm_tiny")           # forward(noisy, t, condition) -> predicted noise
    save_checkpoint(clf, "clf.safetensors")       # -> sha256; load_model(path, expected_sha256=...)

Every model is built from a registered YAML config (engine/models/configs/<family>/) with
random weights; nothing is downloaded. Inputs are single-channel micrograph tiles.
"""

from __future__ import annotations

from pathlib import Path

from engine.models.checkpoint import load_model, load_state_dict, save_checkpoint, sha256_file, verify_sha256
from engine.models.errors import (
    CheckpointError,
    ChecksumMismatchError,
    ModelConfigError,
    UnknownModelError,
    UnsafeCheckpointError,
)
from engine.models.families import FAMILIES, ModelConfig, build, create_model, get_config, list_models
from engine.models.labels import GRADES, defect_class_names, material_names


def create_detector(name: str, **overrides):
    """A YOLO `Detector` (engine.models.detector) from the registered config `name`."""
    return create_model("detector", name, **overrides)


def create_segmenter(name: str, checkpoint: str | Path | None = None, *, expected_sha256: str | None = None, **overrides):
    """A SAM `Segmenter`; with `checkpoint`, weights from that file (Meta's .pth read
    weights-only, or safetensors), checked against `expected_sha256` when given."""
    model = create_model("segmenter", name, **overrides)
    if checkpoint is not None:
        from engine.models.segmenter import load_sam_weights

        load_sam_weights(model, checkpoint, expected_sha256=expected_sha256)
    return model


def create_classifier(name: str, **overrides):
    """A timm `Classifier` with material and grade heads."""
    return create_model("classifier", name, **overrides)


def create_fusion(name: str, **overrides):
    """A multi-scale `FusionModel` (detail + context views; material, grade, segmentation)."""
    return create_model("fusion", name, **overrides)


def create_diffusion(name: str, **overrides):
    """A conditional `DefectDiffusion` UNet over (image, mask) patches (engine.models.diffusion)."""
    return create_model("diffusion", name, **overrides)


def load_detector_checkpoint(path: str | Path, expected_sha256: str):
    """An Ultralytics .pt detector, unpickled only after its sha256 matches (see detector)."""
    from engine.models.detector import load_detector_checkpoint as load

    return load(path, expected_sha256)


__all__ = [
    "FAMILIES", "GRADES", "ModelConfig", "defect_class_names", "material_names",
    "build", "create_model", "get_config", "list_models",
    "create_detector", "create_segmenter", "create_classifier", "create_fusion",
    "create_diffusion",
    "load_detector_checkpoint", "save_checkpoint", "load_model", "load_state_dict",
    "sha256_file", "verify_sha256",
    "CheckpointError", "ChecksumMismatchError", "ModelConfigError", "UnknownModelError", "UnsafeCheckpointError",
]
