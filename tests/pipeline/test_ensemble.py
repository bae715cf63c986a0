"""The ensemble on datasource batches: result format, determinism, batch/one-tile parity,
error rows, input modes, and the class as a Ray Data actor-pool UDF."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from engine.pipeline import COLUMNS, Ensemble, EnsembleConfig, EnsembleModels, TileResult, analyze_tile
from engine.pipeline.ensemble import TileInput, tiles_from_batch
from engine.pipeline.results import DETECTION_COLUMNS, from_columns
from engine.tiling import owned, tile_core_level0

from ..known_detections import threshold_detections
from .conftest import TEST_CONFIG, take

# Columns compared within float tolerance between batch compositions (see the module
# doc of engine.pipeline.ensemble); everything else must be equal.
_FLOAT_DETECTION = {"boxes", "boxes_level0", "boxes_nm", "scores", "mask_scores", "area_nm2", "area_um2",
                    "equivalent_diameter_nm", "major_axis_nm", "minor_axis_nm", "aspect_ratio", "orientation_deg",
                    "centroid_level0"}


def assert_same(a: TileResult, b: TileResult, *, exact: bool):
    assert (a.image_id, a.level, a.y, a.x, a.error) == (b.image_id, b.level, b.y, b.x, b.error)
    np.testing.assert_array_equal(a.classes, b.classes)
    for name in DETECTION_COLUMNS:
        x, y = getattr(a, name), getattr(b, name)
        if exact or name not in _FLOAT_DETECTION:
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-3, err_msg=name)
    if exact:
        np.testing.assert_array_equal(a.core_labels, b.core_labels)
        np.testing.assert_array_equal(a.material_probs, b.material_probs)
    else:
        assert np.mean(a.core_labels != b.core_labels) < 1e-3
        np.testing.assert_allclose(a.material_probs, b.material_probs, atol=1e-5)
    assert (a.material, a.grade) == (b.material, b.grade)


def single(ensemble, batch, i, params=None) -> TileResult:
    """Row i of a datasource batch through `analyze_tile`, the online endpoint's call."""
    return analyze_tile(batch["tile"][i], batch["modality"][i], batch["pixel_size"][i], ensemble=ensemble,
                        params=params, image_id=batch["image_id"][i], level=batch["level"][i], y=batch["y"][i],
                        x=batch["x"][i], halo=batch["halo"][i], origin=batch["origin"][i], scale=batch["scale"][i])


def classifier_failing_on_a_flat_tile(tiny_models, tiles, monkeypatch):
    """(ensemble, rows 0-2 of `tiles`, their tile column with row 1 flat): the ensemble's
    classifier fails on any batch holding a flat tile (stretched to 0.5 everywhere)."""
    ens = Ensemble(tiny_models, config=EnsembleConfig(**TEST_CONFIG))
    real = ens.models.classifier.forward

    def flaky(x):
        if bool((x == 0.5).flatten(1).all(dim=1).any()):
            raise RuntimeError("simulated failure")
        return real(x)

    monkeypatch.setattr(ens.models.classifier, "forward", flaky)
    batch = take(tiles, [0, 1, 2])
    tile = batch["tile"].copy()
    tile[1] = np.full_like(tile[1], 100)
    return ens, batch, tile


@pytest.fixture(scope="module")
def out(ensemble, tiles):
    return ensemble(tiles)


