"""Non-square pixels reach the models square, in the batch job as at the endpoint.

A fast-scan SEM records pixels of (10, 5) nm (y, x): read as they are, a round pore is a
1:2 ellipse to a detector. The shared planner (`engine.data.tile_plan.plan_image`)
resamples such an image to square pixels (the target on both axes, or natively the
finer of its two sizes), tiles keep their origin and (y, x) scale in level-0 pixels, so
the job's answer is in the image's own pixels and nm and, for the same pixels and
versions, equals the endpoint's (`engine.serving.prepare.prepare_image`).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.stores.catalog import CatalogRow, image_uri, write_catalog
from engine.stores.uri import resolve

SIZE_YX = (10.0, 5.0)  # nm
H, W, CHUNK, HALO = 128, 256, 64, 16  # 1280 x 1280 nm


def fast_scan_pixels() -> np.ndarray:
    """(H, W) uint16: a 600 nm disc and a 240 x 80 nm ellipse at 30 degrees, bright on
    a dark, lightly noisy ground."""
    yy, xx = np.mgrid[:H, :W]
    py, px = SIZE_YX

    def ellipse(cy, cx, a_nm, b_nm, degrees):
        t = np.radians(degrees)
        x, y = (xx - cx) * px, -(yy - cy) * py
        u, v = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
        return (u / a_nm) ** 2 + (v / b_nm) ** 2 <= 1

    bright = ellipse(64, 128, 300.0, 300.0, 0) | ellipse(15, 192, 120.0, 40.0, 30)
    noise = np.random.default_rng(0).integers(0, 2000, (H, W))
    return (np.where(bright, 40000, 4000) + noise).astype(np.uint16)


def write_archive(root) -> tuple[object, np.ndarray]:
    """An archive of one image of SIZE_YX pixels, as the batch ingest writes a TIFF's."""
    from engine.stores.image import open_image
    from engine.stores.writer import write_image

    location = resolve(root)
    pixels = fast_scan_pixels()
    write_image(image_uri(location, "fast-scan"), pixels, pixel_size=SIZE_YX, chunk=CHUNK,
                attributes={"modality": "SEM"}, name="fast-scan")
    levels = len(open_image(image_uri(location, "fast-scan")).levels)
    write_catalog(location, [CatalogRow(image_id="fast-scan", uri="images/fast-scan.ome.zarr", modality="SEM",
                                        pixel_size_y=SIZE_YX[0], pixel_size_x=SIZE_YX[1], unit="nanometer",
                                        height=H, width=W, dtype="uint16", levels=levels, chunk=CHUNK,
                                        checksum="")])
    return location, pixels


class TestPlanner:
    """`plan_image` over the image's pyramid ((10, 5), (20, 10), ... nm)."""

    @pytest.fixture(scope="class")
    @classmethod
    def image(cls, tmp_path_factory):
        from engine.stores.image import open_image

        location, _ = write_archive(tmp_path_factory.mktemp("square-plan") / "a")
        return open_image(image_uri(location, "fast-scan"))

    def plan(self, image, target_nm, tolerance):
        from engine.data.tile_plan import plan_image

        return plan_image(image, "fast-scan", None, "SEM", target_nm=target_nm, tolerance=tolerance, tile_size=None,
                          halo=HALO, tile_dtype="uint16")

    @pytest.mark.parametrize("target_nm, tolerance, level, square_nm", [
        (5.0, 1.5, 0, 5.0),  # level 0 is the target along x: its rows are upsampled
        (10.0, 1.5, 0, 10.0),  # level 1 is the target along x but 20 nm along y: level 0, downsampled along x
        (20.0, 1.5, 1, 20.0),  # level 1 is no coarser than 20 nm along either axis
        (5.0, float("inf"), 0, 5.0),  # native: the finer of level 0's sizes
    ])
    def test_the_models_pixels_are_square(self, image, target_nm, tolerance, level, square_nm):
        plan = self.plan(image, target_nm, tolerance)
        assert plan.grid.level == level and plan.output is not None
        assert plan.pixel_size_yx_nm == pytest.approx((square_nm, square_nm))
        assert plan.output.extent == (round(H * SIZE_YX[0] / square_nm), round(W * SIZE_YX[1] / square_nm))

    def test_pixels_square_within_a_percent_plan_as_square_ones(self, tmp_path):
        from engine.data.tile_plan import plan_image
        from engine.stores.image import open_image
        from engine.stores.writer import write_image

        plans = []
        for size in ((5.0, 5.0), (5.04, 5.0)):  # a TIFF's rounded resolutions
            loc = resolve(tmp_path / f"{size[0]}.ome.zarr")
            write_image(loc, fast_scan_pixels(), pixel_size=size, chunk=CHUNK)
            plans.append(plan_image(open_image(loc), "img", None, "SEM", target_nm=5.0, tolerance=1.5,
                                    tile_size=None, halo=HALO, tile_dtype="uint16"))
        square, near = plans
        assert near.output is None and near.pixel_size_yx_nm == (5.04, 5.0)
        assert (near.grid.level, near.grid.tile, near.grid.halo, near.n_tiles) == \
            (square.grid.level, square.grid.tile, square.grid.halo, square.n_tiles)


