"""What each model family learns: its samples, its batches, its loss and its metrics.

One generic loop (engine.training.loop) trains every family; a `Task` supplies the
family-specific parts:

- `layout`: the samples to plan (tile size, context tile, mask kind);
- `collate`: a per-epoch batch builder for that layout (engine.training.collate);
- `step`: forward pass, loss (a scalar to minimise) and metric *sums* over the batch;
- `metrics`: sums (added up over batches and over workers) -> epoch metrics.

Sums, not means, cross the workers, so an epoch's metrics weigh every sample alike
whatever batch or worker it fell in.

Losses:
- classifier: cross-entropy of material + cross-entropy of quality grade;
- fusion: the same two, plus the defect segmentation's per-pixel cross-entropy and
  the soft dice loss of its defect (any class) probability over the batch: defects are
  ~1% of the pixels, and cross-entropy alone lets the head settle on all-background
  (the CE + dice pairing of nnU-Net);
- segmenter (SAM): per box, binary cross-entropy + dice between the predicted mask
  logits and the instance mask (over the tile, or with box zoom over the box's window:
  there the training mask_iou is measured too), plus the squared error of
  SAM's own IoU estimate against the mask's actual IoU (as SAM was trained).
- diffusion: DDPM's noise-prediction mean squared error on (image, mask) defect
  patches, conditioned on (defect class, material, modality).
Targets of -1 (material or grade unknown) are ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch.nn import functional as F

from engine.data.sample_plan import SampleLayout, SampleSpec
from engine.errors import UnknownNameError

Stats = dict[str, torch.Tensor]


def _ce(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss over labelled rows, correct count, labelled count); target -1 ignored."""
    valid = target >= 0
    n = valid.sum()
    if int(n) == 0:
        return logits.sum() * 0.0, n.float(), n.float()
    loss = F.cross_entropy(logits[valid], target[valid])
    correct = (logits[valid].argmax(dim=1) == target[valid]).sum()
    return loss, correct.float(), n.float()


def _ratio(num: float, den: float, empty: float = 0.0) -> float:
    return float(num) / float(den) if den > 0 else empty


def _soft_dice_loss(prob: torch.Tensor, truth: torch.Tensor, dim=None) -> torch.Tensor:
    """1 - soft Dice of probabilities against a {0, 1} truth (float or bool), with +1
    smoothing so that an empty truth and an empty prediction agree: over every element
    (dim None: a scalar) or per row, summing over `dim`."""
    inter = (prob * truth).sum(dim=dim)
    return 1.0 - (2.0 * inter + 1.0) / (prob.sum(dim=dim) + truth.sum(dim=dim) + 1.0)


class Task:
    """Base of the per-family tasks (see module doc)."""

    family: ClassVar[str] = ""
    # How workers agree on gradients: "ddp" (DistributedDataParallel's bucketed
    # all-reduce, overlapped with backward) or "allreduce" (one all-reduce of all
    # gradients after backward; for models whose graph changes from step to step, which
    # DDP's hooks cannot follow).
    gradient_sync: ClassVar[str] = "ddp"

    def __init__(self, options: Mapping[str, Any] | None = None):
        self.options = dict(options or {})

    def layout(self, input_size: int, model_args: Mapping[str, Any], *, tile: int | None = None,
               levels: tuple[int, ...] | None = None, max_per_image: int | None = None) -> SampleLayout:
        raise NotImplementedError

    def collate(self, layout: SampleLayout, *, epoch: int, seed: int, augment_strength: float):
        raise NotImplementedError

    def step(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, Stats]:
        raise NotImplementedError

    def metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def config_overrides(self, specs: Sequence[SampleSpec]) -> dict[str, Any]:
        """Builder arguments learnt from the training plan (recorded in the checkpoint's
        config); none for most families."""
        return {}

    @staticmethod
    def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                out[k] = v.to(device, non_blocking=True)
            elif isinstance(v, list):
                out[k] = [t.to(device, non_blocking=True) for t in v]
            else:
                out[k] = v
        return out

    def _augment(self, cls, *, epoch: int, seed: int, strength: float):
        return cls(strength=strength, seed=seed, epoch=epoch) if strength > 0 else None


