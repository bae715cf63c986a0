"""The reprocessing job end to end on a small archive: outputs, ledger, labels, resume
after a killed driver, a corrupt chunk, a killed ensemble actor, and what --out may hold
besides a run's outputs.

Runs use batch_size=1 so every tile's computation is the same whatever the batching
(engine.pipeline.ensemble), which makes "identical outputs" exact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from engine.data.ledger import Ledger
from engine.data.sinks import DETECTIONS, ERRORS, OBJECTS, SUMMARY_FILE, TILES, read_output
from engine.errors import GrainflowError
from engine.pipeline import EnsembleConfig
from engine.pipeline.job import reprocess
from engine.stores.pyramid import downsample_labels

from tests.fresh_imports import heavy_modules_imported

from .conftest import TEST_CONFIG

CONFIG = EnsembleConfig(**TEST_CONFIG)
REF = "tiny@production"
RUN = {"halo": 16, "batch_size": 1, "concurrency": 1}
N_TILES = 12  # 3 images of 2 x 2 chunks


@pytest.fixture(scope="module")
def job_archive(tmp_path_factory):
    from engine.synth.archive import generate_archive

    out = tmp_path_factory.mktemp("job-archive") / "a"
    generate_archive(out, n_images=3, seed=11, size=256, chunk=128)
    return out


@pytest.fixture(scope="module")
def job_registry(tmp_path_factory):
    """A SQLite registry with the tiny untrained ensemble as tiny@production."""
    from engine.pipeline.bundle import register_ensemble
    from engine.pipeline.demo_models import untrained_tiny_models
    from engine.registry import ModelRegistry

    root = tmp_path_factory.mktemp("job-registry")
    registry = ModelRegistry(tracking_uri=f"sqlite:///{root}/m.db")
    register_ensemble(registry, untrained_tiny_models(0), "tiny", workdir=root / "w")
    return registry


def run(archive, out, registry, **kwargs):
    return reprocess(str(archive), str(out), REF, registry=registry, config=CONFIG, **{**RUN, **kwargs})


def copy_archive(archive, tmp_path) -> Path:
    dest = tmp_path / "archive"
    shutil.copytree(archive, dest)
    return dest


@pytest.fixture(scope="module")
def clean(ray_session, job_archive, job_registry, tmp_path_factory):
    """An uninterrupted run, labels beside the images of a copy of the archive: the
    reference outputs. Returns (archive copy, out, JobResult)."""
    root = tmp_path_factory.mktemp("job-clean")
    archive = copy_archive(job_archive, root)
    out = root / "out"
    return archive, out, run(archive, out, job_registry)


def snapshot(out) -> dict[str, object]:
    """Every output of a run in a comparable form (tables sorted; label arrays)."""
    keys = {DETECTIONS: ["image_id", "level", "y", "x", "detection"], OBJECTS: ["image_id", "object_id"],
            TILES: ["image_id", "level", "y", "x"], ERRORS: ["image_id", "level", "y", "x"]}
    snap: dict[str, object] = {
        name: read_output(out, name).to_pandas().sort_values(k).reset_index(drop=True) for name, k in keys.items()}
    snap["summary"] = pd.read_parquet(Path(out) / SUMMARY_FILE).drop(columns=["labels_uri"])
    snap["ledger"] = Ledger(out).read().to_pandas()
    labels = {}
    for row in snap["summary"].assign(uri=pd.read_parquet(Path(out) / SUMMARY_FILE)["labels_uri"]).itertuples():
        group = zarr.open_group(str(Path(row.uri).parent), mode="r")  # wherever they were written
        for name in group.group_keys():
            if name.startswith("predicted_defects"):
                for level in group[name].array_keys():
                    labels[(row.image_id, name, level)] = group[name][level][:]
    snap["labels"] = labels
    return snap


def assert_same_outputs(a: dict, b: dict) -> None:
    for name in (DETECTIONS, OBJECTS, TILES, ERRORS, "summary", "ledger"):
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)
    assert a["labels"].keys() == b["labels"].keys()
    for k in a["labels"]:
        np.testing.assert_array_equal(a["labels"][k], b["labels"][k], err_msg=str(k))


class TestEndToEnd:
    def test_outputs_ledger_and_labels(self, clean, job_registry):
        archive, out, result = clean
        assert (result.tiles_total, result.tiles_done, result.tiles_skipped, result.errors) == (N_TILES, N_TILES, 0, 0)
        assert result.bundle == "tiny/1" and result.images == 3 and result.tiles_per_s > 0

        # the ledger: every planned tile exactly once
        ledger = Ledger(out).read().to_pandas()
        assert len(ledger) == N_TILES and not ledger.duplicated(["image_id", "level", "y", "x"]).any()
        assert 1 <= len(Ledger(out).files()) <= N_TILES  # one file per written batch
        catalog = pd.read_parquet(archive / "catalog.parquet")
        assert set(ledger["image_id"]) == set(catalog["image_id"])
        assert set(zip(ledger["y"], ledger["x"])) == {(0, 0), (0, 128), (128, 0), (128, 128)}

        # per-tile detections: owned by their tile, label ids unique in the image
        det = read_output(out, DETECTIONS).to_pandas()
        assert len(det) == ledger["n_defects"].sum() > 0
        cx, cy = (det["x0"] + det["x1"]) / 2, (det["y0"] + det["y1"]) / 2
        assert ((cx >= det["x"]) & (cx < det["x"] + 128) & (cy >= det["y"]) & (cy < det["y"] + 128)).all()
        assert not det.duplicated(["image_id", "label_id"]).any()
        assert (det["area_nm2"] > 0).all() and set(det["class_name"]) <= {"pore", "crack", "inclusion", "scratch", "void"}

        # objects: stitched from the detections, every detection in at most one object
        objects = read_output(out, OBJECTS).to_pandas()
        assert 0 < len(objects) <= len(det) and result.objects == len(objects)
        for image_id, group in objects.groupby("image_id"):
            ids = np.concatenate(group["label_ids"].to_list())
            assert len(ids) == len(set(ids))  # an id belongs to one object
            # an object's ids: its detections' (parts), then foreign pieces other tiles painted
            mine = set(det.loc[det["image_id"] == image_id, "label_id"])
            assert [len(set(v) & mine) for v in group["label_ids"]] == group["parts"].tolist()
        assert (objects["x0_nm"] < objects["x1_nm"]).all()

        # tiles and summary
        tiles = read_output(out, TILES).to_pandas()
        assert len(tiles) == N_TILES and (tiles["status"] == "done").all()
        summary = pd.read_parquet(out / SUMMARY_FILE)
        assert list(summary["image_id"]) == sorted(catalog["image_id"])
        assert summary["complete"].all() and (summary["tiles_done"] == 4).all()
        assert summary["material"].isin(["ferritic_steel", "pearlitic_steel", "martensite", "al_alloy_precipitates",
                                         "ti_alpha_beta", "ni_superalloy", "grey_cast_iron", "nodular_cast_iron",
                                         "porous_ceramic", "fibre_composite", "thin_film_lattice", "am_alloy"]).all()
        assert summary["n_defects"].sum() == len(objects)
        np.testing.assert_allclose(summary["defect_density_per_mm2"], summary["n_defects"] / summary["core_area_mm2"])
        for row in summary.itertuples():
            assert sum(json.loads(row.defect_counts).values()) == row.n_defects
            assert json.loads(row.model_versions)["bundle"] == "tiny/1"
            probs = np.asarray(row.material_probs)
            assert abs(probs.sum() - 1) < 1e-4 and row.material_prob == probs.max()

        # label images beside each image: chunk-aligned cores, ids = the detections' ids
        for image_id in catalog["image_id"]:
            group = zarr.open_group(str(archive / "images" / f"{image_id}.ome.zarr"), mode="r")
            assert {"defects", "predicted_defects", "predicted_defects_classes"} <= set(
                group["labels"].attrs["ome"]["labels"])
            node = group["labels/predicted_defects"]
            level0 = node["0"]
            assert level0.shape == group["0"].shape and level0.chunks == group["0"].chunks
            assert level0.dtype == np.uint32
            assert node.attrs["ome"]["image-label"]["source"]["image"] == "../../"
            assert node.attrs["grainflow"]["bundle"] == "tiny/1"
            assert [d["path"] for d in node.attrs["ome"]["multiscales"][0]["datasets"]] == ["0", "1"]
            labels = level0[:]
            ids = set(np.unique(labels)) - {0}
            mine = det[det["image_id"] == image_id]
            n_found = mine.groupby(["y", "x"]).size()
            # each id lies inside the core of the tile its range belongs to (whole chunks):
            # a detection's id, or after them a foreign piece (an object another tile owns)
            for lid in ids:
                row, col = divmod((lid - 1) // CONFIG.max_det, 2)  # 2 x 2 tiles per image
                ys, xs = np.nonzero(labels == lid)
                assert ys.min() >= 128 * row and ys.max() < 128 * (row + 1)
                assert xs.min() >= 128 * col and xs.max() < 128 * (col + 1)
                local = (lid - 1) % CONFIG.max_det + 1
                assert (lid in set(mine["label_id"])) == (local <= n_found.get((128 * row, 128 * col), 0))
            np.testing.assert_array_equal(node["1"][:], downsample_labels(labels))  # each 2x2 block's label
            classes = group["labels/predicted_defects_classes/0"][:]
            assert classes.max() <= 5 and ((labels > 0) <= (classes > 0)).all()

        # a rerun has nothing left to do, and rewrites the same outputs
        before = snapshot(out)
        again = run(archive, out, job_registry)
        assert (again.tiles_done, again.tiles_skipped, again.errors) == (0, N_TILES, 0)
        assert_same_outputs(before, snapshot(out))

    def test_same_detections_as_the_online_call(self, clean, job_registry):
        """Parity: each tile through `analyze_tile` (the endpoint's call, pixels in their
        stored dtype) gives the detections the job wrote for it."""
        from engine.pipeline import Ensemble, analyze_tile

        from .conftest import read_batch

        archive, out, _ = clean
        ensemble = Ensemble.from_registry("tiny/1", job_registry, config=CONFIG)
        stored = dict(pd.read_parquet(archive / "catalog.parquet")[["image_id", "dtype"]].values)
        assert len(set(stored.values())) > 1, "fixture: images of several dtypes"
        tiles = read_batch(archive, halo=16)
        det = read_output(out, DETECTIONS).to_pandas().set_index(["image_id", "y", "x"]).sort_index()
        for i, image_id in enumerate(tiles["image_id"]):
            r = analyze_tile(tiles["tile"][i].astype(stored[image_id]), tiles["modality"][i], tiles["pixel_size"][i],
                             ensemble=ensemble, image_id=image_id, level=tiles["level"][i], y=tiles["y"][i],
                             x=tiles["x"][i], halo=tiles["halo"][i], origin=tiles["origin"][i],
                             scale=tiles["scale"][i])
            key = (image_id, int(tiles["y"][i]), int(tiles["x"][i]))
            mine = det.loc[[key]] if key in det.index else det.iloc[:0]
            assert len(mine) == r.n_defects, key
            np.testing.assert_array_equal(mine["class"], r.classes)
            np.testing.assert_allclose(mine[["x0", "y0", "x1", "y1"]].to_numpy(), r.boxes_level0, atol=1e-3)
            np.testing.assert_allclose(mine["score"], r.scores, atol=1e-5)

    def test_other_settings_are_refused_on_resume(self, clean, job_registry):
        archive, out, _ = clean
        with pytest.raises(GrainflowError, match="halo: 16 -> 8"):
            run(archive, out, job_registry, halo=8)

    def test_a_replaced_image_is_refused_on_resume(self, clean, job_registry):
        """An image replaced in the archive (same id, other pixels: the catalog's checksum
        changed) would keep the tiles its old pixels gave; the rerun says so and writes
        nothing."""
        archive, out, _ = clean
        path = archive / "catalog.parquet"
        original = path.read_bytes()
        catalog = pd.read_parquet(path)
        catalog.loc[0, "checksum"] = "0" * 64
        manifest = (out / "job.json").read_bytes()
        try:
            catalog.to_parquet(path)
            with pytest.raises(GrainflowError, match=f"changed since the run there \\({catalog['image_id'][0]}"):
                run(archive, out, job_registry)
        finally:
            path.write_bytes(original)
        assert (out / "job.json").read_bytes() == manifest

    def test_an_archive_nothing_of_which_can_be_planned_leaves_the_outputs(self, clean, job_registry):
        """Planning comes before anything in --out is touched: a rerun with --no-resume
        over a catalog whose pixel sizes are all 0 names the first image's row and
        leaves the earlier run's outputs as they were."""
        archive, out, _ = clean
        path = archive / "catalog.parquet"
        original = path.read_bytes()
        catalog = pd.read_parquet(path)
        catalog["pixel_size_x"] = 0.0
        before, manifest = snapshot(out), (out / "job.json").read_bytes()
        try:
            catalog.to_parquet(path)
            with pytest.raises(GrainflowError, match=r"none of its 3 image\(s\) could be planned; the first, "
                                                     rf"{sorted(catalog['image_id'])[0]}: MetadataError: .*row .*"
                                                     r"pixel_size_x 0.0 must be a positive number"):
                run(archive, out, job_registry, resume=False)
        finally:
            path.write_bytes(original)
        assert (out / "job.json").read_bytes() == manifest
        assert_same_outputs(snapshot(out), before)

    def test_unknown_model_is_a_clear_error(self, ray_session, job_archive, job_registry, tmp_path):
        with pytest.raises(GrainflowError, match="nosuch"):
            reprocess(str(job_archive), str(tmp_path / "o"), "nosuch@production", registry=job_registry)


    def test_registered_labels_that_disagree_with_the_files_are_refused(self, ray_session, job_archive,
                                                                         job_registry, tmp_path):
        """The driver plans from registry metadata; an actor whose loaded detector names
        other classes than its registered config stops the job before any tile is written."""
        from engine.models import save_checkpoint
        from engine.pipeline.bundle import load_bundle

        members = load_bundle(REF, job_registry).models
        save_checkpoint(members.detector, tmp_path / "d.safetensors")
        config = members.detector.config.to_dict()
        config["args"] = {**config["args"], "defect_classes": ["not", "what", "the", "file", "says"]}
        job_registry.register("mislabelled", tmp_path / "d.safetensors", family="detector", config=config)
        job_registry.register_bundle("mislabelled-ens", {"detector": "mislabelled/1",
                                                         "segmenter": "tiny-segmenter/1"})
        out = tmp_path / "out"
        with pytest.raises(GrainflowError, match="class_names: registered") as info:
            reprocess(str(job_archive), str(out), "mislabelled-ens/1", registry=job_registry, config=CONFIG,
                      **RUN)
        assert "disagree with their registered configs" in str(info.value)
        assert not (out / DETECTIONS).exists() and not Ledger(out).keys()


