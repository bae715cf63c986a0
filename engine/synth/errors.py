"""The error synthesis raises for bad arguments: a ValueError that the CLI, which prints
GrainflowErrors without a traceback, treats as the user's mistake."""

from __future__ import annotations

from engine.errors import GrainflowError


class SynthArgumentError(GrainflowError, ValueError):
    """An unknown material or modality, an impossible combination, a bad number."""
