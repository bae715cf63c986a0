"""YOLO detector training fed from an archive: tile plans, the Ultralytics dataset, a
short training run (locally and as a Ray task), and whole-image AP evaluation."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.runtime import configure_offline
from engine.stores.image import open_image
from engine.synth.archive import generate_archive
from engine.training.detector import ArchiveLabelError, plan_tiles, split_images
from engine.training.detector.tiles import MIN_VISIBLE, clip_boxes, grid_starts, yolo_format

NAMES = ("pore", "crack", "inclusion", "scratch", "void")
# Ultralytics' ap_per_class integrates a 101-point envelope that ends at recall 1 with
# precision 0, so a flawless detector scores 0.995, as in Ultralytics' own validator.
PERFECT_AP = 0.995
# What a run may leave in its out_dir: our checkpoint and result, Ultralytics' run record.
RUN_FILES = {"detector.safetensors", "detector.safetensors.sha256", "result.json",
             "ultralytics/args.yaml", "ultralytics/results.csv"}


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No hub access; Ultralytics' settings (and anything it might download beside them)
    go to a folder of this test run when Ultralytics was not imported before."""
    configure_offline()
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics-config")))


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Six 256 px images, 128 px chunks: every defect class, several materials."""
    path = tmp_path_factory.mktemp("det-archive") / "archive"
    generate_archive(path, n_images=6, size=256, chunk=128, seed=5)
    return path


@pytest.fixture(scope="module")
def truth(archive) -> pd.DataFrame:
    return pd.read_parquet(archive / "ground_truth.parquet")


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file()}


class TestTilePlan:
    def test_grid_starts_cover_with_whole_tiles(self):
        for length, tile, overlap in [(256, 128, 0), (256, 128, 32), (300, 128, 32), (100, 128, 0), (128, 128, 0)]:
            starts = grid_starts(length, tile, overlap)
            size = min(tile, length)
            assert starts[0] == 0 and starts[-1] + size == max(length, size)
            assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:])), (length, tile, overlap)

    def test_clip_keeps_visible_boxes_in_window_pixels(self):
        boxes = np.array([[10, 10, 20, 20], [120, 0, 140, 10], [127.5, 0, 160, 10]])
        kept, idx = clip_boxes(boxes, (0, 0, 128, 128))
        assert idx.tolist() == [0, 1]  # the third keeps 0.5 px of width
        np.testing.assert_array_equal(kept[1], [120, 0, 128, 10])

    def test_every_defect_is_planned_with_its_class(self, archive, truth):
        tiles = plan_tiles(archive, NAMES, tile=128, overlap=32)
        seen = {}
        for t in tiles:
            for cls, iid in zip(t.classes, t.instance_ids):
                seen[(t.image_id, int(iid))] = NAMES[cls]
        assert seen == {(r.image_id, r.instance_id): r.defect_class for r in truth.itertuples()}
        assert set(truth["defect_class"]) == set(NAMES)  # the archive covers every class

    def test_yolo_labels_lie_in_the_tile_and_match_truth(self, archive, truth):
        tiles = plan_tiles(archive, NAMES, tile=128, overlap=32)
        labelled = 0
        for t in tiles:
            classes, boxes = t.clipped_labels()
            cls, xywh = yolo_format(classes, boxes, t.shape)
            assert cls.shape == (len(boxes), 1) and xywh.shape == (len(boxes), 4)
            lo, hi = xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2
            assert np.all(lo >= -1e-6) and np.all(hi <= 1 + 1e-6)
            rows = truth[truth["image_id"] == t.image_id]
            for c, b in zip(classes, boxes):
                # the truth box that, clipped to this tile, is this label
                gt = rows[["x0", "y0", "x1", "y1"]].to_numpy(float) - [t.x0, t.y0, t.x0, t.y0]
                gt[:, 0::2] = gt[:, 0::2].clip(0, t.shape[1])
                gt[:, 1::2] = gt[:, 1::2].clip(0, t.shape[0])
                match = np.flatnonzero(np.abs(gt - b).max(1) < 1e-4)
                assert len(match) and NAMES[c] in set(rows["defect_class"].iloc[match])
                labelled += 1
        assert labelled >= len(truth)

    def test_mask_fitted_boxes_hold_the_mask_pixels(self, archive):
        tiles = [t for t in plan_tiles(archive, NAMES, tile=128, overlap=32) if t.is_cut]
        assert tiles
        for t in tiles:
            image = open_image(archive / "images" / f"{t.image_id}.ome.zarr")
            mask = image.open_labels("defects").read_region(0, t.y0, t.y1, t.x0, t.x1)
            classes, boxes = t.labels_from_mask(mask)
            h, w = t.shape
            for iid, cls, area in zip(t.instance_ids, t.classes, t.areas):
                ys, xs = np.nonzero(mask == iid)
                hit = [i for i, b in enumerate(boxes) if len(ys) and np.array_equal(
                    b, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])]
                if len(ys) >= max(MIN_VISIBLE * area, 1) and np.ptp(xs) >= 1 and np.ptp(ys) >= 1:
                    assert hit and classes[hit[0]] == cls
            assert np.all((boxes[:, :2] >= 0) & (boxes[:, 2:] <= [w, h]))

    def test_background_is_limited_and_defects_kept(self, archive):
        from engine.training.detector.tiles import limit_background

        tiles = plan_tiles(archive, NAMES, tile=128, overlap=32)
        labelled = [t for t in tiles if not t.is_background]
        kept = limit_background(tiles, 0.5, seed=0)
        assert [t for t in kept if not t.is_background] == labelled
        assert sum(t.is_background for t in kept) == min(round(0.5 * len(labelled)), len(tiles) - len(labelled))
        assert limit_background(tiles, 0.5, seed=0) == kept and limit_background(tiles, None, seed=0) == tiles

    def test_split_is_by_image_and_seeded(self):
        ids = [f"im{i}" for i in range(10)]
        train, val = split_images(ids, 0.3, seed=1)
        assert not set(train) & set(val) and sorted(train + val) == ids and len(val) == 3
        assert split_images(ids, 0.3, seed=1) == (train, val)

    def test_an_archive_without_ground_truth_is_named(self, archive, tmp_path):
        bare = tmp_path / "bare"
        bare.mkdir()
        (bare / "catalog.parquet").write_bytes((archive / "catalog.parquet").read_bytes())
        with pytest.raises(ArchiveLabelError, match=r"bare.*ground_truth\.parquet"):
            plan_tiles(bare, NAMES, tile=128)


@pytest.fixture(scope="module")
def tiles(archive):
    return plan_tiles(archive, NAMES, tile=128, overlap=32)


class TestArchiveTileDataset:
    @pytest.mark.parametrize("augment", [False, True])
    def test_items_are_ultralytics_samples(self, tiles, augment):
        from engine.training.detector.dataset import ArchiveTileDataset

        ds = ArchiveTileDataset(tiles, class_names=NAMES, imgsz=128, augment=augment)
        labelled = [i for i, t in enumerate(tiles) if len(t.classes)][:4]
        batch = ds.collate_fn([ds[i] for i in labelled])
        assert batch["img"].shape == (4, 1, 128, 128) and str(batch["img"].dtype) == "torch.uint8"
        n = len(batch["cls"])
        assert n > 0 or augment  # mosaic and affine may move every box out
        assert batch["cls"].shape == (n, 1) and batch["bboxes"].shape == (n, 4) and batch["batch_idx"].shape == (n,)
        assert set(batch["cls"].flatten().tolist()) <= set(range(len(NAMES)))
        assert set(batch["batch_idx"].tolist()) <= {0.0, 1.0, 2.0, 3.0}
        assert np.all((batch["bboxes"].numpy() >= 0) & (batch["bboxes"].numpy() <= 1))
        assert len(batch["im_file"]) == 4 and {"ori_shape", "resized_shape", "ratio_pad"} <= set(batch)

    def test_pixels_and_boxes_are_the_archive_tile(self, archive, tiles):
        from engine.training.detector.dataset import ArchiveTileDataset
        from engine.training.detector.pixels import to_uint8

        ds = ArchiveTileDataset(tiles, class_names=NAMES, imgsz=128, augment=False)
        for i in [i for i, t in enumerate(tiles) if len(t.classes)][:6]:
            t = ds.tile(i)
            sample = ds[i]
            pixels = open_image(archive / "images" / f"{t.image_id}.ome.zarr").read_region(0, t.y0, t.y1, t.x0, t.x1)
            np.testing.assert_array_equal(sample["img"][0].numpy(), to_uint8(pixels))
            xywh = sample["bboxes"].numpy()
            assert np.all(xywh[:, :2] - xywh[:, 2:] / 2 >= -1e-6) and np.all(xywh[:, :2] + xywh[:, 2:] / 2 <= 1 + 1e-6)
            assert set(sample["cls"].flatten().long().tolist()) <= set(t.classes.tolist())

    def test_reads_leave_no_files(self, archive, tiles, tmp_path, monkeypatch):
        from engine.training.detector.dataset import ArchiveTileDataset

        monkeypatch.chdir(tmp_path)
        before = files_under(archive)
        ds = ArchiveTileDataset(tiles, class_names=NAMES, imgsz=128, augment=True)
        for i in range(len(ds)):
            ds[i]
        assert files_under(archive) == before and files_under(tmp_path) == set()

    def test_pickles_for_spawned_workers(self, tiles):
        """On a GPU the loader's workers are spawned: the dataset crosses by pickle and
        reopens its stores there (its open readers stay behind)."""
        import pickle

        from engine.training.detector.dataset import ArchiveTileDataset

        ds = ArchiveTileDataset(tiles, class_names=NAMES, imgsz=128, augment=False)
        i = next(i for i, t in enumerate(tiles) if t.is_cut)
        a = ds[i]
        b = pickle.loads(pickle.dumps(ds))[i]
        assert np.array_equal(a["img"].numpy(), b["img"].numpy())
        assert np.array_equal(a["bboxes"].numpy(), b["bboxes"].numpy()) and np.array_equal(a["cls"], b["cls"])

    def test_vertical_mirrors_only_where_the_material_allows(self, tiles):
        """flipud=1, no other transform: a tile of a material with no up comes mirrored
        top to bottom, boxes too; an AM alloy's never (its build direction stays up)."""
        import dataclasses

        from ultralytics.cfg import get_cfg

        from engine.training.detector.dataset import ArchiveTileDataset

        labelled = [t for t in tiles if len(t.classes)][:4]
        mixed = [dataclasses.replace(t, material=m) for t, m in
                 zip(labelled, ("ferritic_steel", "am_alloy", "porous_ceramic", "am_alloy"))]
        still = {"flipud": 1.0, "fliplr": 0.0, "mosaic": 0.0, "mixup": 0.0, "cutmix": 0.0, "degrees": 0.0,
                 "translate": 0.0, "scale": 0.0, "shear": 0.0, "perspective": 0.0, "hsv_h": 0.0, "hsv_s": 0.0,
                 "hsv_v": 0.0}
        plain = ArchiveTileDataset(mixed, class_names=NAMES, imgsz=128, augment=False)
        flipped = ArchiveTileDataset(mixed, class_names=NAMES, imgsz=128, augment=True, hyp=get_cfg(overrides=still))
        # Ultralytics rebuilds the transforms from the trainer's settings when it turns
        # mosaic off for the last epochs (for all of a run of <= 10 epochs)
        flipped.close_mosaic(get_cfg(overrides=still))
        for i, t in enumerate(mixed):
            a, b = plain[i], flipped[i]
            mirror = t.material != "am_alloy"
            want = a["img"].flip(1) if mirror else a["img"]
            assert np.array_equal(b["img"].numpy(), want.numpy()), t.material
            boxes = a["bboxes"].numpy().copy()
            if mirror:
                boxes[:, 1] = 1 - boxes[:, 1]
            np.testing.assert_allclose(np.sort(b["bboxes"].numpy(), axis=0), np.sort(boxes, axis=0), atol=1e-5)

    def test_disk_cache_is_refused(self, tiles):
        from engine.training.detector.dataset import ArchiveTileDataset

        with pytest.raises(ValueError, match="disk"):
            ArchiveTileDataset(tiles, class_names=NAMES, imgsz=128, augment=True, cache="disk")


