"""Per-family tasks and batch collation, without Ray: losses, metric sums, augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.data.sample_plan import SampleLayout, plan_samples
from engine.data.training_samples import ReadSamples, _columns
from engine.errors import UnknownNameError
from engine.models import create_model
from engine.models.labels import GRADES, defect_class_names, material_names
from engine.training.collate import PairedAugment
from engine.training.tasks import ClassifierTask, FusionTask, SegmenterTask, make_task

LABELS = dict(materials=material_names(), grades=GRADES, defect_classes=defect_class_names())


def read_batch(archive, layout: SampleLayout, n: int = 4) -> dict[str, np.ndarray]:
    """A batch as Ray Data hands it to the collate function, read in this process."""
    specs = plan_samples(archive, layout, **LABELS)
    specs = sorted(specs, key=lambda s: -len(s.instance_ids))[:n]  # tiles with defects first
    reader = ReadSamples(layout.mask)
    return _columns([reader.read(s) for s in specs])


def sums_of(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in stats.items()}


def assert_every_parameter_has_a_gradient(model):
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


class TestMakeTask:
    def test_unknown_family_lists_the_trainable_ones(self):
        with pytest.raises(UnknownNameError, match="classifier, fusion, segmenter"):
            make_task("detector")

    @pytest.mark.parametrize("family, cls", [("classifier", ClassifierTask), ("fusion", FusionTask),
                                             ("segmenter", SegmenterTask)])
    def test_each_family_has_its_task(self, family, cls):
        assert isinstance(make_task(family), cls)


class TestClassifierTask:
    def test_step_loss_and_metrics(self, train_archive):
        task = ClassifierTask()
        layout = task.layout(128, {})
        batch = task.collate(layout, epoch=0, seed=0, augment_strength=0.5)(read_batch(train_archive, layout))
        assert batch["image"].shape == (4, 1, 128, 128) and batch["image"].dtype == torch.float32
        torch.manual_seed(0)
        model = create_model("classifier", "resnet10t")
        loss, stats = task.step(model, batch)
        loss.backward()
        assert_every_parameter_has_a_gradient(model)
        m = task.metrics(sums_of(stats))
        assert m["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
        assert 0.0 <= m["material_acc"] <= 1.0 and 0.0 <= m["grade_acc"] <= 1.0

    def test_unknown_labels_are_ignored(self):
        task = ClassifierTask()
        model = create_model("classifier", "resnet10t")
        batch = {"image": torch.rand(2, 1, 64, 64), "material": torch.tensor([-1, -1]), "grade": torch.tensor([0, -1])}
        loss, stats = task.step(model, batch)
        assert math.isfinite(float(loss.detach())) and float(stats["material_n"]) == 0 and float(stats["grade_n"]) == 1
        assert task.metrics(sums_of(stats))["material_acc"] == 0.0  # nothing labelled: 0, not NaN


class TestFusionTask:
    def test_step_loss_and_metrics(self, train_archive):
        task = FusionTask()
        layout = task.layout(64, {"context_level_offset": 2})
        assert (layout.tile, layout.context_tile, layout.context_offset, layout.mask) == (64, 64, 2, "semantic")
        batch = task.collate(layout, epoch=1, seed=0, augment_strength=0.5)(read_batch(train_archive, layout))
        assert batch["context"].shape == (4, 1, 64, 64) and batch["mask"].shape == (4, 64, 64)
        assert batch["mask"].dtype == torch.int64 and int(batch["mask"].max()) > 0
        torch.manual_seed(0)
        model = create_model("fusion", "fusion_tiny")
        loss, stats = task.step(model, batch)
        loss.backward()
        assert_every_parameter_has_a_gradient(model)
        m = task.metrics(sums_of(stats))
        assert m["loss"] == pytest.approx(m["material_loss"] + m["grade_loss"] + m["seg_loss"], rel=1e-5)
        assert 0.0 <= m["pixel_acc"] <= 1.0 and 0.0 <= m["defect_iou"] <= 1.0
        assert 0.0 < m["seg_dice_loss"] < 1.0 and m["seg_loss"] > m["seg_dice_loss"]

    def test_an_all_background_segmentation_pays_the_whole_dice_term(self, train_archive):
        """Defects are ~1% of the pixels: cross-entropy barely punishes a head that calls
        everything background; the dice term charges it in full."""
        task = FusionTask()
        layout = task.layout(64, {"context_level_offset": 2})
        batch = task.collate(layout, epoch=1, seed=0, augment_strength=0.0)(read_batch(train_archive, layout))
        real = create_model("fusion", "fusion_tiny")(batch["image"], batch["context"])

        def background(image, context):
            seg = torch.zeros_like(real["segmentation"])
            seg[:, 0] = 20.0  # background, confidently, everywhere
            return {**real, "segmentation": seg}

        _, stats = task.step(background, batch)
        m = task.metrics(sums_of(stats))
        assert m["seg_dice_loss"] == pytest.approx(1.0, abs=0.02) and m["defect_iou"] == 0.0
        assert m["seg_loss"] - m["seg_dice_loss"] < 0.3  # cross-entropy: the defects' few pixels only

    def test_views_get_the_same_draws(self, train_archive):
        """Detail and context are turned and re-toned alike: with identical pixels in
        both views, the augmented views stay identical, for every seed."""
        layout = FusionTask().layout(64, {})
        raw = read_batch(train_archive, layout, n=6)
        raw["context"] = raw["image"].copy()
        raw["modality"] = np.array(["TEM"] * 6, dtype=object)  # TEM allows quarter turns
        raw["pixel_size_nm"] = np.full(6, 1.0)
        task = FusionTask()
        for epoch in range(3):
            collate = task.collate(layout, epoch=epoch, seed=0, augment_strength=1.0)
            collate.context_offset = 0  # same pixel size in both views, for this comparison
            out = collate(dict(raw))
            assert torch.equal(out["image"], out["context"])
            assert not torch.equal(out["image"][:, 0], torch.from_numpy(raw["image"]))

    def test_paired_augment_leaves_out_scale_jitter(self):
        names = PairedAugment(strength=1.0).pipeline("SEM", "ferritic_steel").names
        assert "scale" not in names and "dihedral" in names


class TestSegmenterTask:
    def test_step_loss_and_iou(self, train_archive):
        task = SegmenterTask({"max_boxes": 2})
        layout = task.layout(256, {}, tile=128)
        raw = read_batch(train_archive, layout, n=2)
        batch = task.collate(layout, epoch=0, seed=0, augment_strength=0.5)(raw)
        assert batch["image"].shape == (2, 1, 128, 128)
        for boxes, masks in zip(batch["boxes"], batch["masks"]):
            assert boxes.shape[1] == 4 and masks.shape[1:] == (128, 128) and len(boxes) == len(masks) <= 2
            for (x0, y0, x1, y1), m in zip(boxes.tolist(), masks):
                ys, xs = torch.nonzero(m, as_tuple=True)
                assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # tight after augmentation
        torch.manual_seed(0)
        model = create_model("segmenter", "sam_tiny")
        loss, stats = task.step(model, batch)
        loss.backward()
        m = task.metrics(sums_of(stats))
        assert math.isfinite(float(loss.detach())) and 0.0 <= m["mask_iou"] <= 1.0 and m["dice_loss"] > 0

    def test_no_box_left_gives_a_zero_loss_touching_every_parameter(self):
        task = SegmenterTask()
        model = create_model("segmenter", "sam_tiny")
        batch = {"image": torch.rand(1, 1, 64, 64), "boxes": [torch.zeros(0, 4)], "masks": [torch.zeros(0, 64, 64)]}
        loss, stats = task.step(model, batch)
        loss.backward()
        assert float(loss.detach()) == 0.0 and float(stats["boxes"]) == 0
        assert_every_parameter_has_a_gradient(model)
        assert task.metrics(sums_of(stats))["mask_iou"] == 0.0
