"""Training samples read in Ray tasks: shapes, dtypes, labels; pixels only off the driver."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from engine.data import training_samples
from engine.data.sample_plan import SampleLayout, plan_samples, read_truth
from engine.data.training_samples import (
    ReadSamples, context_origin, normalise_tile, read_context, read_window, training_dataset,
)
from engine.models.labels import GRADES, defect_class_names, material_names
from engine.stores.image import MultiscaleImage, open_image

LABELS = dict(materials=material_names(), grades=GRADES, defect_classes=defect_class_names())
FUSION = SampleLayout(64, context_tile=64, mask="semantic")
SAM = SampleLayout(128, mask="instance", require_instances=True)


def plan(archive, layout):
    return plan_samples(archive, layout, **LABELS)


class TestNormaliseTile:
    @pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
    def test_any_dtype_to_unit_float(self, dtype):
        rng = np.random.default_rng(0)
        tile = (rng.random((32, 32)) * (200 if dtype != np.float32 else 0.3)).astype(dtype)
        out = normalise_tile(tile)
        assert out.dtype == np.float32 and out.shape == (32, 32)
        assert out.min() == 0.0 and out.max() == 1.0
        # percentile scaling is monotonic: grey-level order is kept
        flat = tile.ravel().astype(np.float64)
        assert np.all(np.diff(out.ravel()[np.argsort(flat, kind="stable")]) >= 0)

    def test_a_non_finite_pixel_does_not_flatten_the_tile(self):
        """One NaN (or inf) pixel: the others keep their stretch, it becomes 0 (it had
        made the percentiles NaN and the whole tile mid-grey)."""
        tile = np.linspace(0, 1000, 64 * 64, dtype=np.float32).reshape(64, 64)
        for bad in (np.nan, np.inf):
            t = tile.copy()
            t[3, 5] = bad
            out = normalise_tile(t)
            assert out[3, 5] == 0 and out.min() == 0 and out.max() == 1 and np.isfinite(out).all()
            assert out[32, 32] == pytest.approx(normalise_tile(tile)[32, 32], abs=1e-3)

    def test_reference_sets_the_scale_and_flat_tiles_are_mid_grey(self):
        ref = np.linspace(0, 1000, 10_000).reshape(100, 100)
        out = normalise_tile(np.full((4, 4), 505.0), reference=ref)
        assert np.allclose(out, 0.5, atol=0.01)
        assert np.all(normalise_tile(np.full((8, 8), 7, np.uint16)) == 0.5)


class TestContextGeometry:
    def test_origin_agrees_with_the_fusion_model(self):
        from engine.models.fusion import context_origin as model_origin

        for y in range(0, 96, 4):
            for x in range(0, 64, 8):
                for detail, context in ((64, 64), (64, 32), (32, 48)):
                    assert context_origin(y, x, detail, context, 2) == model_origin(y, x, detail, context, 2)

    def test_missing_level_is_block_averaged_from_the_coarsest(self, deep_archive):
        """A pyramid cut short gives the same context, up to the pyramid's rounding."""
        archive, _ = deep_archive
        # a 32 px context at level 2 around level-0 tile (64, 64) lies inside the image,
        # so no padding enters the comparison
        layout = SampleLayout(64, context_tile=32, mask="semantic")
        spec = next(s for s in plan(archive, layout) if s.level == 0 and s.y == 64 and s.x == 64)
        image = open_image(spec.image_uri)
        assert len(image.levels) == 3  # level 2 = the context level exists
        stored = read_context(image, spec)
        assert np.array_equal(stored, image.read_region(2, 8, 40, 8, 40))
        image.levels = image.levels[:2]  # as if the pyramid stopped at level 1
        made = read_context(image, spec)
        assert made.shape == stored.shape == (32, 32)
        assert np.abs(made - stored).max() <= 1.0  # integer rounding of each 2x2 mean

    def test_windows_past_the_edge_are_padded(self, small_archive):
        archive, catalog = small_archive
        image = open_image(archive / "images" / f"{catalog.image_id[0]}.ome.zarr")
        w = read_window(image, 1, -16, 100, 64, 64)
        assert w.shape == (64, 64) and w.dtype == np.dtype(image.dtype)
        inside = image.read_region(1, 0, 48, 100, 128)
        assert np.array_equal(w[16:, :28], inside)
        assert np.array_equal(w[:16, :28], inside[16:0:-1])  # reflected rows
        labels = image.open_labels("defects")
        assert np.all(read_window(labels, 1, -16, 100, 64, 64, pad="zero")[:16] == 0)