class NetworkGuard:
    """Refuses and records every attempt to resolve a remote host or open an IP connection."""

    def __init__(self, monkeypatch):
        self.attempts: list[str] = []
        real_getaddrinfo = socket.getaddrinfo

        def getaddrinfo(host, *args, **kwargs):
            if host not in (None, "localhost", "127.0.0.1", "::1"):
                self.attempts.append(f"resolve {host}")
                raise OSError(f"network disabled in tests: {host}")
            return real_getaddrinfo(host, *args, **kwargs)

        def connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                self.attempts.append(f"connect {address}")
                raise OSError(f"network disabled in tests: {address}")
            return real_connect(sock, address)

        real_connect = socket.socket.connect
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(scope="module")
def trained(archive, tmp_path_factory):
    """One 2-epoch CPU run of yolov8n_tiny, with the network refused and recorded,
    in a fresh working directory, registered in a SQLite registry."""
    from engine.registry import ModelRegistry
    from engine.registry.backend import sqlite_uri
    from engine.training.detector import train_detector

    root = tmp_path_factory.mktemp("det-run")
    cwd, out = root / "cwd", root / "out"
    cwd.mkdir()
    archive_before = files_under(archive)
    config_dir = _ultralytics_config_dir()
    config_before = files_under(config_dir) if config_dir.is_dir() else set()
    registry = ModelRegistry(sqlite_uri(root / "registry" / "mlflow.db"))
    with pytest.MonkeyPatch.context() as mp:
        guard = NetworkGuard(mp)
        mp.chdir(cwd)
        result = train_detector(archive, out_dir=out, model="yolov8n_tiny", epochs=2, imgsz=128, batch=8,
                                val_fraction=0.34, seed=0, register_as="defect-detector", registry=registry)
    return {
        "result": result, "out": out, "cwd": cwd, "attempts": guard.attempts, "registry": registry,
        "archive_unchanged": files_under(archive) == archive_before,
        "config_new": (files_under(config_dir) if config_dir.is_dir() else set()) - config_before,
    }


