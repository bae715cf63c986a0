"""The training loop every Ray Train worker runs (one loop for all families; see tasks).

Per worker:

1. build the model from its registered config, seeded alike on every rank;
2. resume: when Ray Train hands over a checkpoint (`ray.train.get_checkpoint()`, after a
   worker died and the group was restarted, or when a run of the same name is started
   again), load weights, optimizer state and history, and continue at the next epoch;
3. wrap in DDP (`ray.train.torch.prepare_model`: gloo on CPU, NCCL on GPUs; the device
   comes from Ray, nothing assumes CUDA), or, for tasks whose graph varies between
   steps (SAM), keep the bare model and all-reduce its gradients after backward;
4. per epoch: seed torch's global RNG (dropout, drop-path) from (seed, epoch, rank),
   so an epoch run after a restart draws what an uninterrupted run's would have, as the
   shuffle, the augmentation and the learning rate already follow (seed, epoch, step);
   iterate this worker's shard of the "train" dataset with
   `iter_torch_batches` (augmented per epoch by the task's collate function), then the
   "val" shard without augmentation; add up the task's metric sums over all workers;
   rank 0 logs the epoch's metrics to MLflow and writes a checkpoint, and every rank
   calls `ray.train.report` (a barrier).

Metrics per epoch: train_* and val_* (the task's), train_samples_per_s (all workers'
training samples over the slowest worker's training wall time, s), lr (the rate of the
epoch's last step), epoch (1-based).

Resume granularity: Ray Train's controller collects reports on a poll (about every 2 s).
A worker that dies after `report` returned but before that poll takes the report with
it, and the run resumes from the checkpoint before; the redone epoch is then logged to
MLflow a second time at the same step.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.data.sample_plan import SampleLayout
from engine.training.checkpointing import TrainingState, load_training_state, read_optimizer_state, save_training_state
from engine.training.schedule import check_schedule, learning_rate
from engine.training.tasks import Task, make_task
from engine.training.warm_start import check_same_modules, freeze_all_but, frozen_to_eval, load_initial_weights


@dataclass(frozen=True)
class LoopConfig:
    """Everything a worker needs, as plain values (it travels as train_loop_config).

    lr: AdamW's base learning rate; lr_schedule: engine.training.schedule's name for how
    it moves over the run, which has epochs x steps_per_epoch optimizer steps per worker
    (the rate is a function of the step, so a resumed run continues on the same curve);
    weight_decay: AdamW's decoupled decay; max_grad_norm:
    gradient clipping (None: off); augment_strength: engine.augment strength, 0 = off;
    shuffle_buffer: rows in each worker's local shuffle buffer (>= batch_size);
    init_weights / init_sha256: a file the run starts from instead of the seeded
    initialisation (its digest checked on every worker); train_only: the modules that
    train, the others frozen (empty: all; engine.training.warm_start);
    tracking_uri / mlflow_run_id: where rank 0 logs metrics (None: not logged);
    validate: whether a "val" dataset was given;
    progress_dir: a local folder where each rank appends JSON lines (`rank<r>.jsonl`:
    {"event": "start" | "checkpoint", "epoch", "pid", "time", "threads": torch's}), for
    monitors and tests.
    """

    family: str
    model_name: str
    layout: SampleLayout
    epochs: int
    batch_size: int
    lr: float
    lr_schedule: str = "constant"
    steps_per_epoch: int = 0  # required by any schedule but "constant"
    weight_decay: float = 1e-4
    max_grad_norm: float | None = 1.0
    seed: int = 0
    augment_strength: float = 0.5
    shuffle_buffer: int = 64
    overrides: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    init_weights: str | None = None
    init_sha256: str | None = None
    train_only: list[str] = field(default_factory=list)
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    progress_dir: str | None = None
    validate: bool = True

    def __post_init__(self):
        check_schedule(self.lr_schedule)
        if self.lr_schedule != "constant" and self.steps_per_epoch < 1:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} needs steps_per_epoch >= 1, got {self.steps_per_epoch}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopConfig:
        d = dict(d)
        layout = d["layout"]
        d["layout"] = layout if isinstance(layout, SampleLayout) else SampleLayout(**layout)
        return cls(**d)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of torch's global RNG for one worker's epoch (0-based): a function of
    the run's seed, the epoch and the rank alone, never of what was drawn before, so a
    resumed run's epochs draw as the uninterrupted run's did; ranks draw apart."""
    import numpy as np

    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0] >> 1)


def _progress(cfg: LoopConfig, rank: int, event: str, epoch: int) -> None:
    if not cfg.progress_dir:
        return
    path = Path(cfg.progress_dir) / f"rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"event": event, "epoch": epoch, "pid": os.getpid(), "time": time.time(),
                            "threads": torch.get_num_threads()}) + "\n")


def _all_sums(sums: dict[str, float], seconds: float) -> tuple[dict[str, float], float]:
    """Sums added over all workers, and the slowest worker's seconds.

    all_gather_object rather than all_reduce of a tensor: a worker that saw no batch has
    no keys, and this stays correct then.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums, seconds
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (sums, seconds))
    total: dict[str, float] = {}
    for part, _ in gathered:
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + v
    return total, max(s for _, s in gathered)


def _broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP's constructor does)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


def _average_gradients(model: torch.nn.Module) -> None:
    """Mean gradient over all workers, in one flat all-reduce after backward.

    A parameter without a gradient on this rank counts as zero, so every rank sends
    the same layout whatever its graph was. Buffers are not synchronised: tasks using
    this path have no batch-norm statistics (SAM uses layer norm).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n


