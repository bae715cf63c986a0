"""`train`: plan the samples, run the Ray Train loop, register the result.

    from engine.training import train
    result = train("fusion", "fusion_tiny", "s3://lab/archive", storage_path="/runs",
                   epochs=5, num_workers=2, register_as="fusion-prod")
    result.history[-1]["val_defect_iou"], result.checkpoint_path, result.model_version

On the driver: the samples are planned from the archive's catalog, ground truth and
images' metadata (no pixels), split into train and validation, and handed to a TorchTrainer as Ray
Datasets that read their pixels in Ray tasks. The workers run engine.training.loop.
Checkpoints go to `<storage_path>/<run_name>/epoch_NNNN/` after every epoch; a worker
that dies makes Ray Train restart the worker group (up to `max_failures` times), and the
loop resumes from the latest checkpoint. Starting `train` again with the same
`run_name` and `storage_path` resumes that run the same way, with the same model and
builder arguments only (check_resume, before Ray starts).

Metrics go to MLflow (one run per training run in the `grainflow-training`
experiment), at the registry's tracking URI when a registry is given, else at
`tracking_uri` resolved by engine.registry's rules. With `register_as`, the final
model file is registered with its config, final metrics and sha256, and optionally
promoted to `production`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from engine.data.sample_plan import SampleLayout, SampleSpec, plan_samples, split_specs
from engine.errors import GrainflowError
from engine.pipeline.inputs import TRAINED_INPUT_TAG
from engine.training.loop import LoopConfig
from engine.training.schedule import SCHEDULES, steps_per_epoch

# Share of the cluster's object store that cached training samples may take (train(cache=None)).
CACHE_SHARE = 0.25

# Worker-group starts Ray Train may retry before the run fails (FailureConfig's
# controller_failure_limit, unlimited by default; max_failures does not count them).
# Each start waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default) for its
# resources: about half an hour for an autoscaler to bring nodes up, and a start that
# can never succeed ends instead of retrying forever.
WORKER_GROUP_START_RETRIES = 30

# Longest wait for the cluster's resource view to show a CPU slot free before a cached
# dataset is read (`_materialize`), and how many polls in a row (_CPU_VIEW_POLL_S apart)
# must show one: a single poll has seen a slot that the next report took back.
_CPU_VIEW_WAIT_S = 1.0
_CPU_VIEW_STEADY_POLLS = 3
_CPU_VIEW_POLL_S = 0.02


class TrainingError(GrainflowError):
    """A training run that cannot start or did not finish."""


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced.

    history: one dict of metrics per epoch (train_*, val_*, train_samples_per_s, epoch).
    checkpoint_path: the final checkpoint directory in storage (local path or URI).
    model_sha256: sha256 of the final checkpoint's model.safetensors.
    model_version: the registered version ("name/version" in `.ref`), or None.
    run_id: the MLflow run holding the per-epoch metrics.
    seconds: wall time of the Ray Train run (workers start to last report, and the one
    read of the samples when they were cached), s. cached: whether they were.
    """

    family: str
    model_name: str
    run_name: str
    history: list[dict[str, float]]
    checkpoint_path: str
    model_sha256: str
    run_id: str | None
    tracking_uri: str
    train_samples: int
    val_samples: int
    seconds: float
    model_version: Any = None
    cached: bool = False

    @property
    def metrics(self) -> dict[str, float]:
        """The last epoch's metrics."""
        return self.history[-1] if self.history else {}

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable summary (what jobs.finetune prints)."""
        mv = self.model_version
        return {
            "family": self.family, "model": self.model_name, "run_name": self.run_name,
            "epochs": len(self.history), "metrics": self.metrics,
            "history": self.history, "checkpoint": self.checkpoint_path, "sha256": self.model_sha256,
            "mlflow_run_id": self.run_id, "tracking_uri": self.tracking_uri,
            "train_samples": self.train_samples, "val_samples": self.val_samples,
            "seconds": round(self.seconds, 3), "cached": self.cached,
            "model_version": None if mv is None else mv.ref,
            "aliases": [] if mv is None else list(mv.aliases),
        }


def _label_orders(family: str, args: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """The model's class orders: its config's, else the defaults the builder fills in."""
    from engine.models import labels

    return {
        "materials": tuple(args.get("materials") or labels.material_names()),
        "grades": tuple(args.get("grades") or labels.GRADES),
        "defect_classes": tuple(args.get("defect_classes") or labels.defect_class_names()),
    }


def _storage(storage_path: str | os.PathLike):
    """(storage_path, storage_filesystem, URI prefix) for Ray Train's RunConfig.

    A local path becomes absolute. An s3:// URI is passed to Ray Train as it is (pyarrow
    resolves endpoint, region and credentials from the standard AWS environment in each
    process), unless the engine config names an endpoint or region (engine.config
    `[s3]`): then a pyarrow S3FileSystem with those settings is given explicitly. No
    credentials are put in it; every process finds its own, as it does for the archive.
    """
    text = os.fspath(storage_path)
    if text.startswith("s3://"):
        from engine.stores.uri import resolve

        location = resolve(text)
        options = location.storage_options
        endpoint = options.get("endpoint_url")
        region = options.get("client_kwargs", {}).get("region_name")
        if not endpoint and not region:
            return text, None, "s3://"  # Ray's checkpoint paths come back without the scheme
        import pyarrow.fs

        kwargs = {"endpoint_override": endpoint} if endpoint else {}
        if region:
            kwargs["region"] = region
        return location.path, pyarrow.fs.S3FileSystem(**kwargs), "s3://"
    if "://" in text and not text.startswith("file://"):
        raise TrainingError(f"storage_path {text!r}: use a local path, file:// or s3:// URI")
    if text.startswith("file://"):
        text = text[len("file://"):]
    return os.path.abspath(os.path.expanduser(text)), None, ""


def check_resume(storage_path: str | os.PathLike, run_name: str, family: str, model_name: str,
                 overrides: dict[str, Any] | None = None, train_only: Sequence[str] = ()) -> None:
    """Refuse, before Ray starts, to resume `<storage_path>/<run_name>` with another model.

    Ray Train hands a run's latest checkpoint to the workers of any run started under
    its name. One of another family or model would fail in every worker, after
    max_failures restarts, and mark the earlier run's MLflow run FAILED; one of this
    model with other builder arguments (`overrides`) could load and go on training a
    model its config misdescribes; one training other modules (`train_only`) would not
    fit the optimizer state it saved. Reads the checkpoint Ray Train would resume from
    (checkpointing.latest_checkpoint: the one its snapshot names, not a newer folder cut
    off while being copied): its state.json and the model file's config (its header, not
    the weights); the workers compare the whole config again when they load it
    (checkpointing.load_training_state).
    """
    from engine.models import get_config
    from engine.stores.uri import resolve
    from engine.training.checkpointing import config_differences, latest_checkpoint, read_stored_checkpoint
    from engine.training.warm_start import check_same_modules

    run = resolve(storage_path).join(run_name)
    latest = latest_checkpoint(run)
    if latest is None:
        return
    state, saved = read_stored_checkpoint(latest)
    if (state.family, state.model) != (family, model_name):
        raise TrainingError(
            f"run {run_name!r} in {storage_path} holds a {state.family}:{state.model} checkpoint ({latest.name}), "
            f"which a run of that name resumes; this one trains {family}:{model_name}. Give another run_name "
            f"(--run-name), or train {state.family}:{state.model} to resume it")
    check_same_modules(state.train_only, train_only, where=f"run {run_name!r} in {storage_path}: its checkpoint "
                                                           f"{latest.name}")
    if saved is None:
        return
    wanted = get_config(family, model_name)
    wanted = dataclasses.replace(wanted, args={**wanted.args, **(overrides or {})})
    # The builder fills in arguments left unset (label orders): the workers compare those.
    differences = config_differences(saved, wanted, only_args=[k for k, v in wanted.args.items() if v is not None])
    if differences:
        raise TrainingError(
            f"run {run_name!r} in {storage_path}: its checkpoint {latest.name} was written by another "
            f"{family}:{model_name} config than this run's: {'; '.join(differences)}. Give another run_name "
            f"(--run-name), or the checkpoint's settings to resume it")


def ensure_ray(worker_cpus: int) -> None:
    """Connect to Ray if this process is not connected yet.

    With RAY_ADDRESS (a submitted job, a cluster) `ray.init()` joins that cluster. Without
    it a new local Ray starts (address="local": never some other Ray that happens to run
    on the machine) with at least worker_cpus + 2 logical CPUs: the training workers hold
    worker_cpus slots for the whole run, and Ray Data's read tasks need slots of their
    own, or on a small machine the trainer would starve its own data pipeline.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, worker_cpus + 2))


