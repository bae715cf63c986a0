"""Grey levels of generated samples: real crops' p1..p99 recorded at training, written back."""

from __future__ import annotations

import numpy as np
import pytest

from engine.data.sample_plan import SampleLayout, plan_samples
from engine.data.training_samples import ReadSamples, read_window
from engine.models import labels
from engine.stores.image import open_image
from engine.stores.uri import resolve
from engine.synth.archive import generate_archive
from engine.synth.diffusion.conditions import Condition
from engine.synth.diffusion.intensity import crop_intensity, crop_percentiles, range_for
from engine.synth.diffusion.output import to_stored, write_sample
from engine.synth.diffusion.plan import PlannedSample

CLASSES = labels.defect_class_names()
ORDERS = dict(materials=labels.material_names(), grades=labels.GRADES, defect_classes=CLASSES)


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """(specs, intensity record) of a small real archive's defect crops, as diffusion trains on them."""
    out = tmp_path_factory.mktemp("intensity") / "real"
    generate_archive(out, n_images=4, seed=7, size=256, chunk=128)
    specs = plan_samples(out, SampleLayout(32, mask="instance", anchor="instances"), **ORDERS)
    return specs, crop_intensity(specs, CLASSES)


def _condition(spec) -> Condition:
    return Condition(CLASSES[spec.instance_classes[0] - 1], spec.material, spec.modality)


class TestCropIntensity:
    def test_records_the_median_crop_percentiles_per_condition(self, crops):
        specs, record = crops
        assert {s.modality for s in specs} <= set(record)
        for cond in {_condition(s) for s in specs}:
            group = [s for s in specs if _condition(s) == cond]
            raw = [crop_percentiles(read_window(open_image(s.image_uri), s.level, s.y, s.x, 32, 32)) for s in group]
            assert record[cond.key()] == pytest.approx([np.median([r[0] for r in raw]), np.median([r[1] for r in raw])])
            assert range_for(record, cond) == tuple(record[cond.key()])
        # real micrographs use part of their dtype's range, which is the point of recording it
        assert all(0.0 <= lo < hi <= 1.0 and hi - lo < 0.8 for lo, hi in record.values())

    def test_lookup_falls_back_to_material_then_modality_then_none(self):
        record = {"ferritic_steel.SEM": [0.2, 0.5], "SEM": [0.1, 0.6]}
        assert range_for(record, Condition("pore", "ferritic_steel", "SEM")) == (0.2, 0.5)
        assert range_for(record, Condition("pore", "copper", "SEM")) == (0.1, 0.6)
        assert range_for(record, Condition("pore", "copper", "TEM")) is None
        assert range_for({}, Condition("pore", "copper", "SEM")) is None


class TestWrittenGreyLevels:
    def test_a_perfect_sample_has_the_grey_levels_of_the_real_crops(self, crops, tmp_path):
        # a sample that reproduces a real crop exactly (what the model learns: the crop
        # normalised to [0, 1]) must be written with about that crop's grey levels
        specs, record = crops
        archive = resolve(tmp_path / "syn")
        reader = ReadSamples("instance")
        for modality in sorted({s.modality for s in specs}):
            group = [s for s in specs if s.modality == modality and s.material][:6]
            real, written = [], []
            for i, s in enumerate(group):
                row = reader.read(s)
                crop = read_window(open_image(s.image_uri), s.level, s.y, s.x, 32, 32)
                sample = PlannedSample(f"p-{modality}-{i}", _condition(s), i, i)
                write_sample(archive, sample, row["image"], row["mask"] == s.instance_ids[0], pixel_size_nm=1.0,
                             provenance={}, intensity=range_for(record, sample.condition))
                out = open_image(archive.join("images", f"{sample.sample_id}.ome.zarr")).read_region(0, 0, 32, 0, 32)
                assert out.dtype == crop.dtype
                real.append(crop_percentiles(crop))
                written.append(crop_percentiles(out))
            # the medians of real and written p1 / p99 close (the old full-range mapping: 0 and 1)
            real, written = np.array(real), np.array(written)
            assert np.abs(np.median(written, 0) - np.median(real, 0)).max() < 0.02, (modality, real, written)

    def test_models_without_a_record_keep_the_full_range(self):
        x = np.array([[0.0, 0.5, 1.0]], np.float32)
        np.testing.assert_array_equal(to_stored(x, np.dtype("uint8"), None), [[0, 128, 255]])
        np.testing.assert_array_equal(to_stored(x, np.dtype("uint8"), (0.2, 0.6)), [[51, 102, 153]])
        np.testing.assert_array_equal(to_stored(x, np.dtype("uint16"), (0.0, 1.0)), [[0, 32768, 65535]])
