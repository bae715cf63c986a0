"""The `grainflow report` command (registered on the app by engine.cli)."""

from __future__ import annotations

from typing import Optional

import typer


def report(
    run: str = typer.Argument(..., help="The run: the --out of `python -m jobs.reprocess` (local path, file://, s3://)."),
    archive: Optional[str] = typer.Option(None, "--archive", "-a",
                                          help="Where the run's archive lies now (default: the one the job recorded)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="HTML file to write (default: RUN/report.html)."),
) -> None:
    """Write the HTML quality report of a reprocessing run and print where it is."""
    from engine.reports.report import write_report

    typer.echo(write_report(run, archive=archive, out=out))


def register(app: typer.Typer) -> None:
    """Add this package's commands to the `grainflow` app."""
    app.command("report")(report)
