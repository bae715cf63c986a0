"""The `grainflow synthesize` command (registered on the app by engine.cli)."""

from __future__ import annotations

import typer


def synthesize(ctx: typer.Context) -> None:
    """Generate labelled rare-defect samples with a diffusion model (the arguments of
    `python -m jobs.synthesize`; see --help)."""
    from jobs.synthesize import main

    raise typer.Exit(main(list(ctx.args)))


def register(app: typer.Typer) -> None:
    """Add this package's commands to the `grainflow` app."""
    app.command("synthesize", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                add_help_option=False)(synthesize)
