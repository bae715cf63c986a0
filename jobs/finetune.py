"""Fine-tune a model on an archive with Ray Train; prints a JSON summary as its last line.

    python -m jobs.finetune --model fusion:fusion_tiny --archive s3://lab/archive \\
        --storage s3://lab/runs --epochs 5 --workers 2 --register fusion --promote

`--model FAMILY:NAME` names a registered config (classifier, fusion, segmenter or
detector). Classifier, fusion and segmenter train on Ray Train (DDP); a YOLO detector
trains through Ultralytics' trainer as one Ray task, on a GPU node when there is one,
and writes its checkpoint to --storage (a local path). Submitted as a Ray job it joins that cluster
(RAY_ADDRESS); run directly it starts a local Ray. Exit status: 0 done, 2 bad input
(the message names it), 1 anything else. See engine.training.train for the arguments.
`--init-weights FILE --train-only MODULE` fine-tunes from given weights (Meta's SAM .pth)
and trains only that module (e.g. `--model segmenter:sam_vit_b --train-only
sam.mask_decoder`); a detector starts from a detector checkpoint (`--init-weights
production/detector.safetensors`: a grainflow one, or an Ultralytics .pt), its class
outputs carried over by class name. `--synthetic ARCHIVE --synthetic-ratio R` mixes a synthetic archive (jobs.synthesize)
into detector or fusion training: R synthetic samples per real training sample.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time


# Options of the Ray Train loop (engine.training.train) and their defaults; the
# detector trains through Ultralytics' trainer and refuses them.
RAY_TRAIN_ONLY = {"workers": 2, "lr_schedule": "cosine", "cache": "auto", "augment": 0.5, "max_samples_per_image": None,
                  "max_failures": 2, "inputs": "tile", "train_only": None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="FAMILY:NAME, e.g. fusion:fusion_tiny")
    p.add_argument("--archive", required=True, help="archive URI (local path, file://, s3://)")
    p.add_argument("--storage", required=True, help="checkpoint storage (local path or s3:// URI)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--workers", type=int, default=None, help="DDP workers (default 2)")
    p.add_argument("--cpus-per-worker", type=int, default=None,
                   help="CPU slots each worker holds, and its torch threads (default: 1 on a CPU worker, none "
                        "beside a GPU; the detector's task: 2)")
    p.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto", help="use GPUs (auto: when the cluster has one per worker)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per worker per step")
    p.add_argument("--lr", type=float, default=None,
                   help="base learning rate (default 1e-3, AdamW; the detector: Ultralytics' lr0, default its own)")
    # engine.training.schedule.SCHEDULES, spelled out: importing engine.training loads torch
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default=None,
                   help="cosine: 5%% warm-up, then cosine decay to 1%% of --lr; constant: --lr throughout "
                        "(classifier, fusion, segmenter, diffusion)")
    p.add_argument("--cache", choices=("auto", "yes", "no"), default=None,
                   help="keep the samples in Ray's object store after one read (auto: when they take at most a "
                        "quarter of it) instead of reading the archive every epoch (not the detector: Ultralytics "
                        "reads its own way)")
    p.add_argument("--augment", type=float, default=None,
                   help="augmentation strength in [0, 1] (default 0.5); 0 turns it off")
    # engine.pipeline.inputs' modes a trained model can expect (engine.data.sample_plan.NORMALISATIONS)
    p.add_argument("--inputs", choices=("tile", "image"), default=None,
                   help="how tiles are normalised for the model, and so what it expects at inference: tile (each "
                        "tile's percentile stretch, the default) or image (the image's per-modality preprocessing, "
                        "fitted once per image: every tile of an image alike); recorded on the registered version")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-archive", default=None, help="validation archive (default: hold out --val-fraction of the tiles)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--tile", type=int, default=None, help="tile side in pixels (default: the model's input size)")
    p.add_argument("--max-samples-per-image", type=int, default=None)
    p.add_argument("--init-weights", default=None, metavar="FILE",
                   help="start from these weights (Meta's SAM .pth, a grainflow .safetensors; for the detector a "
                        "grainflow or Ultralytics detector checkpoint), not a random initialisation: a path every "
                        "worker can read, or an s3:// URI (copied once per machine)")
    p.add_argument("--init-sha256", default=None, metavar="HEX",
                   help="the sha256 --init-weights must have (default: its .sha256 file, where there is one)")
    p.add_argument("--train-only", default=None, metavar="MODULE[,MODULE]",
                   help="train only these modules, the rest frozen (e.g. sam.mask_decoder: SAM's decoder on its "
                        "pretrained image encoder); an unknown name lists the model's modules")
    p.add_argument("--max-failures", type=int, default=None, help="worker-group restarts allowed (default 2)")
    p.add_argument("--run-name", default=None,
                   help="run name in storage; an existing run's name resumes it (a detector run of that name is "
                        "trained again and replaced)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the embedded store; the detector uses "
                        "it for --register only)")
    p.add_argument("--register", default=None, metavar="NAME", help="register the final model under NAME")
    p.add_argument("--promote", action="store_true", help="make the registered version NAME@production")
    p.add_argument("--synthetic", default=None, metavar="ARCHIVE",
                   help="mix in a synthetic archive (jobs.synthesize; gate-rejected samples left out); detector, fusion")
    p.add_argument("--synthetic-ratio", type=float, default=0.5,
                   help="synthetic training samples per real one (default 0.5)")
    args = p.parse_args(argv)
    family, sep, name = args.model.partition(":")
    if not sep or not family or not name:
        p.error(f"--model must be FAMILY:NAME (e.g. fusion:fusion_tiny), got {args.model!r}")
    args.family, args.model_name = family, name
    if args.init_sha256 and not args.init_weights:
        p.error("--init-sha256 needs --init-weights FILE")
    if args.promote and not args.register:
        p.error("--promote needs --register NAME")
    if args.synthetic and family not in ("detector", "fusion"):
        p.error(f"--synthetic mixes into detector or fusion training, not {family}")
    if args.synthetic_ratio < 0:
        p.error(f"--synthetic-ratio must be >= 0, got {args.synthetic_ratio}")
    # Each of these would otherwise surface only after Ray started, or not at all.
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.max_failures is not None and args.max_failures < 0:
        p.error(f"--max-failures must be >= 0 (Ray Train would read {args.max_failures} as unlimited), "
                f"got {args.max_failures}")
    if args.cpus_per_worker is not None and args.cpus_per_worker < 1:
        p.error(f"--cpus-per-worker must be >= 1, got {args.cpus_per_worker}")
    if args.tile is not None and args.tile < 1:
        p.error(f"--tile must be >= 1 pixel (leave it out for the model's input size), got {args.tile}")
    scheme = args.storage.partition("://")[0].lower() if "://" in args.storage else ""
    if scheme not in ("", "file", "s3"):
        p.error(f"--storage must be a local path, file:// or s3:// URI, got {args.storage!r}")
    given = [name for name in RAY_TRAIN_ONLY if getattr(args, name) is not None]
    if family == "detector" and given:
        p.error(f"{', '.join('--' + n.replace('_', '-') for n in given)}: Ray Train options (classifier, fusion, "
                f"segmenter); the detector trains through Ultralytics' trainer")
    for name, default in RAY_TRAIN_ONLY.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import ray

    from engine.errors import exit_code_for
    from engine.runtime import configure_offline
    from engine.training import train

    configure_offline()
    # train() plans the samples first, so bad input fails before any Ray starts, then
    # connects (engine.training.trainer.ensure_ray): under `ray job submit` (RAY_ADDRESS
    # set) ray.init() joins that cluster, otherwise a local Ray starts.
    connected = ray.is_initialized()  # a Ray the caller connected stays connected
    try:
        from engine.tenants import enforce_job_uris

        enforce_job_uris("train", args)  # the tenant's prefixes, checked again in the job
        if args.family == "detector":
            summary = _train_detector(args)
        else:
            summary = train(
                args.family, args.model_name, args.archive, storage_path=args.storage, epochs=args.epochs,
                num_workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                use_gpu={"auto": None, "yes": True, "no": False}[args.gpu],
                batch_size=args.batch_size, lr=1e-3 if args.lr is None else args.lr, lr_schedule=args.lr_schedule,
                cache={"auto": None, "yes": True, "no": False}[args.cache], augment=args.augment, seed=args.seed,
                val_archive=args.val_archive, val_fraction=args.val_fraction, tile_size=args.tile,
                max_samples_per_image=args.max_samples_per_image, max_failures=args.max_failures,
                run_name=args.run_name, tracking_uri=args.tracking_uri, register_as=args.register,
                promote=args.promote, inputs=args.inputs, init_weights=args.init_weights,
                init_sha256=args.init_sha256, train_only=[m for m in (args.train_only or "").split(",") if m],
                **_synthetic(args),
            ).summary()
    except Exception as exc:
        return exit_code_for(exc, "finetune")  # a user's error: one line, exit 2; a bug: its traceback
    finally:
        # Before printing: workers' log lines reach the driver asynchronously and must
        # not land after the summary line.
        if ray.is_initialized() and not connected:
            ray.shutdown()
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)
    return 0


def _synthetic(args: argparse.Namespace) -> dict:
    """The mixing arguments of engine.training.train / train_detector, when asked for."""
    if not args.synthetic:
        return {}
    return {"synthetic_archive": args.synthetic, "synthetic_ratio": args.synthetic_ratio}


def _train_detector(args: argparse.Namespace) -> dict:
    from engine.errors import GrainflowError
    from engine.registry import ModelRegistry
    from engine.stores.catalog import read_catalog
    from engine.stores.uri import resolve
    from engine.training.detector import train_detector_on_ray
    from engine.training.detector.ray_task import DETECTOR_TASK_CPUS
    from engine.training.detector.train import check_detector_args
    from engine.training.trainer import check_gpus, ensure_ray

    # Everything that can be checked is checked before Ray starts (the Ray Train
    # families' train() does the same): the worker would find it only after setup, and
    # a bad --register name only after the whole training.
    storage = resolve(args.storage)
    if storage.scheme != "file":
        raise GrainflowError(f"{storage}: detector runs write their checkpoint to a local --storage path")
    check_detector_args(args.model_name, imgsz=args.tile, epochs=args.epochs, batch=args.batch_size,
                        val_fraction=None if args.val_archive else args.val_fraction)
    if args.register:
        from engine.registry.refs import check_name

        check_name(args.register)
    for archive in filter(None, (args.archive, args.val_archive)):
        read_catalog(archive)  # a missing or foreign archive is named here
    if args.synthetic:
        from engine.training.mixing import accepted_image_ids

        # one that is no synthetic archive, was never gated or changed since: named here,
        # not ~30 s later from the Ray task
        accepted_image_ids(args.synthetic)
    init = {}
    if args.init_weights:
        from engine.training.detector.warm_start import check_init_weights

        _, digest = check_init_weights(args.model_name, args.init_weights, args.init_sha256)
        init = {"init_weights": args.init_weights, "init_sha256": digest}
    cpus = args.cpus_per_worker or DETECTOR_TASK_CPUS
    ensure_ray(cpus)
    if args.gpu == "yes":
        check_gpus(1)  # a task asking for a GPU no node has or can get would wait forever
    registry = ModelRegistry(args.tracking_uri) if args.register else None
    val = {"val_archive": args.val_archive} if args.val_archive else {"val_fraction": args.val_fraction}
    run_name = args.run_name or f"detector-{args.model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = train_detector_on_ray(
        args.archive, out_dir=storage.join(run_name).path,
        model=args.model_name, epochs=args.epochs, batch=args.batch_size, seed=args.seed, num_cpus=cpus,
        num_gpus={"auto": None, "yes": 1, "no": 0}[args.gpu], register_as=args.register, registry=registry,
        **({"imgsz": args.tile} if args.tile is not None else {}),
        **({"hyperparameters": {"lr0": args.lr}} if args.lr is not None else {}),
        **val, **_synthetic(args), **init,
    )
    if args.promote and result.registered:
        name, _, version = result.registered.partition("/")
        registry.promote(name, int(version))
    return {"family": "detector", **result.to_dict()}


if __name__ == "__main__":
    sys.exit(main())
