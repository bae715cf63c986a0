"""Submit Ray jobs through the Jobs API and follow them (notebooks, `grainflow submit`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine.errors import GrainflowError


def submit_job(client, *, entrypoint: str, retry_s: float = 60.0, **kwargs: Any) -> str:
    """`client.submit_job(...)`, retried while a just-started head has no job agent yet."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, **kwargs)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def follow_job(client, job_id: str, *, on_line: Callable[[str], None] = print, poll_s: float = 1.0,
               timeout_s: float | None = None) -> str:
    """Stream a job's log lines to `on_line` until it ends; returns the final status name.

    Polls the whole log and forwards what is new, which works from synchronous
    notebook cells and scripts alike (the SDK's tail is an async generator). timeout_s:
    give up (GrainflowError; the job goes on) after this long; None: until it ends.
    """
    seen = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        for line in logs[seen:].splitlines():
            on_line(line)
        seen = len(logs)
        if status.is_terminal():
            return str(status.value)
        if deadline is not None and time.monotonic() > deadline:
            raise GrainflowError(f"job {job_id} still {status.value} after {timeout_s:.0f} s")
        time.sleep(poll_s)


# ----------------------------------------------------------------- grainflow submit <job>

# job name -> (module run as `python -m`, argument naming where its results land)
JOBS: dict[str, tuple[str, str]] = {
    "reprocess": ("jobs.reprocess", "out"),
    "train": ("jobs.finetune", "storage"),
    "synthesize": ("jobs.synthesize", "out"),
}
# Never reach a model hub from a job (engine.runtime.configure_offline does the same locally).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "YOLO_OFFLINE": "1"}


@dataclass(frozen=True)
class Submission:
    """What `prepare_submission` decided: the entrypoint and runtime_env to send, the
    job's store URIs (argument -> URI) and where its results land."""

    job: str
    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str
    uris: dict[str, str]
    results: str | None


def parse_job_args(job: str, argv: list[str]):
    """The job's own parser over `argv` (argparse exits 2 on bad arguments, naming them).

    A job module not in this checkout (jobs.synthesize while it is written) is parsed
    for its store URIs only, without abbreviations, so none slips past the tenant check.
    """
    import argparse
    import importlib

    from engine.tenants import JOB_URI_ARGS

    if job not in JOBS:
        raise GrainflowError(f"unknown job {job!r}; known: {', '.join(JOBS)}")
    try:
        module = importlib.import_module(JOBS[job][0])
    except ModuleNotFoundError as exc:
        if exc.name != JOBS[job][0]:
            raise
        p = argparse.ArgumentParser(prog=f"python -m {JOBS[job][0]}", allow_abbrev=False)
        for name in JOB_URI_ARGS[job]:
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None)
        return p.parse_known_args(argv)[0]
    return module.parse_args(argv)


def prepare_submission(job: str, argv: list[str], *, tenant: str | None = None, tenants_file: str | None = None,
                       audit=None, env_vars: dict[str, str] | None = None) -> Submission:
    """Parse the job's arguments, check its URIs against the tenant's prefixes (refusals
    and acceptances audited: engine.tenants.check_job), and build what to submit.

    The job gets GRAINFLOW_TENANT in its runtime_env and checks again inside
    (engine.tenants.enforce_job_uris) against the tenants file its cluster's nodes name
    (cluster/aws, cluster/kuberay set GRAINFLOW_TENANTS_FILE); the submitter's own file
    goes along as GRAINFLOW_SUBMITTER_TENANTS_FILE, used only where the nodes name none
    (a local head on the submitter's disk), so a submitter's file never replaces a
    cluster's.
    Relative local paths among the job's store arguments are made absolute here: the
    job's driver runs in another working directory.
    """
    import shlex
    import uuid

    from engine.tenants import SUBMISSION_ID_ENV, SUBMITTER_TENANTS_FILE_ENV, TENANT_ENV, Tenants, check_job, job_uris

    argv = absolute_paths(job, argv)
    args = parse_job_args(job, argv)
    submission_id = f"grainflow-{job}-{uuid.uuid4().hex[:12]}"
    env = {**OFFLINE_ENV, **(env_vars or {}), SUBMISSION_ID_ENV: submission_id}
    if tenants_file:
        tenants_file = str(Path(tenants_file).expanduser().resolve())
        check_job(job, args, tenant=tenant, tenants=Tenants.load(tenants_file), where="submit", audit=audit,
                  extra={"submission_id": submission_id})
        env.update({SUBMITTER_TENANTS_FILE_ENV: tenants_file, TENANT_ENV: tenant or ""})
    elif tenant:
        env[TENANT_ENV] = tenant
    module, results_arg = JOBS[job]
    uris = job_uris(job, args)
    return Submission(job, shlex.join(["python", "-m", module, *argv]), {"env_vars": env}, submission_id, uris,
                      uris.get(results_arg))


def absolute_paths(job: str, argv: list[str]) -> list[str]:
    """`argv` with each relative local path given to one of the job's store arguments
    (engine.tenants.JOB_URI_ARGS: --archive, --out, ...) made absolute."""
    import os

    from engine.tenants import JOB_URI_ARGS

    flags = {f"--{name.replace('_', '-')}" for name in JOB_URI_ARGS.get(job, ())}

    def absolute(value: str) -> str:
        local = "://" not in value and not os.path.isabs(value)
        return os.path.abspath(os.path.expanduser(value)) if local and value else value

    out, after_flag = [], False
    for token in argv:
        flag, eq, value = token.partition("=")
        if after_flag:
            out.append(absolute(token))
        elif eq and flag in flags:
            out.append(f"{flag}={absolute(value)}")
        else:
            out.append(token)
        after_flag = token in flags
    return out


def job_client(address: str, *, token_path: str | None = None):
    """A JobSubmissionClient for the dashboard at `address` (http://host:port), sending
    the cluster token from `token_path` (default RAY_AUTH_TOKEN_PATH) when there is one."""
    import os

    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        # Without a scheme Ray takes it for a GCS address and waits on it for a minute.
        raise GrainflowError(f"--address {address!r}: give the cluster dashboard's URL, http://HOST:PORT "
                             f"(e.g. http://127.0.0.1:8265)")
    token_path = token_path or os.environ.get("RAY_AUTH_TOKEN_PATH")
    headers = None
    if token_path:
        try:
            headers = {"Authorization": f"Bearer {Path(token_path).expanduser().read_text().strip()}"}
        except OSError as exc:
            raise GrainflowError(f"{token_path}: cannot read the cluster token: {exc}") from None
    try:
        return JobSubmissionClient(address, headers=headers)
    except ConnectionError as exc:
        raise GrainflowError(f"no Ray dashboard answers at {address} ({exc}); is the cluster up?") from None