class TestResults:
    def test_one_row_per_tile_with_every_column(self, tiles, out):
        n = len(tiles["image_id"])
        assert n == 12 and len({t.shape for t in tiles["tile"]}) > 1, "fixture: tiles of several shapes"
        assert list(out) == list(COLUMNS)
        assert all(len(v) == n for v in out.values())
        for name in ("image_id", "level", "y", "x", "modality"):
            np.testing.assert_array_equal(out[name], tiles[name])
        assert out["material_probs"].shape == (n, 12) and out["grade_probs"].shape == (n, 4)

    def test_detections_are_well_formed(self, ensemble, tiles, out):
        assert out["n_defects"].sum() > 0, "no detections: nothing downstream of the detector was exercised"
        for i, r in enumerate(from_columns(out)):
            n = r.n_defects
            assert r.error is None
            assert r.boxes.shape == r.boxes_level0.shape == r.boxes_nm.shape == (n, 4)
            for name in DETECTION_COLUMNS:
                assert len(getattr(r, name)) == n, name
            assert np.all(np.diff(r.scores) <= 0) and np.all((r.classes >= 0) & (r.classes < 5))
            origin, scale, halo = tiles["origin"][i], tiles["scale"][i], tiles["halo"][i]
            np.testing.assert_allclose(r.boxes_level0, r.boxes * np.r_[scale[::-1], scale[::-1]]
                                       + np.r_[origin[::-1], origin[::-1]])
            core = tile_core_level0(origin, scale, halo, tiles["tile"][i].shape)
            assert owned(r.boxes_level0, core).all(), "a box whose centre lies outside the core"
            p0 = tiles["pixel_size"][i] / scale[1]
            np.testing.assert_allclose(r.boxes_nm, r.boxes_level0 * p0)
            # measurements: positive areas in nm2, consistent units, centroids in the box
            assert np.all(r.area_nm2 > 0)
            np.testing.assert_allclose(r.area_um2, r.area_nm2 / 1e6)
            np.testing.assert_allclose(r.equivalent_diameter_nm, np.sqrt(4 * r.area_nm2 / np.pi))
            assert np.all(r.aspect_ratio >= 1)
            cy, cx = r.centroid_level0.T if n else (np.zeros(0), np.zeros(0))
            b, tol = r.boxes_level0, 0.5 * max(scale)  # a box mask holds every pixel the box touches
            assert np.all((cx >= b[:, 0] - tol) & (cx <= b[:, 2] + tol) & (cy >= b[:, 1] - tol) & (cy <= b[:, 3] + tol))
            # core masks: the core's shape, labels index this row's detections
            h, w = tiles["tile"][i].shape
            top, bottom, left, right = halo
            assert r.core_labels.shape == r.core_classes.shape == (h - top - bottom, w - left - right)
            assert r.core_labels.dtype == np.uint32 and r.core_classes.dtype == np.uint8
            assert r.core_labels.max(initial=0) <= n + len(r.foreign_classes) and r.core_classes.max(initial=0) <= 5
            # foreign pieces: other cores' objects, each painted in this core beneath its own
            assert not owned(r.foreign_boxes_level0, core).any()
            assert set(np.unique(r.core_labels[r.core_labels > n])) == set(range(n + 1, n + len(r.foreign_classes) + 1))
            px = tiles["pixel_size"][i]
            assert r.core_area_mm2 == pytest.approx(r.core_labels.size * px * px / 1e12)
            assert r.defect_density_per_mm2 == pytest.approx(n / r.core_area_mm2)

    def test_classification_and_versions(self, ensemble, out):
        np.testing.assert_allclose(out["material_probs"].sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(out["grade_probs"].sum(axis=1), 1.0, rtol=1e-5)
        for i in range(len(out["material"])):
            assert out["material"][i] == ensemble.materials[int(np.argmax(out["material_probs"][i]))]
            assert out["grade"][i] in ensemble.grades
        versions = json.loads(out["model_versions"][0])
        assert versions == {"classifier": "resnet10t (unregistered)", "detector": "yolov8n_tiny (unregistered)",
                            "fusion": "fusion_tiny (unregistered)", "segmenter": "sam_tiny (unregistered)"}
        assert ensemble.describe()["class_names"] == ["pore", "crack", "inclusion", "scratch", "void"]

    def test_non_square_pixels_are_measured_in_both_sizes(self, ensemble, tiles, out):
        """The same tiles from pixels twice as tall as wide: the same detections, with y
        lengths and areas doubled and the density halved."""
        tall = dict(tiles, pixel_size_y=np.asarray(tiles["pixel_size"], np.float64) * 2)
        for a, b in zip(from_columns(out), from_columns(ensemble(tall))):
            np.testing.assert_array_equal(a.boxes_level0, b.boxes_level0)
            np.testing.assert_allclose(b.boxes_nm[:, [0, 2]], a.boxes_nm[:, [0, 2]])
            np.testing.assert_allclose(b.boxes_nm[:, [1, 3]], 2 * a.boxes_nm[:, [1, 3]])
            np.testing.assert_allclose(b.area_nm2, 2 * a.area_nm2, rtol=1e-6)
            assert b.core_area_mm2 == pytest.approx(2 * a.core_area_mm2)
            assert b.defect_density_per_mm2 == pytest.approx(a.defect_density_per_mm2 / 2)

    def test_a_tile_without_detections(self, tiny_models, tiles):
        ens = Ensemble(tiny_models, config=EnsembleConfig(conf=1.0))
        r = from_columns(ens(take(tiles, [0])))[0]
        assert r.n_defects == 0 and r.error is None and not r.core_labels.any()
        assert r.defect_density_per_mm2 == 0.0 and r.material != ""


@pytest.mark.parametrize("family,name", [("classifier", "resnet10t_px"), ("fusion", "fusion_tiny_px")])
def test_a_model_that_reads_pixel_sizes_is_given_each_tiles(tiny_models, tiles, family, name):
    """resnet10t_px, fusion_tiny_px: the same pixels at ten times the pixel size are
    another material's evidence; the ensemble (the batch job's and Serve's path) hands
    each tile's size over."""
    import dataclasses

    import torch

    import engine.models as M

    torch.manual_seed(0)
    model = M.create_model(family, name).eval()
    torch.nn.init.normal_(model.scale[-1].weight, std=1.0)  # a trained modulation, not the identity it starts as
    members = {"classifier": None, "fusion": None, family: model}
    ens = Ensemble(dataclasses.replace(tiny_models, **members), config=EnsembleConfig(**TEST_CONFIG))
    batch = take(tiles, [0, 1, 2])
    sizes = np.asarray(batch["pixel_size"], np.float64)
    coarser = {**batch, "pixel_size": sizes * np.array([1, 10, 10])}  # tile 0 as it was
    at_size, changed = ens(batch), ens(coarser)
    assert not any(at_size["error"]) and not any(changed["error"])
    np.testing.assert_allclose(changed["material_probs"][0], at_size["material_probs"][0], atol=1e-6)
    for i in (1, 2):
        assert not np.allclose(changed["material_probs"][i], at_size["material_probs"][i], atol=1e-3), i


def test_a_defect_reaching_into_a_neighbour_core_is_painted_there(tiny_models, monkeypatch):
    """Two tiles of one row, cores x [0, 64) and [64, 128), halo 16: a disc centred at
    x 58 belongs to the left tile; the right one paints its share (x >= 64) as a
    foreign piece beneath its own detections, so the two cores hold its mask whole."""
    yy, xx = np.mgrid[:64, :128]
    image = ((yy - 32) ** 2 + (xx - 58) ** 2 <= 12**2).astype(np.uint8) * 255
    monkeypatch.setattr(tiny_models.detector, "predict", threshold_detections)
    ens = Ensemble(EnsembleModels(tiny_models.detector), config=EnsembleConfig(**TEST_CONFIG))
    batch = {"image_id": np.array(["a", "a"], object), "level": np.zeros(2, np.int32),
             "y": np.zeros(2, np.int64), "x": np.array([0, 64]), "modality": np.array(["SEM", "SEM"], object),
             "pixel_size": np.full(2, 10.0), "pixel_size_y": np.full(2, 10.0), "error": np.array([None, None], object),
             "origin": np.array([[0.0, 0.0], [0.0, 48.0]]), "scale": np.ones((2, 2)),
             "halo": np.array([[0, 0, 0, 16], [0, 0, 16, 0]], np.int32)}
    batch["tile"] = np.empty(2, object)
    batch["tile"][:] = [image[:, :80], image[:, 48:]]
    left, right = from_columns(ens(batch))
    assert left.n_defects == 1 and right.n_defects == 0
    np.testing.assert_array_equal(right.foreign_boxes_level0, [[48, 20, 71, 45]])  # cut where it reads from
    painted = np.concatenate([left.core_labels == 1, right.core_labels == 1], axis=1)  # foreign id: 0 + 0 + 1
    box = np.zeros_like(painted)
    box[20:45, 46:71] = True  # no segmenter: the box is the mask
    np.testing.assert_array_equal(painted, box)


def test_core_areas_end_at_the_image_edge(tiny_models):
    """A 37 x 45 image read at level 3 (8 level-0 px a pixel): its one tile's pixels
    cover 40 x 48 level-0 px, the core area counts the 37 x 45 of the image."""
    ens = Ensemble(EnsembleModels(tiny_models.detector), config=EnsembleConfig(**TEST_CONFIG))
    tile = np.zeros((5, 6), np.uint8)
    (inside,) = ens.analyze([TileInput("a", tile, 80.0, level=3, scale=(8.0, 8.0), extent0=(37, 45))])
    (whole,) = ens.analyze([TileInput("a", tile, 80.0, level=3, scale=(8.0, 8.0))])
    assert inside.core_area_mm2 == pytest.approx(37 * 45 * 10.0**2 / 1e12)
    assert whole.core_area_mm2 == pytest.approx(40 * 48 * 10.0**2 / 1e12)


class TestDeterminism:
    def test_same_batch_twice_gives_identical_output(self, ensemble, tiles, out):
        again = ensemble(tiles)
        for a, b in zip(from_columns(out), from_columns(again)):
            assert_same(a, b, exact=True)

    def test_batch_and_one_tile_at_a_time_agree(self, ensemble, tiles, out):
        for i, a in enumerate(from_columns(out)):
            assert_same(a, single(ensemble, tiles, i), exact=False)

    def test_max_batch_1_is_bit_identical_to_one_tile_at_a_time(self, tiny_models, tiles):
        ens = Ensemble(tiny_models, config=EnsembleConfig(**TEST_CONFIG, max_batch=1))
        rows = [0, 5, 6]  # an interior tile, an edge tile, another image
        got = from_columns(ens(take(tiles, rows)))
        for a, i in zip(got, rows):
            assert_same(a, single(ens, tiles, i), exact=True)


class TestClassifierBeside:
    """The online endpoint runs the classifier beside the detector and segmenter, each in
    its own process, and joins them (`EnsemblePass.classification`, `with_classification`):
    the answer must be `Ensemble.analyze`'s."""

    @staticmethod
    def apart(ens, tiles):
        shipped = lambda x: pickle.loads(pickle.dumps(x))  # noqa: E731 - as between two replicas
        classified = shipped(ens.classify(shipped(ens.start(tiles, warm=True))).classification())
        return ens.finish(ens.segment(ens.detect(ens.start(tiles, warm=True))).with_classification(classified))

    def test_same_answer_as_analyze_bit_for_bit(self, tiny_models, tiles):
        ens = Ensemble(tiny_models, config=EnsembleConfig(**TEST_CONFIG, max_batch=1))
        inputs = tiles_from_batch(take(tiles, [0, 5, 6]))
        joined, together = self.apart(ens, inputs), ens.analyze(inputs)
        assert sum(r.n_defects for r in together) > 0 and all(r.material for r in together)
        for a, b in zip(joined, together, strict=True):
            assert_same(a, b, exact=True)
            np.testing.assert_array_equal(a.grade_probs, b.grade_probs)

    def test_errors_of_either_branch_fail_their_tiles_only(self, tiny_models, tiles, monkeypatch):
        ens, batch, tile = classifier_failing_on_a_flat_tile(tiny_models, tiles, monkeypatch)
        halo = batch["halo"].copy()
        halo[2] = (200, 200, 0, 0)  # fails at start, before either branch
        inputs = tiles_from_batch({**batch, "tile": tile, "halo": halo})
        joined, together = self.apart(ens, inputs), ens.analyze(inputs)
        assert [r.error for r in joined] == [r.error for r in together]
        assert joined[0].error is None and joined[1].error == "RuntimeError: classifier: simulated failure"
        assert "leaves no core" in joined[2].error
        assert_same(joined[0], together[0], exact=False)

    def test_another_pass_s_classification_is_refused(self, ensemble, tiles):
        two, three = tiles_from_batch(take(tiles, [0, 1])), tiles_from_batch(take(tiles, [0, 1, 2]))
        classified = ensemble.classify(ensemble.start(two)).classification()
        with pytest.raises(ValueError, match="not this pass's 3"):
            ensemble.detect(ensemble.start(three)).with_classification(classified)


class TestErrors:
    def test_error_rows_pass_through_and_others_complete(self, ensemble, tiles, out):
        batch = take(tiles, range(4))
        tile = batch["tile"].copy()
        tile[1] = np.zeros((0, 0), tile[0].dtype)
        error = batch["error"].copy()
        error[1] = "CorruptChunkError: images/synth-00000.ome.zarr/0: chunk c/0/1 cannot be decoded"
        got = from_columns(ensemble({**batch, "tile": tile, "error": error}))
        bad = got[1]
        assert bad.error == error[1] and bad.n_defects == 0 and bad.core_labels.shape == (0, 0)
        assert np.isnan(bad.material_probs).all() and bad.material == "" and np.isnan(bad.defect_density_per_mm2)
        assert (bad.image_id, bad.y, bad.x) == (batch["image_id"][1], batch["y"][1], batch["x"][1])
        for i in (0, 2, 3):
            assert_same(got[i], from_columns(out)[i], exact=False)

    def test_a_bad_tile_becomes_an_error_row_naming_it(self, ensemble, tiles):
        batch = take(tiles, range(2))
        halo = batch["halo"].copy()
        halo[0] = (200, 200, 0, 0)
        got = from_columns(ensemble({**batch, "halo": halo}))
        assert got[0].error.startswith("ValueError: ") and "leaves no core" in got[0].error
        assert batch["image_id"][0] in got[0].error
        assert got[1].error is None

    def test_a_member_failing_on_one_tile_fails_that_tile_only(self, tiny_models, tiles, monkeypatch):
        ens, batch, tile = classifier_failing_on_a_flat_tile(tiny_models, tiles, monkeypatch)
        got = from_columns(ens({**batch, "tile": tile}))
        assert got[1].error == "RuntimeError: classifier: simulated failure"
        assert got[0].error is None and got[2].error is None

    @pytest.mark.parametrize("null", [None, float("nan"), np.float32("nan"), np.float64("nan")])
    def test_a_null_error_column_in_any_form_means_no_error(self, ensemble, tiles, out, null):
        """Ray Data hands an all-null error column over as None or as NaN of the array's
        float type; none of those may turn good tiles into error rows."""
        batch = take(tiles, range(2))
        error = np.array([null, null], dtype=object if null is None else type(null))
        got = from_columns(ensemble({**batch, "error": error}))
        assert [r.error for r in got] == [None, None]
        for i in range(2):
            assert_same(got[i], from_columns(out)[i], exact=False)

    def test_missing_columns_are_named(self, ensemble, tiles):
        with pytest.raises(KeyError, match="pixel_size"):
            ensemble({k: v for k, v in take(tiles, [0]).items() if k != "pixel_size"})


class TestInputs:
    def test_each_member_gets_its_input_mode(self, tiny_models, tiles, archive, monkeypatch):
        """detector "image": the image's PreprocessParams, or the per-tile stretch for an
        image without; segmenter "raw": the stored values by the dtype's maximum."""
        from engine.pipeline.inputs import tile_stretch
        from engine.preprocess import apply, fit_preprocessing
        from engine.stores.image import open_image

        batch = take(tiles, [0, 6])  # one tile of each image
        image_id = str(batch["image_id"][0])
        params = fit_preprocessing(open_image(archive / "images" / f"{image_id}.ome.zarr"), batch["modality"][0])
        cfg = EnsembleConfig(**dict(TEST_CONFIG, inputs={"detector": "image", "segmenter": "raw"}))
        ens = Ensemble(tiny_models, config=cfg, params={image_id: params})
        seen = {}
        for role, method in (("detector", "predict"), ("segmenter", "segment")):
            real = getattr(getattr(ens.models, role), method)

            def spy(x, *args, _real=real, _role=role, **kwargs):
                seen.setdefault(_role, []).extend(np.asarray(x))
                return _real(x, *args, **kwargs)

            monkeypatch.setattr(getattr(ens.models, role), method, spy)
        got = from_columns(ens(batch))
        assert all(r.error is None for r in got)
        expect = apply(params, batch["tile"][0], tuple(batch["origin"][0]), tuple(batch["scale"][0]))
        np.testing.assert_array_equal(seen["detector"][0], expect)
        np.testing.assert_array_equal(seen["detector"][1], tile_stretch(batch["tile"][1]))  # no params: fallback
        raw = np.asarray(batch["tile"][1], np.float32) / np.float32(65535)
        assert any(np.array_equal(x, raw) for x in seen["segmenter"])
        # analyze_tile takes the parameters per call and answers the same
        assert_same(single(ens, batch, 0, params), got[0], exact=False)

    def test_unknown_modes_and_roles_are_refused(self):
        with pytest.raises(ValueError, match="valid modes"):
            EnsembleConfig(inputs={"detector": "zscore"})
        with pytest.raises(ValueError, match="valid roles"):
            EnsembleConfig(inputs={"counter": "raw"})

    def test_models_or_bundle(self, tiny_models):
        with pytest.raises(ValueError, match="not both"):
            Ensemble()
        with pytest.raises(TypeError, match="expected a Detector"):
            from engine.pipeline import EnsembleModels

            Ensemble(EnsembleModels(detector=tiny_models.classifier))


class TestRayData:
    def test_actor_pool_udf_gives_the_direct_answers(self, ray_session, archive, tiny_models, tiles):
        """The batch job's use: map_batches(Ensemble, ...) over the datasource in an actor
        pool; every tile comes back once, with the answer a direct call gives."""
        import ray

        from engine.data.datasource import ZarrTileDatasource
        from engine.pipeline import EnsembleModels
        from engine.stores.catalog import read_catalog

        catalog = read_catalog(str(archive))
        image_id = str(catalog["image_id"][1])
        models = EnsembleModels(detector=tiny_models.detector, segmenter=tiny_models.segmenter,
                                classifier=tiny_models.classifier)
        config = EnsembleConfig(**TEST_CONFIG)
        ds = ray.data.read_datasource(ZarrTileDatasource(
            str(archive), target_pixel_size_nm=float(catalog["pixel_size_x"][1]), halo=16, image_ids=[image_id]))
        result = ds.map_batches(Ensemble, fn_constructor_kwargs={"models": models, "config": config},
                                batch_size=3, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1))
        rows = result.take_all()
        mine = [i for i in range(len(tiles["image_id"])) if tiles["image_id"][i] == image_id]
        assert len(rows) == len(mine) == 6
        direct = {(r.image_id, r.y, r.x): r for r in from_columns(Ensemble(models, config=config)(take(tiles, mine)))}
        for row in rows:
            got = TileResult.from_row(row)
            assert_same(got, direct.pop((got.image_id, got.y, got.x)), exact=False)
        assert not direct


