"""Last-mile batch preparation on the training worker: augmentation, then tensors.

Runs as `iter_torch_batches(collate_fn=...)`, in Ray Data's prefetch threads, so it
overlaps with the model's step. Augmentation is applied here rather than in the Ray
Data read stage because it must change every epoch: the dataset handed to the trainer is
one fixed plan, while a collate function is made per epoch with that epoch's number
(AugmentBatch seeds each row by (seed, epoch, row seed), so a run is reproducible
whichever worker or batch a row lands in).

Input columns are those of engine.data.training_samples. Outputs (torch, CPU; the loop
moves them to its device):

- image: B x 1 x T x T float32 in [0, 1];
- context: B x 1 x Tc x Tc float32 (fusion);
- material, grade: B int64, -1 where unknown (ignored by the losses);
- mask: B x T x T int64 defect class per pixel (fusion);
- boxes: list of B tensors N_b x 4 float32 XYXY; masks: list of B tensors N_b x T x T
  float32 in {0, 1}, one per box (segmenter).
- diffusion: patch B x 2 x T x T float32 in [-1, 1] (image, mask of the crop's defect),
  defect_class, material B int64 (0-based), modality (tuple of B str), seed B int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from engine.augment import AugmentBatch, Compose, ScaleJitter, build_pipeline


@dataclass
class PairedAugment(AugmentBatch):
    """AugmentBatch for two views of one region (fusion's detail and context tiles).

    Both views are augmented with the same per-row seed and hence the same draws, so
    a flip or quarter turn (about each tile's centre, which is the same point of the
    specimen) and the grey-level changes agree between them. Scale jitter is left out:
    it crops at a random offset of each tile's own pixels, which would move the detail
    tile off the centre of its context; sampling several pyramid levels already varies
    the scale.
    """

    def pipeline(self, modality: str, material: str | None) -> Compose:
        key = (modality, material)
        if key not in self._cache:
            full = build_pipeline(modality, material, self.strength)
            self._cache[key] = Compose(tuple(t for t in full.transforms if not isinstance(t, ScaleJitter)))
        return self._cache[key]


def _views(batch: dict[str, np.ndarray], image: str, pixel_scale: float = 1.0) -> dict[str, np.ndarray]:
    """The columns AugmentBatch reads, with `image` as the picture."""
    out = {"image": batch[image], "modality": batch["modality"],
           "pixel_size_nm": np.asarray(batch["pixel_size_nm"], np.float64) * pixel_scale,
           "seed": batch["seed"]}
    if "material" in batch:
        out["material"] = np.array([m if m else None for m in batch["material"]], dtype=object)
    return out


def _image_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.stack(list(images)) if images.dtype == object else images,
                                                 dtype=np.float32)).unsqueeze(1)


def _labels(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {"material": torch.from_numpy(np.asarray(batch["material_index"], np.int64)),
            "grade": torch.from_numpy(np.asarray(batch["grade_index"], np.int64))}


class ClassifierCollate(NumpyBatchCollateFn):
    """image + material/grade targets; optional augmentation of the image."""

    def __init__(self, augment: AugmentBatch | None = None):
        self.augment = augment

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        image = batch["image"]
        if self.augment is not None:
            image = self.augment(_views(batch, "image"))["image"]
        return {"image": _image_tensor(image), **_labels(batch)}


class FusionCollate(NumpyBatchCollateFn):
    """detail image, context, semantic mask and material/grade targets; the two views
    augmented alike (PairedAugment)."""

    def __init__(self, augment: PairedAugment | None = None, context_offset: int = 2):
        self.augment = augment
        self.context_offset = context_offset

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        image, context, mask = batch["image"], batch["context"], batch["mask"]
        if self.augment is not None:
            detail = self.augment({**_views(batch, "image"), "mask": mask})
            image, mask = detail["image"], detail["mask"]
            context = self.augment(_views(batch, "context", 2.0**self.context_offset))["image"]
        return {"image": _image_tensor(image), "context": _image_tensor(context),
                "mask": torch.from_numpy(np.asarray(np.stack(list(mask)) if mask.dtype == object else mask,
                                                    dtype=np.int64)),
                **_labels(batch)}


class SegmenterCollate(NumpyBatchCollateFn):
    """image, one box per visible instance and that instance's binary mask.

    Augmentation moves the instance mask with the image and recomputes each box from
    the moved mask (engine.augment's rule for instance masks), so prompts stay tight.
    At most `max_boxes` instances per image (a seeded choice) bound the decoder's work.
    """

    def __init__(self, augment: AugmentBatch | None = None, max_boxes: int = 16, seed: int = 0):
        self.augment = augment
        self.max_boxes = max_boxes
        self.seed = seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, object]:
        image, mask = batch["image"], batch["mask"]
        boxes, ids = batch["boxes"], batch["instance_ids"]
        if self.augment is not None:
            out = self.augment({**_views(batch, "image"), "mask": mask, "boxes": boxes, "instance_ids": ids})
            image, mask, boxes, ids = out["image"], out["mask"], out["boxes"], out["instance_ids"]
        box_list, mask_list = [], []
        for i in range(len(image)):
            b = np.asarray(boxes[i], np.float32).reshape(-1, 4)
            k = np.asarray(ids[i], np.int64).reshape(-1)
            if len(k) > self.max_boxes:
                rng = np.random.default_rng([self.seed, int(batch["seed"][i])])
                keep = np.sort(rng.choice(len(k), self.max_boxes, replace=False))
                b, k = b[keep], k[keep]
            m = np.asarray(mask[i])
            box_list.append(torch.from_numpy(b))
            mask_list.append(torch.from_numpy((m[None] == k[:, None, None]).astype(np.float32)))
        return {"image": _image_tensor(image), "boxes": box_list, "masks": mask_list}


class DiffusionCollate(NumpyBatchCollateFn):
    """Defect crops (mask="instance", anchor="instances") -> (image, mask) patches.

    Augmentation: with a seed, each row is flipped up-down and/or left-right by draws
    seeded per (seed, epoch, row seed). Flips only: they keep a defect a plausible
    defect of its class and keep SEM scan lines horizontal. Rows whose material is
    unknown (-1) are dropped: the model is conditioned on it.
    """

    def __init__(self, seed: int | None = None, epoch: int = 0):
        self.seed, self.epoch = seed, epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, object]:
        from engine.synth.diffusion.patches import defect_patches, to_model_space

        keep = np.flatnonzero(np.asarray(batch["material_index"]) >= 0)
        targets = [int(np.asarray(batch["instance_ids"][i]).ravel()[0]) for i in keep]
        classes = [int(np.asarray(batch["classes"][i]).ravel()[0]) - 1 for i in keep]
        images, masks = defect_patches(batch["image"][keep], batch["mask"][keep], targets)
        if self.seed is not None:
            for j, i in enumerate(keep):
                flip = np.random.default_rng([self.seed, self.epoch, int(batch["seed"][i])]).random(2) < 0.5
                axes = tuple(a for a, f in zip((0, 1), flip) if f)
                if axes:
                    images[j], masks[j] = np.flip(images[j], axes), np.flip(masks[j], axes)
        return {
            "patch": torch.from_numpy(np.ascontiguousarray(to_model_space(images, masks))),
            "defect_class": torch.as_tensor(classes, dtype=torch.int64),
            "material": torch.as_tensor(np.asarray(batch["material_index"])[keep], dtype=torch.int64),
            "modality": tuple(str(batch["modality"][i]) for i in keep),  # a tuple: Task.to_device moves lists
            "seed": torch.as_tensor(np.asarray(batch["seed"])[keep], dtype=torch.int64),
        }
