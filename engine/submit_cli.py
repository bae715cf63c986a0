"""The `grainflow submit ...` commands (registered on the app by engine.cli).

    grainflow submit reprocess --address http://127.0.0.1:8265 --tenant lab-a \\
        --tenants-file tenants.toml -- --archive s3://lab-a/archive --out s3://lab-a/runs/r1 \\
        --models grainflow-demo@production

Options before `--` are the submitter's; what follows goes to the job
(`python -m jobs.reprocess|finetune|synthesize`). The job's store URIs are checked
against the tenant's prefixes first (a refusal is audited and nothing is submitted),
then the job is submitted through the Ray Jobs API with the cluster token, its log is
followed to the end, and where its results land is printed.
"""

from __future__ import annotations

import os
from typing import Optional

import typer

from engine.errors import GrainflowError

submit_app = typer.Typer(help="Submit a grainflow job to a Ray cluster (Jobs API, token auth).",
                         no_args_is_help=True)
_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _submit(job: str, ctx: typer.Context, address: Optional[str], token_file: Optional[str], tenant: Optional[str],
            tenants_file: Optional[str], follow: bool) -> None:
    from engine.submit import follow_job, job_client, prepare_submission, submit_job

    address = address or os.environ.get("GRAINFLOW_DASHBOARD_URL") or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise GrainflowError("no cluster: give --address http://HOST:PORT (the dashboard) or set GRAINFLOW_DASHBOARD_URL")
    argv = [a for a in ctx.args if a != "--"] if ctx.args[:1] == ["--"] else list(ctx.args)
    submission = prepare_submission(job, argv, tenant=tenant, tenants_file=tenants_file)
    client = job_client(address, token_path=token_file)
    job_id = submit_job(client, entrypoint=submission.entrypoint, runtime_env=submission.runtime_env,
                        submission_id=submission.submission_id)
    typer.echo(f"submitted {job_id} to {address}: {submission.entrypoint}")
    if submission.results:
        typer.echo(f"results: {submission.results}")
    if not follow:
        typer.echo(f"status: {client.get_job_status(job_id).value}")
        return
    status = follow_job(client, job_id, on_line=typer.echo)
    typer.echo(f"status: {status}")
    if submission.results:
        typer.echo(f"results: {submission.results}")
    if status != "SUCCEEDED":
        raise typer.Exit(1)


def _command(job: str):
    def command(
        ctx: typer.Context,
        address: Optional[str] = typer.Option(None, help="dashboard URL (default: $GRAINFLOW_DASHBOARD_URL)"),
        token_file: Optional[str] = typer.Option(None, help="cluster token file (default: $RAY_AUTH_TOKEN_PATH)"),
        tenant: Optional[str] = typer.Option(None, envvar="GRAINFLOW_TENANT", help="tenant the job runs for"),
        tenants_file: Optional[str] = typer.Option(None, envvar="GRAINFLOW_TENANTS_FILE",
                                                   help="TOML file granting store prefixes to tenants"),
        follow: bool = typer.Option(True, "--follow/--no-follow", help="stream the job's log until it ends"),
    ) -> None:
        _submit(job, ctx, address, token_file, tenant, tenants_file, follow)

    command.__doc__ = f"Submit `grainflow {job}` as a Ray job; the job's arguments follow `--`."
    return command


for _job in ("reprocess", "train", "synthesize"):
    submit_app.command(_job, context_settings=_EXTRA)(_command(_job))


def register(app: typer.Typer) -> None:
    """Add this package's commands to the `grainflow` app."""
    app.add_typer(submit_app, name="submit")
