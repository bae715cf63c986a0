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


def mask_contrast(patch: np.ndarray) -> float:
    """How far the image inside the mask stands out from the image outside it: |mean
    inside - mean outside| in pooled standard deviations (an effect size, so the same
    for any grey scale) of one 2 x S x S (image, mask) patch in [-1, 1]. 0 when the mask
    is empty or covers the whole patch (nothing to compare), and for a flat image.

    Most real defect crops score 1 to 8 (a defect is what stands out); a flat or noise
    image under a defect-shaped mask scores about 0, a real defect under a mask moved
    off it mostly below 1.
    """
    image, mask = np.asarray(patch[0], np.float64), np.asarray(patch[1]) > 0
    if not mask.any() or mask.all():
        return 0.0
    inside, outside = image[mask], image[~mask]
    spread = np.sqrt((inside.var() + outside.var()) / 2)
    # a flat image has no spread: no contrast, not 0 / 0
    return float(abs(inside.mean() - outside.mean()) / spread) if spread > 1e-6 else 0.0