class TestResume:
    def test_driver_killed_midway(self, ray_session, clean, job_archive, job_registry, tmp_path):
        """A driver (python -m jobs.reprocess, joined to this Ray) is killed once some
        tiles are ledgered; the rerun redoes none of them and ends with the clean outputs."""
        out = tmp_path / "out"
        env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
        cmd = [sys.executable, "-m", "jobs.reprocess", "--archive", str(job_archive), "--out", str(out), "--models",
               REF, "--tracking-uri", job_registry.tracking_uri, "--conf", str(CONFIG.conf), "--max-det",
               str(CONFIG.max_det), "--halo", "16", "--batch-size", "1", "--concurrency", "1", "--labels", "out"]
        proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).parents[2], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        ledger = Ledger(out)
        try:
            deadline = time.monotonic() + 240
            while len(ledger.files()) < 2 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started itself
            proc.wait()
        # Ray ends a dead driver's tasks; one may still be finishing a write: let it settle.
        done, settled = ledger.keys(), time.monotonic()
        while time.monotonic() - settled < 2:
            time.sleep(0.2)
            if (now := ledger.keys()) != done:
                done, settled = now, time.monotonic()
        assert 2 <= len(done) < N_TILES, "the driver must be killed midway"
        written = {k: _mtime(out, k) for k in done}

        result = run(job_archive, out, job_registry, labels="out")
        assert result.tiles_skipped == len(done)
        assert result.tiles_done == N_TILES - len(done) and result.errors == 0
        assert {k: _mtime(out, k) for k in done} == written  # no ledgered tile was done again
        assert_same_outputs(snapshot(clean[1]), snapshot(out))