def _check_cpus_left_for_reads(worker_cpus: int) -> None:
    """Refuse a run whose workers would hold every CPU slot while Ray Data must read the
    archive each epoch: its read tasks would wait for a slot that never frees. The slots
    counted are the cluster's now, or what its autoscaler says it can provide where it
    reports that (engine.runtime.autoscaler_max)."""
    import ray

    from engine.runtime import autoscaler_max

    total = max(ray.cluster_resources().get("CPU", 0), autoscaler_max("CPU") or 0)
    if total - worker_cpus < 1:
        raise TrainingError(
            f"the training workers hold {worker_cpus} CPU slots of the cluster's {total:g}, leaving none for "
            "reading the archive: use fewer workers or cpus_per_worker, or cache=True")


def _materialize(datasets: dict[str, Any]) -> dict[str, Any]:
    """Each dataset read into the object store (the cache), one after the other.

    Before each read, waits (`wait_for_free_cpu`) for the cluster's resource view to show
    a CPU slot free: the previous read's tasks have returned theirs by the time it ends,
    but the view (`ray.available_resources`) lags the raylets by a report (measured up
    to ~75 ms here), and Ray Data warns that a dataset started while it reads no CPU
    free "will hang", which a user of `make demo` then sees for nothing.
    """
    import ray

    cached = {}
    for name, ds in datasets.items():
        wait_for_free_cpu(lambda: ray.available_resources().get("CPU", 0))
        cached[name] = ds.materialize()
    return cached


