"""Training samples of an image whose pixels are not square get square ones, as inference does.

A fast-scan SEM records (10, 5) nm (y, x) pixels. The batch job and the endpoint resample
such an image to square pixels (engine.data.tile_plan), so training must too: read as
level pixels, a round pore is a 1:2 ellipse to the model while it learns, then round when
it is used. The archive here holds the same scene twice, once at (10, 5) nm and once at
(5, 5) nm: a 600 nm disc (one `pore` instance) on a gentle ramp; another holds it at
(10, 5) nm and at (5, 5) nm as foreign OME-Zarrs whose level 1 is 3x coarser
(tests/non_square_scene.py): a pyramid need not halve, square pixels or not.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.data.sample_plan import SampleLayout, SampleSpec, plan_samples
from engine.data.training_samples import ReadSamples, normalise_tile
from engine.models.labels import GRADES, defect_class_names, material_names
from engine.stores.catalog import CatalogRow, image_uri, write_catalog
from engine.stores.uri import resolve
from tests.non_square_scene import DISC, IMAGES, extent, write_scene_archive

LABELS = dict(materials=material_names(), grades=GRADES, defect_classes=defect_class_names())


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_scene_archive(tmp_path_factory.mktemp("square-train") / "a")


def plan(archive, layout, image_id):
    return plan_samples(archive, layout, image_ids=[image_id], **LABELS)


class TestPlan:
    def test_tiles_are_laid_in_square_pixels_over_the_same_field(self, archive):
        """Each level's tiles are square pixels of the finer size (5 nm * 2**k) and cover
        the field as the square twin's do: same places in nm, same defects."""
        layout = SampleLayout(64, mask="semantic")
        fast, square = plan(archive, layout, "fast-scan"), plan(archive, layout, "square")
        assert fast and all(s.resampled for s in fast) and not any(s.resampled for s in square)
        for s in fast:
            assert s.pixel_size_nm == 5.0 * 2**s.level
            # the tile's pixels are square: level-0 pixels per tile pixel times their size
            assert (s.step_y * 10.0, s.step_x * 5.0) == (s.pixel_size_nm, s.pixel_size_nm)
        where = lambda specs: [(s.level, s.y, s.x, s.pixel_size_nm, s.instance_ids) for s in specs]  # noqa: E731
        assert where(fast) == where(square)
        assert any(s.instance_ids for s in fast)

    def test_the_square_pixels_are_the_inference_planners(self, archive):
        """The pixels a level's samples are trained at are the ones the batch job and the
        endpoint deliver when reading that level natively (tile_plan's rule and grid)."""
        from engine.data.tile_plan import choose_square_pixels, plan_image
        from engine.stores.image import open_image

        image = open_image(image_uri(archive, "fast-scan"))
        specs = plan(archive, SampleLayout(16), "fast-scan")
        assert {s.level for s in specs} == set(range(len(image.levels)))
        for s in specs:
            level_x_nm = 5.0 * 2**s.level
            assert choose_square_pixels(image, level_x_nm, math.inf) == (s.level, s.pixel_size_nm)
            job = plan_image(image, "fast-scan", None, "SEM", target_nm=level_x_nm, tolerance=math.inf,
                             tile_size=None, halo=0, tile_dtype="uint16")
            assert (job.grid.level, job.output.step) == (s.level, (s.step_y, s.step_x))

    def test_pixels_square_within_a_percent_plan_as_square_ones(self, tmp_path):
        """(5.04, 5.0) nm pixels are square to the models (tile_plan.SQUARE_WITHIN): their
        tiles are the level's own pixels, as before."""
        from engine.stores.writer import write_image

        def archive_of(name, size_yx):
            location = resolve(tmp_path / name)
            write_image(image_uri(location, "im"), np.zeros((256, 256), np.uint16), pixel_size=size_yx, chunk=64)
            write_catalog(location, [CatalogRow(
                image_id="im", uri="images/im.ome.zarr", modality="SEM", pixel_size_y=size_yx[0],
                pixel_size_x=size_yx[1], unit="nanometer", height=256, width=256, dtype="uint16", levels=3,
                chunk=64, checksum="", material="ferritic_steel", quality_grade="A")])
            return plan_samples(location, SampleLayout(64), **LABELS)

        near, exact = archive_of("near", (5.04, 5.0)), archive_of("exact", (5.0, 5.0))
        assert len(near) == 16 + 4 + 1 and not any(s.resampled for s in near)
        assert [(s.level, s.y, s.x, s.pixel_size_nm) for s in near] == [
            (s.level, s.y, s.x, s.pixel_size_nm) for s in exact]

    def test_resampled_specs_round_trip_through_rows(self, archive):
        for s in plan(archive, SampleLayout(64, context_tile=64, mask="semantic"), "fast-scan"):
            assert s.resampled and SampleSpec.from_row(s.to_row()) == s


