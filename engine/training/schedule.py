"""Learning-rate schedules for the Ray Train loop: the rate as a pure function of the step.

A run's rate depends only on (schedule, base rate, global step, total steps), never on
state kept between steps, so a run resumed from an epoch's checkpoint continues on
exactly the curve an uninterrupted run follows, with nothing extra in the checkpoint.

- "constant": the base rate at every step;
- "cosine": linear warm-up over the first `warmup_steps` steps (5% of the run, at
  least one), rising from base/(warmup_steps + 1) in equal steps to reach the base rate
  at the step after them (Goyal et al. 2017: large early steps of a freshly initialised
  network, batch-norm statistics still lagging, diverge or stall), then a half cosine
  down to FINAL_RATIO x base at the last step (Loshchilov & Hutter 2017, SGDR without
  restarts), the usual schedule for training image models from scratch.

The curve is that of the run's length: a run resumed with other epochs, workers or batch
size (so another number of steps) continues on the new run's curve from where it is.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")
WARMUP_FRACTION = 0.05  # of all steps, for "cosine"
FINAL_RATIO = 0.01  # the last step's rate over the base rate, for "cosine"


def check_schedule(name: str) -> str:
    if name not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    return name


def warmup_steps(total_steps: int) -> int:
    """Warm-up length of "cosine": WARMUP_FRACTION of the run, at least one step."""
    return max(1, round(WARMUP_FRACTION * total_steps))


def learning_rate(schedule: str, base_lr: float, step: int, total_steps: int) -> float:
    """The rate for optimizer step `step` (0-based, counted over the whole run) of a run
    of `total_steps` steps. Steps past the end keep the last step's rate."""
    check_schedule(schedule)
    if schedule == "constant" or total_steps <= 1:
        return base_lr
    step = min(max(step, 0), total_steps - 1)
    warm = warmup_steps(total_steps)
    if step < warm:
        return base_lr * (step + 1) / (warm + 1)
    progress = (step - warm) / max(1, total_steps - 1 - warm)  # 0 after warm-up .. 1 at the last step
    return base_lr * (FINAL_RATIO + (1.0 - FINAL_RATIO) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def steps_per_epoch(train_samples: int, num_workers: int, batch_size: int) -> int:
    """Optimizer steps per epoch on each worker: Ray Train splits the training dataset
    into equal shards (DataConfig's streaming_split(equal=True)), the last batch may be
    short."""
    rows = train_samples // max(1, num_workers)
    return max(1, math.ceil(rows / max(1, batch_size)))


__all__ = ["FINAL_RATIO", "SCHEDULES", "WARMUP_FRACTION", "check_schedule", "learning_rate", "steps_per_epoch",
           "warmup_steps"]
