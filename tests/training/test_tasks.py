"""Per-family tasks and batch collation, without Ray: losses, metric sums, augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.augment import AugmentBatch, Compose, IntensityMap, UnevenIllumination
from engine.data.sample_plan import SampleLayout, plan_samples
from engine.data.training_samples import ReadSamples, _columns
from engine.errors import UnknownNameError
from engine.models import create_model
from engine.models.labels import GRADES, defect_class_names, material_names
from engine.models.segmenter import SamOutput
from engine.training.collate import ClassifierCollate, FusionCollate, PairedAugment
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


# A mask without any symmetry of the square (an "F" of 16-px blocks): every rotation or
# mirror moves it, so a mask left behind by its image is caught.
F_BLOCKS = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]])


def coded_batch(n: int = 8, tile: int = 64, pixel_size_nm: float = 1.0) -> dict[str, np.ndarray]:
    """A fusion/classifier batch whose mask is readable from its image: defect blocks
    bright (0.8), background dark (0.2); context = the same picture."""
    mask = np.kron(F_BLOCKS, np.ones((tile // 4, tile // 4), np.int64))
    image = np.where(mask > 0, 0.8, 0.2).astype(np.float32)
    return {"image": np.stack([image] * n), "context": np.stack([image] * n), "mask": np.stack([mask] * n),
            "modality": np.array(["TEM"] * n, dtype=object), "material": np.array(["ferritic_steel"] * n, dtype=object),
            "pixel_size_nm": np.full(n, pixel_size_nm), "seed": np.arange(n),
            "material_index": np.zeros(n, np.int64), "grade_index": np.zeros(n, np.int64)}


def block_means(image: np.ndarray) -> np.ndarray:
    """4 x 4 means of square 16-px blocks of a T x T image."""
    t = image.shape[-1] // 4
    return image.reshape(4, t, 4, t).mean(axis=(1, 3))


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


    def test_accuracy_counts_the_right_rows(self):
        """Hand-made logits: material right for 3 of its 4 labelled rows (the fifth is
        unlabelled), grade right for 4 of 5."""
        task = ClassifierTask()
        material = torch.tensor([0, 1, 2, 1, -1])
        grade = torch.tensor([2, 0, 1, 1, 0])
        m_logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 2]), 3).float() * 5.0
        g_logits = torch.nn.functional.one_hot(torch.tensor([2, 0, 1, 2, 0]), 3).float() * 5.0
        model = lambda image, pixel_size_nm=None: {"material": m_logits, "grade": g_logits}  # noqa: E731
        _, stats = task.step(model, {"image": torch.zeros(5, 1, 8, 8), "material": material, "grade": grade})
        m = task.metrics(sums_of(stats))
        assert m["material_acc"] == 0.75 and float(stats["material_n"]) == 4
        assert m["grade_acc"] == 0.8  # 4 of 5 (grade 1 of row 3 predicted 2)

    def test_collate_keeps_the_augmented_pixel_size(self):
        """Scale jitter changes the pixel size; the batch reports the new one per row."""
        batch = coded_batch()
        aug = AugmentBatch(strength=1.0, seed=1)
        out = ClassifierCollate(aug)(dict(batch))
        want = aug(dict(batch))["pixel_size_nm"]
        np.testing.assert_allclose(out["pixel_size_nm"].numpy(), want, rtol=1e-6)
        assert (want < 1.0).any()  # scale jitter fired on some row
        assert torch.equal(ClassifierCollate(None)(dict(batch))["pixel_size_nm"], torch.ones(8))


class TestFusionTask:
    @pytest.mark.parametrize("name", ["fusion_tiny", "fusion_tiny_px"])  # the latter needs the batch's pixel sizes
    def test_step_loss_and_metrics(self, train_archive, name):
        task = FusionTask()
        layout = task.layout(64, {"context_level_offset": 2})
        assert (layout.tile, layout.context_tile, layout.context_offset, layout.mask) == (64, 64, 2, "semantic")
        batch = task.collate(layout, epoch=1, seed=0, augment_strength=0.5)(read_batch(train_archive, layout))
        assert batch["context"].shape == (4, 1, 64, 64) and batch["mask"].shape == (4, 64, 64)
        assert batch["mask"].dtype == torch.int64 and int(batch["mask"].max()) > 0
        torch.manual_seed(0)
        model = create_model("fusion", name)
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

        def background(image, context, pixel_size_nm=None):
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

    def test_pixel_metrics_of_known_predictions(self):
        """Defects fill the left half of an 8 x 8 tile; the stub predicts them except in
        the bottom two rows and adds the top two rows' right half: 16 of 64 pixels wrong
        (pixel_acc 0.75), defect IoU 24 / 40 = 0.6."""
        target = torch.zeros(1, 8, 8, dtype=torch.int64)
        target[0, :, :4] = 1
        pred = target.clone()
        pred[0, 6:, :4] = 0
        pred[0, :2, 4:] = 2
        seg = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float() * 8.0
        out = {"material": torch.tensor([[5.0, 0.0]]), "grade": torch.tensor([[0.0, 5.0]]), "segmentation": seg}
        batch = {"image": torch.zeros(1, 1, 8, 8), "context": torch.zeros(1, 1, 8, 8), "mask": target,
                 "material": torch.tensor([0]), "grade": torch.tensor([0])}
        task = FusionTask()
        _, stats = task.step(lambda image, context, pixel_size_nm=None: out, batch)
        m = task.metrics(sums_of(stats))
        assert m["pixel_acc"] == 0.75 and m["defect_iou"] == pytest.approx(0.6)
        assert m["material_acc"] == 1.0 and m["grade_acc"] == 0.0

    def test_mask_follows_the_augmented_image(self):
        """The mask is readable from the image (defects bright): after augmentation the
        bright blocks are exactly the mask's blocks, in every row and epoch, and the
        draws did turn the pictures."""
        batch = coded_batch()
        moved = 0
        for epoch in range(3):
            out = FusionTask().collate(FusionTask().layout(64, {}), epoch=epoch, seed=0,
                                       augment_strength=0.5)(dict(batch))
            for image, mask, raw in zip(out["image"][:, 0].numpy(), out["mask"].numpy(), batch["mask"]):
                fg = block_means(mask.astype(np.float64)) > 0.5
                means = block_means(image)
                assert fg.any() and (~fg).any()
                assert means[fg].min() > means[~fg].max()
                moved += not np.array_equal(mask, raw)
            assert torch.equal(out["pixel_size_nm"], torch.ones(8))  # no scale jitter
        assert moved >= 12  # of 24 rows; D4 has 7 operations that move the "F"

    def test_one_grey_level_and_one_field_in_both_views(self):
        """The detail tile is the central part of its context (same pixel size here, so
        its central half): after the grey-level map and the illumination field, it is
        still exactly the central half of the augmented context."""

        class ToneOnly(PairedAugment):
            def pipeline(self, modality, material, view_fraction=1.0):
                light = UnevenIllumination(vignetting_range=(0.3, 0.3), gradient_range=(0.2, 0.2), tile_fraction=0.5,
                                           view_fraction=view_fraction)
                return Compose((IntensityMap(gamma_range=(0.5, 2.0), contrast_range=(0.5, 2.0),
                                             brightness_range=(-0.2, 0.2)), light))

        rng = np.random.default_rng(0)
        context = rng.random((4, 64, 64)).astype(np.float32)
        detail = context[:, 16:48, 16:48].copy()
        cols = {"modality": np.array(["optical"] * 4), "pixel_size_nm": np.full(4, 300.0), "seed": np.arange(4)}
        aug = ToneOnly(strength=1.0, seed=0)
        d, c = aug.views({"image": detail, **cols}, {"image": context, **cols}, 0.5)
        np.testing.assert_allclose(d["image"], c["image"][:, 16:48, 16:48], rtol=1e-6)
        assert not np.allclose(c["image"], context, atol=0.01)

    def test_fusion_collate_gives_the_detail_its_part_of_the_field(self):
        """context_offset 2, equal tiles: the detail covers the context's central quarter
        at 4 x the resolution, and its field is that quarter's."""

        class LightOnly(PairedAugment):
            def pipeline(self, modality, material, view_fraction=1.0):
                return Compose((UnevenIllumination(vignetting_range=(0.3, 0.3), gradient_range=(0.2, 0.2),
                                                   tile_fraction=0.5, view_fraction=view_fraction),))

        batch = coded_batch(n=3)
        batch["image"][:] = 0.5
        batch["context"][:] = 0.5
        out = FusionCollate(LightOnly(strength=1.0), context_offset=2)(batch)
        detail, context = out["image"][:, 0].numpy(), out["context"][:, 0].numpy()
        for d, c in zip(detail, context):
            coarse = d.reshape(16, 4, 16, 4).mean(axis=(1, 3))  # detail at the context's pixel size
            np.testing.assert_allclose(coarse, c[24:40, 24:40], atol=2e-4)
            assert np.ptp(c) > 0.02

    def test_paired_augment_leaves_out_scale_jitter(self):
        names = PairedAugment(strength=1.0).pipeline("SEM", "ferritic_steel").names
        assert "scale" not in names and "dihedral" in names


