"""Errors of model creation and checkpoint I/O; each names the model or file at fault."""

from __future__ import annotations

from engine.errors import GrainflowError, UnknownNameError


class UnknownModelError(UnknownNameError):
    """A family or model name that is not registered; the message lists the valid ones."""


class ModelConfigError(GrainflowError, ValueError):
    """A model config file or override that does not fit its builder."""


class CheckpointError(GrainflowError):
    """A checkpoint file that cannot be read or does not fit the model."""


class ChecksumMismatchError(CheckpointError):
    """A checkpoint whose sha256 differs from the one recorded for it."""

    def __init__(self, path: str, expected: str, actual: str):
        super().__init__(
            f"{path}: sha256 mismatch: expected {expected}, file has {actual}; "
            "refusing to load a checkpoint that is not the one recorded"
        )
        self.path, self.expected, self.actual = path, expected, actual


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would run code (or build objects) when loaded."""


def check_timm_arch(arch: str) -> None:
    """Refuse a timm architecture name timm does not know, naming close ones."""
    import difflib

    import timm

    if not timm.is_model(arch):
        close = difflib.get_close_matches(str(arch), timm.list_models(), n=5, cutoff=0.6)
        raise ModelConfigError(f"unknown timm architecture {arch!r}" + (f"; close: {', '.join(close)}" if close else
                                                                        "; see timm.list_models()"))
