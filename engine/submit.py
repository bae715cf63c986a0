"""Submit Ray jobs through the Jobs API and follow them (notebooks, `grainflow submit`)."""

from __future__ import annotations

import time
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
               timeout_s: float = 3600.0) -> str:
    """Stream a job's log lines to `on_line` until it ends; returns the final status name.

    Polls the whole log and forwards what is new, which works from synchronous
    notebook cells and scripts alike (the SDK's tail is an async generator).
    """
    seen = 0
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        for line in logs[seen:].splitlines():
            on_line(line)
        seen = len(logs)
        if status.is_terminal():
            return str(status.value)
        if time.monotonic() > deadline:
            raise GrainflowError(f"job {job_id} still {status.value} after {timeout_s:.0f} s")
        time.sleep(poll_s)