def wait_for_free_cpu(free_cpus, *, polls: int = _CPU_VIEW_STEADY_POLLS, interval_s: float = _CPU_VIEW_POLL_S,
                      timeout_s: float = _CPU_VIEW_WAIT_S) -> bool:
    """Wait until `free_cpus()` (CPU slots the resource view shows free) is positive in
    `polls` polls in a row, `interval_s` apart, or `timeout_s` has passed. Returns whether
    the view settled.

    Several polls, not one: in `make demo` one poll saw a slot free between two reads
    while other work's slots were being returned and taken, and Ray Data's own look,
    milliseconds later, saw none.
    """
    deadline = time.monotonic() + timeout_s
    steady = 0
    while True:
        steady = steady + 1 if free_cpus() > 0 else 0
        if steady >= polls:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def _auto_gpu(num_workers: int) -> bool:
    """GPUs when the cluster has one for every worker; CPUs otherwise."""
    from engine.runtime import cluster_gpus

    return cluster_gpus() >= num_workers


def check_gpus(num_workers: int) -> None:
    """Refuse use_gpu=True when the cluster has fewer GPUs than workers and nothing says
    it can get more (`engine.runtime.gpu_shortfall`): Ray Train V2 would wait for them
    forever, retrying the worker-group start every minute (see
    WORKER_GROUP_START_RETRIES), and a local Ray never grows."""
    from engine.runtime import refuse_unmet_gpus

    refuse_unmet_gpus(num_workers, f"use_gpu: the run needs {num_workers} GPU{'s' if num_workers != 1 else ''} "
                                   f"(one per worker)",
                      "train on CPUs (use_gpu=False or None to pick, --gpu no/auto) or with fewer workers",
                      TrainingError)


