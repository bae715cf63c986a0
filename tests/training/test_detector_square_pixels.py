"""The YOLO detector trains and is evaluated on square pixels where an image's are not.

A fast-scan SEM records (10, 5) nm (y, x) pixels. The batch job and the endpoint resample
such an image to square pixels (engine.data.tile_plan), so detector training and its
evaluation must too: read as level pixels, a round pore is a 1:2 ellipse with a 1:2 box
to the detector while it learns, then round when it is used. For a model of a pixel size,
on the very grid the job reads for it, square images included: where no level is within
the job's tolerance of that size, the job resamples them to it. The archive holds the
same scene at (10, 5) nm, (5, 10) nm and (5, 5) nm (levels of 5, 10 and 20 nm), and at
(10, 5) nm as a foreign OME-Zarr whose level 1 is 3x coarser: a 600 nm disc (one `pore`)
on a gentle ramp (tests/non_square_scene.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.data.datasource import DEFAULT_TARGET_BYTES, DEFAULT_TOLERANCE
from engine.data.tile_plan import plan_image, plan_reads
from engine.runtime import configure_offline
from engine.stores.image import open_image
from engine.training.detector import plan_tiles
from engine.training.detector.pixels import to_uint8
from engine.training.detector.tiles import yolo_format
from engine.stores.catalog import image_uri
from tests.non_square_scene import DISC, FIELD_NM, IMAGES, extent, write_scene_archive

NAMES = ("pore",)
BRIGHT = 20000  # between the ramp and the disc's value
PERFECT_AP = 0.995  # Ultralytics' ap_per_class of a flawless detector


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No hub access; Ultralytics' settings go to a folder of this test run."""
    import os

    configure_offline()
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics-config")))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_scene_archive(tmp_path_factory.mktemp("square-detector") / "a",
                               {**IMAGES, "slow-scan": (5.0, 10.0)}, foreign={"factor-3": (10.0, 5.0)})


def dataset(tiles):
    from engine.training.detector.dataset import ArchiveTileDataset

    return ArchiveTileDataset(tiles, class_names=NAMES, imgsz=256, augment=False)


def box_px(sample) -> np.ndarray:
    """An item's YOLO boxes (normalised xywh) as (w, h) in tile pixels, N x 2 (the
    letterboxed image pads the tile, never resizes it)."""
    h, w = sample["img"].shape[-2:]
    return sample["bboxes"].numpy()[:, 2:] * [w, h]


def job_plan(archive, image_id: str, pixel_size_nm: float, *, tile: int, halo: int = 0):
    """The batch job's plan (`ImageTiles`) of an image for a model of `pixel_size_nm`:
    the target at the job's tolerance, as jobs.reprocess and the endpoint plan it."""
    location = image_uri(archive, image_id)
    return plan_image(open_image(location), image_id, location, "SEM", target_nm=pixel_size_nm,
                      tolerance=DEFAULT_TOLERANCE, tile_size=tile, halo=halo, tile_dtype="uint16")


def job_tiles(plan) -> list[np.ndarray]:
    """The tiles (core and halo, uint16) the batch job's reader delivers for `plan`."""
    from ray.data.block import BlockAccessor

    from engine.data.tile_read import read_tiles

    out = []
    for spec in plan_reads([plan], target_bytes=DEFAULT_TARGET_BYTES, max_tasks=10_000):
        for block in read_tiles(spec):
            out += [np.asarray(t) for t in BlockAccessor.for_block(block).to_batch_format("numpy")["tile"]]
    return out


