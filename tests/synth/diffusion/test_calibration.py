"""What training records per condition for synthesis: the conditions it saw and the
pixel size of their crops, at the level each crop was read at."""

from __future__ import annotations

import pytest

from engine.data.sample_plan import SampleSpec
from engine.models import labels
from engine.synth.diffusion.calibration import crop_pixel_sizes, pixel_size_for, trained_conditions
from engine.synth.diffusion.conditions import Condition

CLASSES = labels.defect_class_names()


def _crop(cls: str, material: str | None, modality: str, level: int, level0_nm: float) -> SampleSpec:
    """A defect crop as the diffusion layout plans it (no pixels are read here)."""
    return SampleSpec(image_id="i", image_uri="memory://i", level=level, y=0, x=0, tile=32, modality=modality,
                      pixel_size_nm=level0_nm * 2**level, material=material,
                      material_index=-1 if material is None else 0, instance_ids=(1,),
                      instance_classes=(CLASSES.index(cls) + 1,))


# Pores fit at level 0, cracks only at level 2 (four times coarser); one crack of an
# image without a material label; TEM crops of another material.
SPECS = ([_crop("pore", "ferritic_steel", "SEM", 0, 2.0)] * 3 + [_crop("crack", "ferritic_steel", "SEM", 2, 2.0)] * 2
         + [_crop("crack", None, "SEM", 2, 2.0), _crop("void", "ni_superalloy", "TEM", 1, 0.1)])


class TestPixelSizes:
    def test_each_condition_records_the_pixel_size_its_crops_were_read_at(self):
        record = crop_pixel_sizes(SPECS, CLASSES)
        assert record["pore.ferritic_steel.SEM"] == pytest.approx(2.0)
        assert record["crack.ferritic_steel.SEM"] == pytest.approx(8.0)
        assert record["void.ni_superalloy.TEM"] == pytest.approx(0.2)
        # the fallbacks: medians over what they hold (the crack without a material
        # counts for its modality only)
        assert record["ferritic_steel.SEM"] == pytest.approx(2.0)  # 2, 2, 2, 8, 8
        assert record["SEM"] == pytest.approx(5.0)  # 2, 2, 2, 8, 8, 8
        assert set(record) == {"pore.ferritic_steel.SEM", "crack.ferritic_steel.SEM", "ferritic_steel.SEM", "SEM",
                               "void.ni_superalloy.TEM", "ni_superalloy.TEM", "TEM"}

    def test_a_sample_takes_its_conditions_value_else_the_fallbacks(self):
        record = {"crack.ferritic_steel.SEM": 8.0, "ferritic_steel.SEM": 3.0, "SEM": 2.0}
        assert pixel_size_for(record, Condition("crack", "ferritic_steel", "SEM")) == 8.0
        assert pixel_size_for(record, Condition("pore", "ferritic_steel", "SEM")) == 3.0
        assert pixel_size_for(record, Condition("pore", "martensite", "SEM")) == 2.0
        assert pixel_size_for(record, Condition("pore", "martensite", "TEM")) is None
        # a model trained before they were recorded per condition: one per modality
        assert pixel_size_for({"SEM": 2.5}, Condition("crack", "ferritic_steel", "SEM")) == 2.5


class TestTrainedConditions:
    def test_the_conditions_of_the_crops_with_a_material(self):
        # a crop without a material is dropped in training (DiffusionCollate): it teaches no condition
        assert trained_conditions(SPECS, CLASSES) == [
            "crack.ferritic_steel.SEM", "pore.ferritic_steel.SEM", "void.ni_superalloy.TEM"]
