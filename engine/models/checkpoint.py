"""Checkpoint I/O that never runs code from a file.

Our own models are saved as safetensors: the state dict plus the model's config (JSON,
in the file's metadata), so a file alone rebuilds its model. Formats that need torch's
pickle (.pt, .pth, e.g. Meta's SAM weights) are read with torch.load(weights_only=True),
which refuses anything but tensors and plain containers. The one full-pickle format we
accept (Ultralytics .pt) goes through `engine.models.detector.load_detector_checkpoint`,
and only after its sha256 matches a trusted record.

Every save returns the file's sha256 and writes it beside the file as `<file>.sha256`
(sha256sum format); loads check it against the digest given or, failing that, the one
beside the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file

from engine.models.errors import CheckpointError, ChecksumMismatchError, UnsafeCheckpointError

FORMAT = "grainflow/1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return _sha256_of(f)


def _sha256_of(f: BinaryIO) -> str:
    """Hex sha256 of an open file's bytes from where it stands to its end."""
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def _check_hex(path: Path, expected) -> None:
    if not isinstance(expected, str) or not _HEX64.match(expected.lower()):
        raise CheckpointError(f"{path}: expected_sha256 must be 64 hex digits, got {expected!r}")


def sidecar_path(path: str | Path) -> Path:
    """Where a checkpoint's recorded digest lives: `<file>.sha256`."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def read_sidecar(path: str | Path) -> str | None:
    """The digest recorded beside `path`, or None when there is no sidecar file."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    text = side.read_text().split()
    if not text or not _HEX64.match(text[0].lower()):
        raise CheckpointError(f"{side}: not a sha256 record (expected 64 hex digits)")
    return text[0].lower()


def verify_sha256(path: str | Path, expected: str) -> str:
    """Check a file against the digest recorded for it; returns the digest.

    Raises ChecksumMismatchError (naming the file and both digests) when they differ.
    """
    _check_hex(Path(path), expected)
    with open_checked(path, expected):
        return expected.lower()


def open_checked(path: str | Path, expected_sha256: str | None = None) -> BinaryIO:
    """The file opened once for reading, its sha256 checked on this open file against
    `expected_sha256` or, when not given, the `<file>.sha256` beside it (neither: not
    checked). Parse what this returns, not the path again: a file replaced after the
    check (a shared cache, another process) is then never the one loaded."""
    return _open_checked(path, expected_sha256)[0]


def _open_checked(path: str | Path, expected_sha256: str | None) -> tuple[BinaryIO, os.stat_result]:
    """`open_checked`, and the file's stat taken before its bytes were hashed."""
    path = Path(path)
    expected = expected_sha256 if expected_sha256 is not None else read_sidecar(path)
    if expected is not None:
        _check_hex(path, expected)
    try:
        f = open(path, "rb")
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    before = os.fstat(f.fileno())
    if expected is not None:
        actual = _sha256_of(f)
        if actual != expected.lower():
            f.close()
            raise ChecksumMismatchError(str(path), expected.lower(), actual)
        f.seek(0)
    return f, before


def _safetensors_metadata(data: bytes, path: Path) -> dict[str, str]:
    """The metadata in a safetensors file's header (8-byte little-endian length, JSON)."""
    try:
        n = int.from_bytes(data[:8], "little")
        return dict(json.loads(data[8 : 8 + n]).get("__metadata__") or {})
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from None


def _plain_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no two sharing storage (safetensors refuses aliases)."""
    out, seen = {}, set()
    for key, value in state_dict.items():
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_checkpoint(model: torch.nn.Module, path: str | Path, *, metadata: dict[str, str] | None = None) -> str:
    """Save a model built by engine.models as safetensors; returns the file's sha256.

    The file holds the state dict and, in its metadata, "format" and "config" (the
    model's config as JSON), plus any extra string `metadata`. The digest is also
    written to `<path>.sha256`. The file appears complete or not at all (written to a
    temporary name, then renamed).
    """
    config = getattr(model, "config", None)
    if config is None:
        raise CheckpointError(f"{path}: model {type(model).__name__} has no .config; build it with engine.models.create_model")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**(metadata or {}), "format": FORMAT, "config": json.dumps(config.to_dict(), sort_keys=True)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(_plain_tensors(model.state_dict()), str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    digest = sha256_file(path)
    sidecar_path(path).write_text(f"{digest}  {path.name}\n")
    return digest


def read_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's metadata (no tensors are read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from None


def read_config(path: str | Path):
    """The ModelConfig recorded in a checkpoint saved by `save_checkpoint`."""
    return _config_of(read_metadata(path), path)


def _config_of(meta: dict[str, str], path) -> Any:
    """The ModelConfig in a checkpoint's metadata (CheckpointError if it is not ours)."""
    from engine.models.families import ModelConfig

    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path}: not a grainflow checkpoint (metadata format={meta.get('format')!r})")
    return ModelConfig.from_dict(json.loads(meta["config"]))


