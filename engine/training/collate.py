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
- pixel_size_nm: B float32, nm per pixel of `image` after augmentation (scale jitter
  changes it; classifier, fusion, segmenter);
- context: B x 1 x Tc x Tc float32 (fusion);
- material, grade: B int64, -1 where unknown (ignored by the losses);
- mask: B x T x T int64 defect class per pixel (fusion);
- boxes: list of B tensors N_b x 4 float32 XYXY; masks: list of B tensors N_b x T x T
  float32 in {0, 1}, one per box (segmenter).
- diffusion: patch B x 2 x T x T float32 in [-1, 1] (image, mask of the crop's defect),
  defect_class, material B int64 (0-based), modality (tuple of B str), seed B int64.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from engine.augment import AugmentBatch, Compose, ScaleJitter, UnevenIllumination, build_pipeline


@dataclass
class PairedAugment(AugmentBatch):
    """AugmentBatch for two views of one region (fusion's detail and context tiles).

    `views` augments both with the same per-row seed and hence the same draws, so a flip
    or quarter turn (about each tile's centre, which is the same point of the specimen)
    agrees between them, and so do the grey levels: the detail tile is normalised with
    the context's percentiles (one grey level is one signal in both), the intensity map
    is a function of the grey level alone (augment.intensity), the noise's black level
    and dose are shared, and the illumination is one field at two scales (the detail
    view sees the central part of the context's field, UnevenIllumination.view_fraction).
    Scale jitter is left out: it crops at a random offset of each tile's own pixels,
    which would move the detail tile off the centre of its context; sampling several
    pyramid levels already varies the scale.
    """

    def pipeline(self, modality: str, material: str | None, view_fraction: float = 1.0) -> Compose:
        """The pipeline without scale jitter; view_fraction: this view's side as a fraction
        of the outer (context) view's, in nm, for the illumination field."""
        key = (modality, material, view_fraction)
        if key not in self._cache:
            if view_fraction == 1.0:
                full = build_pipeline(modality, material, self.strength)
                self._cache[key] = Compose(tuple(t for t in full.transforms if not isinstance(t, ScaleJitter)))
            else:
                outer = self.pipeline(modality, material)
                self._cache[key] = Compose(tuple(
                    dataclasses.replace(t, view_fraction=t.view_fraction * view_fraction)
                    if isinstance(t, UnevenIllumination) else t for t in outer.transforms))
        return self._cache[key]

    def views(self, detail: dict[str, np.ndarray], context: dict[str, np.ndarray],
              detail_fraction: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(detail, context) batches (AugmentBatch columns) augmented alike.

        detail_fraction: the detail tile's side over the context tile's, both in nm
        (detail px * T / (context px * Tc)); the detail is centred in its context.
        """
        if not 0.0 < detail_fraction <= 1.0:
            raise ValueError(f"PairedAugment.views: detail_fraction must be in (0, 1]; got {detail_fraction}")
        out_detail = self.augment(detail, lambda m, mat: self.pipeline(m, mat, detail_fraction))
        return out_detail, self.augment(context, self.pipeline)


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


def _pixel_size(pixel_size_nm: np.ndarray) -> torch.Tensor:
    # float32: every accelerator backend takes it (MPS has no float64)
    return torch.from_numpy(np.asarray(pixel_size_nm, np.float32).copy())


def _labels(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {"material": torch.from_numpy(np.asarray(batch["material_index"], np.int64)),
            "grade": torch.from_numpy(np.asarray(batch["grade_index"], np.int64))}


class ClassifierCollate(NumpyBatchCollateFn):
    """image + material/grade targets; optional augmentation of the image."""

    def __init__(self, augment: AugmentBatch | None = None):
        self.augment = augment

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        image, px = batch["image"], batch["pixel_size_nm"]
        if self.augment is not None:
            out = self.augment(_views(batch, "image"))
            image, px = out["image"], out["pixel_size_nm"]
        return {"image": _image_tensor(image), "pixel_size_nm": _pixel_size(px), **_labels(batch)}


class FusionCollate(NumpyBatchCollateFn):
    """detail image, context, semantic mask and material/grade targets; the two views
    augmented alike (PairedAugment)."""

    def __init__(self, augment: PairedAugment | None = None, context_offset: int = 2):
        self.augment = augment
        self.context_offset = context_offset

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        image, context, mask, px = batch["image"], batch["context"], batch["mask"], batch["pixel_size_nm"]
        if self.augment is not None:
            scale = 2.0**self.context_offset
            fraction = np.shape(image[0])[-1] / (np.shape(context[0])[-1] * scale)
            detail, outer = self.augment.views({**_views(batch, "image"), "mask": mask},
                                               _views(batch, "context", scale), fraction)
            image, mask, px = detail["image"], detail["mask"], detail["pixel_size_nm"]
            context = outer["image"]
        return {"image": _image_tensor(image), "context": _image_tensor(context), "pixel_size_nm": _pixel_size(px),
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
        image, mask, px = batch["image"], batch["mask"], batch["pixel_size_nm"]
        boxes, ids = batch["boxes"], batch["instance_ids"]
        if self.augment is not None:
            out = self.augment({**_views(batch, "image"), "mask": mask, "boxes": boxes, "instance_ids": ids})
            image, mask, boxes, ids = out["image"], out["mask"], out["boxes"], out["instance_ids"]
            px = out["pixel_size_nm"]
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
        return {"image": _image_tensor(image), "pixel_size_nm": _pixel_size(px), "boxes": box_list,
                "masks": mask_list}


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