def _mtime(out, key) -> int:
    image_id, level, y, x = key
    return (Path(out) / DETECTIONS / f"image_id={image_id}" / f"tile-{level}-{y}-{x}.parquet").stat().st_mtime_ns


class TestFailures:
    def test_corrupt_chunk_is_an_error_row_and_a_repaired_rerun_ends_clean(self, ray_session, clean, job_archive,
                                                                           job_registry, tmp_path):
        """The chunk's tile fails; its neighbours complete without their halo on its side,
        which the tiles table records, and stay out of the ledger: a rerun redoes them
        (again trimmed while the chunk is bad), and once the chunk is repaired the
        outputs are the clean run's, not the trimmed neighbours' detections."""
        archive = copy_archive(job_archive, tmp_path)
        image_id = sorted(pd.read_parquet(archive / "catalog.parquet")["image_id"])[1]
        chunk = archive / "images" / f"{image_id}.ome.zarr" / "0" / "c" / "1" / "0"
        good = chunk.read_bytes()
        chunk.write_bytes(b"\x00not zstd at all" * 5)
        out = tmp_path / "out"
        result = run(archive, out, job_registry, labels="out")
        assert (result.tiles_done, result.errors, result.tiles_halo_reduced) == (N_TILES - 1, 1, 3)

        errors = read_output(out, ERRORS).to_pylist()
        assert len(errors) == 1
        e = errors[0]
        assert (e["image_id"], e["level"], e["y"], e["x"]) == (image_id, 0, 128, 0)
        assert e["exception"] == "CorruptChunkError" and e["chunk_keys"] == ["0/c/1/0"]
        assert "0/c/1/0" in e["message"]
        tiles = read_output(out, TILES).to_pandas().set_index(["image_id", "y", "x"])
        assert tiles.loc[(image_id, 128, 0), "status"] == "error"
        assert (tiles["status"] == "done").sum() == N_TILES - 1
        # the 2 x 2 image's other tiles each lost the side facing the chunk (row 1, column 0)
        reduced = tiles["halo_reduced"].dropna()
        assert {k: v.split(":")[0] for k, v in reduced.items()} == {
            (image_id, 0, 0): "bottom", (image_id, 0, 128): "bottom", (image_id, 128, 128): "left"}
        assert all("CorruptChunkError" in v and "0/c/1/0" in v for v in reduced)
        neighbours = {(image_id, 0, y, x) for _, y, x in reduced.index}
        ledger = Ledger(out).keys()
        assert len(ledger) == N_TILES - 4 and not ledger & ({(image_id, 0, 128, 0)} | neighbours)
        summary = pd.read_parquet(out / SUMMARY_FILE).set_index("image_id")
        assert summary.loc[image_id, ["tiles_error", "tiles_halo_reduced"]].tolist() == [1, 3]
        assert not summary.loc[image_id, "complete"] and summary["complete"].sum() == 2

        # a rerun with the chunk still bad redoes the failed tile and its trimmed neighbours
        again = run(archive, out, job_registry, labels="out")
        assert (again.tiles_done, again.tiles_skipped, again.errors, again.tiles_halo_reduced) == (3, N_TILES - 4, 1, 3)
        assert len(read_output(out, ERRORS)) == 1

        # the chunk repaired: the rerun redoes those four, and the outputs are a clean run's
        chunk.write_bytes(good)
        repaired = run(archive, out, job_registry, labels="out")
        assert (repaired.tiles_done, repaired.tiles_skipped, repaired.errors, repaired.tiles_halo_reduced) == (
            4, N_TILES - 4, 0, 0)
        assert_same_outputs(snapshot(clean[1]), snapshot(out))

    def test_image_without_metadata_is_recorded_and_the_others_complete(self, ray_session, job_archive,
                                                                         job_registry, tmp_path):
        from engine.reports import write_report

        archive = copy_archive(job_archive, tmp_path)
        ids = sorted(pd.read_parquet(archive / "catalog.parquet")["image_id"])
        broken = archive / "images" / f"{ids[0]}.ome.zarr" / "zarr.json"
        kept = broken.read_bytes()
        broken.unlink()
        out = tmp_path / "out"
        result = run(archive, out, job_registry, labels="out")
        assert (result.images, result.images_failed, result.tiles_done, result.errors) == (2, 1, N_TILES - 4, 0)

        (e,) = read_output(out, ERRORS).to_pylist()
        assert e["image_id"] == ids[0] and (e["level"], e["y"], e["x"]) == (None, None, None)
        assert e["exception"] == "MetadataError" and "zarr.json" in e["message"], e
        summary = pd.read_parquet(out / SUMMARY_FILE).set_index("image_id")
        assert list(summary.index) == ids
        assert summary.loc[ids[0], ["tiles_planned", "tiles_done", "complete"]].tolist() == [0, 0, False]
        assert summary.loc[ids[1:], "complete"].all()
        page = Path(write_report(out, archive=archive)).read_text()
        assert "1 image(s) could not be planned" in page and "Errors (0 tiles, 1 images)" in page
        errors_table = page[page.index('id="errors-table"'):]
        assert "whole image" in errors_table and "MetadataError" in errors_table

        # metadata restored: the rerun plans the image, runs only its tiles, drops the error
        broken.write_bytes(kept)
        again = run(archive, out, job_registry, labels="out")
        assert (again.images_failed, again.tiles_done, again.tiles_skipped) == (0, 4, N_TILES - 4)
        assert len(read_output(out, ERRORS)) == 0
        assert pd.read_parquet(out / SUMMARY_FILE)["complete"].all()

    def test_an_image_whose_preprocessing_cannot_be_fitted_is_recorded_and_the_others_complete(
            self, ray_session, job_archive, job_registry, tmp_path):
        """A member reads "image" inputs, so every image's preprocessing is fitted before
        the tiles; one image's coarse level has a corrupt chunk: that image is an errors
        row, the others are processed (the job used to stop at the first such image)."""
        archive = copy_archive(job_archive, tmp_path)
        ids = sorted(pd.read_parquet(archive / "catalog.parquet")["image_id"])
        for chunk in (archive / "images" / f"{ids[0]}.ome.zarr").glob("*/c/0/0"):  # every level: the fit's too
            chunk.write_bytes(b"\x00not zstd at all" * 5)
        out = tmp_path / "out"
        config = EnsembleConfig(**dict(TEST_CONFIG, inputs={"classifier": "image"}))
        result = reprocess(str(archive), str(out), REF, registry=job_registry, config=config,
                           **{**RUN, "labels": "out"})
        assert (result.images, result.images_failed, result.tiles_done, result.errors) == (2, 1, N_TILES - 4, 0)
        (e,) = read_output(out, ERRORS).to_pylist()
        assert e["image_id"] == ids[0] and (e["level"], e["y"], e["x"]) == (None, None, None)
        assert "preprocessing parameters could not be fitted" in e["message"], e
        summary = pd.read_parquet(out / SUMMARY_FILE).set_index("image_id")
        assert summary.loc[ids[1:], "complete"].all() and not summary.loc[ids[0], "complete"]

    def test_killed_actor(self, ray_session, clean, job_archive, job_registry, tmp_path):
        """The ensemble actor's process is killed mid-job: Ray restarts it, the job
        completes, every tile is written once, outputs as a clean run's."""
        import psutil

        out = tmp_path / "out"
        outcome: dict[str, object] = {}

        def job():
            try:
                outcome["result"] = run(job_archive, out, job_registry, labels="out")
            except BaseException as exc:  # reported by the test below
                outcome["error"] = exc

        thread = threading.Thread(target=job)
        thread.start()
        ledger, killed, at_kill = Ledger(out), None, None
        deadline = time.monotonic() + 240
        while thread.is_alive() and killed is None and time.monotonic() < deadline:
            if len(ledger.files()) >= 2:
                for p in _session_processes(ray_session, psutil):
                    if "MapWorker(MapBatches(JobEnsemble))" in " ".join(_cmdline(p)):
                        at_kill = len(ledger.files())
                        p.kill()
                        killed = p.pid
                        break
            time.sleep(0.05)
        thread.join(timeout=300)
        assert killed is not None and at_kill < N_TILES, "the actor must be killed mid-job"
        assert "error" not in outcome, outcome.get("error")
        result = outcome["result"]
        assert result.tiles_done == N_TILES and result.errors == 0
        assert_same_outputs(snapshot(clean[1]), snapshot(out))

    def test_with_room_for_one_tile_in_the_object_store_nothing_stalls_or_is_lost(
            self, ray_session, clean, job_archive, job_registry, tmp_path, monkeypatch):
        """The tile stage's object-store budget (tiles read ahead of the actors, outputs
        not yet written) at a single tile, where a job's default is 256 MiB: reads wait
        for the actors instead of running ahead, and the job still completes with a
        clean run's outputs."""
        import engine.pipeline.job as job

        monkeypatch.setattr(job, "_IN_FLIGHT_FLOOR", 0)
        monkeypatch.setattr(job, "_IN_FLIGHT_BATCHES_PER_ACTOR", 1)
        out = tmp_path / "out"
        result = run(job_archive, out, job_registry, labels="out")
        assert (result.tiles_done, result.errors) == (N_TILES, 0)
        assert_same_outputs(snapshot(clean[1]), snapshot(out))


