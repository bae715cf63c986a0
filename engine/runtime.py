"""Process-wide settings that entrypoints apply before any work (never at import time)."""

from __future__ import annotations

import os


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
