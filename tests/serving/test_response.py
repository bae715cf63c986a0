"""Tile results to the answer's detections: masks are placed where the tile's boxes are.

A tile resampled to the models' pixel size is keyed by a whole level-0 pixel (y, x), but
its core starts at origin + halo x scale, a fraction of a pixel off the key. Boxes are
placed from origin and scale (`engine.tiling.stitch.tile_boxes_to_level0`); the masks
must be too, or an overlay draws them up to a pixel away from their boxes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import zarr

from engine.pipeline.results import TileResult
from engine.serving.prepare import TilingSettings, prepare_image
from engine.serving.response import analysis, core_corner, paint_mask
from engine.tiling.stitch import tile_boxes_to_level0
from tests.data.test_sinks import plan  # noqa: F401  (fixture: a 256 px archive image planned in 64 px tiles)


@pytest.fixture(scope="module")
def resampled_tiles():
    """A 300 x 300 upload at 3 nm, tiled at the models' 1.3 nm: 128 px chunks, 8 px halo."""
    pixels = (np.arange(300 * 300) % 251).astype(np.uint8).reshape(300, 300)
    settings = TilingSettings(chunk=128, halo=8, target_pixel_size_nm=1.3)
    return prepare_image(pixels, modality="SEM", pixel_size_nm=3.0, settings=settings, fit=False).tiles


def one_detection(tile, box_tile_px: tuple[int, int, int, int]) -> TileResult:
    """A TileResult for `tile` with one detection whose mask fills `box_tile_px` (xyxy,
    tile pixels of core + halo, edge coordinates), placed as the ensemble places boxes."""
    h, w = tile.tile.shape
    top, bottom, left, right = tile.halo
    x0, y0, x1, y1 = box_tile_px
    full = np.zeros((h, w), np.uint32)
    full[y0:y1, x0:x1] = 1
    box = np.array([box_tile_px], np.float64)
    level0 = tile_boxes_to_level0(box, tile.origin, tile.scale)
    empty = TileResult.failed(image_id="upload", level=int(tile.level), y=int(tile.y), x=int(tile.x), modality="SEM",
                              pixel_size_nm=float(tile.pixel_size_nm), error="", n_materials=0, n_grades=0,
                              model_versions={})
    one = np.ones(1)
    return dataclasses.replace(
        empty, error=None, boxes=box, boxes_level0=level0, boxes_nm=level0 * 3.0, scores=one * 0.9,
        classes=np.zeros(1, np.int64), mask_scores=one, mask_from_box=np.zeros(1, bool),
        **{name: one for name in ("area_nm2", "area_um2", "equivalent_diameter_nm", "major_axis_nm",
                                  "minor_axis_nm", "aspect_ratio", "orientation_deg")},
        centroid_level0=np.zeros((1, 2)), core_labels=full[top : h - bottom, left : w - right],
        core_classes=np.zeros((h - top - bottom, w - left - right), np.uint8), core_area_mm2=1.0,
        defect_density_per_mm2=1.0)


class TestMaskPlacement:
    def test_a_resampled_tiles_mask_starts_at_its_core_corner_not_its_key(self, resampled_tiles):
        tile = next(t for t in resampled_tiles if (t.y, t.x) == (0, 128))
        assert tile.scale == pytest.approx((1.3 / 3, 1.3 / 3))
        corner = core_corner(tile)
        assert corner == pytest.approx((0.0, 128.2667), abs=1e-4)  # the key says x = 128
        left = tile.halo[2]
        result = one_detection(tile, (left, 0, left + 5, 4))  # the core's first 5 x 4 pixels
        (det,) = analysis([result], [tile], class_names=["void"], materials=[], grades=[])["detections"]
        assert det["mask"]["origin_px"] == pytest.approx(list(corner), abs=1e-9)
        # the mask's corner is the box's corner: both placed by the tile's origin and scale
        assert det["mask"]["origin_px"] == pytest.approx([det["box_px"][1], det["box_px"][0]], abs=1e-9)

    def test_masks_paint_inside_their_boxes_on_every_tile(self, resampled_tiles):
        for tile in resampled_tiles:
            top, _, left, _ = tile.halo
            box = (left + 3, top + 2, left + 40, top + 30)
            (det,) = analysis([one_detection(tile, box)], [tile], class_names=["void"], materials=[],
                                   grades=[])["detections"]
            x0, y0, x1, y1 = det["box_px"]
            m = det["mask"]
            oy, ox = m["origin_px"]
            (sy, sx), (h, w) = m["scale"], m["size"]
            assert (oy, ox, oy + h * sy, ox + w * sx) == pytest.approx((y0, x0, y1, x1), abs=1e-9)
            painted = paint_mask(np.zeros((300, 300), bool), m, True)
            ys, xs = np.nonzero(painted)
            # each level-0 pixel takes the mask pixel its centre falls in: centres inside the box
            assert (ys + 0.5 >= y0).all() and (ys + 0.5 <= y1).all() and (xs + 0.5 >= x0).all()
            assert (xs + 0.5 <= x1).all()

    def test_one_tile_per_result(self, resampled_tiles):
        tile = resampled_tiles[0]
        with pytest.raises(ValueError, match="1 results of 2 tiles"):
            analysis([one_detection(tile, (0, 0, 2, 2))], [tile, tile], class_names=["v"], materials=[], grades=[])