class ClassifierTask(Task):
    """Material and quality grade from one tile."""

    family = "classifier"

    def layout(self, input_size, model_args, *, tile=None, levels=None, max_per_image=None):
        return SampleLayout(tile or input_size, levels=levels, max_per_image=max_per_image)

    def collate(self, layout, *, epoch, seed, augment_strength):
        from engine.augment import AugmentBatch
        from engine.training.collate import ClassifierCollate

        return ClassifierCollate(self._augment(AugmentBatch, epoch=epoch, seed=seed, strength=augment_strength))

    def _heads(self, out, batch) -> tuple[torch.Tensor, Stats]:
        lm, cm, nm = _ce(out["material"], batch["material"])
        lg, cg, ng = _ce(out["grade"], batch["grade"])
        n = torch.tensor(float(batch["material"].shape[0]), device=lm.device)
        loss = lm + lg
        stats = {"n": n, "loss": loss.detach() * n, "material_loss": lm.detach() * n, "grade_loss": lg.detach() * n,
                 "material_correct": cm, "material_n": nm, "grade_correct": cg, "grade_n": ng}
        return loss, stats

    def step(self, model, batch):
        # the tile's pixel size after augmentation (scale jitter changes it), read by a
        # model built with pixel_size_input and ignored by the others
        return self._heads(model(batch["image"], pixel_size_nm=batch.get("pixel_size_nm")), batch)

    def metrics(self, sums):
        n = sums["n"]
        return {
            "loss": _ratio(sums["loss"], n), "material_loss": _ratio(sums["material_loss"], n),
            "grade_loss": _ratio(sums["grade_loss"], n),
            "material_acc": _ratio(sums["material_correct"], sums["material_n"]),
            "grade_acc": _ratio(sums["grade_correct"], sums["grade_n"]),
        }


class FusionTask(ClassifierTask):
    """Material, grade and per-pixel defect class from a detail tile and its context."""

    family = "fusion"

    def layout(self, input_size, model_args, *, tile=None, levels=None, max_per_image=None):
        t = tile or input_size
        return SampleLayout(t, context_tile=int(self.options.get("context_tile") or t),
                            context_offset=int(model_args.get("context_level_offset", 2)),
                            mask="semantic", levels=levels, max_per_image=max_per_image)

    def collate(self, layout, *, epoch, seed, augment_strength):
        from engine.training.collate import FusionCollate, PairedAugment

        return FusionCollate(self._augment(PairedAugment, epoch=epoch, seed=seed, strength=augment_strength),
                             context_offset=layout.context_offset)

    def step(self, model, batch):
        out = model(batch["image"], batch["context"], pixel_size_nm=batch.get("pixel_size_nm"))
        loss, stats = self._heads(out, batch)
        seg_logits, target = out["segmentation"], batch["mask"]
        ce = F.cross_entropy(seg_logits, target)
        fg_prob = 1.0 - seg_logits.softmax(dim=1)[:, 0]  # any defect class
        fg_true = target > 0
        dice = _soft_dice_loss(fg_prob, fg_true)
        ls = ce + dice
        pred = seg_logits.argmax(dim=1)
        fg_pred = pred > 0
        n = stats["n"]
        stats.update(
            loss=(loss + ls).detach() * n, seg_loss=ls.detach() * n, seg_dice_loss=dice.detach() * n,
            pixels=torch.tensor(float(target.numel()), device=ls.device),
            pixel_correct=(pred == target).sum().float(),
            defect_intersection=(fg_pred & fg_true).sum().float(),
            defect_union=(fg_pred | fg_true).sum().float(),
        )
        return loss + ls, stats

    def metrics(self, sums):
        out = super().metrics(sums)
        out.update(
            seg_loss=_ratio(sums["seg_loss"], sums["n"]),
            seg_dice_loss=_ratio(sums["seg_dice_loss"], sums["n"]),
            pixel_acc=_ratio(sums["pixel_correct"], sums["pixels"]),
            # no defect pixel predicted nor present: perfect agreement
            defect_iou=_ratio(sums["defect_intersection"], sums["defect_union"], empty=1.0),
        )
        return out


