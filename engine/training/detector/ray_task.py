"""`train_detector` as a Ray task: on a GPU node when the cluster has one.

The task trains in a scratch folder on whichever node runs it and returns the result
with the checkpoint's bytes (a YOLOv8n is ~12 MB; the object store carries it); the
caller's process writes them to its `out_dir`, checks the sha256 the worker recorded,
and registers the checkpoint there (the registry's store may be a file only the caller
can reach). The archive is read by the worker from its URI (local path on one machine,
s3:// on a cluster); only the tile plan and labels are computed on the worker too.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from engine.stores.uri import StoreLocation

DETECTOR_TASK_CPUS = 2  # CPU slots the task holds by default, and its torch threads


def _train_in_worker(archive: StoreLocation | str, kwargs: dict[str, Any],
                     init_file: tuple[str, bytes] | None = None):
    """Runs on the Ray worker: train in a scratch folder, return the result with the bytes.
    init_file: (the caller's path, its bytes) of the initial weights, written to the
    scratch folder (the worker's node need not see the caller's files) and checked there
    against kwargs["init_sha256"]."""
    from engine.runtime import configure_offline, use_assigned_cpus

    configure_offline()
    use_assigned_cpus()  # train_detector trains on this process's threads: the CPUs Ray granted
    from engine.training.detector.train import train_detector

    with tempfile.TemporaryDirectory(prefix="grainflow-detector-") as scratch:
        if init_file is not None:
            path, data = init_file
            local = Path(scratch) / Path(path).name  # a .pt's stem names the model it holds
            local.write_bytes(data)
            kwargs = {**kwargs, "init_weights": local}
        result = train_detector(archive, out_dir=Path(scratch) / "run", **kwargs)
        data = Path(result.checkpoint).read_bytes()
    if init_file is not None:
        result = dataclasses.replace(result, init={**result.init, "file": init_file[0]})
    return dataclasses.replace(result, checkpoint_bytes=data)


def train_detector_on_ray(
    archive: str | StoreLocation,
    *,
    out_dir: str | Path,
    num_cpus: float = DETECTOR_TASK_CPUS,
    num_gpus: float | None = None,
    register_as: str | None = None,
    registry=None,
    **kwargs: Any,
):
    """`train_detector(archive, ...)` run as a Ray task; returns its `DetectorTrainingResult`
    with `checkpoint` in this process's `out_dir`.

    num_gpus: None asks for one GPU when the cluster has any (then the task trains on
    cuda), else none (cpu); GPUs the cluster has not and cannot get
    (`engine.runtime.gpu_shortfall`) raise TrainingError before the task starts.
    num_cpus: CPU slots held; the task trains on as many torch threads.
    Other keyword arguments go to `train_detector` (model, epochs, imgsz, batch,
    val_fraction or val_archive, seed, init_weights, ...). Initial weights are checked
    here against the model before the task starts and their bytes go with it. Uses the
    Ray this process is connected to, or starts a local one (RAY_ADDRESS joins a cluster).
    """
    import ray

    from engine.models.checkpoint import sha256_file, sidecar_path
    from engine.training.detector.train import CHECKPOINT_NAME, register_result, write_result

    if "device" in kwargs:
        raise TypeError("train_detector_on_ray picks the device from the resources Ray grants; pass num_gpus")
    if register_as is not None:
        from engine.registry.refs import check_name

        check_name(register_as)  # here, where it is registered after the task's training
    init_file = None
    if kwargs.get("init_weights") is not None:
        from engine.training.detector.train import DEFAULT_MODEL
        from engine.training.detector.warm_start import check_init_weights

        uri = str(kwargs.pop("init_weights"))
        local, kwargs["init_sha256"] = check_init_weights(kwargs.get("model", DEFAULT_MODEL), uri,
                                                          kwargs.get("init_sha256"))
        init_file = (uri, local.read_bytes())  # the task checks them against that digest
    if not ray.is_initialized():
        from engine.runtime import configure_offline

        configure_offline()  # workers inherit the driver's environment on a local Ray
        ray.init()
    from engine.runtime import cluster_gpus, refuse_unmet_gpus
    from engine.training.trainer import TrainingError

    gpus = (1 if cluster_gpus() >= 1 else 0) if num_gpus is None else num_gpus
    refuse_unmet_gpus(gpus, f"num_gpus: the detector's training task asks for {gpus:g} GPU{'s' if gpus != 1 else ''}",
                      "train on CPUs (num_gpus=0, or None to pick; --gpu no/auto)", TrainingError)
    task = ray.remote(_train_in_worker).options(num_cpus=num_cpus, num_gpus=gpus, name="train_detector")
    result = ray.get(task.remote(archive, kwargs, init_file))

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / CHECKPOINT_NAME
    checkpoint.write_bytes(result.checkpoint_bytes)
    if sha256_file(checkpoint) != result.sha256:
        checkpoint.unlink()
        raise RuntimeError(f"{checkpoint}: bytes received from the Ray worker do not match the sha256 it recorded")
    sidecar_path(checkpoint).write_text(f"{result.sha256}  {checkpoint.name}\n")
    result = dataclasses.replace(result, checkpoint=str(checkpoint), checkpoint_bytes=None)
    if register_as is not None:
        result = register_result(result, register_as, registry, archive=str(archive))
    write_result(result, out_dir)
    return result