class TestRead:
    def test_a_round_defect_is_round_in_the_sample(self, archive):
        """The disc's mask spans as many rows as columns (within a pixel), SAM's box is
        square, and its size in nm is the disc's and the square twin's."""
        layout = SampleLayout(192, mask="instance", anchor="instances")
        reader = ReadSamples("instance")
        size_nm = {}
        for image_id in IMAGES:
            (spec,) = plan(archive, layout, image_id)
            row = reader.read(spec)
            assert row["pixel_size_nm"] == 5.0 and row["mask"].shape == (192, 192)
            rows, cols = extent(row["mask"] == 1)
            assert abs(rows - cols) <= 1
            (x0, y0, x1, y1), = row["boxes"]
            assert (x1 - x0, y1 - y0) == (cols, rows)
            bright_rows, bright_cols = extent(row["image"] > 0.5)  # the pixels show the disc round too
            assert abs(bright_rows - bright_cols) <= 1
            size_nm[image_id] = (rows * row["pixel_size_nm"], cols * row["pixel_size_nm"])
        diameter = 2 * DISC[2]
        for image_id, (h, w) in size_nm.items():
            assert abs(h - diameter) <= 5.0 and abs(w - diameter) <= 5.0, (image_id, h, w)
        assert np.allclose(size_nm["fast-scan"], size_nm["square"], atol=5.0)

    def test_the_detail_is_the_jobs_resampling_of_its_level(self, archive):
        """The detail tile is what engine.preprocess.resample makes of the whole level
        (the job's tiles equal that), rounded to the image's dtype; with normalisation
        "image", the image's preprocessing is applied at the tile's level-0 place."""
        from engine.pipeline.inputs import normalise
        from engine.preprocess import fit_preprocessing
        from engine.preprocess.resample import cast_pixels, resample
        from engine.stores.image import open_image
        from engine.tiling.transform import LevelTransform

        image = open_image(image_uri(archive, "fast-scan"))
        params = fit_preprocessing(image, "SEM")
        specs = plan(archive, SampleLayout(64, normalisation="image"), "fast-scan")
        for spec in (specs[0], specs[5], next(s for s in specs if s.level == 1)):
            height, width = image.levels[spec.level].shape
            level = image.read_region(spec.level, 0, height, 0, width)
            transform = LevelTransform.from_image(image, spec.level)
            step = (spec.step_y, spec.step_x)
            want = cast_pixels(resample(level, (0, 0), transform, step, (spec.y, spec.x), (64, 64)), level.dtype)
            np.testing.assert_array_equal(ReadSamples().read(spec)["image"], normalise_tile(want))
            placed = normalise(want, "image", params=params, origin=(spec.y * step[0], spec.x * step[1]), scale=step)
            np.testing.assert_array_equal(ReadSamples(None, "image").read(spec)["image"], placed)

    def test_context_and_semantic_mask_are_square_too(self, archive):
        """A fusion sample: the context (4x the pixel size, resampled from the coarsest
        level) and the class mask show the disc round, in the same place as the square
        twin's."""
        layout = SampleLayout(64, context_tile=64, mask="semantic")
        pore = defect_class_names().index("pore") + 1
        rows = {}
        for image_id in IMAGES:
            spec = next(s for s in plan(archive, layout, image_id) if s.level == 0 and s.y == 64 and s.x == 64)
            rows[image_id] = row = ReadSamples("semantic").read(spec)
            assert row["context"].shape == (64, 64) and row["context"].dtype == np.float32
            assert set(np.unique(row["mask"])) == {0, pore}
            rows_, cols_ = extent(row["context"] > 0.5)
            assert abs(rows_ - cols_) <= 1
        fast, square = rows["fast-scan"], rows["square"]
        # nearest neighbour from 10 nm rows: the masks differ at most on the disc's rim
        assert np.mean(fast["mask"] != square["mask"]) < 0.02
        assert np.abs(fast["context"] - square["context"]).mean() < 0.05

    def test_a_batch_mixing_square_and_resampled_samples(self, archive):
        """One batch of both images' specs (as a Ray read task gets it): one set of
        columns, every pixel size 5 nm * 2**level, each fast-scan sample the square
        twin's but for the disc's rim, and SAM's boxes those of the masks."""
        layout = SampleLayout(128, mask="instance", require_instances=True)
        fast, square = plan(archive, layout, "fast-scan"), plan(archive, layout, "square")
        assert len(fast) == len(square) == 5  # 2 x 2 tiles at 5 nm, one at 10 nm
        rows = [s.to_row() for s in fast + square]
        batch = ReadSamples("instance")({k: [r[k] for r in rows] for k in rows[0]})
        assert batch["image"].shape == (10, 128, 128)
        assert batch["pixel_size_nm"].tolist() == [5.0 * 2**s.level for s in fast + square]
        for mask, boxes in zip(batch["mask"], batch["boxes"]):
            (x0, y0, x1, y1), = boxes
            assert (y1 - y0, x1 - x0) == extent(mask == 1)
        for i in range(5):
            assert np.mean(batch["mask"][i] != batch["mask"][i + 5]) < 0.02


