"""A training checkpoint: one directory, written by rank 0 after every epoch.

    model.safetensors         the model (engine.models.checkpoint.save_checkpoint: weights
                              and config; rebuilds with load_model)
    model.safetensors.sha256  its digest, checked when the checkpoint is read back
    optimizer.pt              the optimizer's state dict: tensors, numbers and lists only,
                              read with torch.load(weights_only=True)
    state.json                {"epoch": epochs completed, "history": [per-epoch metrics],
                              "family", "model"}

Nothing in it runs code when loaded. Ray Train copies the directory to the run's storage
(local or S3) and hands it back through `ray.train.get_checkpoint()` after a restart: the
one its `checkpoint_manager_snapshot.json` beside them names as the latest
(`latest_checkpoint` reads the same).
A checkpoint resumes only into the model it was written from: the same family, name,
builder, input size and builder arguments (`config_differences`).
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.models.checkpoint import (
    load_into, load_state_dict, load_weights_only, read_config, save_checkpoint, sha256_of, sidecar_path,
)
from engine.models.errors import CheckpointError

if TYPE_CHECKING:
    from engine.models.families import ModelConfig
    from engine.stores.uri import StoreLocation

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
SIDECAR_FILE = sidecar_path(MODEL_FILE).name
# Ray Train's directory of one report: loop.py names it checkpoint_dir_name=epoch_NNNN.
EPOCH_DIR = re.compile(r"epoch_(\d+)")
# Ray Train's record of a run's reported checkpoints, in the run's folder; a restarted
# run resumes from its `latest_checkpoint_result` (ray.train.v2 CheckpointManager).
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
# The model config fields a resumed model must share with its checkpoint (besides its
# builder arguments); description, tiny and large only describe it.
COMPARED_FIELDS = ("family", "name", "builder", "input_size")
_SHORT = reprlib.Repr()  # values in messages: a class order shows its first few names
_SHORT.maxlist = _SHORT.maxdict = 4
_SHORT.maxstring = _SHORT.maxother = 40
_UNSET = object()

logger = logging.getLogger(__name__)


@dataclass
class TrainingState:
    """Where a run stands: `epoch` epochs are done; `history[i]` holds epoch i's metrics;
    `train_only`: the modules it trains, all when empty (engine.training.warm_start)."""

    family: str
    model: str
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    train_only: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"family": self.family, "model": self.model, "epoch": self.epoch,
                           "history": self.history, "train_only": self.train_only}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainingState:
        d = json.loads(text)
        return cls(family=d["family"], model=d["model"], epoch=int(d["epoch"]), history=list(d["history"]),
                   train_only=list(d.get("train_only", [])))  # runs written before it trained everything


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
    from a checkpoint directory; returns its TrainingState.

    A model with a `.config` (engine.models) must be the one the checkpoint was written
    from: CheckpointError lists every config key that differs (`config_differences`),
    where loading would otherwise fail on mismatched weights or, worse, succeed and
    train a model whose config says something else (another class order, another
    context level)."""
    directory = Path(directory)
    state = read_state(directory)
    weights = load_state_dict(directory / MODEL_FILE)
    config = getattr(model, "config", None)
    if config is not None:
        differences = config_differences(read_config(directory / MODEL_FILE), config)
        if differences:
            raise CheckpointError(
                f"{directory}: this checkpoint ({state.family}:{state.model}, epoch {state.epoch}) was written by "
                f"another model config than the one resuming it: {'; '.join(differences)}. Resume with the "
                f"checkpoint's config, or start a new run (another run name)")
    load_into(model, weights, source=directory / MODEL_FILE)
    if optimizer is not None:
        optimizer.load_state_dict(read_optimizer_state(directory))
    return state


def read_optimizer_state(directory: str | Path) -> dict[str, Any]:
    """The optimizer state dict, read weights-only: a pickle holding anything but
    tensors, numbers, strings and containers raises UnsafeCheckpointError unexecuted, a
    damaged file CheckpointError (engine.models.checkpoint.load_weights_only)."""
    path = Path(directory) / OPTIMIZER_FILE
    with open(path, "rb") as f:
        return load_weights_only(f, path)


def config_differences(saved: ModelConfig, current: ModelConfig, *, only_args: Any = None) -> list[str]:
    """What differs between a checkpoint's model config and another, one
    "key: <checkpoint's> in the checkpoint, <other> now" per key: COMPARED_FIELDS and
    each builder argument (`args.<name>`; with `only_args`, only those arguments).
    Values compare as JSON, as the checkpoint stores them (a tuple equals its list)."""
    out = [f"{key}: {getattr(saved, key)!r} in the checkpoint, {getattr(current, key)!r} now"
           for key in COMPARED_FIELDS if getattr(saved, key) != getattr(current, key)]
    keys = set(saved.args) | set(current.args) if only_args is None else set(only_args)
    for key in sorted(keys):
        was, now = _plain(saved.args.get(key, _UNSET)), _plain(current.args.get(key, _UNSET))
        if was != now:
            out.append(f"args.{key}: {_show(was)} in the checkpoint, {_show(now)} now")
    return out