def unpickler_reason(exc: Exception) -> str:
    """The line of torch's weights-only error that says what was refused (e.g.
    "Unsupported global: GLOBAL io.open ..."), without its advice to load unsafely."""
    for line in str(exc).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". Please use")[0]
    return type(exc).__name__


def load_state_dict(
    path: str | Path, *, expected_sha256: str | None = None, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors, .pt or .pth checkpoint, read without running its code.

    The sha256 is checked against `expected_sha256` or, when not given, against the
    `<file>.sha256` beside it, on the same read that is parsed (`open_checked`); with
    neither, the file is loaded unchecked (both formats here are parsed without running
    code; the digest guards identity, not safety).
    A .pt/.pth whose pickle holds anything but tensors and plain containers (e.g. a
    __reduce__ payload) is refused with UnsafeCheckpointError, before any of it runs.
    A dict holding the state dict under "state_dict" or "model" is unwrapped.
    """
    return load_checked(path, expected_sha256=expected_sha256, map_location=map_location)[0]


def load_checked(path: str | Path, *, expected_sha256: str | None = None,
                 map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, the safetensors file's metadata or {}) from one read of the file,
    checked as `load_state_dict` says."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors, .pt or .pth")
    f, before = _open_checked(path, expected_sha256)
    with f:
        if path.suffix == ".safetensors":
            return _load_safetensors(f, before, path, map_location)
        return _load_pickled_state(f, path, map_location), {}


def _load_safetensors(f: BinaryIO, before: os.stat_result, path: Path,
                      map_location) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of the open (checked) file `f`. On Linux through the open file
    descriptor (/proc/self/fd: memory-mapped, straight to `map_location`, whatever the
    path now names), refused if the file was written to since `before` (its stat ahead
    of the hash); elsewhere read whole into memory once (twice the file at the peak)."""
    fd_path = f"/proc/self/fd/{f.fileno()}"
    try:
        if os.path.exists(fd_path):
            state = load_file(fd_path, device=str(map_location))
            with safe_open(fd_path, framework="pt") as g:
                meta = dict(g.metadata() or {})
            after = os.fstat(f.fileno())
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                raise CheckpointError(f"{path}: was written to while it was being checked and loaded; refused")
            return state, meta
        data = f.read()
        state = safetensors_load(data)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from None
    return {k: v.to(map_location) for k, v in state.items()}, _safetensors_metadata(data, path)


def _load_pickled_state(f: BinaryIO, path: Path, map_location) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = unpickler_reason(exc)
        raise UnsafeCheckpointError(
            f"{path}: refused: its pickle holds objects other than tensors (it could run code "
            f"when loaded); only weights-only checkpoints are accepted ({reason})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {exc}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict) and len(obj) <= 3:
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (names -> tensors), got {type(obj).__name__}")
    return obj


def load_into(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, source: str | Path) -> None:
    """load_state_dict (strict) with an error naming the file and the keys that differ."""
    own = set(module.state_dict())
    missing, unexpected = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: does not fit {type(module).__name__}: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{source}: does not fit {type(module).__name__}: {exc}") from None


def load_model(path: str | Path, *, expected_sha256: str | None = None, map_location: str | torch.device = "cpu"):
    """Rebuild a model from a checkpoint saved by `save_checkpoint` and load its weights.

    The architecture comes from the config recorded in the file, not from today's YAML,
    so a checkpoint keeps loading after the registered config changes.
    """
    from engine.models.families import build

    path = Path(path)
    # config and weights from one checked read (a .pt has no metadata: not ours)
    state, meta = load_checked(path, expected_sha256=expected_sha256, map_location=map_location)
    model = build(_config_of(meta, path))
    load_into(model, state, source=path)
    return model.to(map_location)
