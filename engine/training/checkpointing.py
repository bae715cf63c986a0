"""A training checkpoint: one directory, written by rank 0 after every epoch.

    model.safetensors         the model (engine.models.checkpoint.save_checkpoint: weights
                              and config; rebuilds with load_model)
    model.safetensors.sha256  its digest, checked when the checkpoint is read back
    optimizer.pt              the optimizer's state dict: tensors, numbers and lists only,
                              read with torch.load(weights_only=True)
    state.json                {"epoch": epochs completed, "history": [per-epoch metrics],
                              "family", "model"}

Nothing in it runs code when loaded. Ray Train copies the directory to the run's storage
(local or S3) and hands it back through `ray.train.get_checkpoint()` after a restart.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.models.checkpoint import load_into, load_state_dict, save_checkpoint
from engine.models.errors import UnsafeCheckpointError

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


@dataclass
class TrainingState:
    """Where a run stands: `epoch` epochs are done; `history[i]` holds epoch i's metrics."""

    family: str
    model: str
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"family": self.family, "model": self.model, "epoch": self.epoch,
                           "history": self.history}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainingState:
        d = json.loads(text)
        return cls(family=d["family"], model=d["model"], epoch=int(d["epoch"]), history=list(d["history"]))


def save_training_state(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        state: TrainingState) -> str:
    """Write the checkpoint files into `directory`; returns the model file's sha256.

    `model` is the bare model (not its DDP wrapper): its state-dict keys are what a later
    `load_model` expects.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    digest = save_checkpoint(model, directory / MODEL_FILE, metadata={"epoch": str(state.epoch)})
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(state.to_json())
    return digest


def read_state(directory: str | Path) -> TrainingState:
    return TrainingState.from_json((Path(directory) / STATE_FILE).read_text())


def load_training_state(directory: str | Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer | None = None) -> TrainingState:
    """Restore model weights (sha256 checked against the sidecar) and optimizer state
    from a checkpoint directory; returns its TrainingState."""
    directory = Path(directory)
    state = read_state(directory)
    weights = load_state_dict(directory / MODEL_FILE)
    load_into(model, weights, source=directory / MODEL_FILE)
    if optimizer is not None:
        optimizer.load_state_dict(read_optimizer_state(directory))
    return state


def read_optimizer_state(directory: str | Path) -> dict[str, Any]:
    """The optimizer state dict, read weights-only: a pickle holding anything but
    tensors, numbers, strings and containers raises UnsafeCheckpointError unexecuted."""
    path = Path(directory) / OPTIMIZER_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refused: its pickle holds objects other than tensors and plain values ({exc})".split("\n")[0]
        ) from None