def _ultralytics_config_dir() -> Path:
    from ultralytics.utils import USER_CONFIG_DIR

    return Path(USER_CONFIG_DIR)


class TestTrainDetector:
    def test_metrics_are_finite(self, trained):
        r = trained["result"]
        for value in (r.metrics["mAP50"], r.metrics["mAP50-95"], r.tile_metrics["mAP50"]):
            assert math.isfinite(value) and 0 <= value <= 1
        assert set(r.metrics["per_class_AP50"]) <= set(NAMES) and r.metrics["per_class_AP50"]
        assert all(math.isfinite(v) for v in r.metrics["per_material_mAP50"].values())
        assert len(r.history) == 2 and all(math.isfinite(v) for row in r.history for v in row.values())
        assert not set(r.train_images) & set(r.val_images) and len(r.val_images) == 2

    def test_nbs_defaults_to_the_batch(self, trained):
        """So that every batch is an optimizer step: Ultralytics would accumulate a small
        archive's batches to 64 images a step (one step an epoch)."""
        import yaml

        args = yaml.safe_load((trained["out"] / "ultralytics" / "args.yaml").read_text())
        assert args["nbs"] == args["batch"] == trained["result"].batch == 8

    def test_checkpoint_reloads_through_engine_models_and_predicts(self, trained):
        import engine.models as M

        r = trained["result"]
        detector = M.load_model(r.checkpoint, expected_sha256=r.sha256)
        assert type(detector).__name__ == "Detector" and detector.names == NAMES
        again = M.load_detector_checkpoint(r.checkpoint, r.sha256)
        out = again.predict(np.random.default_rng(0).integers(0, 65535, (2, 128, 128), dtype=np.uint16),
                            conf=0.0, max_det=10)
        assert len(out) == 2 and all(len(d.scores) <= 10 for d in out)

    def test_registered_version_fetches_bit_for_bit(self, trained, tmp_path):
        r = trained["result"]
        assert r.registered == "defect-detector/1"
        files = trained["registry"].fetch("defect-detector/1", tmp_path)
        assert files["detector.safetensors"].read_bytes() == Path(r.checkpoint).read_bytes()

    def test_no_dataset_copy_no_downloads_no_network(self, trained):
        assert files_under(trained["out"]) == RUN_FILES
        assert files_under(trained["cwd"]) == set()
        assert trained["archive_unchanged"]
        assert not {f for f in trained["config_new"] if f.endswith((".pt", ".ttf", ".ttc", ".zip"))}
        assert trained["attempts"] == []

    def test_bad_arguments_are_refused(self, archive, tmp_path):
        from engine.training.detector import train_detector

        with pytest.raises(ValueError, match="multiple of 32"):
            train_detector(archive, out_dir=tmp_path, imgsz=100, epochs=1)
        with pytest.raises(ValueError, match="not both"):
            train_detector(archive, out_dir=tmp_path, epochs=1, val_fraction=0.2, val_archive=archive)


