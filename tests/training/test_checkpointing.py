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
