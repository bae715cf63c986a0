"""Process-wide settings that entrypoints apply before any work (never at import time)."""

from __future__ import annotations

import os

from engine.errors import GrainflowError


def configure_offline() -> None:
    """No code path may reach a model hub: weights come from files the user supplies.

    Set for this process and inherited by Ray workers started from it.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Ultralytics checks connectivity and fetches fonts/assets when online.
    os.environ.setdefault("YOLO_OFFLINE", "1")


def use_assigned_cpus() -> int | None:
    """Inside a Ray task or actor: torch's intra-op threads = the CPUs Ray assigned it.

    Ray sets a worker's OMP_NUM_THREADS when it starts the process, for whatever task
    or actor that was, and only where the environment sets none: a reused worker keeps
    another task's count, and a shell that exports OMP_NUM_THREADS=32 gives every 1-CPU
    actor 32 threads on cores it shares. The count also changes a convolution's last
    float bits (sums split by thread), which a rerun must not see change. Returns the
    count set; None in a driver, outside Ray or with no CPU assigned (nothing changed).
    """
    import ray

    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:  # a driver: its threads are its own business
        return None
    cpus = context.get_assigned_resources().get("CPU")
    if not cpus:
        return None
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    return torch.get_num_threads()


# Set to 1 where an autoscaler adds GPU nodes without reporting its node groups to Ray
# (a cluster-launcher or KubeRay GPU group scaling from zero): work may wait for GPUs.
GPU_AUTOSCALING_ENV = "GRAINFLOW_GPU_AUTOSCALING"


def cluster_gpus() -> float:
    """The GPUs of the connected Ray cluster's nodes now (in use or free), 0.0 on a
    cluster without any; what an autoscaler could add is not counted (gpu_shortfall)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def autoscaler_max(resource: str) -> float | None:
    """The most of `resource` ("GPU", "CPU") the connected cluster's autoscaler says it
    can provide, or None when no autoscaler reported its node groups to Ray. It is what
    Ray Train's own start check reads (ray.train.v2
    WorkerGroup._check_cluster_resources_and_raise_if_insufficient); a private Ray API,
    so any failure to read it counts as "not reported"."""
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
    except Exception:
        return None
    return None if most is None else float(most.get(resource, 0))


def gpu_shortfall(needed: float) -> str | None:
    """Why the connected Ray cluster cannot give work `needed` GPUs, or None when it has
    them or can get them: an autoscaler reports GPU node groups enough, or
    $GRAINFLOW_GPU_AUTOSCALING is 1. Work asking for GPUs that never come waits forever
    (Ray queues it), so callers refuse it with this reason."""
    have = cluster_gpus()
    if have >= needed:
        return None
    most = autoscaler_max("GPU")
    if most is not None and most >= needed:
        return None
    if most is None and os.environ.get(GPU_AUTOSCALING_ENV, "").strip().lower() in ("1", "true", "yes"):
        return None
    can = (f"its autoscaler can provide at most {most:g}" if most is not None else
           f"no autoscaler reports GPU nodes it could add (set {GPU_AUTOSCALING_ENV}=1 where one does)")
    return f"the Ray cluster has {have:g} and {can}"


def refuse_unmet_gpus(needed: float, request: str, remedy: str, error: type[Exception] = GrainflowError) -> None:
    """Raise `error` "<request> but <why>; <remedy>" when work asking for `needed` GPUs
    (0: none) could never get them (`gpu_shortfall`): checked before any task or actor
    is submitted, since Ray would queue it forever. request names the option and what
    asks, e.g. "num_gpus: each task asks for 1 GPU"."""
    why = gpu_shortfall(needed) if needed > 0 else None
    if why is not None:
        raise error(f"{request} but {why}; {remedy}")