class PerfectDetector:
    """Returns, for a tile, every ground-truth box of its image that meets it (whole, in
    tile pixels), score 1; finds where a tile lies by matching its pixels in the image."""

    def __init__(self, archive: Path, truth: pd.DataFrame, wrong_class: str | None = None):
        self.names = NAMES
        self.images = {i: open_image(archive / "images" / f"{i}.ome.zarr").read_level(0) for i in truth["image_id"]}
        self.truth = truth
        self.wrong_class = wrong_class

    def _locate(self, tile):
        th, tw = tile.shape
        for image_id, image in self.images.items():
            if image.dtype != tile.dtype or image.shape[0] < th or image.shape[1] < tw:
                continue
            rows = np.lib.stride_tricks.sliding_window_view(image, tw, axis=1)  # h, w - tw + 1, tw
            for y, x in zip(*np.nonzero((rows == tile[0]).all(-1))):
                if y + th <= image.shape[0] and np.array_equal(image[y:y + th, x:x + tw], tile):
                    return image_id, int(y), int(x)
        raise AssertionError("tile not found in any image")

    def predict(self, tiles, *, conf, iou, max_det):
        from engine.models.detector import Detections

        out = []
        for tile in tiles:
            image_id, y, x = self._locate(tile)
            th, tw = tile.shape
            rows = self.truth[(self.truth["image_id"] == image_id) & (self.truth["x0"] < x + tw) &
                              (self.truth["x1"] > x) & (self.truth["y0"] < y + th) & (self.truth["y1"] > y)]
            boxes = rows[["x0", "y0", "x1", "y1"]].to_numpy(np.float32) - np.float32([x, y, x, y])
            names = [self.wrong_class or c if c == "pore" else c for c in rows["defect_class"]]
            classes = np.array([NAMES.index(c) for c in names], np.int64)
            out.append(Detections(boxes.reshape(-1, 4), np.ones(len(rows), np.float32), classes))
        return out


