"""engine.data.objects through the job's own tile path (no Ray): objects cut by tile
borders are measured whole from their pieces' moments, the same with label images and
without, and as measuring the uncut mask; tile files from before the moments fall back.

The image is drawn by code (a grain larger than a tile and its halo, a thin slanted
crack, a small pore across a core border) with non-square pixels, and read by the job's
planner (which gives the models square pixels) and reader; the ensemble's detector and
segmenter are stand-ins whose answers are known: boxes of the bright components, masks
of the bright pixels.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine.data.objects import PIECE_COLUMNS
from engine.data.sinks import (
    DETECTIONS, OBJECTS, TILE_META, LabelTarget, WriteTileOutputs, create_label_arrays, finish_image, label_dtype,
    read_output, tile_location,
)
from engine.pipeline.measure import measure_mask
from engine.pipeline.results import MEASUREMENT_COLUMNS
from engine.stores.uri import resolve

from ..known_detections import threshold_detections

PY, PX = 10.0, 5.0  # nm: pixels twice as tall as wide
H, W, CHUNK, HALO = 192, 256, 64, 16  # 3 x 4 tiles of one chunk, each read 16 px on
STRIDE = 16


def scene() -> list[np.ndarray]:
    """(H, W) bool masks: a grain over 3 x 4 cores, a crack over 4, a pore over 2."""
    yy, xx = np.mgrid[:H, :W]

    def ellipse(cy, cx, a_nm, b_nm, degrees):
        t = np.radians(degrees)
        x, y = (xx - cx) * PX, -(yy - cy) * PY
        u, v = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
        return (u / a_nm) ** 2 + (v / b_nm) ** 2 <= 1

    d = np.array([240.0, 30.0]) / np.hypot(240.0, 30.0)  # (x, y) along the crack
    along, across = (xx - 8) * d[0] + (yy - 6) * d[1], np.abs(-(xx - 8) * d[1] + (yy - 6) * d[0])
    crack = (along >= 0) & (along <= np.hypot(240.0, 30.0)) & (across <= 1.5)
    return [ellipse(112, 128, 520.0, 380.0, 10), crack, ellipse(170, 63.3, 30.0, 45.0, 60)]


class Detector(torch.nn.Module):  # named as the family the ensemble checks for
    """Boxes of the bright components of each tile."""

    names = ("pore",)
    config = None

    def predict(self, tiles, *, conf=0.25, iou=0.7, max_det=300):
        return threshold_detections(tiles)


class Segmenter(torch.nn.Module):
    """Every box's mask: all bright pixels of its tile (the ensemble cuts it to the box)."""

    def segment(self, images, boxes):
        from engine.models.segmenter import Segmentation

        return [Segmentation(np.repeat((np.asarray(im) > 0.5)[None], len(b), axis=0), np.full(len(b), 0.99, np.float32))
                for im, b in zip(images, boxes)]


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """(plan, masks, class names, the ensemble's result batches with their placement)."""
    from ray.data.block import BlockAccessor

    from engine.data.tile_plan import plan_image, plan_reads
    from engine.data.tile_read import read_tiles
    from engine.pipeline.ensemble import Ensemble, EnsembleConfig, EnsembleModels
    from engine.stores.image import open_image
    from engine.stores.writer import write_image

    masks = scene()
    loc = resolve(str(tmp_path_factory.mktemp("objects-image") / "img.ome.zarr"))
    write_image(loc, (np.logical_or.reduce(masks) * 255).astype(np.uint8), pixel_size=(PY, PX), unit="nanometer",
                chunk=CHUNK, attributes={"modality": "SEM"}, name="img")
    plan = plan_image(open_image(loc), "img", loc, "SEM", target_nm=PX, tolerance=1.5, tile_size=None, halo=HALO,
                      tile_dtype="uint8")
    # the models see square 5 nm pixels (the 10 nm rows upsampled); the objects are
    # still measured in the image's own (10, 5) nm pixels, as the uncut mask is
    assert plan.pixel_size_yx_nm == (PX, PX) and plan.output.step == (PX / PY, 1.0) and plan.n_tiles == 12
    ens = Ensemble(EnsembleModels(Detector(), Segmenter()), config=EnsembleConfig(conf=0.0, max_det=STRIDE),
                   device="cpu")
    batches = []
    for spec in plan_reads([plan], target_bytes=1 << 26, max_tasks=100):
        for block in read_tiles(spec):
            b = BlockAccessor.for_block(block).to_batch_format("numpy")
            res = ens(b)
            res.update({k: b[k] for k in ("origin", "scale", "halo")})
            batches.append(res)
    return plan, masks, ens.class_names, batches


