"""The diffusion family on Ray Train: defect-centred crops in, a checkpoint that samples out."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.data.sample_plan import SampleLayout, SamplePlanError, plan_samples
from engine.data.training_samples import ReadSamples
from engine.models import labels
from engine.synth.truth import TRUTH_FILE

ORDERS = dict(materials=labels.material_names(), grades=labels.GRADES, defect_classes=labels.defect_class_names())


class TestInstanceCrops:
    def test_one_crop_per_defect_centred_on_it(self, train_archive):
        import pandas as pd

        truth = pd.read_parquet(train_archive / TRUTH_FILE)
        specs = plan_samples(train_archive, SampleLayout(32, mask="instance", anchor="instances"), **ORDERS)
        assert len(specs) == len(truth)
        reader = ReadSamples("instance")
        for spec in specs:
            row = truth[(truth.image_id == spec.image_id) & (truth.instance_id == spec.instance_ids[0])].iloc[0]
            assert labels.defect_class_names()[spec.instance_classes[0] - 1] == row.defect_class
            f = 2**spec.level
            side = max(row.y1 - row.y0, row.x1 - row.x0) / f
            assert side <= 0.75 * 32 or spec.level == max(s.level for s in specs if s.image_id == spec.image_id)
            sample = reader.read(spec)
            ys, xs = np.nonzero(sample["mask"] == spec.instance_ids[0])
            assert len(ys), "the crop shows its defect"
            # the defect's box centre is the crop's centre, within a pixel
            assert abs((ys.min() + ys.max() + 1) / 2 - 16) <= 1.5 or side > 32
            assert abs((xs.min() + xs.max() + 1) / 2 - 16) <= 1.5 or side > 32

    def test_instance_anchor_has_no_context(self):
        with pytest.raises(SamplePlanError, match="no context tile"):
            SampleLayout(32, context_tile=32, anchor="instances")


class TestWhatTrainingRecords:
    def test_pixel_sizes_and_grey_levels_reach_the_checkpoint(self, train_archive, tmp_path):
        # generated samples are written with the real crops' grey levels per condition
        # (engine.synth.diffusion.intensity), recorded in the config as pixel sizes are
        from engine.models import create_diffusion, load_model, save_checkpoint
        from engine.synth.diffusion.intensity import crop_intensity
        from engine.training.tasks import make_task

        specs = plan_samples(train_archive, SampleLayout(32, mask="instance", anchor="instances"), **ORDERS)
        overrides = make_task("diffusion").config_overrides(specs)
        modalities = {s.modality for s in specs}
        assert modalities <= set(overrides["pixel_size_nm"])
        assert overrides["intensity_range"] == crop_intensity(specs, labels.defect_class_names())
        assert modalities <= set(overrides["intensity_range"])
        path = tmp_path / "m.safetensors"
        digest = save_checkpoint(create_diffusion("ddpm_tiny", **overrides), path)
        loaded = load_model(path, expected_sha256=digest)
        assert loaded.intensity_range == overrides["intensity_range"]
        assert loaded.pixel_size_nm == overrides["pixel_size_nm"]
        assert list(loaded.trained_conditions) == overrides["trained_conditions"]

    def test_each_condition_records_the_pixel_size_of_the_level_its_crops_are_read_at(self, train_archive):
        # crops are read at the finest level where the defect fits: a condition's samples
        # must be written at its crops' scale, not at one per modality
        from engine.training.tasks import make_task

        specs = plan_samples(train_archive, SampleLayout(32, mask="instance", anchor="instances"), **ORDERS)
        record = make_task("diffusion").config_overrides(specs)["pixel_size_nm"]
        classes = labels.defect_class_names()
        by_condition: dict[str, list[float]] = {}
        for s in specs:
            if s.material:
                by_condition.setdefault(f"{classes[s.instance_classes[0] - 1]}.{s.material}.{s.modality}",
                                        []).append(s.pixel_size_nm)
        assert by_condition
        for key, sizes in by_condition.items():
            assert record[key] == pytest.approx(float(np.median(sizes))), key

    def test_the_conditions_training_saw_are_recorded(self, train_archive):
        from engine.training.tasks import make_task

        specs = plan_samples(train_archive, SampleLayout(32, mask="instance", anchor="instances"), **ORDERS)
        classes = labels.defect_class_names()
        seen = sorted({f"{classes[s.instance_classes[0] - 1]}.{s.material}.{s.modality}" for s in specs if s.material})
        assert make_task("diffusion").config_overrides(specs)["trained_conditions"] == seen


@pytest.mark.slow
class TestDiffusionOnRayTrain:
    def test_trains_checkpoints_and_records_pixel_sizes(self, ray_session, train_archive, tmp_path, tracking_uri):
        from engine.models import load_model
        from engine.models.checkpoint import read_config
        from engine.synth.diffusion.sampler import sample_patches
        from engine.training import train

        result = train("diffusion", "ddpm_tiny", str(train_archive), storage_path=tmp_path / "runs", epochs=1,
                       num_workers=2, batch_size=8, tracking_uri=tracking_uri, val_fraction=0.2)
        assert result.history[-1]["epoch"] == 1
        assert math.isfinite(result.history[-1]["train_loss"]) and math.isfinite(result.history[-1]["val_loss"])
        path = f"{result.checkpoint_path}/model.safetensors"
        config = read_config(path)
        assert config.family == "diffusion"
        assert {k.rsplit(".", 1)[-1] for k in config.args["pixel_size_nm"]} <= {"SEM", "TEM", "optical"}
        assert set(config.args["pixel_size_nm"]) <= set(config.args["intensity_range"])
        assert config.args["trained_conditions"] and all(
            k in config.args["pixel_size_nm"] for k in config.args["trained_conditions"])
        model = load_model(path, expected_sha256=result.model_sha256)
        images, masks = sample_patches(model, [0], [1], steps=2)
        assert images.shape == (1, 32, 32)
