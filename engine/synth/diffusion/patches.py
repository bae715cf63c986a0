"""(image, mask) patches: the two-channel arrays the diffusion model learns and makes.

A real defect crop (engine.data.sample_plan with anchor="instances", read by
engine.data.training_samples) holds the normalised tile and its instance-id label
window; the patch keeps the one defect the crop is centred on as a binary mask.
"""

from __future__ import annotations

import numpy as np


def defect_patches(images: np.ndarray, instances: np.ndarray, target_ids) -> tuple[np.ndarray, np.ndarray]:
    """(B x S x S float32 in [0, 1] images, B x S x S int instance ids, B target ids) ->
    (images unchanged as float32, B x S x S bool masks of each row's target instance)."""
    images = np.asarray(images, np.float32)
    ids = np.asarray(target_ids, np.int64).reshape(-1, 1, 1)
    return images, np.asarray(instances) == ids


def to_model_space(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(B x S x S [0, 1] images, B x S x S bool masks) -> B x 2 x S x S float32 in [-1, 1]."""
    x = np.stack([np.asarray(images, np.float32), np.asarray(masks, np.float32)], axis=1)
    return x * 2.0 - 1.0
