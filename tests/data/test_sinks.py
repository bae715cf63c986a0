"""The job's sinks without Ray: the tile sink (detections, errors, label cores, ledger
last) and per-image finishing (stitching, tables, label pyramid, stale files).

Results are made by hand (`result`), so boxes, labels and probabilities are known.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from engine.data.datasource import ZarrTileDatasource
from engine.data.ledger import Ledger
from engine.data.sinks import (
    DETECTIONS, ERRORS, OBJECTS, TILE_META, TILES, LabelTarget, WriteTileOutputs, core_to_level, create_label_arrays,
    finish_image, label_dtype, partition, read_output, stitch_objects, tile_location,
)
from engine.pipeline.results import TileResult, to_columns
from engine.stores.pyramid import downsample_labels
from engine.stores.uri import resolve

CLASSES = ("pore", "crack")
MATERIALS = ("steel", "alloy")
GRADES = ("A", "B")
STRIDE = 8


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """One 256 x 256 image in 64 px chunks, planned at level 0: 4 x 4 tiles of one chunk."""
    from engine.synth.archive import generate_archive

    out = tmp_path_factory.mktemp("sink-archive") / "a"
    catalog = generate_archive(out, n_images=1, seed=4, size=256, chunk=64)
    source = ZarrTileDatasource(out, target_pixel_size_nm=float(catalog["pixel_size_x"][0]), tolerance=math.inf)
    (image,) = source.images()
    return image


def target_for(plan, out, name="predicted_defects") -> LabelTarget:
    out = resolve(out)
    target = LabelTarget(plan.image_id, out.join("labels", f"{plan.image_id}.ome.zarr"), name, plan, STRIDE,
                         label_dtype(plan.n_tiles, STRIDE), plan.location)
    create_label_arrays(target)
    return target


def result(plan, row, col, boxes=(), *, classes=None, error=None, probs=(0.75, 0.25), core_shape=None,
           foreign=()) -> TileResult:
    """Tile (row, col) of `plan` with detections at level-0 xyxy `boxes` (painted into the
    core's labels, best first), as the ensemble would report it; `foreign`: level-0 xyxy
    boxes of class 0 that other tiles own, painted beneath them."""
    spec = plan.grid.tile_at(row, col)
    y, x = spec.origin0
    versions = {"bundle": "tiny/1"}
    if error is not None:
        return TileResult.failed(image_id=plan.image_id, level=0, y=y, x=x, modality=plan.modality,
                                 pixel_size_nm=plan.pixel_size_nm, error=error, n_materials=2, n_grades=2,
                                 model_versions=versions)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    n = len(b)
    labels = np.zeros(core_shape or (spec.height, spec.width), np.uint32)
    f = np.asarray(foreign, np.float64).reshape(-1, 4)
    for k in range(len(f) - 1, -1, -1):
        x0, y0, x1, y1 = (f[k] - [x, y, x, y]).clip(0, [spec.width, spec.height] * 2).astype(int)
        labels[y0:y1, x0:x1] = n + k + 1
    for i in range(n - 1, -1, -1):
        x0, y0, x1, y1 = (b[i] - [x, y, x, y]).clip(0, [spec.width, spec.height] * 2).astype(int)
        labels[y0:y1, x0:x1] = i + 1
    cls = np.zeros(n, np.int64) if classes is None else np.asarray(classes, np.int64)
    p = plan.pixel_size_nm
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) * p * p
    core_area = spec.height * spec.width * p * p * 1e-12
    return TileResult(
        image_id=plan.image_id, level=0, y=y, x=x, modality=plan.modality, pixel_size_nm=p, error=None,
        boxes=b - [x, y, x, y], boxes_level0=b, boxes_nm=b * p, scores=np.linspace(0.9, 0.5, n), classes=cls,
        mask_scores=np.full(n, 0.8), mask_from_box=np.zeros(n, bool), area_nm2=area, area_um2=area * 1e-6,
        equivalent_diameter_nm=np.sqrt(4 * area / np.pi), major_axis_nm=np.ones(n), minor_axis_nm=np.ones(n),
        aspect_ratio=np.ones(n), orientation_deg=np.zeros(n),
        centroid_level0=np.stack([(b[:, 1] + b[:, 3]) / 2, (b[:, 0] + b[:, 2]) / 2], axis=1).reshape(-1, 2),
        core_labels=labels, core_classes=(labels > 0).astype(np.uint8), core_area_mm2=core_area,
        defect_density_per_mm2=n / core_area, material_probs=np.asarray(probs, np.float32),
        grade_probs=np.asarray(probs[::-1], np.float32), material=MATERIALS[int(np.argmax(probs))],
        grade=GRADES[int(np.argmax(probs[::-1]))], model_versions=versions, foreign_boxes_level0=f,
        foreign_classes=np.zeros(len(f), np.int64))


def batch(results) -> dict:
    """Result rows plus the datasource placement columns (halo 0, level 0)."""
    cols = to_columns(results, n_materials=2, n_grades=2)
    cols["origin"] = np.array([[r.y, r.x] for r in results], np.float64)
    cols["scale"] = np.ones((len(results), 2))
    cols["halo"] = np.zeros((len(results), 4), np.int32)
    return cols


CORRUPT = "CorruptChunkError: /a/img.ome.zarr: chunk 0/c/1/1 cannot be decoded (ValueError: bad zstd)"


class TestTileSink:
    def test_outputs_then_ledger(self, plan, tmp_path):
        target = target_for(plan, tmp_path)
        sink = WriteTileOutputs(tmp_path, labels={plan.image_id: target}, class_names=CLASSES)
        rows = [result(plan, 0, 0, [(10, 10, 20, 30)], classes=[1]), result(plan, 0, 1), result(plan, 1, 1, error=CORRUPT)]
        got = sink(batch(rows))
        assert got["ok"].tolist() == [True, True, False] and got["n_defects"].tolist() == [1, 0, 0]

        # detections: label ids from the tile's index, the tile's own values in the metadata
        f = tile_location(resolve(tmp_path), DETECTIONS, (plan.image_id, 0, 0, 0))
        table = pq.read_table(f.path)
        assert table.column("label_id").to_pylist() == [1]  # tile 0: base 0
        assert table.column("class_name").to_pylist() == ["crack"]
        meta = json.loads(table.schema.metadata[TILE_META])
        assert meta["core_level0"] == [0.0, 0.0, 64.0, 64.0] and meta["material_probs"] == [0.75, 0.25]
        empty = pq.read_table(tile_location(resolve(tmp_path), DETECTIONS, (plan.image_id, 0, 0, 64)).path)
        assert empty.num_rows == 0 and json.loads(empty.schema.metadata[TILE_META])["n_defects"] == 0

        # the error: its own table, with the chunk's key; not ledgered
        errors = read_output(tmp_path, ERRORS).to_pylist()
        assert len(errors) == 1 and errors[0]["exception"] == "CorruptChunkError"
        assert errors[0]["chunk_keys"] == ["0/c/1/1"] and (errors[0]["y"], errors[0]["x"]) == (64, 64)
        assert Ledger(tmp_path).keys() == {(plan.image_id, 0, 0, 0), (plan.image_id, 0, 0, 64)}

        # labels: the core's ids offset by the tile's base, written as whole chunks
        group = zarr.open_group(target.root.path, mode="r")
        labels = group["labels/predicted_defects/0"][:]
        assert set(np.unique(labels)) == {0, 1} and (labels[10:30, 10:20] == 1).all() and labels.sum() == 200
        assert (group["labels/predicted_defects_classes/0"][:] == (labels > 0)).all()
        chunks = Path(target.root.path) / "labels" / "predicted_defects" / "0" / "c"
        assert {str(p.relative_to(chunks)) for p in chunks.rglob("*") if p.is_file()} == {"0/0"}  # zero chunks are not stored; the failed tile wrote none

    def test_a_tile_failing_on_a_rerun_leaves_no_old_labels(self, plan, tmp_path):
        """Written by an interrupted run (before its ledger entry), failing on the rerun:
        the tile's label ids go with its detections."""
        target = target_for(plan, tmp_path)
        WriteTileOutputs(tmp_path, labels={plan.image_id: target}, class_names=CLASSES)(
            batch([result(plan, 0, 0, [(10, 10, 20, 30)]), result(plan, 0, 1, [(70, 5, 80, 15)])]))
        WriteTileOutputs(tmp_path, labels={plan.image_id: target}, class_names=CLASSES)(
            batch([result(plan, 0, 0, error=CORRUPT)]))
        group = zarr.open_group(target.root.path, mode="r")
        for name in ("predicted_defects", "predicted_defects_classes"):
            labels = group[f"labels/{name}/0"][:]
            assert not labels[:64, :64].any() and labels[5:15, 70:80].all()  # its neighbour's stay

    def test_ids_are_unique_across_tiles(self, plan, tmp_path):
        target = target_for(plan, tmp_path)
        sink = WriteTileOutputs(tmp_path, labels={plan.image_id: target}, class_names=CLASSES)
        sink(batch([result(plan, 3, 2, [(140, 200, 150, 210), (130, 192, 135, 195)])]))
        table = read_output(tmp_path, DETECTIONS).to_pandas()
        base = (3 * 4 + 2) * STRIDE
        assert table["label_id"].tolist() == [base + 1, base + 2]
        labels = zarr.open_group(target.root.path, mode="r")["labels/predicted_defects/0"][192:256, 128:192]
        assert set(np.unique(labels)) == {0, base + 1, base + 2}

    def test_a_failed_write_ledgers_nothing(self, plan, tmp_path):
        target = target_for(plan, tmp_path)
        sink = WriteTileOutputs(tmp_path, labels={plan.image_id: target}, class_names=CLASSES)
        bad = result(plan, 0, 1, [(70, 5, 80, 15)], core_shape=(32, 32))  # a core of the wrong shape
        with pytest.raises(ValueError, match="core mask"):
            sink(batch([result(plan, 0, 0, [(1, 1, 5, 5)]), bad]))
        assert Ledger(tmp_path).files() == []  # so a rerun does both tiles again

    def test_a_retried_batch_rewrites_the_same_files(self, plan, tmp_path):
        target = target_for(plan, tmp_path)
        sink = WriteTileOutputs(tmp_path, labels={plan.image_id: target}, class_names=CLASSES)
        rows = batch([result(plan, 0, 0, [(1, 1, 9, 9)]), result(plan, 2, 2)])
        sink(rows)
        f = tile_location(resolve(tmp_path), DETECTIONS, (plan.image_id, 0, 0, 0)).path
        first, ledger = open(f, "rb").read(), Ledger(tmp_path).files()
        sink(rows)
        assert open(f, "rb").read() == first and Ledger(tmp_path).files() == ledger

    def test_a_tile_read_with_a_reduced_halo_is_written_but_redone_by_a_rerun(self, plan, tmp_path):
        """A neighbour of a bad chunk, read without that side's halo, completes (its
        detections count in this run) but is not ledgered, and the image is not complete;
        redone with its whole halo it replaces its detections and label core."""
        target = target_for(plan, tmp_path)
        sink = WriteTileOutputs(tmp_path, labels={plan.image_id: target}, class_names=CLASSES)
        kwargs = dict(label_target=target, class_names=CLASSES, materials=MATERIALS, grades=GRADES)
        cols = batch([result(plan, r, c) for r in range(4) for c in range(4) if (r, c) != (0, 0)]
                     + [result(plan, 0, 0, [(10, 10, 20, 30)])])
        why = "bottom: " + CORRUPT
        cols["halo_reduced"] = np.array([None] * 15 + [why], object)
        got = sink(cols)
        assert got["ok"].all() and got["halo_reduced"].tolist() == [False] * 15 + [True]
        key = (plan.image_id, 0, 0, 0)
        assert len(Ledger(tmp_path).keys()) == 15 and key not in Ledger(tmp_path).keys()
        done = [(0, r * 64, c * 64) for r in range(4) for c in range(4)]
        row = finish_image(tmp_path, plan, done, **kwargs)
        assert (row["tiles_done"], row["tiles_error"], row["tiles_halo_reduced"], row["complete"]) == (16, 0, 1, False)
        tiles = read_output(tmp_path, TILES).to_pandas().set_index(["y", "x"])
        assert tiles.loc[(0, 0), "halo_reduced"] == why and tiles["halo_reduced"].isna().sum() == 15
        assert len(read_output(tmp_path, OBJECTS)) == 1

        # the rerun: the same tile with its whole halo sees another defect
        redo = batch([result(plan, 0, 0, [(40, 40, 50, 44)])])
        redo["halo_reduced"] = np.array([None], object)
        assert sink(redo)["halo_reduced"].tolist() == [False]
        assert key in Ledger(tmp_path).keys()
        row = finish_image(tmp_path, plan, done, **kwargs)
        assert (row["tiles_done"], row["tiles_halo_reduced"], row["complete"]) == (16, 0, True)
        assert read_output(tmp_path, TILES)["halo_reduced"].null_count == 16
        detections = read_output(tmp_path, DETECTIONS).to_pylist()
        assert [(d["x0"], d["y0"], d["x1"], d["y1"]) for d in detections] == [(40, 40, 50, 44)]
        assert len(read_output(tmp_path, OBJECTS)) == 1
        labels = zarr.open_group(target.root.path, mode="r")["labels/predicted_defects/0"][:64, :64]
        assert not labels[10:30, 10:20].any() and (labels[40:44, 40:50] == 1).all() and labels.sum() == 40

    def test_sink_pickles_without_open_arrays(self, plan, tmp_path):
        import pickle

        sink = WriteTileOutputs(tmp_path, labels={plan.image_id: target_for(plan, tmp_path)}, class_names=CLASSES)
        sink(batch([result(plan, 0, 0)]))
        copy = pickle.loads(pickle.dumps(sink))
        assert copy._arrays is None and copy.labels.keys() == sink.labels.keys()


class TestLabelGeometry:
    def test_label_dtype_widens_when_ids_run_out(self):
        assert label_dtype(1000, 100) == "uint32" and label_dtype(2**27, 100) == "uint64"

    def test_resampled_cores_map_back_to_level_pixels(self, plan):
        """Tiles resampled to 1.4x the level's pixel size: the core's output window maps
        onto the level core by nearest neighbour, in order."""
        archive = plan.location.parent().parent()
        source = ZarrTileDatasource(archive, target_pixel_size_nm=plan.pixel_size_nm * 1.4, tolerance=1.2)
        (im,) = source.images()
        assert im.output is not None
        target = LabelTarget(im.image_id, plan.location, "x", im, STRIDE, "uint32", plan.location)
        for spec in im.grid:
            x0, y0, x1, y1 = spec.core_level0()
            j0, j1, i0, i1 = im.output.core_window((y0, y1, x0, x1))
            ids = np.arange((j1 - j0) * (i1 - i0)).reshape(j1 - j0, i1 - i0) + 1
            mapped = core_to_level(target, spec, ids)
            assert mapped.shape == (spec.height, spec.width)
            # every output pixel lands somewhere, but for the last row or column: an output
            # pixel starting in this core can hold no level pixel's centre of it
            missing = set(ids.ravel()) - set(np.unique(mapped))
            assert missing <= set(ids[-1]) | set(ids[:, -1])
            assert (np.diff(mapped, axis=1) >= 0).all() and (np.diff(mapped, axis=0) >= 0).all()


class TestFinish:
    def _run(self, plan, tmp_path):
        target = target_for(plan, tmp_path)
        sink = WriteTileOutputs(tmp_path, labels={plan.image_id: target}, class_names=CLASSES)
        rows = [
            # one defect cut by the border x = 64: a piece in each tile
            result(plan, 0, 0, [(50, 20, 64, 40)], probs=(0.9, 0.1)),
            result(plan, 0, 1, [(64, 22, 80, 38), (100, 40, 104, 44)], classes=[0, 1], probs=(0.3, 0.7)),
            result(plan, 1, 0, error=CORRUPT),
        ]
        sink(batch(rows))
        done = [(0, 0, 0), (0, 0, 64)]
        return target, done

    def test_objects_tiles_summary(self, plan, tmp_path):
        target, done = self._run(plan, tmp_path)
        row = finish_image(tmp_path, plan, done, label_target=target, class_names=CLASSES, materials=MATERIALS,
                           grades=GRADES, provenance={"bundle": "tiny/1"})
        objects = read_output(tmp_path, OBJECTS).to_pylist()
        assert [(o["class_name"], o["parts"], sorted(o["label_ids"])) for o in objects] == [
            ("pore", 2, [1, STRIDE + 1]), ("crack", 1, [STRIDE + 2])]
        assert (objects[0]["x0"], objects[0]["x1"], objects[0]["y0"], objects[0]["y1"]) == (50, 80, 20, 40)
        assert objects[0]["x1_nm"] == pytest.approx(80 * plan.grid.transform.pixel_size_nm[1])
        # measured whole on the label image: both pieces (14 x 20 and 16 x 16 px), its centroid theirs
        assert objects[0]["area_nm2"] == pytest.approx((14 * 20 + 16 * 16) * plan.pixel_size_nm**2)
        assert objects[0]["centroid_x"] == pytest.approx((280 * 57 + 256 * 72) / 536)
        assert objects[0]["centroid_y"] == pytest.approx(30)
        assert objects[0]["equivalent_diameter_nm"] == pytest.approx(2 * np.sqrt(536 / np.pi) * plan.pixel_size_nm)
        assert objects[1]["area_nm2"] == pytest.approx(16 * plan.pixel_size_nm**2)  # one piece: its own

        tiles = read_output(tmp_path, TILES).to_pandas()
        assert tiles["status"].tolist() == ["done", "done", "error"]
        assert tiles["error"].iloc[2].startswith("CorruptChunkError")

        assert row["n_defects"] == 2 and row["n_detections"] == 3 and json.loads(row["defect_counts"]) == {
            "crack": 1, "pore": 1}
        assert row["tiles_planned"] == 16 and row["tiles_done"] == 2 and row["tiles_error"] == 1
        assert not row["complete"]
        # equal core areas: the tiles' probabilities averaged
        assert row["material_probs"] == pytest.approx([0.6, 0.4]) and row["material"] == "steel"
        assert row["defect_density_per_mm2"] == pytest.approx(2 / row["core_area_mm2"])
        assert json.loads(row["model_versions"]) == {"bundle": "tiny/1"}

        # label pyramid and NGFF metadata
        group = zarr.open_group(target.root.path, mode="r")
        assert group["labels"].attrs["ome"]["labels"] == ["predicted_defects", "predicted_defects_classes"]
        node = group["labels/predicted_defects"]
        assert sorted(node.array_keys()) == ["0", "1", "2"]
        np.testing.assert_array_equal(node["1"][:], downsample_labels(node["0"][:]))  # each 2x2 block's label
        ms = node.attrs["ome"]["multiscales"][0]
        assert [d["coordinateTransformations"][0]["scale"][1] for d in ms["datasets"]] == pytest.approx(
            [plan.pixel_size_nm * 2**k for k in range(3)])
        # a coarser label pixel stands for its block: placed on the block's centre, as the image's levels
        shifts = [d["coordinateTransformations"][-1]["translation"][1] if k else 0.0
                  for k, d in enumerate(ms["datasets"])]
        assert shifts == pytest.approx([plan.pixel_size_nm * (2**k - 1) / 2 for k in range(3)])
        assert node.attrs["grainflow"]["bundle"] == "tiny/1"
        props = group["labels/predicted_defects_classes"].attrs["ome"]["image-label"]["properties"]
        assert props == [{"label-value": 1, "class": "pore"}, {"label-value": 2, "class": "crack"}]

    def test_an_object_reaching_into_a_neighbour_core_is_whole(self, plan, tmp_path):
        """Tile (0, 0) owns a defect over x 36..76 (centre 56) and, reading 16 px into its
        neighbour, sees it whole; tile (0, 1), reading from x 48, sees x 48..76 (centre 62,
        not its own) and paints its share as a foreign piece. The object lists both ids,
        keeps its owner's measurements, and the label image holds all of it."""
        target = target_for(plan, tmp_path)
        sink = WriteTileOutputs(tmp_path, labels={plan.image_id: target}, class_names=CLASSES)
        cols = batch([result(plan, 0, 0, [(36, 20, 76, 40)]), result(plan, 0, 1, foreign=[(48, 20, 76, 40)])])
        cols["origin"][1] = (0, 48)  # read with 16 px of halo towards each other
        cols["halo"][0], cols["halo"][1] = (0, 0, 0, 16), (0, 0, 16, 0)
        sink(cols)
        finish_image(tmp_path, plan, [(0, 0, 0), (0, 0, 64)], label_target=target, class_names=CLASSES,
                     materials=MATERIALS, grades=GRADES)
        (obj,) = read_output(tmp_path, OBJECTS).to_pylist()
        assert sorted(obj["label_ids"]) == [1, STRIDE + 1] and obj["parts"] == 1
        assert (obj["x0"], obj["x1"]) == (36, 76)
        assert obj["area_nm2"] == pytest.approx(40 * 20 * plan.pixel_size_nm**2)
        assert obj["centroid_x"] == pytest.approx(56)
        labels = zarr.open_group(target.root.path, mode="r")["labels/predicted_defects/0"][:]
        assert np.isin(labels[20:40, 36:76], obj["label_ids"]).all()
        assert set(np.unique(labels[20:40, 64:76])) == {STRIDE + 1}  # painted by the neighbour

    def test_a_foreign_piece_joins_its_owners_detection_not_a_neighbour_of_it(self, plan, tmp_path):
        """The owner reports a long slanted defect (box x 10..76, y 10..60, reaching the
        border only at its lower end) and a small one beside that end; the neighbour's
        two foreign pieces each join their own defect, compared where both tiles read."""
        target = target_for(plan, tmp_path)
        sink = WriteTileOutputs(tmp_path, labels={plan.image_id: target}, class_names=CLASSES)
        cols = batch([result(plan, 0, 0, [(10, 10, 76, 60), (50, 28, 74, 40)]),
                      result(plan, 0, 1, foreign=[(48, 28, 74, 40), (48, 48, 76, 60)])])
        cols["origin"][1] = (0, 48)
        cols["halo"][0], cols["halo"][1] = (0, 0, 0, 16), (0, 0, 16, 0)
        sink(cols)
        finish_image(tmp_path, plan, [(0, 0, 0), (0, 0, 64)], label_target=target, class_names=CLASSES,
                     materials=MATERIALS, grades=GRADES)
        objects = {o["x0"]: o for o in read_output(tmp_path, OBJECTS).to_pylist()}
        assert sorted(objects[10]["label_ids"]) == [1, STRIDE + 2]   # the slanted one: the piece of its end
        assert sorted(objects[50]["label_ids"]) == [2, STRIDE + 1]   # the small one: the piece beside it

    def test_idempotent_and_cleans_stale_files(self, plan, tmp_path):
        target, done = self._run(plan, tmp_path)
        out = resolve(tmp_path)
        # an earlier run's leftovers: an error for a tile now done, detections of a tile now failing
        stale_error = tile_location(out, ERRORS, (plan.image_id, 0, 0, 0))
        stale_error.filesystem().pipe_file(stale_error.path,
                                           open(tile_location(out, ERRORS, (plan.image_id, 0, 64, 0)).path, "rb").read())
        stale_det = tile_location(out, DETECTIONS, (plan.image_id, 0, 64, 0))
        stale_det.filesystem().pipe_file(stale_det.path,
                                         open(tile_location(out, DETECTIONS, (plan.image_id, 0, 0, 0)).path, "rb").read())
        kwargs = dict(label_target=target, class_names=CLASSES, materials=MATERIALS, grades=GRADES)
        first = finish_image(tmp_path, plan, done, **kwargs)
        assert not stale_error.exists() and not stale_det.exists()
        files = {name: open(out.join(name, partition(plan.image_id), "part-0.parquet").path, "rb").read()
                 for name in (OBJECTS, TILES)}
        assert finish_image(tmp_path, plan, done, **kwargs) == first
        for name, data in files.items():
            assert open(out.join(name, partition(plan.image_id), "part-0.parquet").path, "rb").read() == data

    def test_no_detections(self, plan):
        boxes, scores, classes, members = stitch_objects([])
        assert boxes.shape == (0, 4) and members == []


def test_partition_names_round_trip(plan, tmp_path):
    """Image ids a path cannot hold as they are come back as they went in."""
    from engine.data.sinks import DETECTION_SCHEMA
    from engine.data.ledger import put_file, table_bytes

    image_id = "run 7/b%c"
    put_file(resolve(tmp_path).join(DETECTIONS, partition(image_id), "tile-0-0-0.parquet"),
             table_bytes(DETECTION_SCHEMA.empty_table()))
    assert partition(image_id) == "image_id=run%207%2Fb%25c"
    table = read_output(tmp_path, DETECTIONS)
    assert table.num_rows == 0 and table.schema.field("image_id").type == "string"
    sink = WriteTileOutputs(tmp_path, class_names=CLASSES)
    r = result(plan, 0, 0, [(1, 1, 5, 5)])
    sink(batch([TileResult(**{**{f: getattr(r, f) for f in r.__dataclass_fields__}, "image_id": image_id})]))
    assert read_output(tmp_path, DETECTIONS)["image_id"].to_pylist() == [image_id]
    assert read_output(tmp_path, DETECTIONS, image_id=image_id).num_rows == 1


class TestS3:
    def test_tile_sink_and_finishing_on_s3(self, plan, s3_bucket):
        """Outputs, ledger and label images under an s3:// out (moto), in this process."""
        out = resolve(f"{s3_bucket}/runs/r1")
        target = target_for(plan, out)
        sink = WriteTileOutputs(out, labels={plan.image_id: target}, class_names=CLASSES)
        sink(batch([result(plan, 0, 0, [(50, 20, 64, 40)]), result(plan, 0, 1, [(64, 22, 80, 38)]),
                    result(plan, 1, 1, error=CORRUPT)]))
        assert Ledger(out).keys() == {(plan.image_id, 0, 0, 0), (plan.image_id, 0, 0, 64)}
        row = finish_image(out, plan, [(0, 0, 0), (0, 0, 64)], label_target=target, class_names=CLASSES,
                           materials=MATERIALS, grades=GRADES)
        assert row["n_defects"] == 1 and row["tiles_error"] == 1 and row["labels_uri"].startswith("s3://")
        assert read_output(out, OBJECTS)["parts"].to_pylist() == [2]
        assert read_output(out, ERRORS)["chunk_keys"].to_pylist() == [["0/c/1/1"]]
        group = zarr.open_group(target.root.zarr_store(read_only=True), mode="r")
        labels = group["labels/predicted_defects/0"][:]
        assert set(np.unique(labels)) == {0, 1, STRIDE + 1}
        assert sorted(group["labels/predicted_defects"].array_keys()) == ["0", "1", "2"]