@pytest.fixture(scope="module")
def foreign_archive(tmp_path_factory):
    return write_scene_archive(tmp_path_factory.mktemp("square-train-foreign") / "a", {},
                               foreign={"factor-3": (10.0, 5.0), "factor-3-square": (5.0, 5.0)})


class TestForeignPyramid:
    """A valid OME-Zarr whose level 1 is 3x coarser, (30, 15) nm: its level's square pixels
    are its own finer size, 15 nm, as its NGFF transform and the job say, not 2x level 0's.
    The same with square pixels, (5, 5) and (15, 15) nm: the catalog looks like that of a
    halving pyramid, but level 1 holds 85 x 85 pixels of 15 nm, not 128 x 128 of 10 nm."""

    def test_a_square_images_levels_are_planned_at_their_own_pixels(self, foreign_archive):
        """Level 0 is laid on its own 5 nm pixels, as before; level 1 on the 15 nm pixels
        the job reads it at natively (as stored: tile_plan's rule), over the whole field;
        each tile meets the disc where its level-0 footprint does."""
        from engine.data.tile_plan import plan_image
        from engine.stores.image import open_image

        image = open_image(image_uri(foreign_archive, "factor-3-square"))
        specs = plan(foreign_archive, SampleLayout(16, mask="semantic"), "factor-3-square")
        assert {s.level for s in specs} == {0, 1}
        for level, level_x_nm in ((0, 5.0), (1, 15.0)):
            job = plan_image(image, "factor-3-square", None, "SEM", target_nm=level_x_nm, tolerance=math.inf,
                             tile_size=None, halo=0, tile_dtype="uint16")
            assert job.grid.level == level and job.output is None and job.pixel_size_nm == level_x_nm
            on_level = [s for s in specs if s.level == level]
            assert all(s.pixel_size_nm == level_x_nm for s in on_level)
            side = max(s.y for s in on_level) + 16  # the tiles reach the field's far edge
            assert 0 <= 1280.0 - side * level_x_nm < 16 * level_x_nm
        assert not any(s.resampled for s in specs if s.level == 0)
        assert all((s.step_y, s.step_x) == (3.0, 3.0) for s in specs if s.level == 1)
        cy, cx, r = DISC  # the disc's box: [340, 940) nm each way, whole 5 nm pixels
        for s in specs:
            y0, y1, x0, x1 = (v * s.pixel_size_nm for v in (s.y, s.y + 16, s.x, s.x + 16))
            assert bool(s.instance_ids) == (y0 < cy + r and y1 > cy - r and x0 < cx + r and x1 > cx - r), s

    def test_a_level_1_sample_of_square_pixels_is_the_stored_level(self, foreign_archive):
        """A level-1 crop of the disc shows it 40 pixels (600 nm at 15 nm) wide: the stored
        level's own pixels, which its square grid resamples unchanged."""
        from engine.data.training_samples import read_detail
        from engine.stores.image import open_image

        (spec,) = plan(foreign_archive, SampleLayout(64, levels=(1,), anchor="instances"), "factor-3-square")
        row = ReadSamples().read(spec)
        assert row["pixel_size_nm"] == 15.0 and row["image"].shape == (64, 64)
        rows, cols = extent(row["image"] > 0.5)
        assert abs(rows - cols) <= 1 and abs(cols * 15.0 - 2 * DISC[2]) <= 15.0
        image = open_image(spec.image_uri)
        np.testing.assert_array_equal(read_detail(image, spec),
                                      image.read_region(1, spec.y, spec.y + 64, spec.x, spec.x + 64))

    def test_each_level_is_laid_at_the_pixels_the_job_reads_it_at(self, foreign_archive):
        from engine.data.tile_plan import choose_square_pixels, plan_image
        from engine.stores.image import open_image

        image = open_image(image_uri(foreign_archive, "factor-3"))
        specs = plan(foreign_archive, SampleLayout(16), "factor-3")
        assert {s.level for s in specs} == {0, 1}
        for s in specs:
            level_x_nm = 5.0 * 3**s.level
            assert s.pixel_size_nm == level_x_nm and (s.step_y * 10.0, s.step_x * 5.0) == (level_x_nm, level_x_nm)
            assert choose_square_pixels(image, level_x_nm, math.inf) == (s.level, s.pixel_size_nm)
            job = plan_image(image, "factor-3", None, "SEM", target_nm=level_x_nm, tolerance=math.inf,
                             tile_size=None, halo=0, tile_dtype="uint16")
            assert (job.grid.level, job.output.step) == (s.level, (s.step_y, s.step_x))

    def test_a_level_1_sample_shows_the_disc_at_15_nm(self, foreign_archive):
        """The disc (600 nm) read from level 1 spans 40 square pixels of 15 nm each way."""
        (spec,) = plan(foreign_archive, SampleLayout(64, levels=(1,), anchor="instances"), "factor-3")
        row = ReadSamples().read(spec)
        assert row["pixel_size_nm"] == 15.0 and row["image"].shape == (64, 64)
        rows, cols = extent(row["image"] > 0.5)
        assert abs(rows - cols) <= 1 and abs(cols * 15.0 - 2 * DISC[2]) <= 15.0