class TestTrainingTiles:
    # 10 nm: from level 0 (10, 5) nm, the level the job reads (level 1 is 20 nm along y)
    @pytest.mark.parametrize("pixel_size_nm, level, nm", [(None, 0, 5.0), (10.0, 0, 10.0)])
    def test_the_disc_is_round_and_its_box_square(self, archive, pixel_size_nm, level, nm):
        """One tile holding the whole disc: its pixels show it round, its YOLO box is
        square (w == h within a pixel) and as wide as the disc (600 nm)."""
        (tile,) = plan_tiles(archive, NAMES, tile=256, image_ids=["fast-scan"], pixel_size_nm=pixel_size_nm)
        assert tile.resampled and tile.level == level and tile.shape == (round(FIELD_NM / nm),) * 2
        assert tile.scale == (nm / 10.0, nm / 5.0)  # level-0 (y, x) pixels per square pixel
        ds = dataset([tile])
        rows, cols = extent(ds.read_tile(0) > to_uint8(np.uint16([BRIGHT]))[0])
        assert abs(rows - cols) <= 1
        (w, h), = box_px(ds[0])
        assert abs(w - h) <= 1 and abs(w * nm - 2 * DISC[2]) <= nm + 1e-6

    def test_cut_discs_get_the_boxes_of_their_pixels(self, archive):
        """Tiles of 64 square pixels cut the disc: each one's mask-fitted box (the
        `defects` labels read onto its square pixels) is the extent of the bright pixels
        it shows."""
        tiles = [t for t in plan_tiles(archive, NAMES, tile=64, image_ids=["fast-scan"]) if t.is_cut]
        assert tiles and all(t.resampled and t.shape == (64, 64) for t in tiles)
        ds = dataset(tiles)
        checked = 0
        for i in range(len(tiles)):
            t, sample = ds.tile(i), ds[i]
            bright = ds.read_tile(i) > to_uint8(np.uint16([BRIGHT]))[0]
            if bright.sum() < 0.1 * t.areas[0] or min(extent(bright)) < 2:
                continue  # a sliver the labelling rule drops
            (w, h), = box_px(sample)
            rows, cols = extent(bright)
            assert abs(w - cols) <= 1 and abs(h - rows) <= 1, (t.key, (w, h), (cols, rows))
            checked += 1
        assert checked >= 4

    # 14 nm: no level is 14 nm, but level 1 (10 nm) is within the job's tolerance (1.5x)
    @pytest.mark.parametrize("pixel_size_nm", [10.0, 14.0])
    def test_square_images_read_their_level_pixels_as_before(self, archive, pixel_size_nm):
        """The square twin's tiles are its level's own pixels and labels, as read
        directly (regression guard: square images train as they did)."""
        tiles = plan_tiles(archive, NAMES, tile=64, image_ids=["square"], pixel_size_nm=pixel_size_nm)
        assert job_plan(archive, "square", pixel_size_nm, tile=64).output is None  # the job reads it as stored
        assert tiles and not any(t.resampled for t in tiles) and all(t.scale == (2.0, 2.0) for t in tiles)
        image = open_image(image_uri(archive, "square"))
        labels = image.open_labels("defects")
        ds = dataset(tiles)
        for i, t in enumerate(tiles):
            assert ds.tile(i) == t and t.level == 1
            np.testing.assert_array_equal(ds.read_tile(i), to_uint8(image.read_region(1, t.y0, t.y1, t.x0, t.x1)))
            if t.is_cut:
                want = yolo_format(*t.labels_from_mask(labels.read_region(1, t.y0, t.y1, t.x0, t.x1)), t.shape)
            else:
                want = yolo_format(*t.clipped_labels(), t.shape)
            label = ds.get_image_and_label(i)  # before letterboxing: tile-normalised xywh
            np.testing.assert_array_equal(label["img"][..., 0], ds.read_tile(i))
            np.testing.assert_array_equal(label["cls"], want[0])
            np.testing.assert_allclose(label["instances"].bboxes, want[1], atol=1e-6)


class TestTargetPixelSize:
    """A model of a pixel size (train_detector's pixel_size_nm) is trained and evaluated on
    exactly the pixels the batch job and the endpoint deliver to it."""

    @pytest.mark.parametrize("image_id, pixel_size_nm", [
        ("slow-scan", 10.0),  # (5, 10) nm: nearest level by x is level 0, the job's 10 nm grid
        ("fast-scan", 10.0),  # (10, 5) nm: the job reads level 0, not level 1 (20, 10) nm
        ("fast-scan", 7.0),  # no level is 7 nm: the job resamples to exactly 7
        ("factor-3", 15.0),  # level 1 is 3x coarser, (30, 15) nm: the job resamples level 0
        ("square", 40.0),  # (5, 5) nm, levels up to 20 nm, none within 1.5x: the job resamples level 2
    ])
    def test_training_tiles_are_the_jobs_grid(self, archive, image_id, pixel_size_nm):
        """The image in one tile: its level, square-grid step and extent are the job's plan
        for that model; the disc in its pixels is round and 600 nm wide at pixel_size_nm
        per pixel, and so is its YOLO box."""
        (tile,) = plan_tiles(archive, NAMES, tile=256, image_ids=[image_id], pixel_size_nm=pixel_size_nm)
        job = job_plan(archive, image_id, pixel_size_nm, tile=256)
        assert job.pixel_size_yx_nm == pytest.approx((pixel_size_nm, pixel_size_nm))
        assert tile.resampled and (tile.level, tile.scale, tile.shape) == (
            job.grid.level, job.output.step, job.output.extent)
        ds = dataset([tile])
        rows, cols = extent(ds.read_tile(0) > to_uint8(np.uint16([BRIGHT]))[0])
        diameter = 2 * DISC[2]
        assert abs(rows - cols) <= 1 and abs(cols * pixel_size_nm - diameter) <= pixel_size_nm + 1e-6
        (w, h), = box_px(ds[0])
        assert abs(w - h) <= 1 and abs(w * pixel_size_nm - diameter) <= pixel_size_nm + 1e-6

    def test_evaluation_sees_the_jobs_tiles(self, archive):
        """Evaluating a 10 nm model on the (5, 10) nm image: the detector is shown the very
        tiles (pixels, core and halo) the batch job's reader delivers for a 10 nm model,
        and its boxes, mapped back to level 0 per axis, are the ground truth's."""
        from engine.training.detector import evaluate_detector

        detector = DiscDetector()
        ev = evaluate_detector(detector, archive, image_ids=["slow-scan"], pixel_size_nm=10.0, tile=64, halo=16)
        delivered = job_tiles(job_plan(archive, "slow-scan", 10.0, tile=64, halo=16))
        assert len(delivered) > 1
        key = lambda t: (t.shape, t.tobytes())  # noqa: E731
        assert sorted(map(key, detector.tiles)) == sorted(map(key, delivered))
        assert ev.map50_95 == pytest.approx(PERFECT_AP) and ev.predictions == 1

    @pytest.mark.parametrize("pixel_size_nm, level", [
        (40.0, 2),  # the coarsest level, 20 nm, is 2x finer: downsampled from it
        (3.0, 0),  # level 0, 5 nm, is 1.67x coarser: upsampled from it
    ])
    def test_evaluation_resamples_a_square_image_as_the_job_does(self, archive, pixel_size_nm, level):
        """No level of the square (5, 5) nm image is within the job's tolerance of the
        model's pixel size: the detector is shown the very tiles the job's reader delivers
        (resampled to exactly that size from the level it picks), and its boxes, mapped
        back to level 0, are the ground truth's."""
        from engine.training.detector import evaluate_detector

        job = job_plan(archive, "square", pixel_size_nm, tile=64, halo=16)
        assert job.output is not None and job.grid.level == level
        detector = DiscDetector()
        ev = evaluate_detector(detector, archive, image_ids=["square"], pixel_size_nm=pixel_size_nm, tile=64, halo=16)
        delivered = job_tiles(job)
        key = lambda t: (t.shape, t.tobytes())  # noqa: E731
        assert sorted(map(key, detector.tiles)) == sorted(map(key, delivered))
        assert ev.map50 == pytest.approx(PERFECT_AP) and ev.predictions == 1


