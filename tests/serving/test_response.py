"""Tile results to the answer's detections: masks are placed where the tile's boxes are.

A tile resampled to the models' pixel size is keyed by a whole level-0 pixel (y, x), but
its core starts at origin + halo x scale, a fraction of a pixel off the key. Boxes are
placed from origin and scale (`engine.tiling.stitch.tile_boxes_to_level0`); the masks
must be too, or an overlay draws them up to a pixel away from their boxes.
"""

from __future__ import annotations

import dataclasses
import math

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


def tiff_of_non_square_pixels(path) -> list[np.ndarray]:
    """Write a 128 x 256 uint16 TIFF of (10, 5) nm (y, x) pixels (XResolution twice
    YResolution: a fast-scan SEM) to `path`; return its defects' masks: a disc of 600 nm
    diameter over four tile cores, an ellipse of 240 x 80 nm at 30 degrees over two."""
    import tifffile

    py, px = TestNonSquarePixels.PIXEL_NM
    yy, xx = np.mgrid[:128, :256]

    def ellipse(cy, cx, a_nm, b_nm, degrees):  # counter-clockwise from +x as displayed (y down)
        t = np.radians(degrees)
        x, y = (xx - cx) * px, -(yy - cy) * py
        u, v = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
        return (u / a_nm) ** 2 + (v / b_nm) ** 2 <= 1

    masks = [ellipse(64, 128, 300.0, 300.0, 0), ellipse(15, 192, 120.0, 40.0, 30)]
    pixels = np.where(np.logical_or.reduce(masks), 40000, 0).astype(np.uint16)
    # pixels per centimetre: x 5 nm -> 2e6, y 10 nm -> 1e6
    tifffile.imwrite(path, pixels, resolution=(1e7 / px, 1e7 / py), resolutionunit="CENTIMETER")
    return masks