def _session_processes(ray_session, psutil):
    """Processes of this test session's Ray (under its raylet), never anyone else's."""
    from ray._private import worker

    node = worker._global_node
    for info in node.all_processes.get("raylet", []):
        yield from psutil.Process(info.process.pid).children(recursive=True)


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:
        return []


class TestEntrypoint:
    def test_bad_input_exits_2_naming_it(self, job_archive, job_registry, tmp_path, capsys):
        from jobs.reprocess import main

        code = main(["--archive", str(job_archive), "--out", str(tmp_path / "o"), "--models",
                     "nosuch@production", "--tracking-uri", job_registry.tracking_uri])
        assert code == 2 and "nosuch" in capsys.readouterr().err
        code = main(["--archive", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--models",
                     "nosuch@production", "--tracking-uri", job_registry.tracking_uri])
        assert code == 2 and "nowhere: no catalog.parquet" in capsys.readouterr().err

    def test_arguments_are_checked(self, capsys):
        from jobs.reprocess import parse_args

        with pytest.raises(SystemExit) as exc:
            parse_args(["--archive", "a", "--out", "o", "--models", "m", "--conf", "2"])
        assert exc.value.code == 2 and "--conf" in capsys.readouterr().err
        with pytest.raises(SystemExit) as exc:
            parse_args(["--archive", "a", "--out", "o", "--models", "m", "--cpus-per-actor", "0"])
        assert exc.value.code == 2 and "--cpus-per-actor" in capsys.readouterr().err


