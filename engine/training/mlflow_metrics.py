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


def start_run(uri: str, *, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str:
    """Create a run in the `grainflow-training` experiment with `params`; returns its id."""
    from mlflow.entities import Param

    client = _client(uri)
    run = client.create_run(_experiment_id(client, uri), run_name=run_name, tags=dict(tags or {}))
    items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


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
