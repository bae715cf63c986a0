"""The `grainflow synthesize` command (registered on the app by engine.cli)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this package's commands to the `grainflow` app."""