class TestPrepare:
    """The per-image preparation the driver runs as Ray tasks, called here directly."""

    def _plan(self, job_archive):
        from engine.data.datasource import ZarrTileDatasource

        return ZarrTileDatasource(job_archive, target_pixel_size_nm=100.0, tolerance=math.inf).images()[0]

    def test_labels_fall_back_to_out_when_the_image_cannot_be_written(self, job_archive, tmp_path):
        from dataclasses import replace

        from engine.pipeline.job import _prepare_images
        from engine.stores.uri import resolve

        (tmp_path / "a-file").write_text("not a folder")
        plan = replace(self._plan(job_archive), location=resolve(tmp_path / "a-file" / "img.ome.zarr"))
        out = resolve(tmp_path / "out")
        (target,), _ = _prepare_images(out, [plan], labels="auto", label_name="p", id_stride=8, overwrite=False, fit=False)
        assert target.root == out.join("labels", f"{plan.image_id}.ome.zarr") and "Error" in target.note
        group = zarr.open_group(target.root.path, mode="r")
        assert group["labels/p/0"].shape == plan.grid.shape and group["labels/p_classes/0"].dtype == np.uint8
        with pytest.raises(GrainflowError, match="cannot write label images beside the image"):
            _prepare_images(out, [plan], labels="image", label_name="p", id_stride=8, overwrite=False, fit=False)

    def test_a_zarr_v2_image_is_left_untouched(self, job_archive, tmp_path):
        """An NGFF 0.4 (Zarr v2) image: labels go to <out>, and the image still opens."""
        from dataclasses import replace

        from engine.pipeline.job import _prepare_images
        from engine.stores.image import open_image
        from engine.stores.uri import resolve

        path = tmp_path / "v2.ome.zarr"
        group = zarr.open_group(path, mode="w", zarr_format=2)
        group.create_array("0", data=np.full((64, 64), 30, np.uint8), chunks=(32, 32))
        group.attrs.update({"multiscales": [{"version": "0.4", "axes": [
            {"name": "y", "type": "space", "unit": "nanometer"}, {"name": "x", "type": "space", "unit": "nanometer"}],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [10.0, 10.0]}]}]}]})
        before = sorted(p.name for p in path.iterdir())
        plan = replace(self._plan(job_archive), location=resolve(path))
        out = resolve(tmp_path / "out")
        (target,), _ = _prepare_images(out, [plan], labels="auto", label_name="p", id_stride=8, overwrite=False, fit=False)
        assert target.root == out.join("labels", f"{plan.image_id}.ome.zarr") and "Zarr v2" in target.note
        assert sorted(p.name for p in path.iterdir()) == before
        assert open_image(resolve(path)).multiscale.version == "0.4"
        with pytest.raises(GrainflowError, match="Zarr v2"):
            _prepare_images(out, [plan], labels="image", label_name="p", id_stride=8, overwrite=False, fit=False)
        assert sorted(p.name for p in path.iterdir()) == before

    def test_existing_label_arrays_are_kept_unless_overwritten(self, job_archive, tmp_path):
        from engine.pipeline.job import _prepare_images
        from engine.stores.uri import resolve

        plan = self._plan(job_archive)
        out = resolve(tmp_path / "out")
        kw = dict(labels="out", label_name="p", id_stride=8, fit=False)
        (target,), _ = _prepare_images(out, [plan], overwrite=False, **kw)
        arr = zarr.open_array(target.root.join("labels", "p", "0").path, mode="r+")
        arr[:128, :128] = 7
        _prepare_images(out, [plan], overwrite=False, **kw)  # a resumed run writes into it
        assert arr[0, 0] == 7
        _prepare_images(out, [plan], overwrite=True, **kw)  # a fresh run starts it afresh
        assert zarr.open_array(target.root.join("labels", "p", "0").path, mode="r")[0, 0] == 0

    def test_preprocessing_parameters_round_trip(self, job_archive, tmp_path):
        from engine.pipeline.job import ParamsFromStore, _prepare_images
        from engine.preprocess import fit_preprocessing
        from engine.stores.image import open_image
        from engine.stores.uri import resolve

        catalog = pd.read_parquet(job_archive / "catalog.parquet")
        out = resolve(tmp_path / "out")
        plans = [p for p in self._plans(job_archive)]
        _prepare_images(out, plans, labels="none", label_name="p", id_stride=8, overwrite=False, fit=True)
        lookup = ParamsFromStore(out)
        for image_id, modality in zip(catalog["image_id"], catalog["modality"]):
            expected = fit_preprocessing(open_image(job_archive / "images" / f"{image_id}.ome.zarr"), modality)
            assert lookup(image_id) == expected  # optical ones carry an illumination field
        assert lookup("unknown") is None

    def _plans(self, job_archive):
        from engine.data.datasource import ZarrTileDatasource

        return ZarrTileDatasource(job_archive, target_pixel_size_nm=100.0, tolerance=math.inf).images()