def plan_training(
    family: str,
    model_name: str,
    archive: str,
    *,
    val_archive: str | None = None,
    val_fraction: float = 0.2,
    tile_size: int | None = None,
    levels: Sequence[int] | None = None,
    max_samples_per_image: int | None = None,
    num_workers: int = 2,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    task_options: dict[str, Any] | None = None,
    synthetic_archive: str | None = None,
    synthetic_ratio: float = 0.5,
    inputs: str = "tile",
) -> tuple[SampleLayout, list[SampleSpec], list[SampleSpec]]:
    """(layout, train specs, val specs) for a model: metadata only, no pixels.

    Validation tiles come from `val_archive` when given, else a seeded `val_fraction`
    of the archive's tiles (val_fraction=0: no validation). With `synthetic_archive`,
    its gate-accepted samples join the training specs, `synthetic_ratio` per real one,
    interleaved with them in a permutation seeded by `seed` (engine.training.mixing;
    an archive the gate has not judged is refused, `mixing.ungated(archive)` opts out).
    """
    from engine.models import get_config
    from engine.training.tasks import make_task

    config = get_config(family, model_name)  # unknown names list the valid ones
    if tile_size is not None and tile_size < 1:
        # 0 would silently mean "the model's input size" to the task's layout
        raise TrainingError(f"tile_size must be a whole number of pixels >= 1 (None: the model's input size, "
                            f"{config.input_size}), got {tile_size!r}")
    task = make_task(family, task_options)
    args = {**config.args, **(overrides or {})}
    layout = task.layout(config.input_size, args, tile=tile_size,
                         levels=None if levels is None else tuple(levels), max_per_image=max_samples_per_image)
    layout = dataclasses.replace(layout, normalisation=inputs)
    orders = _label_orders(family, args)
    specs = plan_samples(archive, layout, seed=seed, **orders)
    if val_archive is not None:
        train_specs = specs
        val_specs = plan_samples(val_archive, layout, seed=seed + 1, **orders)
    else:
        train_specs, val_specs = split_specs(specs, val_fraction, seed=seed, min_each=num_workers)
    if synthetic_archive is not None:
        from engine.training.mixing import mix_in, synthetic_specs

        synthetic = synthetic_specs(synthetic_archive, layout, seed=seed + 2, **orders)
        train_specs = mix_in(train_specs, synthetic, synthetic_ratio, seed=seed)
    if len(train_specs) < num_workers:
        raise TrainingError(
            f"{archive}: {len(train_specs)} training samples for {num_workers} workers; every worker needs at "
            f"least one (layout: tile {layout.tile}, levels {layout.levels or 'all'})"
        )
    if val_archive is not None and not val_specs:
        raise TrainingError(f"{val_archive}: no {family} validation samples (layout: tile {layout.tile}, levels "
                            f"{layout.levels or 'all'}{'; a segmenter needs ground-truth defects' if family == 'segmenter' else ''})")
    if val_specs and len(val_specs) < num_workers:
        raise TrainingError(f"{val_archive}: {len(val_specs)} validation samples for {num_workers} workers")
    if family == "classifier":  # it learns, and is scored on, nothing but the catalog's material and grade
        for name, where, group in (("training", archive, train_specs), ("validation", val_archive or archive, val_specs)):
            if group and all(s.material_index < 0 and s.grade_index < 0 for s in group):
                raise TrainingError(f"{where}: the {name} images have no material or quality_grade in the catalog; "
                                    f"a classifier learns and is scored on those")
    return layout, train_specs, val_specs