class SegmenterTask(Task):
    """SAM: one mask per ground-truth box prompt."""

    family = "segmenter"
    # SAM's decoder runs once per image that has boxes (a varying number of times per
    # step; none for an image without boxes) and a single-mask output leaves the other
    # mask tokens unused: DDP's per-parameter hooks refuse such graphs.
    gradient_sync = "allreduce"

    def layout(self, input_size, model_args, *, tile=None, levels=None, max_per_image=None):
        return SampleLayout(tile or input_size, mask="instance", require_instances=True, levels=levels,
                            max_per_image=max_per_image)

    def collate(self, layout, *, epoch, seed, augment_strength):
        from engine.augment import AugmentBatch
        from engine.training.collate import SegmenterCollate

        return SegmenterCollate(self._augment(AugmentBatch, epoch=epoch, seed=seed, strength=augment_strength),
                                max_boxes=int(self.options.get("max_boxes", 16)), seed=seed)

    def step(self, model, batch):
        images, boxes, masks = batch["image"], batch["boxes"], batch["masks"]
        outputs = model(images, boxes)
        sam = getattr(model, "module", model)  # under DDP the Segmenter is .module
        tile = tuple(images.shape[-2:])
        logits, targets, iou_pred = [], [], []
        for out, target in zip(outputs, masks):
            if target.shape[0] == 0:
                continue
            logit, target = sam.loss_frame(out, target, tile)  # N x h x w each
            logits.append(logit)
            targets.append(target)
            iou_pred.append(out.iou[:, 0])
        dev = images.device
        n_img = torch.tensor(float(images.shape[0]), device=dev)
        if not logits:
            # Every box fell out of frame: a zero loss that still touches every
            # parameter, so DDP's gradient all-reduce sees the same graph on all ranks.
            zero = sum(p.sum() for p in model.parameters()) * 0.0
            zeros = torch.zeros((), device=dev)
            return zero, {"n": n_img, "boxes": zeros, "loss": zeros, "bce": zeros, "dice": zeros,
                          "iou_mse": zeros, "iou": zeros}
        logit, target, iou_hat = torch.cat(logits), torch.cat(targets), torch.cat(iou_pred)
        bce = F.binary_cross_entropy_with_logits(logit, target, reduction="none").mean(dim=(1, 2))
        dice = _soft_dice_loss(torch.sigmoid(logit), target, dim=(1, 2))
        hard = logit > 0
        truth = target > 0.5
        union = (hard | truth).sum(dim=(1, 2)).float()
        iou = torch.where(union > 0, (hard & truth).sum(dim=(1, 2)).float() / union.clamp(min=1), torch.ones_like(union))
        iou_mse = (iou_hat - iou.detach()) ** 2
        per_box = bce + dice + iou_mse
        loss = per_box.mean()
        k = torch.tensor(float(len(per_box)), device=dev)
        return loss, {"n": n_img, "boxes": k, "loss": per_box.detach().sum(), "bce": bce.detach().sum(),
                      "dice": dice.detach().sum(), "iou_mse": iou_mse.detach().sum(), "iou": iou.detach().sum()}

    def metrics(self, sums):
        k = sums["boxes"]
        return {"loss": _ratio(sums["loss"], k), "bce": _ratio(sums["bce"], k), "dice_loss": _ratio(sums["dice"], k),
                "iou_mse": _ratio(sums["iou_mse"], k), "mask_iou": _ratio(sums["iou"], k)}


class DiffusionTask(Task):
    """DDPM on defect crops: one crop per ground-truth defect, centred on it."""

    family = "diffusion"

    def layout(self, input_size, model_args, *, tile=None, levels=None, max_per_image=None):
        return SampleLayout(tile or input_size, mask="instance", anchor="instances", levels=levels,
                            max_per_image=max_per_image)

    def collate(self, layout, *, epoch, seed, augment_strength):
        from engine.training.collate import DiffusionCollate

        return DiffusionCollate(seed if augment_strength > 0 else None, epoch)

    def config_overrides(self, specs):
        """What the model's config records of the crops, per condition (keys as in
        engine.synth.diffusion.calibration): pixel_size_nm, the crops' median pixel size
        (nm) at the level each is read at, which generated samples are written with;
        intensity_range, their median p1 / p99 (engine.synth.diffusion.intensity; reads a
        capped subset of the crops), the grey levels samples are written with; and
        trained_conditions, the keys of the conditions the crops teach, which synthesis
        keeps requests to."""
        from engine.models import labels
        from engine.synth.diffusion.calibration import crop_pixel_sizes, trained_conditions
        from engine.synth.diffusion.intensity import crop_intensity

        classes = labels.defect_class_names()
        return {"pixel_size_nm": crop_pixel_sizes(specs, classes),
                "intensity_range": crop_intensity(specs, classes),
                "trained_conditions": trained_conditions(specs, classes)}

    def step(self, model, batch):
        from engine.models.diffusion import diffusion_loss

        bare = getattr(model, "module", model)
        patch = batch["patch"]
        dev = patch.device
        n = torch.tensor(float(patch.shape[0]), device=dev)
        if patch.shape[0] == 0:  # every row lacked a material: a zero loss on every parameter
            zero = sum(p.sum() for p in model.parameters()) * 0.0
            return zero, {"n": n, "loss": torch.zeros((), device=dev)}
        modality = torch.as_tensor([bare.modalities.index(m) for m in batch["modality"]], device=dev)
        condition = bare.condition_index(batch["defect_class"], batch["material"], modality)
        # Noise and timesteps seeded by the batch's rows: reproducible, and different
        # on every rank (the global RNG is seeded alike on all of them).
        g = torch.Generator().manual_seed(int(batch["seed"].sum()) & 0x7FFFFFFF)
        loss = diffusion_loss(model, patch, condition, generator=g)
        return loss, {"n": n, "loss": loss.detach() * n}

    def metrics(self, sums):
        return {"loss": _ratio(sums["loss"], sums["n"])}


TASKS: dict[str, type[Task]] = {t.family: t for t in (ClassifierTask, FusionTask, SegmenterTask, DiffusionTask)}


def make_task(family: str, options: Mapping[str, Any] | None = None) -> Task:
    """The task for a model family; detectors train through Ultralytics, not here."""
    if family not in TASKS:
        raise UnknownNameError(
            f"no Ray Train task for model family {family!r}; trainable families: {', '.join(TASKS)} "
            "(detectors train through engine.models.detector)"
        )
    return TASKS[family](options)