class TestSegmenterTask:
    def test_step_loss_and_iou(self, train_archive):
        task = SegmenterTask({"max_boxes": 2})
        layout = task.layout(256, {}, tile=128)
        raw = read_batch(train_archive, layout, n=2)
        batch = task.collate(layout, epoch=0, seed=0, augment_strength=0.5)(raw)
        assert batch["image"].shape == (2, 1, 128, 128) and batch["pixel_size_nm"].shape == (2,)
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

    def test_mask_iou_of_known_predictions(self):
        """A stub whose logits are positive on the left half of each box's mask (and
        negative elsewhere): every box's IoU, hence mask_iou, is exactly 0.5."""
        masks = torch.zeros(2, 32, 32)
        masks[0, 8:16, 4:20] = 1.0
        masks[1, 20:28, 10:18] = 1.0
        logits = torch.full((2, 32, 32), -5.0)
        logits[0, 8:16, 4:12] = 5.0
        logits[1, 20:28, 10:14] = 5.0

        class Stub:
            def __call__(self, images, boxes):
                return [SamOutput(logits[:, None], torch.full((2, 1), 0.5))]

            def loss_frame(self, out, target, tile):
                return out.low_res_logits[:, 0], target

        task = SegmenterTask()
        batch = {"image": torch.zeros(1, 1, 32, 32), "boxes": [torch.zeros(2, 4)], "masks": [masks]}
        _, stats = task.step(Stub(), batch)
        m = task.metrics(sums_of(stats))
        assert m["mask_iou"] == pytest.approx(0.5) and float(stats["boxes"]) == 2
        assert m["iou_mse"] == pytest.approx(0.0)  # the stub's own estimate, 0.5, is right

    def test_no_box_left_gives_a_zero_loss_touching_every_parameter(self):
        task = SegmenterTask()
        model = create_model("segmenter", "sam_tiny")
        batch = {"image": torch.rand(1, 1, 64, 64), "boxes": [torch.zeros(0, 4)], "masks": [torch.zeros(0, 64, 64)]}
        loss, stats = task.step(model, batch)
        loss.backward()
        assert float(loss.detach()) == 0.0 and float(stats["boxes"]) == 0
        assert_every_parameter_has_a_gradient(model)
        assert task.metrics(sums_of(stats))["mask_iou"] == 0.0