def train(
    family: str,
    model_name: str,
    archive: str,
    *,
    storage_path: str | os.PathLike,
    epochs: int,
    num_workers: int = 2,
    cpus_per_worker: int | None = None,
    use_gpu: bool | None = None,
    batch_size: int = 16,
    lr: float = 1e-3,
    lr_schedule: str = "cosine",
    weight_decay: float = 1e-4,
    augment: bool | float = True,
    seed: int = 0,
    val_fraction: float = 0.2,
    val_archive: str | None = None,
    tile_size: int | None = None,
    levels: Sequence[int] | None = None,
    max_samples_per_image: int | None = None,
    max_failures: int = 2,
    keep_checkpoints: int | None = None,
    run_name: str | None = None,
    registry: Any = None,
    tracking_uri: str | None = None,
    register_as: str | None = None,
    promote: bool = False,
    overrides: dict[str, Any] | None = None,
    task_options: dict[str, Any] | None = None,
    progress_dir: str | os.PathLike | None = None,
    synthetic_archive: str | None = None,
    synthetic_ratio: float = 0.5,
    cache: bool | None = None,
    inputs: str = "tile",
    init_weights: str | os.PathLike | None = None,
    init_sha256: str | None = None,
    train_only: Sequence[str] = (),
) -> TrainResult:
    """Train a registered model on an archive with Ray Train (module doc).

    family / model_name: "classifier" | "fusion" | "segmenter" | "diffusion" and a registered config
      (engine.models.list_models(family)).
    archive, val_archive: archive URIs (local path, file://, s3://).
    storage_path: where checkpoints go (local path or s3:// URI); the run lives in
      `<storage_path>/<run_name>`.
    epochs: total epochs (a resumed run counts the ones already done).
    num_workers: DDP workers; use_gpu: None picks GPUs when the cluster has one per worker;
      True refuses a cluster without them that cannot get them (check_gpus).
    cpus_per_worker: CPU slots each worker holds, and its torch threads (on one machine
      with one worker, all its cores train one model); None: Ray Train's default (one on
      a CPU worker, none beside a GPU). Without `cache` the archive is read while the
      workers hold their slots, so at least one slot must be left over (counted on the
      cluster now, or up to what its autoscaler reports it can add; on an autoscaling
      cluster that reports nothing, use cache=True or leave this unset).
    batch_size: rows per worker per step; lr, weight_decay: AdamW's (lr the base rate).
    lr_schedule: "cosine" (linear warm-up over 5% of the steps, then cosine decay to
      1% of lr) or "constant" (engine.training.schedule).
    augment: True (strength 0.5), False, or a strength in [0, 1] (engine.augment).
    val_fraction: share of the archive's tiles held out for validation when no
      val_archive is given (0: none).
    tile_size, levels, max_samples_per_image: override the sample layout (default: the
      config's input size, every pyramid level a tile fits in, all tiles).
    max_failures: worker-group restarts Ray Train may make (FailureConfig), >= 0.
    keep_checkpoints: how many checkpoints to keep in storage (None: all).
    registry / tracking_uri: an engine.registry.ModelRegistry, whose tracking URI the
      metrics use too; else metrics go to `tracking_uri` (engine.registry's resolution).
    register_as: register the final model under this name; promote: also make it
      `register_as@production`.
    overrides: builder-argument overrides of the model config.
    task_options: per-family extras (segmenter: max_boxes; fusion: context_tile).
    progress_dir: local folder for per-rank progress lines (see loop.LoopConfig).
    synthetic_archive / synthetic_ratio: mix a synthetic archive's gate-accepted samples
      into training, `synthetic_ratio` per real training sample (plan_training); the
      run's parameters record the asked ratio and the achieved count and ratio.
    cache: read the samples from the archive once and keep them in Ray's object store
      for every epoch (`Dataset.materialize`; augmentation still differs per epoch, it
      runs in the workers' collate), instead of reading the archive again each epoch.
      None: when they take at most CACHE_SHARE of the cluster's object store.
    inputs: how tiles are normalised for the model, the input mode it then expects at
      inference (engine.pipeline.inputs): "tile" (each tile's percentile stretch) or
      "image" (the image's engine.preprocess parameters: tiles of an image alike);
      recorded on the registered version (tag `input`), which bundles read.
    init_weights / init_sha256: fine-tune from this checkpoint file (Meta's SAM .pth, our
      .safetensors; a path every worker can read, or an s3:// URI each machine copies
      once into its cache: engine.models.weights_file) instead of the seeded
      initialisation; its sha256 (default: the `.sha256` beside it, else the file's
      own) is checked on every worker (engine.training.warm_start).
    train_only: train only these modules ("sam.mask_decoder"); the rest stay as loaded.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from engine.data.training_samples import sample_bytes, training_dataset
    from engine.models.checkpoint import read_config, read_sidecar, verify_sha256
    from engine.registry import backend
    from engine.training import mlflow_metrics
    from engine.training.checkpointing import MODEL_FILE, read_state
    from engine.training.loop import train_loop_per_worker
    from engine.training.tasks import make_task
    from engine.training.warm_start import check_warm_start

    if epochs < 1 or num_workers < 1 or batch_size < 1:
        raise TrainingError(f"epochs ({epochs}), num_workers ({num_workers}) and batch_size ({batch_size}) must be >= 1")
    if cpus_per_worker is not None and (
            isinstance(cpus_per_worker, bool) or not isinstance(cpus_per_worker, int) or cpus_per_worker < 1):
        raise TrainingError(f"cpus_per_worker must be a whole number >= 1, got {cpus_per_worker!r}")
    strength = (0.5 if augment else 0.0) if isinstance(augment, bool) else float(augment)
    if not 0.0 <= strength <= 1.0:
        raise TrainingError(f"augment strength must be in [0, 1], got {augment!r}")
    if promote and not register_as:
        raise TrainingError("promote needs register_as (the registered name to promote)")
    if lr_schedule not in SCHEDULES:
        raise TrainingError(f"unknown lr_schedule {lr_schedule!r}; valid: {', '.join(SCHEDULES)}")
    if keep_checkpoints is not None and keep_checkpoints < 1:
        raise TrainingError(f"keep_checkpoints must be None (all) or >= 1, got {keep_checkpoints}")
    if not _positive(lr):
        raise TrainingError(f"lr must be a finite number > 0, got {lr!r}")
    if not (_positive(weight_decay) or weight_decay == 0):
        raise TrainingError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
        # Ray Train reads -1 as "restart forever"
        raise TrainingError(f"max_failures must be a whole number >= 0, got {max_failures!r}")
    if register_as:
        from engine.registry.refs import check_name

        check_name(register_as)  # before hours of training, not after
    storage, storage_fs, storage_prefix = _storage(storage_path)  # an unusable URI before Ray starts
    # The registry and the metrics' tracking server before planning or Ray: one that is
    # down is a RegistryError naming it now, not minutes later with Ray up (engine.registry.backend).
    if registry is None and register_as:
        from engine.registry import ModelRegistry

        registry = ModelRegistry(tracking_uri)
    uri = registry.tracking_uri if registry is not None else mlflow_metrics.tracking_uri(tracking_uri)
    backend.check_reachable(uri)

    layout, train_specs, val_specs = plan_training(
        family, model_name, archive, val_archive=val_archive, val_fraction=val_fraction, tile_size=tile_size,
        levels=levels, max_samples_per_image=max_samples_per_image, num_workers=num_workers, seed=seed,
        overrides=overrides, task_options=task_options, synthetic_archive=synthetic_archive,
        synthetic_ratio=synthetic_ratio, inputs=inputs)

    # What the plan teaches the model's config (diffusion: pixel sizes per modality);
    # the user's own overrides win.
    overrides = {**make_task(family, task_options).config_overrides(train_specs), **(overrides or {})}
    synthetic_params = {"synthetic_archive": str(synthetic_archive),
                        "synthetic_ratio": synthetic_ratio if synthetic_archive else 0.0}
    if synthetic_archive is not None:  # what was mixed in, which a small archive caps below the ratio
        from engine.training.mixing import synthetic_count

        n_syn = synthetic_count(train_specs, synthetic_archive)
        n_real = len(train_specs) - n_syn
        synthetic_params.update(synthetic_samples=n_syn,
                                synthetic_ratio_achieved=round(n_syn / n_real, 4) if n_real else float("nan"))
    train_only = [train_only] if isinstance(train_only, str) else list(train_only)
    # before Ray: the file fits the model (keys, shapes, digest), the modules exist
    init_sha256 = check_warm_start(family, model_name, overrides, init_weights, init_sha256, train_only)
    if init_weights is not None:
        from engine.stores.uri import resolve

        init_weights = resolve(init_weights).uri  # an absolute path (workers' cwd differs) or s3://
    if run_name:  # a run of that name in storage is resumed: it must be this model
        check_resume(storage_path, run_name, family, model_name, overrides, train_only)
    ensure_ray(num_workers * (cpus_per_worker or 1))
    if use_gpu is None:
        use_gpu = _auto_gpu(num_workers)
    elif use_gpu:
        check_gpus(num_workers)
    run_name = run_name or f"{family}-{model_name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    datasets = {"train": training_dataset(train_specs, layout)}
    if val_specs:
        datasets["val"] = training_dataset(val_specs, layout)
    if cache is None:
        cache = _fits_object_store((len(train_specs) + len(val_specs)) * sample_bytes(layout))
    if not cache and cpus_per_worker is not None:  # Ray Train's default holds one slot at most: as before
        _check_cpus_left_for_reads(num_workers * cpus_per_worker)
    run_id = mlflow_metrics.start_run(uri, run_name=run_name, params={
        "family": family, "model": model_name, "archive": str(archive), "val_archive": str(val_archive),
        "epochs": epochs, "num_workers": num_workers, "cpus_per_worker": cpus_per_worker, "use_gpu": use_gpu,
        "batch_size": batch_size, "lr": lr,
        "lr_schedule": lr_schedule, "weight_decay": weight_decay, "augment_strength": strength, "seed": seed,
        "tile": layout.tile, "context_tile": layout.context_tile, "inputs": layout.normalisation,
        "train_samples": len(train_specs), "val_samples": len(val_specs),
        **synthetic_params,
        "init_weights": str(init_weights), "init_sha256": str(init_sha256), "train_only": ",".join(train_only),
        "cached": bool(cache),
        "storage_path": os.fspath(storage_path) if storage_prefix else storage,
    }, tags={"grainflow.family": family, "grainflow.model": model_name}, resume_key="storage_path")

    loop_config = LoopConfig(
        family=family, model_name=model_name, layout=layout, epochs=epochs, batch_size=batch_size, lr=lr,
        lr_schedule=lr_schedule, steps_per_epoch=steps_per_epoch(len(train_specs), num_workers, batch_size),
        weight_decay=weight_decay, seed=seed, augment_strength=strength, overrides=dict(overrides or {}),
        task_options=dict(task_options or {}), init_weights=init_weights, init_sha256=init_sha256,
        train_only=train_only, tracking_uri=uri, mlflow_run_id=run_id,
        progress_dir=None if progress_dir is None else os.path.abspath(progress_dir), validate=bool(val_specs),
    )
    start = time.perf_counter()  # with the cached samples' one read
    try:
        if cache:  # read once, here, before the workers start
            datasets = _materialize(datasets)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config.to_dict(),
            scaling_config=ScalingConfig(
                num_workers=num_workers, use_gpu=use_gpu,
                resources_per_worker=None if cpus_per_worker is None else {"CPU": cpus_per_worker}),
            run_config=RunConfig(
                name=run_name, storage_path=storage, storage_filesystem=storage_fs,
                failure_config=FailureConfig(max_failures=max_failures,
                                             controller_failure_limit=WORKER_GROUP_START_RETRIES),
                checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            ),
            datasets=datasets,
        )
        result = trainer.fit()
        if getattr(result, "error", None) is not None:
            raise TrainingError(f"training run {run_name!r} failed: {result.error}") from result.error
        if result.checkpoint is None:
            raise TrainingError(f"training run {run_name!r} finished without a checkpoint")
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory(prefix="grainflow-final-") as tmp:
            local = Path(result.checkpoint.to_directory(tmp))
            state = read_state(local)
            # the file is checked against the digest written beside it at save time:
            # intact after its trip through storage
            digest = verify_sha256(local / MODEL_FILE, read_sidecar(local / MODEL_FILE))
            version = None
            if register_as:
                version = registry.register(
                    register_as, local / MODEL_FILE, family=family,
                    config={"model": read_config(local / MODEL_FILE).to_dict(), "training": {
                        "archive": str(archive), "epochs": state.epoch, "batch_size": batch_size, "lr": lr,
                        "lr_schedule": lr_schedule, "weight_decay": weight_decay, "num_workers": num_workers,
                        "augment_strength": strength, "seed": seed, "tile": layout.tile,
                        "context_tile": layout.context_tile, "inputs": layout.normalisation,
                        "train_samples": len(train_specs), "val_samples": len(val_specs), "run_name": run_name,
                        "init_weights": init_weights, "init_sha256": init_sha256, "train_only": train_only,
                    }},
                    metrics=_finite(state.history[-1]),
                    tags={"training_run": run_id, TRAINED_INPUT_TAG: layout.normalisation},
                    reuse_identical=True,  # a finished run started again: its version, not a copy
                )
                if promote:
                    version = registry.promote(register_as, version.version)
    except BaseException:
        mlflow_metrics.end_run(uri, run_id, "FAILED")
        raise
    mlflow_metrics.end_run(uri, run_id, "FINISHED")
    return TrainResult(
        family=family, model_name=model_name, run_name=run_name, history=state.history,
        checkpoint_path=storage_prefix + str(result.checkpoint.path), model_sha256=digest, run_id=run_id,
        tracking_uri=uri, train_samples=len(train_specs), val_samples=len(val_specs), seconds=seconds,
        model_version=version, cached=bool(cache),
    )


def _fits_object_store(nbytes: int) -> bool:
    """Whether `nbytes` of samples may be kept in the object store for a whole run."""
    import ray

    return nbytes <= CACHE_SHARE * ray.cluster_resources().get("object_store_memory", 0)


def _positive(x: Any) -> bool:
    """A finite real number > 0 (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite entries (what the registry accepts as metrics)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