class TestReadSamples:
    def test_fusion_sample_matches_the_stores(self, small_archive):
        archive, _ = small_archive
        specs = plan(archive, FUSION)
        spec = max(specs, key=lambda s: len(s.instance_ids))  # a tile with defects
        row = ReadSamples("semantic").read(spec)
        image = open_image(spec.image_uri)
        detail = image.read_region(spec.level, spec.y, spec.y + 64, spec.x, spec.x + 64)
        context = read_context(image, spec)
        assert np.array_equal(row["image"], normalise_tile(detail, reference=context))
        assert row["context"].shape == (64, 64) and row["context"].dtype == np.float32
        instances = image.open_labels("defects").read_region(spec.level, spec.y, spec.y + 64, spec.x, spec.x + 64)
        truth = read_truth(archive).set_index(["image_id", "instance_id"])
        expected = np.zeros_like(row["mask"])
        for i in np.unique(instances[instances > 0]):
            expected[instances == i] = defect_class_names().index(truth.loc[(spec.image_id, int(i)), "defect_class"]) + 1
        assert row["mask"].dtype == np.uint8 and np.array_equal(row["mask"], expected)
        assert expected.any()

    def test_image_normalisation_is_the_images_preprocessing_at_each_tiles_place(self, small_archive):
        """normalisation="image": detail and context go through the image's
        engine.preprocess parameters (fitted once per image), placed at their own level-0
        corners, exactly as the batch job's "image" input mode applies them; so one raw
        value is one input value in every tile of an image (no per-tile stretch)."""
        from engine.pipeline.inputs import normalise
        from engine.preprocess import fit_preprocessing
        from engine.tiling.transform import LevelTransform

        archive, _ = small_archive
        layout = SampleLayout(64, context_tile=64, mask="semantic", normalisation="image")
        specs = plan(archive, layout)
        reader = ReadSamples("semantic", "image")
        by_image = {}
        for spec in specs:
            by_image.setdefault(spec.image_id, []).append(spec)
        image_id, group = max(by_image.items(), key=lambda kv: len(kv[1]))
        image = open_image(group[0].image_uri)
        params = fit_preprocessing(image, group[0].modality)
        seen = {}
        for spec in group[:6]:
            row = reader.read(spec)
            t = LevelTransform.from_image(image, spec.level)
            detail = image.read_region(spec.level, spec.y, spec.y + 64, spec.x, spec.x + 64)
            want = normalise(detail, "image", params=params, origin=t.to_level0(spec.y, spec.x), scale=t.factor)
            np.testing.assert_array_equal(row["image"], want)
            assert row["context"].shape == (64, 64) and np.isfinite(row["context"]).all()
            if params.background is None:  # no illumination field: a raw value maps alike everywhere
                for v, out in zip(detail.ravel()[:200], row["image"].ravel()[:200]):
                    assert seen.setdefault((spec.level, int(v)), float(out)) == pytest.approx(float(out), abs=1e-6)
        with pytest.raises(Exception, match="normalisation 'per-batch' is not one of"):
            SampleLayout(64, normalisation="per-batch")

    def test_instance_sample_has_tight_boxes(self, small_archive):
        archive, _ = small_archive
        spec = plan(archive, SAM)[0]
        row = ReadSamples("instance").read(spec)
        assert row["mask"].dtype == np.int32 and row["mask"].shape == (128, 128)
        assert len(row["boxes"]) == len(row["instance_ids"]) == len(row["classes"]) >= 1
        for (x0, y0, x1, y1), i in zip(row["boxes"], row["instance_ids"]):
            ys, xs = np.nonzero(row["mask"] == i)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)

    def test_reader_pickles_small(self):
        assert len(pickle.dumps(ReadSamples("semantic"))) < 512


class TestTrainingDataset:
    def test_columns_shapes_and_labels_through_ray(self, ray_session, small_archive):
        archive, catalog = small_archive
        specs = plan(archive, FUSION)
        batches = list(training_dataset(specs, FUSION).iter_batches(batch_size=32, batch_format="numpy"))
        n = sum(len(b["image"]) for b in batches)
        assert n == len(specs)
        b = batches[0]
        assert b["image"].shape[1:] == (64, 64) and b["image"].dtype == np.float32
        assert b["context"].shape[1:] == (64, 64) and b["context"].dtype == np.float32
        assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
        assert b["mask"].dtype == np.uint8 and b["mask"].max() <= len(defect_class_names())
        assert b["material_index"].dtype == np.int64 and b["grade_index"].dtype == np.int64
        by_id = catalog.set_index("image_id")
        for image_id, m, g in zip(b["image_id"], b["material_index"], b["grade_index"]):
            assert material_names()[m] == by_id.loc[image_id, "material"]
            assert GRADES[g] == by_id.loc[image_id, "quality_grade"]
        masks = np.concatenate([bb["mask"] for bb in batches])
        assert masks.max() > 0  # the archive's defects made it through

    def test_ragged_instance_columns_through_ray(self, ray_session, small_archive):
        archive, _ = small_archive
        specs = plan(archive, SAM)
        rows = training_dataset(specs, SAM).take_all()
        assert len(rows) == len(specs)
        for r in rows:
            assert np.asarray(r["boxes"]).reshape(-1, 4).shape[0] == len(r["instance_ids"])

    def test_the_driver_reads_no_pixels(self, ray_session, small_archive, monkeypatch):
        """Reading pixels in this (driver) process fails; the dataset still delivers,
        since every read happens in a Ray task."""
        archive, _ = small_archive

        def refuse(*args, **kwargs):
            raise AssertionError("the driver read pixels")

        monkeypatch.setattr(MultiscaleImage, "read_regions", refuse)
        monkeypatch.setattr(training_samples, "open_image", refuse)
        specs = plan(archive, FUSION)[:8]
        ds = training_dataset(specs, FUSION)
        assert len(ds.take_all()) == 8