def _plain(value: Any) -> Any:
    return value if value is _UNSET else json.loads(json.dumps(value, default=str))


def _show(value: Any) -> str:
    return "unset" if value is _UNSET else _SHORT.repr(value)


def latest_checkpoint(run: StoreLocation) -> StoreLocation | None:
    """The checkpoint a run restarted in `run` (`<storage_path>/<run_name>`, local or S3)
    resumes from, or None when it starts afresh.

    That is what Ray Train resumes from: the latest checkpoint named in its
    checkpoint_manager_snapshot.json (None when the snapshot names none), whatever newer
    epoch folders lie beside it (one cut off while being copied, say). Without a
    readable snapshot, the newest `epoch_NNNN` folder that is complete: state.json, the
    model file and its sha256 sidecar, the file matching it. Incomplete or damaged folders
    passed over are logged as warnings, naming them.
    """
    fs = run.filesystem()
    named = _snapshot_checkpoint(run)
    if named is not _UNSET:
        return None if named is None else run.join(named)
    try:
        entries = fs.ls(run.path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    epochs = []
    for entry in entries:
        name = posixpath.basename(str(entry).rstrip("/"))
        match = EPOCH_DIR.fullmatch(name)
        if match:
            epochs.append((int(match.group(1)), name))
    for _, name in sorted(epochs, reverse=True):
        directory = run.join(name)
        if not fs.isfile(directory.join(STATE_FILE).path):
            continue  # no training state: not (yet) a checkpoint
        problem = _incomplete(directory)
        if problem is None:
            return directory
        logger.warning("%s: passed over as a checkpoint to resume from: %s", directory, problem)
    return None


def _snapshot_checkpoint(run: StoreLocation) -> Any:
    """The folder name Ray's snapshot in `run` names as the latest checkpoint, None when
    it names none, or _UNSET when there is no readable snapshot (warned about if it is
    there but unreadable)."""
    fs = run.filesystem()
    path = run.join(RAY_SNAPSHOT_FILE)
    try:
        with fs.open(path.path, "rb") as f:
            snapshot = json.loads(f.read().decode())
        # a snapshot of another Ray version may name it otherwise: then it says nothing
        latest = snapshot["latest_checkpoint_result"]
    except FileNotFoundError:
        return _UNSET
    except (ValueError, AttributeError, KeyError, TypeError, OSError) as exc:
        logger.warning("%s: unreadable (%r); looking for the newest complete epoch folder instead", path, exc)
        return _UNSET
    if latest is None:
        return None
    name = latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None
    if not isinstance(name, str) or posixpath.basename(name) != name or name in ("", ".", ".."):
        logger.warning("%s: names no checkpoint folder (%r); looking for the newest complete epoch folder "
                       "instead", path, name)
        return _UNSET
    return name


def _incomplete(directory: StoreLocation) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a missing file, a model file that
    does not match its sha256 sidecar), or None when it is complete. Reads the model
    file once, where it lies."""
    fs = directory.filesystem()
    model, sidecar = directory.join(MODEL_FILE), directory.join(SIDECAR_FILE)
    for needed in (model, sidecar):
        if not fs.isfile(needed.path):
            return f"no {needed.name}"
    with fs.open(sidecar.path, "rb") as f:
        words = f.read(200).decode(errors="replace").split()
    expected = words[0].lower() if words else ""
    with fs.open(model.path, "rb") as f:
        digest = sha256_of(f)
    if digest != expected:
        return f"{MODEL_FILE} does not match its sha256 sidecar (a copy cut off, or a damaged file)"
    return None


def read_stored_checkpoint(directory: StoreLocation) -> tuple[TrainingState, ModelConfig | None]:
    """A stored checkpoint's TrainingState and its model file's config, read where it
    lies (local or S3) without fetching the weights: state.json and the safetensors
    header only. The config is None when the model file is missing."""
    from engine.models.families import ModelConfig

    fs = directory.filesystem()
    state_path = directory.join(STATE_FILE).path
    try:
        with fs.open(state_path, "rb") as f:
            state = TrainingState.from_json(f.read().decode())
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{directory.join(STATE_FILE)}: not a training state ({exc!r})") from None
    model_path = directory.join(MODEL_FILE)
    if not fs.isfile(model_path.path):
        return state, None
    with fs.open(model_path.path, "rb") as f:
        # safetensors: an 8-byte little-endian header length, then the JSON header
        size = int.from_bytes(f.read(8), "little")
        try:
            if not 0 < size <= 100 << 20:
                raise ValueError(f"header length {size}")
            metadata = json.loads(f.read(size)).get("__metadata__") or {}
            config = ModelConfig.from_dict(json.loads(metadata["config"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{model_path}: not a grainflow checkpoint ({exc!r})") from None
    return state, config
