"""Sample planning: from the catalog and ground truth only, light specs that pickle."""

from __future__ import annotations

import os
import pickle
import shutil

import pandas as pd
import pytest

from engine.data.sample_plan import (
    SampleLayout, SamplePlanError, SampleSpec, level_shape, plan_samples, read_truth, split_specs,
)
from engine.models.labels import GRADES, defect_class_names, material_names

LABELS = dict(materials=material_names(), grades=GRADES, defect_classes=defect_class_names())


def plan(archive, layout, **kw):
    return plan_samples(archive, layout, **{**LABELS, **kw})


def metadata_copy(archive, to):
    """A copy of `archive` without a pixel: its Parquet tables and its images' zarr.json
    files only."""
    def chunks(folder, names):
        return [n for n in names if not (os.path.isdir(os.path.join(folder, n)) or n == "zarr.json"
                                         or n.endswith(".parquet"))]

    shutil.copytree(archive, to, ignore=chunks)
    return to


class TestSampleLayout:
    @pytest.mark.parametrize("kwargs, match", [
        (dict(tile=4), "tile must be an integer >= 8"),
        (dict(tile=64, mask="boxes"), "mask 'boxes'"),
        (dict(tile=60, context_tile=64), "multiple of 8"),
        (dict(tile=64, context_tile=64, stride=30), "stride \\(30\\) a multiple of 4"),
        (dict(tile=64, context_tile=63), "context tile \\(63\\) even"),
        (dict(tile=64, max_per_image=0), "max_per_image"),
    ])
    def test_bad_layouts_are_refused_by_name(self, kwargs, match):
        with pytest.raises(SamplePlanError, match=match):
            SampleLayout(**kwargs)

    def test_level_shape_halves_rounding_up(self):
        assert level_shape(256, 200, 0) == (256, 200)
        assert level_shape(256, 200, 1) == (128, 100)
        assert level_shape(255, 201, 2) == (64, 51)


class TestPlanSamples:
    def test_grid_over_every_level_a_tile_fits(self, small_archive):
        archive, catalog = small_archive
        specs = plan(archive, SampleLayout(64))
        # 256 px images: 4 x 4 tiles at level 0, 2 x 2 at level 1 (128 px); none at 2
        assert len(specs) == len(catalog) * (16 + 4)
        assert {s.level for s in specs} == {0, 1}
        row = catalog.set_index("image_id")
        for s in specs:
            assert s.tile == 64 and s.context_tile == 0
            h, w = level_shape(256, 256, s.level)
            assert 0 <= s.y <= h - 64 and 0 <= s.x <= w - 64 and s.y % 64 == 0 and s.x % 64 == 0
            r = row.loc[s.image_id]
            assert s.material == r.material and s.material_index == material_names().index(r.material)
            assert s.grade_index == GRADES.index(r.quality_grade)
            assert s.modality == r.modality
            assert s.pixel_size_nm == pytest.approx(r.pixel_size_x * 2**s.level)  # synth writes nanometres
            assert s.image_uri.endswith(f"images/{s.image_id}.ome.zarr")

    def test_levels_and_cap_restrict_the_plan(self, small_archive):
        archive, catalog = small_archive
        assert {s.level for s in plan(archive, SampleLayout(64, levels=(1,)))} == {1}
        capped = plan(archive, SampleLayout(64, max_per_image=3), seed=1)
        assert pd.Series([s.image_id for s in capped]).value_counts().max() == 3
        assert capped == plan(archive, SampleLayout(64, max_per_image=3), seed=1)  # seeded

    def test_needs_only_metadata(self, small_archive, tmp_path):
        """The driver never reads pixels: with every chunk gone (catalog, ground truth and
        the images' zarr.json files kept), the plan is the same."""
        archive, _ = small_archive
        bare = metadata_copy(archive, tmp_path / "metadata-only")
        assert {p.name for p in (bare / "images").rglob("*") if p.is_file()} == {"zarr.json"}
        layout = SampleLayout(64, context_tile=64, mask="semantic")
        full, meta = plan(archive, layout), plan(bare, layout)
        assert len(meta) == len(full) > 0
        for a, b in zip(full, meta):
            assert a.image_uri.replace(str(archive), str(bare)) == b.image_uri
            assert a.instance_ids == b.instance_ids and (a.level, a.y, a.x) == (b.level, b.y, b.x)

    def test_instances_are_the_ground_truth_boxes_meeting_the_tile(self, small_archive):
        archive, _ = small_archive
        truth = read_truth(archive)
        specs = plan(archive, SampleLayout(64, mask="semantic"))
        assert any(s.instance_ids for s in specs)
        for s in specs:
            f = 2**s.level
            t = truth[truth.image_id == s.image_id]
            hit = t[(t.y0 < (s.y + 64) * f) & (t.y1 > s.y * f) & (t.x0 < (s.x + 64) * f) & (t.x1 > s.x * f)]
            assert s.instance_ids == tuple(hit.instance_id)
            assert s.instance_classes == tuple(defect_class_names().index(c) + 1 for c in hit.defect_class)

    def test_require_instances_keeps_tiles_with_a_defect(self, small_archive):
        archive, _ = small_archive
        specs = plan(archive, SampleLayout(128, mask="instance", require_instances=True))
        assert specs and all(s.instance_ids for s in specs)

    def test_unknown_material_names_the_image(self, small_archive):
        archive, catalog = small_archive
        with pytest.raises(SamplePlanError, match=f"image '{catalog.image_id[0]}': material"):
            plan(archive, SampleLayout(64), materials=("unobtainium",))

    def test_masks_without_ground_truth_are_refused(self, small_archive, tmp_path):
        archive, _ = small_archive
        untruthed = tmp_path / "a"
        shutil.copytree(archive, untruthed, ignore=shutil.ignore_patterns("ground_truth.parquet"))
        assert plan(untruthed, SampleLayout(64))  # labels from the catalog need no truth
        with pytest.raises(SamplePlanError, match="ground_truth.parquet"):
            plan(untruthed, SampleLayout(64, mask="semantic"))


class TestSampleSpec:
    def test_specs_pickle_and_round_trip_through_rows(self, small_archive):
        archive, _ = small_archive
        specs = plan(archive, SampleLayout(64, context_tile=64, mask="semantic"))
        for s in specs:
            assert pickle.loads(pickle.dumps(s)) == s
            assert SampleSpec.from_row(s.to_row()) == s
        assert max(len(pickle.dumps(s)) for s in specs) < 1024  # light: no pixels in a spec


class TestSplitSpecs:
    def test_disjoint_seeded_split(self, small_archive):
        archive, _ = small_archive
        specs = plan(archive, SampleLayout(64))
        train, val = split_specs(specs, 0.25, seed=3, min_each=2)
        assert len(val) == 20 and len(train) == 60
        assert set(train).isdisjoint(val) and set(train) | set(val) == set(specs)
        assert (train, val) == split_specs(specs, 0.25, seed=3, min_each=2)
        assert split_specs(specs, 0.0) == (specs, [])

    def test_too_few_samples_for_the_workers(self, small_archive):
        archive, _ = small_archive
        specs = plan(archive, SampleLayout(64))[:3]
        with pytest.raises(SamplePlanError, match="at least 2 each"):
            split_specs(specs, 0.5, min_each=2)
