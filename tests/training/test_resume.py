"""What `train` settles before Ray starts: the checkpoint a restarted run resumes from
(the one Ray Train's snapshot names) and whether the tracking server answers.

The run folders are built by hand, as Ray Train 2.60 leaves them in storage
(`<storage>/<run>/epoch_NNNN/` and `checkpoint_manager_snapshot.json`); no Ray starts.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from engine.models import create_model
from engine.stores.uri import resolve
from engine.training.checkpointing import (
    MODEL_FILE, RAY_SNAPSHOT_FILE, STATE_FILE, TrainingState, latest_checkpoint, save_training_state,
)
from engine.training.trainer import TrainingError, check_resume


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """One classifier checkpoint folder, copied into runs by `epoch`."""
    folder = tmp_path_factory.mktemp("saved") / "epoch"
    model = create_model("classifier", "resnet10t")
    save_training_state(folder, model, torch.optim.AdamW(model.parameters()),
                        TrainingState("classifier", "resnet10t", epoch=1))
    return folder


def epoch(run: Path, number: int, saved: Path) -> Path:
    """`run/epoch_NNNN`, a complete checkpoint whose state says epoch `number`."""
    folder = run / f"epoch_{number:04d}"
    shutil.copytree(saved, folder)
    state = json.loads((folder / STATE_FILE).read_text())
    (folder / STATE_FILE).write_text(json.dumps({**state, "epoch": number}))
    return folder


def ray_snapshot(run: Path, reported: list[str], latest: str | None) -> None:
    """Ray Train's checkpoint_manager_snapshot.json (the fields of Ray 2.60's, metrics cut)."""
    result = [{"version": 0, "checkpoint_dir_name": name, "metrics": {"epoch": i + 1}}
              for i, name in enumerate(reported)]
    (run / RAY_SNAPSHOT_FILE).write_text(json.dumps({
        "ray_version": "2.60.0", "checkpoint_results": result, "checkpoint_report_indices": list(range(len(reported))),
        "latest_checkpoint_result": next((r for r in result if r["checkpoint_dir_name"] == latest), None),
        "pending_training_results": [], "pending_validation_specs": [], "current_report_index": len(reported),
        "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }))


class TestResumeCheckpoint:
    def test_a_newer_folder_cut_off_while_copied_is_not_what_ray_resumes(self, saved, tmp_path):
        """Epoch 3's copy was cut off after its state.json (an empty model file): Ray's
        snapshot never recorded it, and Ray resumes from epoch 2. So does the check."""
        run = tmp_path / "storage" / "myrun"
        for n in (1, 2):
            epoch(run, n, saved)
        ray_snapshot(run, ["epoch_0001", "epoch_0002"], latest="epoch_0002")
        cut = epoch(run, 3, saved)
        (cut / MODEL_FILE).write_bytes(b"")
        (cut / (MODEL_FILE + ".sha256")).unlink()

        assert latest_checkpoint(resolve(run)).name == "epoch_0002"
        check_resume(tmp_path / "storage", "myrun", "classifier", "resnet10t", {})  # resumes: no error
        with pytest.raises(TrainingError, match=r"holds a classifier:resnet10t checkpoint \(epoch_0002\)"):
            check_resume(tmp_path / "storage", "myrun", "fusion", "fusion_tiny", {})

    def test_a_snapshot_that_names_no_checkpoint_starts_afresh(self, saved, tmp_path):
        run = tmp_path / "myrun"
        epoch(run, 1, saved)
        ray_snapshot(run, [], latest=None)
        assert latest_checkpoint(resolve(run)) is None
        check_resume(tmp_path, "myrun", "fusion", "fusion_tiny", {})  # nothing is resumed: any model

    def test_without_a_snapshot_damaged_folders_are_passed_over_with_a_warning(self, saved, tmp_path, caplog):
        run = tmp_path / "myrun"
        for n in (1, 2):
            epoch(run, n, saved)
        cut = epoch(run, 3, saved)  # copy cut off: half the model file, its sidecar intact
        data = (cut / MODEL_FILE).read_bytes()
        (cut / MODEL_FILE).write_bytes(data[: len(data) // 2])
        (epoch(run, 4, saved) / (MODEL_FILE + ".sha256")).unlink()  # no sidecar yet

        with caplog.at_level(logging.WARNING, logger="engine.training.checkpointing"):
            assert latest_checkpoint(resolve(run)).name == "epoch_0002"
        warned = caplog.text
        assert "epoch_0004: passed over" in warned and f"no {MODEL_FILE}.sha256" in warned
        assert "epoch_0003: passed over" in warned and "does not match its sha256 sidecar" in warned
        check_resume(tmp_path, "myrun", "classifier", "resnet10t", {})

    def test_an_unreadable_snapshot_falls_back_to_the_folders(self, saved, tmp_path, caplog):
        run = tmp_path / "myrun"
        for n in (1, 2):
            epoch(run, n, saved)
        (run / RAY_SNAPSHOT_FILE).write_text('{"ray_version": "2.6')
        with caplog.at_level(logging.WARNING, logger="engine.training.checkpointing"):
            assert latest_checkpoint(resolve(run)).name == "epoch_0002"
        assert f"{RAY_SNAPSHOT_FILE}: unreadable" in caplog.text


class TestTrackingServer:
    def test_a_server_that_is_down_is_refused_before_ray_starts(self, monkeypatch, train_archive, tmp_path):
        """MLflow's client would retry for about four minutes while a started Ray waited."""
        import socket
        import time

        import engine.training.trainer as trainer
        from engine.registry import RegistryError
        from engine.training import train

        class RayStarted(Exception):
            pass

        def ensure_ray(num_workers):
            raise RayStarted("the tracking server was not checked before Ray")

        monkeypatch.setattr(trainer, "ensure_ray", ensure_ray)
        for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
            monkeypatch.setenv(key, "-")  # recorded, so what the registry sets is undone after
            monkeypatch.delenv(key)
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(RegistryError, match=f"MLflow tracking server {url} is not reachable"):
            train("classifier", "resnet10t", str(train_archive), storage_path=tmp_path / "runs", epochs=1,
                  tracking_uri=url)
        assert time.monotonic() - start < 15
