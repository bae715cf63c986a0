"""Reading an Ultralytics .pt checkpoint without running anything it holds.

Ultralytics pickles its model objects. A pickle names the globals it needs, and torch's
weights-only unpickler calls those it is allowed with arguments taken from the file, so
allowing the real model classes is not safe: `DetectionModel(cfg)` evaluates the
activation string of a YAML config the file can carry, and
`ultralytics.nn.autobackend.AutoBackend(path)` unpickles another file in full. Here every
class of a model package the file names is replaced by an inert stand-in (`_Inert`) that
takes any arguments, does nothing and keeps its pickled state; no Ultralytics or torch.nn
code runs. The weights are then read out of the stand-ins' `_parameters`, `_buffers` and
`_modules`, as `nn.Module.state_dict()` would give them. Any other global (a function
such as `posix.system` or `builtins.getattr`) refuses the file before it is unpickled.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from engine.models.errors import CheckpointError, UnsafeCheckpointError

# Globals replaced by inert stand-ins: model classes (and the namespaces and paths kept
# with their training arguments). A function named under these is replaced too, so
# calling it does nothing.
_INERT_PREFIXES = ("ultralytics.", "torch.nn.modules.", "pathlib.")
# numpy's array and scalar constructors (training metrics): build plain values only.
_NUMPY = {f"{m}.{name}" for m in ("numpy.core.multiarray", "numpy._core.multiarray")
          for name in ("_reconstruct", "scalar")} | {"numpy.ndarray", "numpy.dtype"}


class _Inert:
    """Stands in for a class of a pickled model: any arguments, no code, its state kept
    (torch's unpickler updates `__dict__` with it)."""

    def __init__(self, *args, **kwargs):
        pass


@dataclass(frozen=True)
class UltralyticsCheckpoint:
    """What grainflow takes from an Ultralytics .pt: the model's YAML config (dict), its
    class names in index order, the training image size (px) and its weights (name ->
    float32 tensor, the EMA weights Ultralytics evaluates where it kept them)."""

    model_yaml: dict[str, Any]
    names: list[str]
    imgsz: int
    state_dict: dict[str, torch.Tensor]


def read_ultralytics_pt(f: BinaryIO, path: str | Path) -> UltralyticsCheckpoint:
    """Read the checked, seekable file `f` (named `path` in errors); UnsafeCheckpointError
    when its pickle names anything but model classes, tensors and numpy values,
    CheckpointError when it is not an Ultralytics detection checkpoint."""
    allowed = _allowed_globals(f, path)
    f.seek(0)
    try:
        with torch.serialization.safe_globals(allowed):
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        from engine.models.checkpoint import unpickler_reason

        raise UnsafeCheckpointError(f"{path}: refused: {unpickler_reason(exc)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {exc}") from None
    model = ckpt
    if isinstance(ckpt, dict):  # Ultralytics keeps the EMA weights (the ones it evaluates) beside the raw ones
        model = ckpt["ema"] if ckpt.get("ema") is not None else ckpt.get("model")
    attrs = vars(model) if isinstance(model, _Inert) else {}
    if not (isinstance(attrs.get("yaml"), dict) and "stride" in attrs and "_modules" in attrs):
        raise CheckpointError(f"{path}: not an Ultralytics detection checkpoint (no model with a YAML config)")
    names = attrs.get("names") or {}
    names = [str(names[i]) for i in sorted(names)] if isinstance(names, dict) else [str(n) for n in names]
    train_args = ckpt.get("train_args") if isinstance(ckpt, dict) else None
    train_args = vars(train_args) if isinstance(train_args, _Inert) else (train_args or {})
    imgsz = train_args.get("imgsz", 640) if isinstance(train_args, dict) else 640
    return UltralyticsCheckpoint(
        model_yaml=attrs["yaml"], names=names, imgsz=int(imgsz if isinstance(imgsz, int) else max(imgsz)),
        state_dict={k: v.float() for k, v in _state_dict(model).items()},
    )


def _allowed_globals(f: BinaryIO, path: str | Path) -> list:
    """Entries for `torch.serialization.safe_globals`: an inert stand-in under each model
    class name the pickle in `f` uses beyond torch's own set, numpy's constructors as
    they are; UnsafeCheckpointError naming any other global, before anything is read."""
    import importlib

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except Exception as exc:  # not a zip, a truncated file, ...
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {exc}") from None
    allowed, refused = [], []
    for name in sorted(names):
        module, _, attr = name.rpartition(".")
        if name.startswith(_INERT_PREFIXES):
            allowed.append((type(attr, (_Inert,), {"__module__": module}), name))
        elif name in _NUMPY or name.startswith("numpy.dtypes."):
            allowed.append((getattr(importlib.import_module(module), attr), name))
        else:
            refused.append(name)
    if refused:
        raise UnsafeCheckpointError(
            f"{path}: refused: its pickle names {', '.join(refused[:5])}{', ...' if len(refused) > 5 else ''}, "
            "which are not parts of an Ultralytics model (loading it could run code)")
    return allowed


def _state_dict(module: _Inert, prefix: str = "") -> dict[str, torch.Tensor]:
    """`nn.Module.state_dict()` of a pickled module kept by stand-ins: parameters and
    persistent buffers, children's under their dotted names."""
    attrs = vars(module)
    out = {prefix + k: v for k, v in (attrs.get("_parameters") or {}).items() if isinstance(v, torch.Tensor)}
    transient = attrs.get("_non_persistent_buffers_set") or set()
    out.update({prefix + k: v for k, v in (attrs.get("_buffers") or {}).items()
                if isinstance(v, torch.Tensor) and k not in transient})
    for name, child in (attrs.get("_modules") or {}).items():
        if isinstance(child, _Inert):
            out.update(_state_dict(child, f"{prefix}{name}."))
    return out