class TestEvaluateDetector:
    @pytest.mark.parametrize("tile, halo", [(1024, 128), (128, 32)])
    def test_ground_truth_as_predictions_scores_one(self, archive, truth, tile, halo):
        from engine.training.detector import evaluate_detector

        ev = evaluate_detector(PerfectDetector(archive, truth), archive, tile=tile, halo=halo)
        assert ev.map50 == pytest.approx(PERFECT_AP) and ev.map50_95 == pytest.approx(PERFECT_AP)
        assert set(ev.per_class_ap50) == set(NAMES)
        assert set(ev.per_material_map50) == set(pd.read_parquet(archive / "catalog.parquet")
                                                 .set_index("image_id").loc[truth["image_id"].unique(), "material"])
        assert all(v == pytest.approx(PERFECT_AP) for v in ev.per_material_map50.values())
        assert ev.predictions == len(truth) and sum(ev.targets.values()) == len(truth)

    def test_a_wrong_class_scores_zero_for_that_class(self, archive, truth):
        from engine.training.detector import evaluate_detector

        ev = evaluate_detector(PerfectDetector(archive, truth, wrong_class="void"), archive)
        assert ev.per_class_ap50["pore"] == 0.0
        assert ev.per_class_ap50["crack"] == pytest.approx(PERFECT_AP)


