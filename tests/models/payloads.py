"""Checkpoint files the tests make: a pickle that carries code, Ultralytics-style .pt."""

from __future__ import annotations

from pathlib import Path

import torch


class CreatesFile:
    """Unpickling this calls open(path, "w"): a visible stand-in for arbitrary code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_payload_checkpoint(path: Path, marker: Path) -> Path:
    """A .pt that looks like a state dict but runs code (creates `marker`) when unpickled."""
    torch.save({"weight": torch.zeros(3), "bias": CreatesFile(marker)}, path)
    return path
