"""Fine-tuning from given weights: a run that starts from a checkpoint file the user
supplies (Meta's SAM .pth, a grainflow .safetensors) and trains only some of the model.

Adapting a large pretrained model to a small labelled set usually keeps its feature
extractor as it is and trains what reads the features: for SAM ViT-B the image encoder
(90M of its 94M parameters, and nearly all of backward's compute at 1024 px) stays
frozen and the mask decoder (4M) learns the material's boundaries, as MedSAM does.

    train("segmenter", "sam_vit_b", archive, storage_path=..., epochs=10,
          init_weights="sam_vit_b_01ec64.pth", train_only=["sam.mask_decoder"])

The driver checks everything before Ray starts (`check_warm_start`: the file's digest,
that its tensors fit the model, that every name in `train_only` is a module of it) and
hands the digest to the workers, which load the file only on a fresh start (a resumed
run's checkpoint holds the trained weights) and refuse it if its bytes changed since.
The file is a local path every training worker can read (one machine, a shared
filesystem) or an s3:// URI, which each machine copies once into its cache.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import torch

from engine.errors import GrainflowError


class WarmStartError(GrainflowError):
    """Initial weights that cannot start this model, or modules it does not have."""


def load_initial_weights(model: torch.nn.Module, family: str, path: str | os.PathLike,
                         expected_sha256: str | None) -> None:
    """Load `path` into `model` (all of its weights: missing or extra keys, or a shape that
    differs, are a CheckpointError naming them). A segmenter reads Meta's .pth keys (those
    of `Sam`) as well as our own ("sam."-prefixed; engine.models.segmenter.load_sam_weights);
    other families our own keys. The sha256 is checked on the read that is parsed; None
    checks the `<file>.sha256` beside it where there is one. `path` may be an s3:// URI
    (copied once per machine: engine.models.weights_file)."""
    from engine.models.checkpoint import load_checked, load_into
    from engine.models.weights_file import weights_file

    path, expected_sha256 = weights_file(path, expected_sha256)
    if family == "segmenter":
        from engine.models.segmenter import load_sam_weights

        load_sam_weights(model, path, expected_sha256=expected_sha256)
        return
    state, _ = load_checked(path, expected_sha256=expected_sha256)
    load_into(model, state, source=path)


def freeze_all_but(model: torch.nn.Module, train_only: Sequence[str]) -> int:
    """Turn off the gradient of every parameter outside the named modules (dotted paths
    as in `named_modules`, e.g. "sam.mask_decoder"); returns how many parameters (scalars)
    still train. A name that is no module of `model` is a WarmStartError listing the
    modules one can name."""
    modules = dict(model.named_modules())
    unknown = [name for name in train_only if not name or name not in modules]
    if unknown:
        raise WarmStartError(f"train_only: {', '.join(map(repr, unknown))}: not a module of this "
                             f"{type(model).__name__}; its modules with parameters: "
                             f"{', '.join(trainable_modules(model))}")
    prefixes = tuple(f"{name}." for name in train_only)
    trainable = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        trainable += p.numel() if p.requires_grad else 0
    if trainable == 0:
        raise WarmStartError(f"train_only: {', '.join(train_only)} hold no parameters to train")
    return trainable


def frozen_to_eval(model: torch.nn.Module, train_only: Sequence[str]) -> None:
    """After `model.train()`: every module outside the trained ones back in eval mode, so
    that frozen batch-norm layers keep the running statistics they were given (in train
    mode they would move to this data's, changing what the frozen features are) and
    frozen dropout stays off. The trained modules and what they hold stay in train mode;
    their ancestors' own flags are left as they are (a module's flag is its own, and
    setting an ancestor's with .eval() would reach the trained ones)."""
    trained = tuple(train_only)
    for name, module in model.named_modules():
        inside = any(name == t or name.startswith(t + ".") for t in trained)
        ancestor = any(t.startswith(name + ".") for t in trained) or name == ""
        if not inside and not ancestor:
            module.training = False


def trainable_modules(model: torch.nn.Module, depth: int = 2) -> list[str]:
    """Module paths down to `depth` dots that hold parameters: what `train_only` names."""
    names = {".".join(name.split(".")[:depth]) for name, _ in model.named_parameters()}
    # the parameter's own name is no module: keep the module paths only
    modules = dict(model.named_modules())
    return sorted({n if n in modules else n.rpartition(".")[0] for n in names} - {""})


def check_warm_start(family: str, model_name: str, overrides: dict | None, init_weights: str | os.PathLike | None,
                     init_sha256: str | None, train_only: Sequence[str]) -> str | None:
    """On the driver, before Ray starts: that the initial weights fit the model and
    `train_only` names its modules. Returns the file's sha256 (what the workers check), or
    None without initial weights: `init_sha256`, else the `<file>.sha256` beside it
    (which the file must match), else the file's own. The model is built on torch's
    meta device (no memory for its weights); the file is read for its keys and shapes."""
    from engine.models import create_model
    from engine.models.errors import CheckpointError
    from engine.models.weights_file import weights_file
    from engine.stores.uri import resolve

    if init_weights is None and not train_only:
        return None
    with torch.device("meta"):
        model = create_model(family, model_name, **(overrides or {}))
    if train_only:
        freeze_all_but(model, train_only)
    if init_weights is None:
        return None
    location = resolve(init_weights)
    if location.scheme == "file" and not os.path.isfile(location.path):
        raise WarmStartError(f"init_weights: {location.path}: no such file (it must be readable at this path by "
                             f"every training worker, or be an s3:// URI)")
    path, digest = weights_file(location, init_sha256)  # an s3:// file: copied here, once
    try:
        with warnings.catch_warnings():
            # Copying into a meta tensor checks the key and the shape and stores nothing:
            # all this check needs. torch warns about it once per tensor.
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter", category=UserWarning)
            load_initial_weights(model, family, path, digest)
    except CheckpointError as exc:
        if location.scheme == "file":
            raise
        # the message names the cached copy; say which file the user gave it as
        raise WarmStartError(f"init_weights {location.uri} (copied to {path}): {exc}") from exc
    return digest


def check_same_modules(saved: Sequence[str], asked: Sequence[str], *, where: str) -> None:
    """A resumed run trains the modules its checkpoint was trained with: another choice
    would not fit the optimizer state it saved (moments for each trained parameter)."""
    if list(saved) != list(asked):
        raise WarmStartError(f"{where} trained {_shown(saved)}; this run asks for {_shown(asked)}. Resume with "
                             f"the same train_only, or start a new run (another run name)")


def _shown(train_only: Sequence[str]) -> str:
    return "only " + ", ".join(train_only) if train_only else "every module"