def run_job(tiled, out, *, labels: bool) -> tuple[list[dict], list]:
    """The tile sink and finishing over the tiles: (objects rows, done tile keys)."""
    plan, _, class_names, batches = tiled
    target = LabelTarget(plan.image_id, resolve(out).join("labels", "img.ome.zarr"), "predicted_defects", plan,
                         STRIDE, label_dtype(plan.n_tiles, STRIDE), plan.location, write=labels)
    if labels:
        create_label_arrays(target)
    sink = WriteTileOutputs(out, labels={plan.image_id: target}, class_names=class_names)
    done = []
    for b in batches:
        r = sink(b)
        done += [(int(lv), int(y), int(x)) for lv, y, x, ok in zip(r["level"], r["y"], r["x"], r["ok"]) if ok]
    finish_image(out, plan, done, label_target=target, class_names=class_names)
    return read_output(out, OBJECTS).to_pylist(), done


def by_truth(objects: list[dict], masks) -> list[dict]:
    """The object nearest each mask's centroid, in the masks' order."""
    centres = [measure_mask(m, (PY, PX)).centroid[0] + 0.5 for m in masks]  # level-0 edge coordinates
    return [min(objects, key=lambda o: np.hypot(o["centroid_y"] - c[0], o["centroid_x"] - c[1])) for c in centres]


COLUMNS = (*MEASUREMENT_COLUMNS, "centroid_y", "centroid_x")


@pytest.fixture(scope="module")
def finished(tiled, tmp_path_factory):
    """labels -> the objects rows of the job over the tiles, with label images or without."""
    return {labels: run_job(tiled, tmp_path_factory.mktemp(f"objects-{labels}"), labels=labels)[0]
            for labels in (True, False)}


class TestMeasuredWhole:
    def test_as_the_uncut_mask(self, tiled, finished):
        """Whole-object measurements, anisotropic pixels: those of the uncut mask, with
        label images or without (before, without: the largest piece's)."""
        for labels in (True, False):
            objects = by_truth(finished[labels], tiled[1])
            grain, crack, pore = objects
            assert len(finished[labels]) == 3 and grain["parts"] > 4 and crack["parts"] >= 4
            assert len(pore["label_ids"]) == 2  # its owner's piece and its neighbour's foreign piece
            for o, mask in zip(objects, tiled[1]):
                truth = measure_mask(mask, (PY, PX))
                for name in MEASUREMENT_COLUMNS:
                    np.testing.assert_allclose(o[name], getattr(truth, name)[0], rtol=1e-9, err_msg=f"{labels} {name}")
                np.testing.assert_allclose([o["centroid_y"], o["centroid_x"]], truth.centroid[0] + 0.5, rtol=1e-9)

    def test_with_and_without_label_images_alike(self, finished):
        with_labels, without = finished[True], finished[False]
        assert [o["label_ids"] for o in with_labels] == [o["label_ids"] for o in without]
        for a, b in zip(with_labels, without):
            for name in COLUMNS:
                np.testing.assert_allclose(a[name], b[name], rtol=1e-9, err_msg=name)


def _as_before_moments(out, image_id, key) -> None:
    """Rewrite a tile's detections file as written before the pieces' moments were
    recorded: no piece_* columns, no foreign_moments or scale in its metadata."""
    loc = tile_location(resolve(out), DETECTIONS, (image_id, *key))
    table = pq.read_table(loc.path)
    meta = json.loads(table.schema.metadata[TILE_META])
    meta.pop("foreign_moments")
    meta.pop("scale")
    table = table.drop_columns(list(PIECE_COLUMNS))
    pq.write_table(table.replace_schema_metadata({TILE_META: json.dumps(meta).encode()}), loc.path)


class TestOlderTileFiles:
    def test_objects_with_an_older_piece_fall_back(self, tiled, tmp_path):
        """One tile file from before the moments, label images written: the objects with a
        piece in it are measured on the label image (whole, as before); with no label
        image, their largest piece's measurements (as before). The others: whole either
        way, from their moments."""
        plan, masks = tiled[0], tiled[1]
        for labels in (True, False):
            out = tmp_path / str(labels)
            _, done = run_job(tiled, out, labels=labels)
            old = (0, 128, 64)  # the grain's middle row, second column: not the crack's
            _as_before_moments(out, plan.image_id, old)
            finish_image(out, plan, done, label_target=LabelTarget(
                plan.image_id, resolve(out).join("labels", "img.ome.zarr"), "predicted_defects", plan, STRIDE,
                label_dtype(plan.n_tiles, STRIDE), plan.location, write=labels), class_names=tiled[2])
            objects = read_output(out, OBJECTS).to_pylist()
            grain, crack, _ = by_truth(objects, masks)
            truth = [measure_mask(m, (PY, PX)) for m in masks]
            assert crack["area_nm2"] == pytest.approx(truth[1].area_nm2[0], rel=1e-9)
            if labels:
                assert grain["area_nm2"] == pytest.approx(truth[0].area_nm2[0], rel=1e-9)
            else:
                detections = read_output(out, DETECTIONS).to_pandas()
                pieces = detections[detections["label_id"].isin(grain["label_ids"])]
                assert grain["area_nm2"] == pytest.approx(pieces["area_nm2"].max())
                assert grain["area_nm2"] < 0.9 * truth[0].area_nm2[0]