class TestObjects:
    def test_a_defect_cut_by_a_tile_border_is_one_object(self):
        """As the batch job counts them: the two tiles each report a piece (two
        detections), the answer's objects and summary count one defect."""
        pixels = np.zeros((64, 128), np.uint8)
        tiles = prepare_image(pixels, modality="SEM", pixel_size_nm=2.0,
                              settings=TilingSettings(chunk=64, halo=8, target_pixel_size_nm=None),
                              fit=False).tiles
        assert [(t.y, t.x) for t in tiles] == [(0, 0), (0, 64)] and tiles[1].halo[2] == 8
        # a defect over x 40..90, y 10..20: each tile sees it up to the edge of what it read
        left, right = one_detection(tiles[0], (40, 10, 72, 20)), one_detection(tiles[1], (0, 10, 34, 20))
        answer = analysis([left, right], tiles, class_names=["crack"], materials=[], grades=[])
        assert answer["summary"]["n_detections"] == 2 and answer["summary"]["n_defects"] == 1
        (obj,) = answer["objects"]
        assert obj["box_px"] == pytest.approx([40, 10, 90, 20]) and obj["parts"] == 2
        assert obj["box_nm"] == pytest.approx([80, 20, 180, 40]) and sorted(obj["detections"]) == [0, 1]
        assert obj["class"] == "crack"


class TestObjectsAsTheJob:
    """For the same tile results the answer's objects are the batch job's objects table
    (engine.data.objects for both): boxes, parts, and an object of several pieces, or one
    reaching into a neighbour's core, measured whole on the tiles' labels."""

    CASES = {
        # a defect cut by the border x = 64, a piece in each tile; a small one beside it
        "cut": ([[(50, 20, 64, 40)], [(64, 22, 80, 38), (100, 40, 104, 44)]], [[], []], None),
        # tile (0, 0) sees x 36..76 whole reading 16 px on; its neighbour paints x 64..76
        "reaching": ([[(36, 20, 76, 40)], []], [[], [(48, 20, 76, 40)]], 16),
        # a long slanted defect and a small one beside its end, each with its piece across
        # the neighbour sees 3 px more of it than its owner did: the object grows to x 79
        "grown": ([[(36, 20, 76, 40)], []], [[], [(48, 20, 79, 40)]], 16),
        "slanted": ([[(10, 10, 76, 60), (50, 28, 74, 40)], []], [[], [(48, 28, 74, 40), (48, 48, 76, 60)]], 16),
    }

    @pytest.mark.parametrize("case", sorted(CASES))
    def test_objects_equal_the_jobs(self, case, plan, tmp_path):
        from engine.data.sinks import OBJECTS, WriteTileOutputs, finish_image, read_output
        from engine.pipeline.ensemble import TileInput
        from engine.serving.response import objects, rle_decode
        from tests.data.test_sinks import CLASSES, GRADES, MATERIALS, batch, result, target_for

        boxes, foreign, halo = self.CASES[case]
        results = [result(plan, 0, c, b, classes=[0] * len(b), foreign=f)
                   for c, (b, f) in enumerate(zip(boxes, foreign))]
        cols = batch(results)
        if halo:  # read with `halo` px towards each other
            cols["origin"][1] = (0, 64 - halo)
            cols["halo"][0], cols["halo"][1] = (0, 0, 0, halo), (0, 0, halo, 0)
        target = target_for(plan, tmp_path)
        WriteTileOutputs(tmp_path, labels={plan.image_id: target}, class_names=CLASSES)(cols)
        finish_image(tmp_path, plan, [(0, 0, 0), (0, 0, 64)], label_target=target, class_names=CLASSES,
                     materials=MATERIALS, grades=GRADES)
        job = read_output(tmp_path, OBJECTS).to_pylist()
        job_labels = zarr.open_group(target.root.path, mode="r")["labels/predicted_defects/0"][:]

        tiles = [TileInput(plan.image_id, np.zeros((64 + h[0] + h[1], 64 + h[2] + h[3]), np.uint16),
                           plan.pixel_size_nm, y=r.y, x=r.x, halo=h, origin=o, modality=plan.modality)
                 for r, o, h in zip(results, cols["origin"], cols["halo"])]
        answer = objects(results, tiles, CLASSES)
        assert len(answer) == len(job) > 0
        for a, j in zip(answer, job):
            assert a["class"] == j["class_name"] and a["score"] == pytest.approx(j["score"])
            assert a["box_px"] == pytest.approx([j["x0"], j["y0"], j["x1"], j["y1"]])
            assert a["box_nm"] == pytest.approx([j["x0_nm"], j["y0_nm"], j["x1_nm"], j["y1_nm"]])
            assert a["parts"] == j["parts"]
            assert a["centroid_px"] == pytest.approx([j["centroid_y"], j["centroid_x"]])
            for name in ("area_nm2", "equivalent_diameter_nm", "major_axis_nm", "aspect_ratio", "orientation_deg"):
                assert a[name] == pytest.approx(j[name]), name
            # its mask: every pixel the job's label image holds of it, in either tile's core
            m, got = a["mask"], np.zeros_like(job_labels, bool)
            (y0, x0), (h, w) = (int(v) for v in m["origin_px"]), m["size"]
            got[y0 : y0 + h, x0 : x0 + w] = rle_decode(m["counts"], m["size"])
            np.testing.assert_array_equal(got, np.isin(job_labels, j["label_ids"]))
        if case == "grown":  # measured on the pixels both tiles painted: 28 + 15 columns of 20
            assert answer[0]["box_px"][2] == 79 and answer[0]["area_nm2"] == pytest.approx(43 * 20 * plan.pixel_size_nm**2)