def _run_epoch(task: Task, model: torch.nn.Module, shard, collate, cfg: LoopConfig, device: torch.device,
               optimizer: torch.optim.Optimizer | None, shuffle_seed: int | None,
               first_step: int = 0) -> tuple[dict[str, float], float]:
    """One pass over a shard; trains when `optimizer` is given, its i-th step of the epoch
    at the schedule's rate for run step `first_step + i`. Returns (metric sums, seconds)."""
    total_steps = cfg.epochs * cfg.steps_per_epoch
    sums: dict[str, torch.Tensor] = {}
    start = time.perf_counter()
    shuffle = dict(local_shuffle_buffer_size=max(cfg.shuffle_buffer, cfg.batch_size),
                   local_shuffle_seed=shuffle_seed) if shuffle_seed is not None else {}
    batches = shard.iter_torch_batches(batch_size=cfg.batch_size, collate_fn=collate, prefetch_batches=2, **shuffle)
    for i, batch in enumerate(batches):
        batch = task.to_device(batch, device)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg.lr_schedule, cfg.lr, first_step + i, total_steps)
            loss, stats = task.step(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if task.gradient_sync == "allreduce":
                _average_gradients(model)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
        else:
            with torch.no_grad():
                _, stats = task.step(model, batch)
        for k, v in stats.items():  # tensors on the device: no host sync per batch
            sums[k] = sums[k] + v.detach() if k in sums else v.detach()
    return {k: float(v) for k, v in sums.items()}, time.perf_counter() - start


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function (module doc); `config` is LoopConfig.to_dict()."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from engine.models import create_model
    from engine.models.layout import prefer_channels_last
    from engine.runtime import use_assigned_cpus
    from engine.training import mlflow_metrics

    cfg = LoopConfig.from_dict(config)
    rank = ray.train.get_context().get_world_rank()
    use_assigned_cpus()  # torch's threads = the worker's CPU slots (cpus_per_worker)
    task = make_task(cfg.family, cfg.task_options)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = prefer_channels_last(create_model(cfg.family, cfg.model_name, **cfg.overrides), cfg.family)
    state = TrainingState(cfg.family, cfg.model_name, train_only=list(cfg.train_only))
    optimizer_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_training_state(directory, model)
            optimizer_state = read_optimizer_state(directory)
        check_same_modules(state.train_only, cfg.train_only, where=f"checkpoint of epoch {state.epoch}")
    elif cfg.init_weights:  # a resumed run's checkpoint holds the weights trained since
        load_initial_weights(model, cfg.family, cfg.init_weights, cfg.init_sha256)
    if cfg.train_only:
        freeze_all_but(model, cfg.train_only)
    _progress(cfg, rank, "start", state.epoch)

    if task.gradient_sync == "ddp":
        model = ray.train.torch.prepare_model(model)
    else:
        model = ray.train.torch.prepare_model(model, parallel_strategy=None)  # to the device only
        _broadcast_parameters(model)
    bare = getattr(model, "module", model)
    trained = [p for p in model.parameters() if p.requires_grad]  # frozen modules get no optimizer state
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)  # moves the state onto the parameters' device
    device = ray.train.torch.get_device()
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if cfg.validate else None

    for epoch in range(state.epoch, cfg.epochs):
        torch.manual_seed(epoch_seed(cfg.seed, epoch, rank))
        model.train()
        if cfg.train_only:
            frozen_to_eval(bare, cfg.train_only)
        collate = task.collate(cfg.layout, epoch=epoch, seed=cfg.seed, augment_strength=cfg.augment_strength)
        sums, seconds = _run_epoch(task, model, train_shard, collate, cfg, device, optimizer,
                                   shuffle_seed=cfg.seed * 100_003 + epoch * 101 + rank,
                                   first_step=epoch * cfg.steps_per_epoch)
        sums, seconds = _all_sums(sums, seconds)
        metrics: dict[str, float] = {f"train_{k}": v for k, v in task.metrics(sums).items()}
        metrics["train_samples_per_s"] = sums.get("n", 0.0) / seconds if seconds > 0 else 0.0
        metrics["lr"] = optimizer.param_groups[0]["lr"]  # the epoch's last step's
        if val_shard is not None:
            # The bare model: evaluation needs no gradient sync, and DDP's forward could
            # broadcast buffers, a collective every rank would have to match.
            bare.eval()
            val_collate = task.collate(cfg.layout, epoch=epoch, seed=cfg.seed, augment_strength=0.0)
            vsums, _ = _run_epoch(task, bare, val_shard, val_collate, cfg, device, None, shuffle_seed=None)
            vsums, _ = _all_sums(vsums, 0.0)
            metrics.update({f"val_{k}": v for k, v in task.metrics(vsums).items()})
        metrics["epoch"] = epoch + 1
        state.epoch = epoch + 1
        state.history.append(metrics)

        # Logged before the report: a worker group killed after the report (the epoch is
        # done, the run resumes after it) must not take the epoch's metrics with it; one
        # killed between the two redoes the epoch and logs it again at the same step.
        if rank == 0 and cfg.tracking_uri and cfg.mlflow_run_id:
            mlflow_metrics.log_metrics(cfg.tracking_uri, cfg.mlflow_run_id, metrics, step=epoch + 1)
        with tempfile.TemporaryDirectory(prefix="grainflow-ckpt-") as tmp:
            ckpt = None
            if rank == 0:
                save_training_state(tmp, bare, optimizer, state)
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
        _progress(cfg, rank, "checkpoint", epoch + 1)