def test_the_jobs_per_image_tasks_import_no_model_stack():
    """Preparing and finishing images run as Ray tasks whose functions live in
    engine.pipeline.job: a worker that runs one imports that module, and it must not pull
    in torch, Ultralytics or MLflow (seconds of CPU and ~0.4 GiB per worker, on the cores
    the ensemble needs). Fresh interpreter: this one has torch loaded."""
    assert heavy_modules_imported("from engine.pipeline.job import _finish, _prepare_images",
                                  ("torch", "ultralytics", "timm", "mlflow")) == []


def test_an_image_is_complete_once_each_planned_tile_came_back_once(job_archive):
    """The driver finishes an image when its last tile is in: tiles an earlier run
    finished are not waited for, a tile reported twice (a retried batch) counts once,
    and a failed tile completes the image without being among its done tiles."""
    from engine.data.datasource import ZarrTileDatasource
    from engine.pipeline.job import _ImageProgress

    plan = ZarrTileDatasource(str(job_archive), target_pixel_size_nm=1.0, tolerance=math.inf,
                              halo=16).images()[0]
    keys = [plan.grid.tile_at(r, c).key for r in range(plan.n_rows) for c in range(plan.n_cols)]
    assert len(keys) == 4
    progress = _ImageProgress(plan, [keys[0]])  # finished by an earlier run
    assert progress.add(tuple(keys[1][1:]), True) and not progress.add(tuple(keys[1][1:]), True)
    assert progress.add(tuple(keys[2][1:]), False) and not progress.complete
    assert progress.add(tuple(keys[3][1:]), True) and progress.complete
    assert sorted(progress.done) == sorted(tuple(k[1:]) for k in (keys[0], keys[1], keys[3]))
    assert progress.counts == (2, 1)
    # Ray ran the failed tile's task again and this time it was ledgered: it is done
    assert not progress.add(tuple(keys[2][1:]), True)
    assert sorted(progress.done) == sorted(tuple(k[1:]) for k in keys) and progress.counts == (3, 0)


