"""`synthesize`: generate labelled defect samples as Ray tasks and write them as an archive.

    from engine.synth.diffusion.job import synthesize
    summary = synthesize("diffusion.safetensors", "out/synthetic", n_per_condition=50,
                         defect_classes=["crack"], materials=["ferritic_steel"], modalities=["SEM"])

On the driver, before any Ray work: the model is resolved and verified (a checkpoint
file with its sha256 sidecar, or a registry ref), every requested class, material and
modality is checked against the model's vocabulary (an unknown one raises
ConditioningError listing the valid ones) and the request against the conditions the
model was trained on (conditions.expand_conditions: untrained combinations are left
out, and a name with none trained is refused; a model saved before training recorded
them warns, UntrainedConditionsWarning), the sampling steps against the model's noise
schedule, and the plan is made (engine.synth.diffusion.plan). Samples already in the
archive's catalog are never written again: an interrupted run resumes, and a run
asking for more samples adds only the new ones. The settings that fix the pixels must
match the archive's (SETTINGS_FILE) while it holds a sample; an archive that holds
none yet (every batch of a run failed) takes the new run's settings.

Each batch of the plan is one Ray task requesting `num_cpus` CPUs and, on a cluster with
GPUs, `num_gpus` (a fraction, so several tasks share one GPU). Pending tasks with a GPU
request are what the autoscaler sees as demand for its GPU worker group. The model
reaches workers once through the object store (a worker keeps the last model it loaded).
As each task finishes the driver rewrites the catalog (with provenance) and the ground
truth; a failed batch (a sampler that produced NaN among them) is recorded and the rest
goes on. Each sample is written with the pixel size of the real crops of its condition
(engine.synth.diffusion.calibration).

Reproducibility: the same seeds and settings write the same pixels, whatever the number
of samples asked for (plan.py: a sample is computed in a fixed window of indices). The
settings include torch's thread count and the device: the thread count changes how
sums are split (the last bits of a float, a step of a stored uint16 pixel) and CUDA
kernels sum differently from CPU ones. Each task pins torch to the recorded thread count
(default: its `num_cpus`), and a resume with another count or device is refused.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from engine.errors import GrainflowError
from engine.stores.catalog import IMAGES_DIR
from engine.stores.staging import remove_stale_siblings
from engine.stores.uri import StoreLocation, resolve
from engine.synth.diffusion.calibration import pixel_size_for
from engine.synth.diffusion.conditions import Condition, UntrainedConditionsWarning, Vocabulary, expand_conditions
from engine.synth.diffusion.model_source import ModelSource, resolve_model
from engine.synth.diffusion.plan import SampleBatch, plan_synthesis
from engine.synth.diffusion.sampler import SAMPLERS, check_steps

DEFAULT_GPU_FRACTION = 0.25


@dataclass(frozen=True)
class SynthesisSummary:
    """What a run did: conditions generated, samples written now, skipped (already
    there), failed batches ({batch_id: error}), the resources each task asked for, wall
    seconds, and the keys of the requested combinations left out because the model was
    not trained on them (untrained)."""

    archive: str
    model_ref: str
    model_sha256: str
    conditions: int
    planned: int
    written: int
    skipped: int
    failed: dict[str, str] = field(default_factory=dict)
    task_resources: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    untrained: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class _Request:
    model: ModelSource
    conditions: list[Condition]
    vocabulary: Vocabulary
    batches: list[SampleBatch]
    settings: dict[str, Any]
    untrained: list[Condition] = field(default_factory=list)


def prepare(model: str, *, n_per_condition: int, defect_classes: Sequence[str] | None = None,
            materials: Sequence[str] | None = None, modalities: Sequence[str] | None = None, seed: int = 0,
            steps: int = 25, sampler: str = "ddim", batch_size: int = 8, tracking_uri: str | None = None) -> _Request:
    """Everything checked and planned on the driver, before any Ray work (module doc)."""
    from engine.models.diffusion import DEFAULT_NUM_TRAIN_TIMESTEPS

    if sampler not in SAMPLERS:
        raise GrainflowError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise GrainflowError(f"steps must be an integer >= 1, got {steps!r}")
    source = resolve_model(model, tracking_uri=tracking_uri)
    config = source.config()
    try:  # here, not in every Ray task (DDIM refuses, DPM-Solver++ writes NaN as blank samples)
        check_steps(sampler, steps, int(config.args.get("num_train_timesteps", DEFAULT_NUM_TRAIN_TIMESTEPS)))
    except ValueError as exc:
        raise GrainflowError(f"{model}: {exc}") from None
    vocabulary = Vocabulary.of(config.args)
    if vocabulary.trained is None:
        warnings.warn(f"{model}: the model does not record the conditions it was trained on (saved before they "
                      "were recorded); every combination of its vocabulary may be asked for, and one its training "
                      "crops never showed generates samples that look like nothing",
                      UntrainedConditionsWarning, stacklevel=2)
    conditions, untrained = expand_conditions(vocabulary, defect_classes=defect_classes, materials=materials,
                                              modalities=modalities)
    calibrated = dict(config.args.get("pixel_size_nm") or {})
    uncalibrated = sorted({c.modality for c in conditions if pixel_size_for(calibrated, c) is None})
    if uncalibrated:  # its samples would be written with a made-up pixel size
        trained_on = sorted({k.rsplit(".", 1)[-1] for k in calibrated})
        raise GrainflowError(
            f"{model}: no pixel size for {', '.join(uncalibrated)} (the model was trained on crops of "
            f"{', '.join(trained_on) or 'no calibrated modality'}); ask for "
            f"{'those modalities' if calibrated else 'a model trained on an archive'} only")
    try:
        batches = plan_synthesis(conditions, n_per_condition, seed=seed, batch_size=batch_size)
    except ValueError as exc:
        raise GrainflowError(str(exc)) from None
    settings = {"model_sha256": source.sha256, "sampler": sampler, "steps": steps, "batch_size": batch_size,
                "sample_size": int(config.args["sample_size"])}
    return _Request(source, conditions, vocabulary, batches, settings, untrained)


# --- worker side -------------------------------------------------------------------

_MODEL_CACHE: dict[str, Any] = {}


def _load(model_bytes: bytes, sha256: str, device: str):
    """The model of these bytes on `device`, checked against its digest; cached per worker."""
    key = f"{sha256}/{device}"
    if key not in _MODEL_CACHE:
        from engine.models.checkpoint import load_model

        with tempfile.TemporaryDirectory(prefix="gf-diffusion-") as tmp:
            path = Path(tmp) / "model.safetensors"
            path.write_bytes(model_bytes)
            model = load_model(path, expected_sha256=sha256, map_location=device)
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = model.eval()
    return _MODEL_CACHE[key]


def generate_batch(model_bytes: bytes, sha256: str, batch: SampleBatch, archive_uri: str,
                   provenance: dict[str, Any], steps: int, sampler: str, *, threads: int | None = None,
                   device: str | None = None) -> list[tuple[dict[str, Any], Any]]:
    """Compute one batch's window and write its samples (runs in a Ray task); returns
    (catalog record, truth row or None) per written sample.

    threads: torch's intra-op thread count (None: the CPUs Ray assigned the task).
    device: "cpu" or "cuda", which the task must be able to use (GrainflowError
    otherwise); None: CUDA when Ray gave this task a GPU, else CPU.
    """
    import torch

    from engine.runtime import use_assigned_cpus
    from engine.synth.diffusion.intensity import range_for
    from engine.synth.diffusion.output import write_sample
    from engine.synth.diffusion.sampler import sample_patches

    import ray

    auto = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    if device is None:
        device = auto
    elif device != auto:  # the recorded device fixes the pixels; computing elsewhere would not resume them
        raise GrainflowError(f"batch {batch.batch_id}: the archive's samples are computed on {device}, and this "
                             f"task can use {auto} only")
    if threads is None:
        use_assigned_cpus()
    else:
        torch.set_num_threads(int(threads))  # a sample's last bits depend on torch's thread count
    model = _load(model_bytes, sha256, device)
    vocabulary = Vocabulary.of(model)
    # The whole window is computed, whichever of its samples are written: the batch a
    # sample is computed in fixes its bits (plan.py).
    conditions = [vocabulary.index(s.condition) for s in batch.window]
    images, masks = sample_patches(model, conditions, [s.seed for s in batch.window], steps=steps, method=sampler,
                                   device=device)
    archive = resolve(archive_uri)
    wanted = {s.sample_id for s in batch.samples}
    out = []
    for s, image, mask, cond in zip(batch.window, images, masks, conditions):
        if s.sample_id not in wanted:
            continue
        px = pixel_size_for(model.pixel_size_nm, s.condition)  # prepare() refused uncalibrated ones
        out.append(write_sample(archive, s, image, mask, pixel_size_nm=px,
                                intensity=range_for(model.intensity_range, s.condition),
                                provenance={**provenance, "condition_index": cond,
                                            "torch_threads": torch.get_num_threads()}))
    return out


# --- driver ----------------------------------------------------------------------------

def task_resources(num_gpus: float | None, num_cpus: float = 1.0) -> dict[str, float]:
    """The resource shape of one synthesis task: `num_cpus` CPUs and, when `num_gpus` is
    None, DEFAULT_GPU_FRACTION of a GPU if the cluster has GPUs now (else none); an
    explicit fraction is requested as given (on an autoscaling cluster whose GPU group
    starts empty, give it, so pending tasks ask for GPUs). A GPU the connected cluster
    has not and cannot get (`engine.runtime.gpu_shortfall`) raises GrainflowError: tasks
    asking for it would wait forever."""
    from engine.runtime import cluster_gpus, refuse_unmet_gpus

    check_resources(num_gpus, num_cpus)
    if num_gpus is None:
        num_gpus = DEFAULT_GPU_FRACTION if cluster_gpus() > 0 else 0.0
    refuse_unmet_gpus(num_gpus, f"num_gpus (--num-gpus): each synthesis task asks for {num_gpus:g} GPU",
                      "run on CPUs (num_gpus=0, --num-gpus 0)")
    return {"num_cpus": float(num_cpus), "num_gpus": float(num_gpus)}


def sampling_threads(num_cpus: float, threads: int | None = None) -> int:
    """torch's thread count for sampling: `threads`, else the task's whole CPUs (at least 1)."""
    if threads is None:
        return max(1, int(num_cpus))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise GrainflowError(f"threads must be an integer >= 1 (torch's threads per task), got {threads!r}")
    return threads


def check_resources(num_gpus: float | None, num_cpus: float) -> None:
    """GrainflowError for a task shape Ray cannot schedule."""
    if num_gpus is not None and (num_gpus < 0 or (num_gpus > 1 and not float(num_gpus).is_integer())):
        raise GrainflowError(f"num_gpus must be a fraction in [0, 1] or a whole number, got {num_gpus}")
    if not num_cpus > 0:
        raise GrainflowError(f"num_cpus must be > 0 (each task's torch runs on the CPUs it is given), got {num_cpus}")


def synthesize(model: str, out: str | StoreLocation, *, n_per_condition: int,
               defect_classes: Sequence[str] | None = None, materials: Sequence[str] | None = None,
               modalities: Sequence[str] | None = None, seed: int = 0, steps: int = 25, sampler: str = "ddim",
               batch_size: int = 8, num_gpus: float | None = None, num_cpus: float = 1.0,
               max_in_flight: int | None = None, tracking_uri: str | None = None,
               threads: int | None = None) -> SynthesisSummary:
    """Generate `n_per_condition` samples of every requested (class, material, modality)
    (None: all the model knows) the model was trained on into the archive `out`
    (module doc).

    seed: the run seed (per-sample seeds derive from it); steps, sampler: "ddim" or "dpm"
    with that many steps; batch_size: samples per task; num_gpus / num_cpus: each task's
    request (see task_resources); max_in_flight: at most this many tasks submitted at a
    time (None: all, which shows the autoscaler the whole demand at once); threads:
    torch's threads per task (None: max(1, int(num_cpus))), recorded with the device in
    the archive's settings, since both change the pixels.
    """
    import ray

    from engine.synth.diffusion.output import (
        check_settings, read_records, read_truth_rows, record_settings, write_index,
    )

    request = prepare(model, n_per_condition=n_per_condition, defect_classes=defect_classes, materials=materials,
                      modalities=modalities, seed=seed, steps=steps, sampler=sampler, batch_size=batch_size,
                      tracking_uri=tracking_uri)
    check_resources(num_gpus, num_cpus)  # before the archive or Ray is touched
    threads = sampling_threads(num_cpus, threads)
    archive = resolve(out)
    # Nothing is written before the folder is known to be a synthetic archive (or none yet).
    records = {r["image_id"]: r for r in read_records(archive)}
    # Recorded settings bind only while a sample they fixed is there: an archive every
    # batch of an earlier run failed on takes a corrected run's settings.
    if records:
        check_settings(archive, {**request.settings, "torch_threads": threads})  # before Ray starts
    remove_stale_siblings(archive.join(IMAGES_DIR))  # half-written samples of a killed run
    truth = {t.image_id: t for t in read_truth_rows(archive) if t.image_id in records}
    todo = []
    for b in request.batches:  # samples in the catalog are never written again (module doc)
        missing = tuple(s for s in b.samples if s.sample_id not in records)
        if missing:
            todo.append(replace(b, samples=missing))
    planned = sum(len(b.samples) for b in request.batches)
    skipped = planned - sum(len(b.samples) for b in todo)

    if not ray.is_initialized():
        ray.init(address="auto" if os.environ.get("RAY_ADDRESS") else "local")
    resources = task_resources(num_gpus, num_cpus)  # before any task: a GPU that never comes is refused
    device = "cuda" if resources["num_gpus"] > 0 else "cpu"
    settings = {**request.settings, "torch_threads": threads, "device": device}
    if not (records and check_settings(archive, settings)):
        record_settings(archive, settings)
    provenance = {"model_ref": request.model.ref, "model_version": request.model.version,
                  "model_sha256": request.model.sha256, "sampler": sampler, "steps": steps, "run_seed": seed}
    remote = ray.remote(generate_batch).options(**resources, max_retries=1)
    model_ref = ray.put(request.model.path.read_bytes())
    start = time.perf_counter()
    pending: dict[Any, SampleBatch] = {}
    queue = list(todo)
    limit = max_in_flight or len(queue) or 1
    failed: dict[str, str] = {}
    written = 0
    while queue or pending:
        while queue and len(pending) < limit:
            b = queue.pop(0)
            pending[remote.remote(model_ref, request.model.sha256, b, archive.uri, provenance, steps, sampler,
                                  threads=threads, device=device)] = b
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            b = pending.pop(ref)
            try:
                results = ray.get(ref)
            except Exception as exc:  # recorded; the other batches go on
                failed[b.batch_id] = f"{type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}"
                continue
            for record, t in results:
                records[record["image_id"]] = record
                truth.pop(record["image_id"], None)
                if t is not None:
                    truth[t.image_id] = t
            written += len(results)
            write_index(archive, records.values(), truth.values())
    if not records:
        write_index(archive, [], [])
    return SynthesisSummary(
        archive=archive.uri, model_ref=request.model.ref, model_sha256=request.model.sha256,
        conditions=len(request.conditions), planned=planned, written=written, skipped=skipped, failed=failed,
        task_resources=resources, seconds=round(time.perf_counter() - start, 3),
        untrained=[c.key() for c in request.untrained])