class TestNonSquarePixels:
    """A TIFF whose pixels are not square, through the endpoint's functions (decode, the
    ingress's pixel-size fields, preprocessing, the ensemble, the answer) and through
    the batch job's (ingest, datasource, ensemble, tile sink, finishing): both measure
    its defects in physical units, and the same. The endpoint once kept the TIFF's x size
    alone and measured the disc as a 2:1 ellipse of half its area."""

    PIXEL_NM = (10.0, 5.0)  # (y, x)
    CHUNK, HALO, MAX_DET = 64, 16, 16

    @pytest.fixture(scope="class")
    @classmethod
    def upload(cls, tmp_path_factory):
        path = tmp_path_factory.mktemp("aniso") / "fast-scan.tif"
        return path, tiff_of_non_square_pixels(path)

    @pytest.fixture(scope="class")
    @classmethod
    def ensemble(cls):
        from engine.pipeline.ensemble import Ensemble, EnsembleConfig, EnsembleModels
        from tests.data.test_objects import Detector, Segmenter  # boxes and masks of the bright pixels

        return Ensemble(EnsembleModels(Detector(), Segmenter()), config=EnsembleConfig(conf=0.0, max_det=cls.MAX_DET),
                        device="cpu")

    def endpoint(self, path, ensemble, target_nm, *, chunk=CHUNK, halo=HALO):
        """The answer of POST /v1/analyze for the TIFF with no pixel size field, as the
        ingress and stages build it (tiles of `chunk` px and `halo`)."""
        from engine.serving.decode import decode
        from engine.serving.ingress import _pixel_size
        from engine.serving.response import image_info, respond
        from engine.serving.schemas import AnalyzeResponse

        decoded = decode(path.read_bytes(), "image/tiff")
        size, source = _pixel_size(None, None, decoded.pixel_size_yx_nm)
        assert (size, source) == (self.PIXEL_NM, "tiff metadata")
        settings = TilingSettings(chunk=chunk, halo=halo, target_pixel_size_nm=target_nm)
        prepared = prepare_image(decoded.pixels, modality="SEM", pixel_size_nm=size, settings=settings, fit=False)
        analysed = analysis(ensemble.analyze(prepared.tiles), prepared.tiles, class_names=ensemble.class_names,
                            materials=(), grades=())
        info = image_info(decoded.pixels, format=decoded.format, sha256="0" * 64, modality="SEM",
                          pixel_size_yx_nm=size, pixel_size_source=source, level=prepared.level,
                          level_pixel_size_yx_nm=(prepared.pixel_size_y_nm, prepared.pixel_size_nm))
        body = respond(analysed, image=info, alias="production", request_id="r", timings_ms={})
        AnalyzeResponse.model_validate(body)  # the schema takes it
        return body

    def job(self, path, ensemble, target_nm, out):
        """(objects rows, summary row) of the batch job over the same file: ingested into
        an archive, its tiles read by the job's datasource, the tile sink, finishing."""
        from ray.data.block import BlockAccessor

        from engine.data.datasource import DEFAULT_TOLERANCE, ZarrTileDatasource
        from engine.data.sinks import (
            OBJECTS, LabelTarget, WriteTileOutputs, create_label_arrays, finish_image, label_dtype, read_output,
        )
        from engine.data.tile_read import read_tiles
        from engine.stores.ingest.pipeline import ingest_files
        from engine.stores.uri import resolve

        (row,) = ingest_files([path], out / "archive", modality="SEM", chunk=self.CHUNK)
        assert (row.pixel_size_y, row.pixel_size_x, row.unit) == (*self.PIXEL_NM, "nanometer")
        ds = ZarrTileDatasource(str(out / "archive"), target_pixel_size_nm=target_nm or row.pixel_size_x,
                                tolerance=math.inf if target_nm is None else DEFAULT_TOLERANCE,  # as jobs.reprocess
                                halo=self.HALO)
        (planned,) = ds.images()
        target = LabelTarget(planned.image_id, resolve(str(out / "labels.ome.zarr")), "predicted_defects", planned,
                             self.MAX_DET, label_dtype(planned.n_tiles, self.MAX_DET), planned.location)
        create_label_arrays(target)
        sink = WriteTileOutputs(str(out / "job"), labels={planned.image_id: target}, class_names=ensemble.class_names)
        done = []
        for spec in ds.read_specs():
            for block in read_tiles(spec):
                batch = BlockAccessor.for_block(block).to_batch_format("numpy")
                results = ensemble(batch)
                results.update({k: batch[k] for k in ("origin", "scale", "halo")})
                r = sink(results)
                done += [(int(lv), int(y), int(x)) for lv, y, x, ok in zip(r["level"], r["y"], r["x"], r["ok"]) if ok]
        summary = finish_image(str(out / "job"), planned, done, label_target=target, class_names=ensemble.class_names)
        return read_output(str(out / "job"), OBJECTS).to_pylist(), summary

    def test_the_tiff_gives_its_two_sizes(self, upload):
        from engine.serving.decode import decode
        from engine.stores.ingest.tiff import read_tiff

        path, _ = upload
        first = next(iter(read_tiff(path)))
        assert (tuple(first.pixel_size), first.unit) == (self.PIXEL_NM, "nanometer")  # the batch ingest's reading
        assert decode(path.read_bytes(), "image/tiff").pixel_size_yx_nm == self.PIXEL_NM

    @pytest.mark.parametrize("target_nm", [None, 2.5], ids=["native", "resampled"])
    def test_the_answer_measures_the_physical_shapes_as_the_job_does(self, upload, ensemble, target_nm, tmp_path):
        from engine.pipeline.measure import measure_mask

        path, masks = upload
        body = self.endpoint(path, ensemble, target_nm)
        image = body["image"]
        assert (image["pixel_size_y_nm"], image["pixel_size_nm"]) == self.PIXEL_NM
        # the models see square pixels: native, the finer 5 nm (the 10 nm rows upsampled)
        want_level = (5.0, 5.0) if target_nm is None else (target_nm, target_nm)
        assert (image["level_pixel_size_y_nm"], image["level_pixel_size_nm"]) == pytest.approx(want_level)
        area_mm2 = 128 * 256 * self.PIXEL_NM[0] * self.PIXEL_NM[1] / 1e12
        summary = body["summary"]
        assert summary["area_mm2"] == pytest.approx(area_mm2)
        assert summary["n_defects"] == 2 and summary["defect_density_per_mm2"] == pytest.approx(2 / area_mm2)

        truth = [measure_mask(m, self.PIXEL_NM) for m in masks]
        centres = [t.centroid[0] + 0.5 for t in truth]  # level-0 edge coordinates
        disc, ellipse = (min(body["objects"], key=lambda o: np.hypot(*(np.array(o["centroid_px"]) - c)))
                         for c in centres)
        assert disc["parts"] == 4 and ellipse["parts"] == 2  # cut by tile borders, measured whole
        # the physical shapes, digitised: a 600 nm disc, a 240 x 80 nm ellipse at 30 degrees
        assert disc["area_nm2"] == pytest.approx(np.pi * 300**2, rel=0.03)
        assert disc["major_axis_nm"] == pytest.approx(600, rel=0.03)
        assert disc["minor_axis_nm"] == pytest.approx(600, rel=0.03)
        assert disc["aspect_ratio"] == pytest.approx(1, abs=0.03) and disc["orientation_deg"] is None  # round
        # native: the thin ellipse loses up to a row per column (below), 6% of its area
        within = 0.05 if target_nm else 0.08
        assert ellipse["area_nm2"] == pytest.approx(np.pi * 120 * 40, rel=within)
        assert ellipse["major_axis_nm"] == pytest.approx(240, rel=within)
        assert ellipse["minor_axis_nm"] == pytest.approx(80, rel=0.1)
        assert ellipse["orientation_deg"] == pytest.approx(30, abs=3)
        if target_nm is None:
            # The models saw the upload's 10 nm rows upsampled to 5 nm: the outer half of a
            # defect's edge row is interpolated to 3/4 of its brightness (30000), under the
            # stand-in detector's threshold (half the uint16 range), and a mask comes back
            # to the upload's rows by the half-row each row's centre falls in, its lower
            # one. So each defect's mask is the true one less at most its lowest pixel in
            # each column; it is measured as returned, in the models' 5 nm pixels, exactly.
            from engine.serving.response import rle_decode

            for o, true_mask in zip((disc, ellipse), masks):
                got = paint_mask(np.zeros_like(true_mask), o["mask"], True)
                lowest = true_mask & ~np.roll(true_mask, -1, axis=0)  # no defect pixel below
                assert not (got & ~true_mask).any() and not (true_mask & ~got & ~lowest).any()
                m = o["mask"]
                assert np.multiply(m["scale"], self.PIXEL_NM) == pytest.approx((5.0, 5.0))
                measured = measure_mask(rle_decode(m["counts"], m["size"]), (5.0, 5.0))
                for name in ("area_nm2", "major_axis_nm", "minor_axis_nm", "aspect_ratio"):
                    assert o[name] == pytest.approx(getattr(measured, name)[0], rel=1e-9), name

        job, job_summary = self.job(path, ensemble, target_nm, tmp_path)
        assert job_summary["n_defects"] == summary["n_defects"]
        assert job_summary["core_area_mm2"] == pytest.approx(summary["area_mm2"], rel=1e-9)
        assert job_summary["defect_density_per_mm2"] == pytest.approx(summary["defect_density_per_mm2"], rel=1e-9)
        assert len(job) == len(body["objects"])
        for a, j in zip(body["objects"], job):  # both best score first
            assert a["parts"] == j["parts"]
            assert a["box_px"] == pytest.approx([j["x0"], j["y0"], j["x1"], j["y1"]])
            assert a["box_nm"] == pytest.approx([j["x0_nm"], j["y0_nm"], j["x1_nm"], j["y1_nm"]])
            assert a["centroid_px"] == pytest.approx([j["centroid_y"], j["centroid_x"]])
            for name in ("area_nm2", "area_um2", "equivalent_diameter_nm", "major_axis_nm", "minor_axis_nm",
                         "aspect_ratio"):
                assert a[name] == pytest.approx(j[name], rel=1e-9), name
            want = j["orientation_deg"]
            assert a["orientation_deg"] == (None if np.isnan(want) else pytest.approx(want))

    @pytest.mark.parametrize("target_nm", [5.0, 6.0], ids=["the x size", "within the level tolerance"])
    def test_the_models_see_square_pixels_and_the_boxes_are_in_the_uploads(self, upload, target_nm):
        """Models of 5 or 6 nm pixels once got the (10, 5) nm pixels as they were (level 0
        is the level nearest the target along x, within the job's 1.5x tolerance): the
        600 nm disc was a 61 x 121 px ellipse to the detector. Resampled to the target on
        both axes it is round; the answer still places it in the upload's pixels and
        measures it in nm."""
        from scipy import ndimage

        from engine.pipeline.ensemble import Ensemble, EnsembleConfig, EnsembleModels
        from tests.data.test_objects import Detector as BrightComponents
        from tests.data.test_objects import Segmenter

        received = []

        class Detector(BrightComponents):  # the family name the ensemble checks for
            def predict(self, tiles, **kwargs):
                received.extend(np.array(t) for t in tiles)
                return super().predict(tiles, **kwargs)

        ensemble = Ensemble(EnsembleModels(Detector(), Segmenter()),
                            config=EnsembleConfig(conf=0.0, max_det=self.MAX_DET), device="cpu")
        path, masks = upload
        body = self.endpoint(path, ensemble, target_nm, chunk=256, halo=0)  # one tile: the disc seen whole
        py, px = self.PIXEL_NM
        image = body["image"]
        assert (image["level_pixel_size_y_nm"], image["level_pixel_size_nm"]) == pytest.approx((target_nm, target_nm))

        (seen,) = received  # 128 x 256 pixels of (10, 5) nm are 1280 x 1280 nm: a square input
        side = 1280 / target_nm
        assert seen.shape == (pytest.approx(side, abs=1), pytest.approx(side, abs=1))
        labels, _ = ndimage.label(seen > 0.5)
        disc_seen = ndimage.find_objects(labels)[np.argmax(np.bincount(labels.ravel())[1:])]
        rows, cols = (s.stop - s.start for s in disc_seen)
        # round, as the physical disc (its rows a little fewer: the coarser y steps are
        # interpolated, and the detector thresholds the raw values at half the uint16 range)
        assert rows == pytest.approx(600 / target_nm, rel=0.04) and cols == pytest.approx(600 / target_nm, rel=0.04)
        assert rows / cols == pytest.approx(1, abs=0.04)

        ys, xs = np.nonzero(masks[0])
        truth_px = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # the disc's box in the upload's pixels
        disc = max(body["objects"], key=lambda o: o["area_nm2"])
        # each edge within an upload pixel and a model pixel of the truth's, along its axis
        within = [1 + target_nm / px, 1 + target_nm / py] * 2
        assert all(abs(got - want) <= tol for got, want, tol in zip(disc["box_px"], truth_px, within))
        x0, y0, x1, y1 = disc["box_nm"]
        assert x1 - x0 == pytest.approx(600, abs=2 * (px + target_nm))
        assert y1 - y0 == pytest.approx(600, abs=2 * (py + target_nm))
        assert disc["area_nm2"] == pytest.approx(np.pi * 300**2, rel=0.03)
        assert disc["aspect_ratio"] == pytest.approx(1, abs=0.03)