class TestReprocess:
    """The real job on the session Ray (native pixels: the bundle records none) against
    the endpoint's preparation of the same pixels with the same bundle."""

    REF = "tiny@production"

    @pytest.fixture(scope="class")
    @classmethod
    def registry(cls, tmp_path_factory):
        from engine.pipeline.bundle import register_ensemble
        from engine.pipeline.demo_models import untrained_tiny_models
        from engine.registry import ModelRegistry

        root = tmp_path_factory.mktemp("square-registry")
        registry = ModelRegistry(tracking_uri=f"sqlite:///{root}/m.db")
        register_ensemble(registry, untrained_tiny_models(0), "tiny", workdir=root / "w")
        return registry

    @pytest.fixture(scope="class")
    @classmethod
    def job(cls, ray_session, registry, tmp_path_factory):
        """(out, pixels, JobResult) of `reprocess` over the one-image archive."""
        from engine.pipeline import EnsembleConfig
        from engine.pipeline.job import reprocess

        root = tmp_path_factory.mktemp("square-job")
        location, pixels = write_archive(root / "archive")
        out = root / "out"
        result = reprocess(location.uri, str(out), cls.REF, registry=registry, halo=HALO, batch_size=1,
                           concurrency=1, config=EnsembleConfig(conf=0.001, max_det=8))
        return out, pixels, result

    def test_the_models_got_square_pixels_and_the_answer_is_the_endpoints(self, job, registry):
        from engine.data.sinks import DETECTIONS, OBJECTS, SUMMARY_FILE, TILE_META, read_output
        from engine.pipeline import Ensemble, EnsembleConfig
        from engine.serving.prepare import TilingSettings, prepare_image
        from engine.serving.response import analysis

        out, pixels, _ = job
        summary = pq.read_table(str(out / SUMMARY_FILE)).to_pylist()
        (image,) = summary
        assert image["complete"] and image["pixel_size_nm"] == 5.0  # native: the finer size, on both axes
        assert (image["level"], image["level_pixel_size_y_nm"], image["level_pixel_size_x_nm"]) == (0, *SIZE_YX)
        assert image["core_area_mm2"] == pytest.approx(H * W * SIZE_YX[0] * SIZE_YX[1] / 1e12)
        tiles = sorted((out / "detections").rglob("*.parquet"))
        assert len(tiles) == (H // CHUNK) * (W // CHUNK)  # cores of one level-0 chunk, 128 x 64 model pixels
        for f in tiles:
            scale = json.loads(pq.read_schema(f).metadata[TILE_META])["scale"]
            assert np.multiply(scale, SIZE_YX) == pytest.approx((5.0, 5.0))  # square model pixels

        job_objects = read_output(str(out), OBJECTS).to_pylist()
        detections = read_output(str(out), DETECTIONS).to_pandas()
        assert job_objects and len(detections)
        for o in job_objects:  # placed in the image's own pixels, measured along each axis in nm
            assert o["x1_nm"] - o["x0_nm"] == pytest.approx((o["x1"] - o["x0"]) * SIZE_YX[1])
            assert o["y1_nm"] - o["y0_nm"] == pytest.approx((o["y1"] - o["y0"]) * SIZE_YX[0])
            assert 0 <= o["x0"] < o["x1"] <= W and 0 <= o["y0"] < o["y1"] <= H

        ensemble = Ensemble.from_registry(self.REF, registry, config=EnsembleConfig(conf=0.001, max_det=8),
                                          device="cpu")
        prepared = prepare_image(pixels, modality="SEM", pixel_size_nm=SIZE_YX, fit="image" in ensemble.inputs.values(),
                                 settings=TilingSettings(chunk=CHUNK, halo=HALO))
        assert (prepared.pixel_size_y_nm, prepared.pixel_size_nm) == (5.0, 5.0)
        results = [ensemble.analyze([t])[0] for t in prepared.tiles]  # one tile a batch, as the job ran
        endpoint = analysis(results, prepared.tiles, class_names=ensemble.class_names, materials=ensemble.materials,
                            grades=ensemble.grades)["objects"]
        assert len(endpoint) == len(job_objects)
        for a, j in zip(endpoint, job_objects):  # both best score first
            assert a["box_px"] == pytest.approx([j["x0"], j["y0"], j["x1"], j["y1"]])
            assert a["box_nm"] == pytest.approx([j["x0_nm"], j["y0_nm"], j["x1_nm"], j["y1_nm"]])
            for name in ("area_nm2", "major_axis_nm", "minor_axis_nm", "aspect_ratio"):
                assert a[name] == pytest.approx(j[name], rel=1e-9), name
