"""Training checkpoints: model, optimizer and progress round-trip; nothing executes on load."""

from __future__ import annotations

import pytest
import torch

from engine.models import ChecksumMismatchError, UnsafeCheckpointError, create_model
from engine.training.checkpointing import (
    MODEL_FILE, OPTIMIZER_FILE, TrainingState, load_training_state, save_training_state,
)


def trained(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("classifier", "resnet10t")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(torch.rand(2, 1, 64, 64))
    (out["material"].sum() + out["grade"].sum()).backward()
    opt.step()
    return model, opt


class TestTrainingCheckpoint:
    def test_round_trip(self, tmp_path):
        model, opt = trained()
        state = TrainingState("classifier", "resnet10t", epoch=2, history=[{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}])
        digest = save_training_state(tmp_path, model, opt, state)
        assert (tmp_path / (MODEL_FILE + ".sha256")).read_text().startswith(digest)

        fresh, fresh_opt = trained(seed=1)
        got = load_training_state(tmp_path, fresh, fresh_opt)
        assert got == state
        for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
            assert torch.equal(a, b), name
        saved, loaded = opt.state_dict(), fresh_opt.state_dict()
        assert saved["param_groups"] == loaded["param_groups"]
        for k, v in saved["state"].items():
            assert torch.equal(v["exp_avg"], loaded["state"][k]["exp_avg"])

    def test_changed_model_file_is_refused(self, tmp_path):
        model, opt = trained()
        save_training_state(tmp_path, model, opt, TrainingState("classifier", "resnet10t", epoch=1))
        data = bytearray((tmp_path / MODEL_FILE).read_bytes())
        data[-1] ^= 0xFF
        (tmp_path / MODEL_FILE).write_bytes(bytes(data))
        with pytest.raises(ChecksumMismatchError):
            load_training_state(tmp_path, trained()[0])

    def test_optimizer_file_is_read_weights_only(self, tmp_path):
        class Payload:
            def __reduce__(self):
                return (print, ("pwned",))

        model, opt = trained()
        save_training_state(tmp_path, model, opt, TrainingState("classifier", "resnet10t", epoch=1))
        torch.save({"state": {}, "param_groups": [], "x": Payload()}, tmp_path / OPTIMIZER_FILE)
        with pytest.raises(UnsafeCheckpointError, match=f"{OPTIMIZER_FILE}: refused"):
            load_training_state(tmp_path, model, opt)

    def test_a_cut_off_optimizer_file_is_damaged_not_unsafe(self, tmp_path):
        from engine.models import CheckpointError

        model, opt = trained()
        save_training_state(tmp_path, model, opt, TrainingState("classifier", "resnet10t", epoch=1))
        data = (tmp_path / OPTIMIZER_FILE).read_bytes()
        (tmp_path / OPTIMIZER_FILE).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=f"{OPTIMIZER_FILE}: damaged or truncated") as info:
            load_training_state(tmp_path, model, opt)
        assert not isinstance(info.value, UnsafeCheckpointError)

    def test_resumes_only_into_the_config_it_was_written_by(self, tmp_path):
        """A checkpoint loaded into a model built with other arguments would train a model
        its config misdescribes (another class order) or fail on the weights' shapes:
        every differing key is named instead, and nothing is loaded."""
        from engine.models import CheckpointError, labels

        model, opt = trained()
        save_training_state(tmp_path, model, opt, TrainingState("classifier", "resnet10t", epoch=1))
        reversed_materials = create_model("classifier", "resnet10t", materials=list(reversed(labels.material_names())))
        before = {k: v.clone() for k, v in reversed_materials.state_dict().items()}
        with pytest.raises(CheckpointError, match=r"another model config.*args\.materials: \['ferritic_steel'"):
            load_training_state(tmp_path, reversed_materials)
        assert all(torch.equal(v, reversed_materials.state_dict()[k]) for k, v in before.items())
        with pytest.raises(CheckpointError, match=r"family: 'classifier' in the checkpoint, 'fusion' now; "
                                                  r"name: 'resnet10t' in the checkpoint, 'fusion_tiny' now"):
            load_training_state(tmp_path, create_model("fusion", "fusion_tiny"))
        assert load_training_state(tmp_path, create_model("classifier", "resnet10t")).epoch == 1


class TestStoredCheckpoint:
    """What train() reads of a run's storage before Ray starts (trainer.check_resume)."""

    def test_latest_epoch_state_and_config_without_the_weights(self, tmp_path):
        from engine.stores.uri import resolve
        from engine.training.checkpointing import latest_checkpoint, read_stored_checkpoint

        model, opt = trained()
        for epoch in (2, 10):
            save_training_state(tmp_path / "r1" / f"epoch_{epoch:04d}", model, opt,
                                TrainingState("classifier", "resnet10t", epoch=epoch))
        (tmp_path / "r1" / "epoch_0011").mkdir()  # a checkpoint being written: no state.json yet
        latest = latest_checkpoint(resolve(tmp_path / "r1"))
        assert latest.name == "epoch_0010"  # by number
        state, config = read_stored_checkpoint(latest)
        assert (state.family, state.model, state.epoch) == ("classifier", "resnet10t", 10)
        assert config == model.config
        assert latest_checkpoint(resolve(tmp_path / "r2")) is None

    def test_in_a_bucket(self, s3_bucket, tmp_path):
        from engine.stores.uri import resolve
        from engine.training.checkpointing import latest_checkpoint, read_stored_checkpoint

        model, opt = trained()
        save_training_state(tmp_path / "epoch_0001", model, opt, TrainingState("classifier", "resnet10t", epoch=1))
        run = resolve(f"{s3_bucket}/runs/r1")
        run.filesystem().put(str(tmp_path / "epoch_0001"), run.join("epoch_0001").path, recursive=True)
        state, config = read_stored_checkpoint(latest_checkpoint(run))
        assert state.epoch == 1 and config.name == "resnet10t"
        assert latest_checkpoint(resolve(f"{s3_bucket}/runs/other")) is None