class TestSchemaDocumentsConventions:
    """The OpenAPI schema states how defects are measured and placed (the conventions of
    engine.pipeline.measure) and takes and reports both pixel sizes."""

    @pytest.fixture(scope="class")
    @classmethod
    def schema(cls):
        from engine.serving.ingress import api

        return api.openapi()

    def test_measurements_and_centroids_are_described(self, schema):
        from engine.pipeline.measure import ROUND_WITHIN

        models = schema["components"]["schemas"]
        for name in ("Detection", "DefectObject"):
            props = models[name]["properties"]
            text = {k: props[k].get("description", "") for k in props}
            for field in ("area_nm2", "area_um2", "equivalent_diameter_nm", "major_axis_nm", "minor_axis_nm",
                          "aspect_ratio", "orientation_deg", "centroid_px"):
                assert text[field], f"{name}.{field} has no description"
            assert "4 * sqrt" in text["major_axis_nm"] and "p² / 12" in text["major_axis_nm"]
            assert "+x axis" in text["orientation_deg"] and "counter-clockwise" in text["orientation_deg"]
            assert "y points down" in text["orientation_deg"] and "[0, 180)" in text["orientation_deg"]
            assert "round" in text["orientation_deg"] and "null" in text["orientation_deg"]
            assert f"ROUND_WITHIN = {ROUND_WITHIN:g}" in text["orientation_deg"]  # the constant the job uses
            assert "edge coordinates" in text["centroid_px"] and "(i + 0.5, j + 0.5)" in text["centroid_px"]

    def test_both_pixel_sizes_are_taken_and_reported(self, schema):
        ref = schema["paths"]["/v1/analyze"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        form = schema["components"]["schemas"][ref["$ref"].rsplit("/", 1)[-1]]
        assert "pixel_size_y_nm" not in form.get("required", [])  # optional: square pixels without it
        assert "along y" in form["properties"]["pixel_size_y_nm"]["description"]
        assert "along x" in form["properties"]["pixel_size_nm"]["description"]
        image = schema["components"]["schemas"]["ImageInfo"]["properties"]
        assert {"pixel_size_nm", "pixel_size_y_nm", "level_pixel_size_nm", "level_pixel_size_y_nm"} <= set(image)
