"""The YOLO detector trains and is evaluated on square pixels where an image's are not.

A fast-scan SEM records (10, 5) nm (y, x) pixels. The batch job and the endpoint resample
such an image to square pixels (engine.data.tile_plan), so detector training and its
evaluation must too: read as level pixels, a round pore is a 1:2 ellipse with a 1:2 box
to the detector while it learns, then round when it is used. The archive holds the same
scene twice, at (10, 5) nm and at (5, 5) nm: a 600 nm disc (one `pore`) on a gentle ramp
(the scene of tests/data/test_training_square_pixels.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.runtime import configure_offline
from engine.stores.catalog import CatalogRow, image_uri, write_catalog, write_table
from engine.stores.image import open_image
from engine.stores.uri import resolve
from engine.training.detector import plan_tiles
from engine.training.detector.pixels import to_uint8
from engine.training.detector.tiles import yolo_format

NAMES = ("pore",)
FIELD_NM = 1280.0  # both images show 1280 x 1280 nm
DISC = (640.0, 640.0, 300.0)  # centre y, x and radius, nm
IMAGES = {"fast-scan": (10.0, 5.0), "square": (5.0, 5.0)}  # (y, x) nm per pixel
CHUNK = 64
DISC_VALUE, BRIGHT = 40000, 20000  # the disc's uint16 value; the ramp stays below BRIGHT
PERFECT_AP = 0.995  # Ultralytics' ap_per_class of a flawless detector


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No hub access; Ultralytics' settings go to a folder of this test run."""
    import os

    configure_offline()
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics-config")))


def scene(pixel_size_yx: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) uint16 pixels and uint32 instance labels of the disc, sampled at the pixel
    centres of a FIELD_NM square at `pixel_size_yx` nm."""
    py, px = pixel_size_yx
    y = (np.arange(round(FIELD_NM / py)) + 0.5)[:, None] * py
    x = (np.arange(round(FIELD_NM / px)) + 0.5)[None, :] * px
    cy, cx, r = DISC
    disc = (y - cy) ** 2 + (x - cx) ** 2 <= r**2
    pixels = np.where(disc, float(DISC_VALUE), 4000.0 + 4 * x + 2 * y)
    return pixels.astype(np.uint16), disc.astype(np.uint32)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """The two images with their `defects` labels, catalog and ground truth."""
    from engine.stores.writer import write_image
    from engine.synth.truth import TRUTH_FILE, TruthRow, truth_table

    location = resolve(tmp_path_factory.mktemp("square-detector") / "a")
    rows, truth = [], []
    for image_id, size in IMAGES.items():
        pixels, labels = scene(size)
        uri = image_uri(location, image_id)
        write_image(uri, pixels, pixel_size=size, chunk=CHUNK, labels={"defects": labels},
                    attributes={"modality": "SEM"}, name=image_id)
        ys, xs = np.nonzero(labels)
        truth.append(TruthRow.of(image_id, 1, "pore", (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1),
                                 int(labels.sum()), size[1]))
        rows.append(CatalogRow(image_id=image_id, uri=f"images/{image_id}.ome.zarr", modality="SEM",
                               pixel_size_y=size[0], pixel_size_x=size[1], unit="nanometer",
                               height=pixels.shape[0], width=pixels.shape[1], dtype="uint16",
                               levels=len(open_image(uri).levels), chunk=CHUNK, checksum="",
                               material="ferritic_steel", quality_grade="A"))
    write_catalog(location, rows)
    write_table(location.join(TRUTH_FILE), truth_table(truth))
    return location


def extent(mask: np.ndarray) -> tuple[int, int]:
    """(rows, columns) a non-empty mask spans."""
    ys, xs = np.nonzero(mask)
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


def dataset(tiles):
    from engine.training.detector.dataset import ArchiveTileDataset

    return ArchiveTileDataset(tiles, class_names=NAMES, imgsz=256, augment=False)


def box_px(sample) -> np.ndarray:
    """An item's YOLO boxes (normalised xywh) as (w, h) in tile pixels, N x 2 (the
    letterboxed image pads the tile, never resizes it)."""
    h, w = sample["img"].shape[-2:]
    return sample["bboxes"].numpy()[:, 2:] * [w, h]


class TestTrainingTiles:
    @pytest.mark.parametrize("pixel_size_nm, level, nm", [(None, 0, 5.0), (10.0, 1, 10.0)])
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

    def test_square_images_read_their_level_pixels_as_before(self, archive):
        """The square twin's tiles are its level's own pixels and labels, as read
        directly (regression guard: square images train as they did)."""
        tiles = plan_tiles(archive, NAMES, tile=64, image_ids=["square"], pixel_size_nm=10.0)
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


class DiscDetector:
    """Finds the disc by its brightness: one box (tile pixels) around the bright pixels
    of each tile, score 1, class 0; records the bright extent of each tile it sees."""

    names = NAMES

    def __init__(self):
        self.seen: list[tuple[tuple[int, int], tuple[int, int]]] = []  # (tile shape, bright rows/cols)

    def predict(self, tiles, *, conf, iou, max_det):
        from engine.models.detector import Detections

        out = []
        for tile in tiles:
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