class TestFusionContext:
    def test_context_view_is_centred_on_the_core(self):
        """Without a context column, fusion's context is the tile block-averaged by 4,
        centred on the core: the core's own blocks sit in the middle of the view."""
        from engine.pipeline.ensemble import _context_view

        rng = np.random.default_rng(0)
        tile = rng.random((96, 96))
        core = (slice(16, 80), slice(16, 80))  # 64 x 64 core, halo 16
        view = _context_view(tile, core, 4)
        assert view.shape == (64, 64)
        blocks = tile[16:80, 16:80].reshape(16, 4, 16, 4).mean(axis=(1, 3))
        np.testing.assert_allclose(view[24:40, 24:40], blocks)
        # the halo's blocks surround them; beyond the tile the view is mirrored
        np.testing.assert_allclose(view[20:24, 24:40], tile[0:16, 16:80].reshape(4, 4, 16, 4).mean(axis=(1, 3)))
        np.testing.assert_allclose(view[19], view[20])

    def test_a_given_context_is_used(self, tiny_models, tiles, monkeypatch):
        from engine.pipeline import EnsembleModels

        ens = Ensemble(EnsembleModels(detector=tiny_models.detector, fusion=tiny_models.fusion),
                       config=EnsembleConfig(**TEST_CONFIG))
        seen = []
        real = ens.models.fusion.forward

        def spy(detail, context):
            seen.append(context.numpy()[:, 0].copy())
            return real(detail, context)

        monkeypatch.setattr(ens.models.fusion, "forward", spy)
        batch = take(tiles, [0])
        h, w = batch["tile"][0].shape
        context = np.empty(1, object)
        context[0] = np.linspace(0, 1000, 128 * 128).reshape(128, 128).astype(np.uint16)
        r = from_columns(ens({**batch, "context": context}))[0]
        assert r.error is None and r.material != ""
        from engine.pipeline.inputs import tile_stretch

        np.testing.assert_array_equal(seen[0][0], tile_stretch(context[0]))

    def test_a_given_context_is_flattened_where_it_lies(self):
        """Image mode: a context tile is flattened by the illumination at its own place (a
        view 4x coarser centred on the core, so its corner is far from the detail tile's).
        Raw pixels that are the illumination itself come out flat in both views."""
        from engine.pipeline.ensemble import _Work
        from engine.preprocess import Background, PreprocessParams

        # illumination rising from 100 to 200 along x over level-0 x 0..4096
        params = PreprocessParams("optical", 0.0, 300.0, background_level=150.0,
                                  background=Background(((100.0, 200.0), (100.0, 200.0)), (0.0, 0.0), (4096.0, 4096.0)))
        h = w = 256
        halo, s, y0, x0 = 16, 4, 1024, 1024  # the core's corner, level 0
        centres = lambda origin, n, step: origin + (np.arange(n) + 0.5) * step  # noqa: E731
        field = params.background.evaluate
        detail = field(centres(y0 - halo, h + 2 * halo, 1), centres(x0 - halo, w + 2 * halo, 1))
        cy, cx = y0 + h / 2, x0 + w / 2  # the context is centred on the core: corner (640, 640)
        context = field(centres(cy - h / 2 * s, h, s), centres(cx - w / 2 * s, w, s))
        t = TileInput("img", detail, 100.0, y=y0, x=x0, halo=(halo,) * 4, modality="optical", context=context)
        core, ctx = _Work.of(t, params).fusion_inputs("image", 2)
        np.testing.assert_allclose(core, 0.5, atol=1e-6)
        np.testing.assert_allclose(ctx, 0.5, atol=1e-6)


def test_an_empty_batch(ensemble, tiles):
    out = ensemble(take(tiles, []))
    assert list(out) == list(COLUMNS) and all(len(v) == 0 for v in out.values())
    assert out["material_probs"].shape == (0, 12)
