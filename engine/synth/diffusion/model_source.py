"""Where the diffusion model comes from: a checkpoint file or a registry ref, verified."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.errors import GrainflowError


class ModelSourceError(GrainflowError):
    """A model argument that names no usable diffusion checkpoint."""


@dataclass(frozen=True)
class ModelSource:
    """A verified local checkpoint: path, sha256, and what provenance records about it
    (ref: the registry ref `name/version` or the file name; version: registry version
    number, or None for a plain file)."""

    path: Path
    sha256: str
    ref: str
    version: int | None

    def config(self):
        """The checkpoint's ModelConfig (metadata only; no tensors read)."""
        from engine.models.checkpoint import read_config

        return read_config(self.path)


def is_checkpoint_path(model: str) -> bool:
    """Whether `model` names a checkpoint file (a `.safetensors` path, or any path that
    exists) rather than a registry ref."""
    path = Path(model).expanduser()
    return path.suffix == ".safetensors" or path.exists()


def resolve_model(model: str, *, tracking_uri: str | None = None) -> ModelSource:
    """A `.safetensors` path (its `<file>.sha256` sidecar is required and checked), or a
    registry ref (`name`, `name@alias`, `name/version`) fetched and checked by the registry.
    The model must be of the diffusion family."""
    from engine.models.checkpoint import read_config, read_sidecar, verify_sha256

    path = Path(model).expanduser()
    if is_checkpoint_path(model):
        if not path.is_file():
            raise ModelSourceError(f"{path}: no such checkpoint file")
        digest = read_sidecar(path)
        if digest is None:
            raise ModelSourceError(f"{path}: no {path.name}.sha256 beside it; provenance needs the checkpoint's digest")
        verify_sha256(path, digest)
        source = ModelSource(path.resolve(), digest, path.name, None)
    else:
        from engine.registry import ModelRegistry
        from engine.registry.backend import check_existing

        check_existing(tracking_uri)  # a mistyped registry is not created empty
        registry = ModelRegistry(tracking_uri)
        mv = registry.get(model)
        if mv.family != "diffusion":
            raise ModelSourceError(f"{model}: registered as a {mv.family} model, not a diffusion model")
        files = registry.fetch(mv)
        (name, local), = [(n, p) for n, p in files.items() if n.endswith(".safetensors")][:1] or [(None, None)]
        if local is None:
            raise ModelSourceError(f"{model}: version {mv.ref} has no .safetensors file")
        source = ModelSource(Path(local), mv.sha256[name], mv.ref, mv.version)
    family = read_config(source.path).family
    if family != "diffusion":
        raise ModelSourceError(f"{model}: a {family} checkpoint, not a diffusion model")
    return source