class DiscDetector:
    """Finds the disc by its brightness: one box (tile pixels) around the bright pixels
    of each tile, score 1, class 0; records every tile it is given (`tiles`) and the
    bright extent of each one that shows the disc (`seen`)."""

    names = NAMES

    def __init__(self):
        self.seen: list[tuple[tuple[int, int], tuple[int, int]]] = []  # (tile shape, bright rows/cols)
        self.tiles: list[np.ndarray] = []

    def predict(self, tiles, *, conf, iou, max_det):
        from engine.models.detector import Detections

        out = []
        for tile in tiles:
            self.tiles.append(np.array(tile))
            bright = tile > BRIGHT
            if not bright.any():
                out.append(Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)))
                continue
            self.seen.append((tile.shape, extent(bright)))
            ys, xs = np.nonzero(bright)
            box = np.float32([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]])
            out.append(Detections(box, np.ones(1, np.float32), np.zeros(1, np.int64)))
        return out


class TestEvaluate:
    def test_the_detector_sees_square_pixels_and_its_boxes_go_back_per_axis(self, archive):
        """Evaluating the fast-scan image: the detector gets the job's square-pixel tile
        (the disc round in it) and its box, mapped back to level 0 along y and x, is the
        ground truth's, so AP is perfect at every IoU threshold."""
        from engine.training.detector import evaluate_detector
        from engine.training.detector.evaluate import predict_image
        from engine.training.detector.pixels import ImageCache
        from engine.training.detector.tiles import read_ground_truth

        detector = DiscDetector()
        ev = evaluate_detector(detector, archive, image_ids=["fast-scan"])
        assert detector.seen and all(abs(r - c) <= 1 for _, (r, c) in detector.seen)
        assert detector.seen[0][0] == (256, 256)  # one tile of 5 nm pixels, the whole field
        assert ev.map50 == pytest.approx(PERFECT_AP) and ev.map50_95 == pytest.approx(PERFECT_AP)
        truth = read_ground_truth(archive)
        want = truth[truth["image_id"] == "fast-scan"][["x0", "y0", "x1", "y1"]].to_numpy(float)
        boxes, _, _ = predict_image(DiscDetector(), ImageCache(), "fast-scan", image_uri(archive, "fast-scan"), 0)
        np.testing.assert_allclose(boxes, want, atol=1.0)  # level-0 pixels: 10 nm rows, 5 nm columns

    def test_tiles_with_halo_stitch_to_the_disc(self, archive):
        """Several cores read with a halo of square pixels: the stitched box is still
        the disc's, in level-0 pixels."""
        from engine.training.detector import evaluate_detector

        detector = DiscDetector()
        ev = evaluate_detector(detector, archive, image_ids=["fast-scan"], tile=64, halo=64)
        assert len(detector.seen) > 1
        assert ev.map50_95 == pytest.approx(PERFECT_AP) and ev.predictions == 1