class TestJobEnsemble:
    def test_tiles_arrive_in_their_stored_dtype_and_placement_passes_through(self, tiny_models):
        """The datasource widens a uint8 image's tiles to a mixed archive's uint16; the
        members' "raw" input scales by the dtype's maximum, so the job narrows them back."""
        from engine.pipeline.job_ensemble import JobEnsemble

        seen = []

        class Spy(JobEnsemble):
            def analyze(self, tiles, *, params=None):
                seen.extend((t.image_id, t.tile.dtype) for t in tiles)
                return super().analyze(tiles, params=params)

        ens = Spy(models=tiny_models, config=CONFIG, dtypes={"a": "uint8"})
        tile = np.random.default_rng(0).integers(0, 255, (2, 48, 48)).astype(np.uint16)
        origin = np.array([[0.0, 0.0], [0.0, 48.0]])
        out = ens({"image_id": np.array(["a", "b"], object), "tile": tile, "pixel_size": np.array([10.0, 10.0]),
                   "origin": origin, "scale": np.ones((2, 2)), "halo": np.zeros((2, 4), np.int32),
                   "y": np.array([0, 0]), "x": np.array([0, 48])})
        assert seen == [("a", np.dtype(np.uint8)), ("b", np.dtype(np.uint16))]
        np.testing.assert_array_equal(out["origin"], origin)
        assert out["halo"].shape == (2, 4) and len(out["image_id"]) == 2

    def test_an_actor_runs_torch_on_its_own_cpus_whatever_omp_num_threads_says(self, ray_session, tiny_models):
        """A shell that exports OMP_NUM_THREADS (Ray then leaves it alone) must not give
        every 1-CPU ensemble actor that many threads."""
        import torch

        from engine.pipeline.job_ensemble import JobEnsemble

        actor = ray_session.remote(num_cpus=1, runtime_env={"env_vars": {"OMP_NUM_THREADS": "3"}})(
            JobEnsemble).remote(models=tiny_models, config=CONFIG)
        env, threads = ray_session.get(actor.__ray_call__.remote(
            lambda self: (__import__("os").environ["OMP_NUM_THREADS"], torch.get_num_threads())))
        assert (env, threads) == ("3", 1)
        ray_session.kill(actor)
        from engine.runtime import use_assigned_cpus

        before = torch.get_num_threads()
        assert use_assigned_cpus() is None and torch.get_num_threads() == before  # a driver is left alone


