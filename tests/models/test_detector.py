"""YOLO detector: batched prediction on tiles; Ultralytics .pt import behind a sha256."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import engine.models as M
from engine.models.detector import Detections, build_yolo

from .payloads import CreatesFile, write_payload_checkpoint


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return M.create_detector("yolov8n_tiny")


def assert_well_formed(dets: Detections, h: int, w: int, n_classes: int = 5):
    n = len(dets.scores)
    assert dets.boxes.shape == (n, 4) and dets.boxes.dtype == np.float32
    assert dets.scores.shape == (n,) and dets.scores.dtype == np.float32
    assert dets.classes.shape == (n,) and dets.classes.dtype == np.int64
    assert np.all((dets.scores >= 0) & (dets.scores <= 1))
    assert np.all(np.diff(dets.scores) <= 0), "not sorted by score"
    assert np.all((dets.classes >= 0) & (dets.classes < n_classes))
    b = dets.boxes
    assert np.all((b[:, 0] >= 0) & (b[:, 2] <= w) & (b[:, 1] >= 0) & (b[:, 3] <= h))
    assert np.all((b[:, 0] <= b[:, 2]) & (b[:, 1] <= b[:, 3]))


class TestPredict:
    @pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.uint16])
    def test_batch_of_tiles(self, detector, dtype):
        rng = np.random.default_rng(0)
        tiles = rng.random((3, 128, 128), dtype=np.float32)
        if dtype != np.float32:
            tiles = (tiles * np.iinfo(dtype).max).astype(dtype)
        # conf=0: a random-init model scores low; keep every candidate to check the format.
        out = detector.predict(tiles, conf=0.0, max_det=50)
        assert len(out) == 3
        for dets in out:
            assert isinstance(dets, Detections)
            assert 0 < len(dets.scores) <= 50
            assert_well_formed(dets, 128, 128)

    def test_any_tile_size_keeps_tile_pixels(self, detector):
        out = detector.predict(np.random.default_rng(1).random((2, 100, 130), dtype=np.float32), conf=0.0)
        for dets in out:
            assert_well_formed(dets, 100, 130)

    def test_identical_tiles_give_identical_detections(self, detector):
        tile = np.random.default_rng(2).random((128, 128), dtype=np.float32)
        a, b = detector.predict(np.stack([tile, tile]), conf=0.0)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.classes, b.classes)

    def test_high_threshold_gives_empty_arrays(self, detector):
        (everything,) = detector.predict(np.zeros((1, 64, 64), np.float32), conf=0.0)
        assert len(everything.scores) > 0 and everything.scores.max() < 0.999
        (dets,) = detector.predict(np.zeros((1, 64, 64), np.float32), conf=0.999)
        assert len(dets.scores) == 0
        assert_well_formed(dets, 64, 64)

    def test_conf_keeps_exactly_the_detections_scoring_above_it(self, detector):
        tile = np.random.default_rng(3).random((1, 128, 128), dtype=np.float32)
        (everything,) = detector.predict(tile, conf=0.0, max_det=1000)
        levels = np.unique(everything.scores)
        assert len(levels) >= 3
        # halfway between two scores the model gives, so no score sits on the threshold
        c = float(levels[len(levels) // 2 - 1] + levels[len(levels) // 2]) / 2
        (dets,) = detector.predict(tile, conf=c, max_det=1000)
        above = everything.scores > c
        assert 0 < len(dets.scores) == above.sum() < len(everything.scores)
        assert np.all(dets.scores >= c)
        # NMS lets a box be suppressed only by a higher-scoring one, so the survivors are the same boxes
        np.testing.assert_array_equal(dets.boxes, everything.boxes[above])
        np.testing.assert_array_equal(dets.classes, everything.classes[above])

    def test_iou_is_the_nms_overlap_limit(self, detector):
        """A lower iou suppresses more boxes. (The overlap of the returned boxes is not
        checked against iou: NMS runs before boxes are clamped to the tile, as in
        Ultralytics, and clamping can raise the overlap of boxes that reach past an edge.)"""
        tile = np.random.default_rng(3).random((1, 128, 128), dtype=np.float32)
        counts = [len(detector.predict(tile, conf=0.0, iou=iou, max_det=1000)[0].scores) for iou in (0.1, 0.7, 1.0)]
        assert 0 < counts[0] < counts[1] < counts[2], counts

    def test_keeps_training_mode(self, detector):
        detector.train()
        detector.predict(np.zeros((1, 64, 64), np.float32))
        assert detector.training

    def test_a_single_tile_without_batch_axis_is_refused(self, detector):
        with pytest.raises(ValueError, match="B x H x W"):
            detector.predict(np.zeros((64, 64), np.float32))

    def test_rgb_model_takes_grey_tiles(self):
        model = build_yolo("yolov8", "n", list(M.defect_class_names()), channels=3)
        assert model.in_channels == 3
        (dets,) = model.predict(np.zeros((1, 64, 64), np.float32), conf=0.0, max_det=5)
        assert_well_formed(dets, 64, 64)


def ultralytics_pt(detector, path, **extra):
    """What Ultralytics writes: a pickle of the (half precision) model object."""
    torch.save({"model": copy.deepcopy(detector.model).half(), "ema": None, "train_args": {"imgsz": 128}, **extra}, path)
    return M.sha256_file(path)


class TestUltralyticsCheckpoint:
    def test_loads_after_its_digest_matches(self, detector, tmp_path):
        path = tmp_path / "best.pt"
        digest = ultralytics_pt(detector, path)
        loaded = M.load_detector_checkpoint(path, digest)
        assert loaded.names == detector.names
        assert loaded.config.input_size == 128
        want = {k: v.half().float() for k, v in detector.model.state_dict().items()}
        for key, value in loaded.model.state_dict().items():
            assert torch.equal(value, want[key].to(value.dtype)), key
        out = loaded.predict(np.zeros((2, 64, 64), np.float32), conf=0.0, max_det=5)
        assert len(out) == 2

    def test_imported_detector_saves_as_safetensors(self, detector, tmp_path):
        digest = ultralytics_pt(detector, tmp_path / "best.pt")
        loaded = M.load_detector_checkpoint(tmp_path / "best.pt", digest)
        sdigest = M.save_checkpoint(loaded, tmp_path / "best.safetensors")
        again = M.load_detector_checkpoint(tmp_path / "best.safetensors", sdigest)
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, again.state_dict()[key]), key

    def test_wrong_digest_is_refused_before_unpickling(self, tmp_path):
        marker = tmp_path / "pwned"
        path = write_payload_checkpoint(tmp_path / "best.pt", marker)
        with pytest.raises(M.ChecksumMismatchError, match="best.pt"):
            M.load_detector_checkpoint(path, "f" * 64)
        assert not marker.exists()

    def test_a_digest_is_required(self, detector, tmp_path):
        ultralytics_pt(detector, tmp_path / "best.pt")
        with pytest.raises(M.CheckpointError, match="64 hex digits"):
            M.load_detector_checkpoint(tmp_path / "best.pt", None)

    def test_a_registered_pt_that_carries_code_is_refused(self, detector, tmp_path):
        """The digest says the file is the one registered, not that it is safe: a .pt
        whose pickle calls anything but a model's classes never runs, digest or not."""
        marker = tmp_path / "pwned"
        path = tmp_path / "best.pt"
        digest = ultralytics_pt(detector, path, train_args={"imgsz": 128, "note": CreatesFile(marker)})
        with pytest.raises(M.UnsafeCheckpointError, match="best.pt.*open"):
            M.load_detector_checkpoint(path, digest)
        assert not marker.exists()

    def test_a_model_class_called_with_the_files_arguments_runs_nothing(self, detector, tmp_path):
        """A model class can be a gadget: AutoBackend(path) unpickles `path` in full. The
        file's classes are never called: stand-ins take their place."""
        from ultralytics.nn.autobackend import AutoBackend

        marker = tmp_path / "pwned"
        stage2 = write_payload_checkpoint(tmp_path / "stage2.pt", marker)

        class CallsAutoBackend:
            def __reduce__(self):
                return (AutoBackend, (str(stage2),))

        path = tmp_path / "best.pt"
        digest = ultralytics_pt(detector, path, train_args={"imgsz": 128, "gadget": CallsAutoBackend()})
        loaded = M.load_detector_checkpoint(path, digest)
        assert not marker.exists() and loaded.names == detector.names

    def test_a_pt_holding_a_real_ultralytics_model_loads(self, tmp_path):
        """What `YOLO(...).save()` writes (Ultralytics' own classes, half precision) loads
        through the allowlist."""
        from ultralytics import YOLO

        path = tmp_path / "y8.pt"
        YOLO("yolov8n.yaml").save(path)
        loaded = M.load_detector_checkpoint(path, M.sha256_file(path))
        assert len(loaded.predict(np.zeros((1, 64, 64), np.float32), conf=0.0, max_det=3)) == 1

    def test_not_a_detector(self, tmp_path):
        path = tmp_path / "other.pt"
        torch.save({"model": torch.nn.Linear(2, 2)}, path)
        with pytest.raises(M.CheckpointError, match="not an Ultralytics detection checkpoint"):
            M.load_detector_checkpoint(path, M.sha256_file(path))


class TestUltralyticsLoss:
    def test_ultralytics_loss_trains_the_one_channel_model(self):
        # What Ultralytics' trainer does with our model: its args, then model.loss(batch).
        from ultralytics.cfg import get_cfg

        det = M.create_detector("yolov8n_tiny")
        det.model.args = get_cfg()
        det.train()
        batch = {  # boxes: normalised xywh, one image with one defect, one with two
            "img": torch.rand(2, 1, 128, 128),
            "batch_idx": torch.tensor([0.0, 1.0, 1.0]),
            "cls": torch.tensor([[0.0], [3.0], [4.0]]),
            "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.4], [0.7, 0.6, 0.2, 0.1]]),
        }
        loss, items = det.model.loss(batch)
        assert torch.isfinite(loss).all() and loss.sum() > 0
        loss.sum().backward()
        assert all(p.grad is not None for p in det.parameters() if p.requires_grad)
