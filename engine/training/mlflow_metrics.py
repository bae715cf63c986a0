"""Training metrics on MLflow: one run per training run, one step per epoch.

The driver opens the run (so its id is known before any worker starts and survives
worker restarts) and closes it; rank 0 logs each epoch's metrics into it. The tracking
URI is always explicit: the caller's, else engine.registry's resolution
(`MLFLOW_TRACKING_URI`, else the embedded SQLite store), so metrics land beside the
registered models. MLflow's global state (mlflow.set_tracking_uri, active runs) is never
touched: every call goes through an MlflowClient bound to the URI.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache
from typing import Any, Mapping

from engine.registry import backend

EXPERIMENT = "grainflow-training"


def tracking_uri(explicit: str | None = None) -> str:
    """The tracking URI metrics go to, by engine.registry's rules (see its backend)."""
    return backend.resolve_uris(explicit, None)[0]


@lru_cache(maxsize=4)
def _client(uri: str):
    # One client per process and URI: a client holds a database engine for SQLite stores.
    return backend.make_client(uri, uri)


def _experiment_id(client, uri: str) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=backend.default_artifact_location(uri))
    except Exception:  # created by another process meanwhile
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(uri: str, *, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None,
              resume_key: str | None = None) -> str:
    """A run in the `grainflow-training` experiment with `params`; returns its id.

    With `resume_key` (a param naming where the run's checkpoints live), an earlier run
    of the same name and the same value of that param is the same training run resumed:
    it is reopened, so one MLflow run holds every epoch's metrics. Its params keep their
    first values (MLflow's params are immutable); values that changed on resuming (more
    epochs, ...) are recorded as tags `resumed.<param>`.
    """
    from mlflow.entities import Param

    client = _client(uri)
    experiment = _experiment_id(client, uri)
    earlier = None
    if resume_key is not None:
        runs = client.search_runs([experiment], filter_string=f"attributes.run_name = '{run_name}'",
                                  order_by=["attributes.start_time DESC"], max_results=20)
        want = str(params.get(resume_key))[:6000]
        earlier = next((r for r in runs if r.data.params.get(resume_key) == want), None)
    if earlier is not None:
        run_id = earlier.info.run_id
        client.update_run(run_id, status="RUNNING")
        old = earlier.data.params
        new = {str(k): str(v)[:6000] for k, v in params.items()}
        for k, v in new.items():
            if k in old and old[k] != v:
                client.set_tag(run_id, f"resumed.{k}", v)
        items = [Param(k, v) for k, v in new.items() if k not in old]
    else:
        run_id = client.create_run(experiment, run_name=run_name, tags=dict(tags or {})).info.run_id
        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100])
    return run_id


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log finite numeric `metrics` at `step` (the epoch number, from 1)."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    items = [Metric(k, float(v), stamp, int(step)) for k, v in metrics.items()
             if isinstance(v, (int, float)) and math.isfinite(float(v))]
    if items:
        _client(uri).log_batch(run_id, metrics=items)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run FINISHED, FAILED or KILLED."""
    _client(uri).set_terminated(run_id, status)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value), ...] of one metric, by step."""
    return sorted((m.step, m.value) for m in _client(uri).get_metric_history(run_id, key))