def test_train_as_ray_task_from_a_trained_checkpoint(ray_session, archive, trained, tmp_path):
    """Fine-tuning the registered detector: the task starts from the caller's file (its
    bytes travel with the task) and, at a learning rate of ~0, ends where it started."""
    import torch

    import engine.models as M
    from engine.models.checkpoint import read_metadata
    from engine.training.detector import train_detector_on_ray

    start = trained["result"]
    result = train_detector_on_ray(archive, out_dir=tmp_path / "out", num_cpus=1, model="yolov8n_tiny", epochs=1,
                                   imgsz=128, batch=8, val_fraction=0.34, seed=0, init_weights=start.checkpoint,
                                   hyperparameters={"lr0": 1e-9, "optimizer": "SGD", "warmup_epochs": 0})
    assert Path(result.checkpoint).parent == tmp_path / "out" and result.checkpoint_bytes is None
    assert result.device == "cpu"  # no GPU in this cluster, so the task asked for none
    assert files_under(tmp_path / "out") == {"detector.safetensors", "detector.safetensors.sha256", "result.json"}
    assert (result.init["file"], result.init["sha256"], result.init["fraction"]) == (start.checkpoint, start.sha256, 1.0)
    assert read_metadata(result.checkpoint)["init_sha256"] == start.sha256
    detector = M.load_model(result.checkpoint, expected_sha256=result.sha256)
    assert len(detector.predict(np.zeros((1, 128, 128), np.float32), conf=0.0, max_det=3)) == 1
    assert math.isfinite(result.metrics["mAP50"])
    given = M.load_model(start.checkpoint, expected_sha256=start.sha256).model.state_dict()
    for key, value in detector.model.state_dict().items():
        if key.endswith("conv.weight"):
            torch.testing.assert_close(value, given[key], atol=1e-6, rtol=0, msg=key)


def test_the_trainer_keeps_the_callers_torch_threads(archive, tmp_path):
    """Ultralytics sets torch to min(8, cores - 1) threads when it picks the CPU: one core
    of two idle here, and more threads than a Ray task was granted on a large node. The
    trainer keeps the caller's count (or the one it is given)."""
    import torch

    from engine.models import create_detector
    from engine.training.detector.trainer import ArchiveDetectionTrainer

    detector = create_detector("yolov8n_tiny")
    tiles = plan_tiles(archive, detector.names, tile=128)
    ultralytics_pick = min(8, max(1, (os.cpu_count() or 1) - 1))
    callers = 2 if ultralytics_pick != 2 else 3
    before = torch.get_num_threads()
    try:
        for threads, expected in ((None, callers), (1, 1)):
            torch.set_num_threads(callers)
            ArchiveDetectionTrainer(detector, {"train": tiles[:4], "val": tiles[4:6]},
                                    {"model": "grainflow-detector-yolov8n_tiny", "task": "detect", "mode": "train",
                                     "device": "cpu", "imgsz": 128, "epochs": 1, "plots": False,
                                     "project": str(tmp_path), "name": "run"},
                                    threads=threads)
            assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)
