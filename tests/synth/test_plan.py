"""Plans: argument checking, coverage, physical pixel sizes."""

from __future__ import annotations

import pickle

import pytest

from engine.errors import GrainflowError
from engine.synth import DEFECT_CLASSES, MATERIALS, MODALITIES
from engine.synth.errors import SynthArgumentError
from engine.synth.archive import generate_archive
from engine.synth.materials import get_material
from engine.synth.modality import PIXEL_RANGE_NM
from engine.synth.plan import pixel_size_range, plan_archive


class TestArguments:
    def test_unknown_material_lists_valid_names(self, tmp_path):
        with pytest.raises(ValueError, match="unobtainium") as err:
            generate_archive(tmp_path / "a", n_images=1, seed=0, materials=["ferritic_steel", "unobtainium"])
        assert all(name in str(err.value) for name in MATERIALS)
        assert not (tmp_path / "a").exists()

    def test_unknown_modality_lists_valid_names(self):
        with pytest.raises(ValueError, match="'XRD'.*SEM, TEM, optical"):
            plan_archive(n_images=1, seed=0, modalities=["XRD"])

    def test_material_without_requested_modality(self):
        with pytest.raises(ValueError, match="thin_film_lattice cannot be imaged with optical"):
            plan_archive(n_images=1, seed=0, materials=["thin_film_lattice"], modalities=["optical"])

    @pytest.mark.parametrize("kwargs,name", [
        (dict(seed=-1), "seed"), (dict(n_images=-2), "n_images"), (dict(size=0), "size"),
        (dict(size=(64, 0)), "size"), (dict(size="big"), "size"), (dict(chunk=8), "chunk"),
        (dict(seed=1.5), "seed"), (dict(n_images="3"), "n_images"),
    ])
    def test_bad_numbers(self, kwargs, name):
        with pytest.raises(SynthArgumentError, match=name):
            plan_archive(**{"n_images": 1, "seed": 0, **kwargs})

    def test_errors_are_value_errors_the_cli_reports(self):
        assert issubclass(SynthArgumentError, ValueError) and issubclass(SynthArgumentError, GrainflowError)

    def test_single_names_and_subsets(self):
        plans = plan_archive(n_images=4, seed=0, materials="martensite", modalities=["SEM"])
        assert {(p.material, p.modality) for p in plans} == {("martensite", "SEM")}


class TestPlans:
    def test_modest_archive_covers_everything(self):
        for seed in range(5):
            plans = plan_archive(n_images=24, seed=seed, size=256)
            assert {p.material for p in plans} == set(MATERIALS)
            assert {p.modality for p in plans} == set(MODALITIES)
            assert {d.defect_class for p in plans for d in p.defects} == set(DEFECT_CLASSES)
            # the first cycle through the materials already covers every modality
            assert {p.modality for p in plans[: len(MATERIALS)]} == set(MODALITIES)

    def test_pixel_size_follows_physics(self):
        for p in plan_archive(n_images=48, seed=2, size=128):
            lo, hi = pixel_size_range(p.material, p.modality)
            assert PIXEL_RANGE_NM[p.modality][0] <= lo <= p.pixel_size_nm <= hi <= PIXEL_RANGE_NM[p.modality][1]
            m = get_material(p.material)
            assert m.feature_px[0] <= m.length_nm / p.pixel_size_nm <= m.feature_px[1]

    def test_every_material_fits_each_of_its_modalities(self):
        for name in MATERIALS:
            for modality in get_material(name).modalities:
                lo, hi = pixel_size_range(name, modality)
                assert hi / lo > 1.1, (name, modality)

    def test_defect_windows_are_inside_and_apart(self):
        for p in plan_archive(n_images=24, seed=4, size=(200, 300)):
            boxes = [d.window for d in p.defects]
            for y0, x0, y1, x1 in boxes:
                assert 0 <= y0 < y1 <= 200 and 0 <= x0 < x1 <= 300
            for i, a in enumerate(boxes):
                for b in boxes[i + 1 :]:
                    assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]

    def test_plans_pickle_and_are_small(self):
        plans = plan_archive(n_images=12, seed=0, size=512)
        blob = pickle.dumps(plans)
        assert pickle.loads(blob) == plans
        assert len(blob) < 200_000