class TestOutFolder:
    """What --out may hold besides a run's outputs: a user's files there are neither
    deleted nor written over, and --no-resume replaces a run's outputs, only those."""

    # A project folder that was never a run, holding names a run writes.
    PROJECT = {"labels/annotations_v3.json": "hand-drawn masks, 3 weeks of work", "tiles/overview.png": "x",
               "errors/notes.txt": "y", "thesis.tex": "z"}
    REFUSED = (r"holds files that are not a grainflow run's outputs \({}; no job.json of a run\).*"
               r"give an empty or new folder")

    @staticmethod
    def files(root: Path) -> dict[str, str]:
        """relative path -> text of every file under `root`."""
        return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}

    @staticmethod
    def write(root: Path, files: dict[str, str]) -> None:
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)

    @pytest.mark.parametrize("resume", [False, True], ids=["no-resume", "resume"])
    def test_a_folder_that_is_no_run_is_refused_and_left_as_it_was(self, ray_session, job_archive, job_registry,
                                                                     tmp_path, resume):
        """--no-resume would delete the user's labels/, tiles/ and errors/; a resume would
        write its outputs among them: both are refused before any work."""
        out = tmp_path / "proj"
        self.write(out, self.PROJECT)
        with pytest.raises(GrainflowError, match=self.REFUSED.format("errors/, tiles/, labels/")):
            run(job_archive, out, job_registry, labels="out", resume=resume)
        assert self.files(out) == self.PROJECT

    def test_a_job_json_that_is_no_runs_manifest_is_no_run(self, ray_session, job_archive, job_registry, tmp_path):
        out = tmp_path / "proj"
        project = {**self.PROJECT, "job.json": '{"project": "thesis", "due": "2027-03"}'}
        self.write(out, project)
        with pytest.raises(GrainflowError, match=self.REFUSED.format("job.json, errors/, tiles/, labels/")):
            run(job_archive, out, job_registry, labels="out", resume=False)
        assert self.files(out) == project

    def test_the_entrypoint_refuses_it_with_exit_2(self, ray_session, job_archive, job_registry, tmp_path, capsys):
        from jobs.reprocess import main

        out = tmp_path / "proj"
        self.write(out, self.PROJECT)
        code = main(["--archive", str(job_archive), "--out", str(out), "--models", REF, "--tracking-uri",
                     job_registry.tracking_uri, "--concurrency", "1", "--labels", "none", "--no-resume"])
        err = capsys.readouterr().err
        assert code == 2 and f"--out {out} holds files that are not a grainflow run's outputs" in err
        assert self.files(out) == self.PROJECT

    def test_no_resume_replaces_a_runs_outputs_and_keeps_the_users_files(self, ray_session, job_archive,
                                                                          job_registry, tmp_path):
        """A run over two images with its label images under --out; a resume after one
        image left the archive (a resume keeps that image's outputs, and its manifest no
        longer names it); the user's files beside the outputs. --no-resume leaves no file
        of either run, the label image of the image that left included, and every file
        of the user's as it was."""
        archive = copy_archive(job_archive, tmp_path)
        catalog_path = archive / "catalog.parquet"
        catalog = pd.read_parquet(catalog_path).sort_values("image_id").reset_index(drop=True)
        kept, gone = catalog["image_id"][0], catalog["image_id"][1]
        out = tmp_path / "out"
        catalog.iloc[:2].to_parquet(catalog_path)
        run(archive, out, job_registry, labels="out")
        catalog.iloc[:1].to_parquet(catalog_path)
        assert run(archive, out, job_registry, labels="out").tiles_skipped == 4
        assert (out / "labels" / f"{gone}.ome.zarr").is_dir() and (out / DETECTIONS / f"image_id={gone}").is_dir()
        earlier = max(p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file())
        mine = {"notes.txt": "run on the new detector", "labels/mine.json": "my own labels",
                "tiles/overview.png": "x"}
        self.write(out, mine)
        zarr.open_group(str(out / "labels" / "mine.ome.zarr"), mode="w").attrs["by"] = "me"  # no run's mark
        users = self.files(out / "labels" / "mine.ome.zarr")

        result = run(archive, out, job_registry, labels="out", resume=False)
        assert (result.tiles_done, result.tiles_skipped, result.images) == (4, 0, 1)
        assert {name: (out / name).read_text() for name in mine} == mine
        assert self.files(out / "labels" / "mine.ome.zarr") == users
        assert {p.name for p in (out / "labels").iterdir()} == {f"{kept}.ome.zarr", "mine.json", "mine.ome.zarr"}
        for table in (DETECTIONS, OBJECTS):
            assert [p.name for p in (out / table).iterdir()] == [f"image_id={kept}"]
        assert {p.name for p in (out / TILES).iterdir()} == {f"image_id={kept}", "overview.png"}
        assert set(Ledger(out).read()["image_id"].to_pylist()) == {kept}
        outputs = [p for p in out.rglob("*") if p.is_file() and not p.relative_to(out).as_posix().startswith(
            tuple(mine) + ("labels/mine.ome.zarr/",))]
        assert outputs and all(p.stat().st_mtime_ns > earlier for p in outputs)  # every one written by this run

    def test_a_bucket_folder_that_is_no_run_is_refused_and_left_as_it_was(self, ray_session, job_archive,
                                                                            job_registry, s3_bucket):
        import s3fs

        fs, uri = s3fs.S3FileSystem(), f"{s3_bucket}/proj"
        for name, text in self.PROJECT.items():
            fs.pipe_file(f"{uri}/{name}", text.encode())
        with pytest.raises(GrainflowError, match=self.REFUSED.format("errors/, tiles/, labels/")):
            run(job_archive, uri, job_registry, labels="none", resume=False)
        fs.invalidate_cache()
        assert {p[len(uri) - len("s3://") + 1:]: fs.cat_file(p).decode() for p in fs.find(uri)} == self.PROJECT

    def test_a_runs_outputs_in_a_bucket_are_cleared_and_the_users_files_stay(self, clean, job_archive, s3_bucket):
        """The clear --no-resume runs, on a finished run copied into a bucket, with a label
        image under --out written as a run writes it (for an image the manifest names)."""
        import s3fs

        from engine.pipeline.job import _prepare_images
        from engine.pipeline.run_folder import clear_run, read_manifest
        from engine.stores.uri import resolve

        fs, uri = s3fs.S3FileSystem(), f"{s3_bucket}/runs/r1"
        fs.put(str(clean[1]) + "/", f"{uri}/", recursive=True)
        out = resolve(uri)
        (target,), _ = _prepare_images(out, [TestPrepare()._plan(job_archive)], labels="out", label_name="p",
                                       id_stride=8, overwrite=False, fit=False)
        mine = {"notes.txt": "run on the new detector", "labels/mine.json": "my own labels", "tiles/overview.png": "x"}
        for name, text in mine.items():
            fs.pipe_file(f"{uri}/{name}", text.encode())
        fs.invalidate_cache()
        assert fs.exists(target.root.path) and fs.exists(f"{uri}/{SUMMARY_FILE}") and fs.find(f"{uri}/ledger")

        clear_run(out, read_manifest(out))
        fs.invalidate_cache()
        left = {p[len(uri) - len("s3://") + 1:]: p for p in fs.find(uri)}
        assert sorted(left) == sorted([*mine, "job.json"])
        assert {name: fs.cat_file(left[name]).decode() for name in mine} == mine
