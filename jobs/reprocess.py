"""Reprocess an archive with a registered ensemble; prints a JSON summary as its last line.

    python -m jobs.reprocess --archive s3://lab/archive --out s3://lab/runs/r1 \\
        --models grainflow-demo@production --tracking-uri sqlite:///registry.db

Every tile of every image goes through the ensemble on Ray Data; results, label images,
the per-image summary, the errors table and the ledger go under --out (see
engine.pipeline.job and engine.data.sinks). A rerun with the same arguments resumes:
tiles the ledger lists are skipped. Submitted as a Ray job it joins that cluster
(RAY_ADDRESS); run directly it starts a local Ray. Exit status: 0 done (failed tiles, and
images whose metadata could not be planned, are in the errors table and counted), 2 bad
input (the message names it), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.reprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--archive", required=True, help="archive URI (local path, file://, s3://)")
    p.add_argument("--out", required=True, help="output URI (local path, file://, s3://)")
    p.add_argument("--models", required=True, metavar="REF", help="registered ensemble: NAME@ALIAS, NAME/VERSION or NAME")
    p.add_argument("--tracking-uri", "--registry", dest="tracking_uri", default=None,
                   help="MLflow tracking URI of the registry (default: MLFLOW_TRACKING_URI or the embedded store)")
    p.add_argument("--pixel-size", type=float, default=None, metavar="NM",
                   help="model pixel size in nm (default: the bundle's, else each image's level 0)")
    p.add_argument("--tile", type=int, default=None, help="tile core edge in model pixels (default: one chunk)")
    p.add_argument("--halo", type=int, default=32, help="context pixels around each core")
    p.add_argument("--batch-size", type=int, default=8, help="tiles per ensemble call")
    p.add_argument("--concurrency", type=int, default=None, help="ensemble actors (default: one per GPU, else CPUs / 2)")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="default: 1 (or a share) when the cluster has GPUs")
    p.add_argument("--cpus-per-actor", type=float, default=1.0,
                   help="CPUs each ensemble actor reserves, and its torch threads")
    p.add_argument("--labels", choices=("auto", "image", "out", "none"), default="auto",
                   help="label images beside each image (auto: when the archive is writable, else under --out)")
    p.add_argument("--conf", type=float, default=None, help="detector score threshold (default: the ensemble's)")
    p.add_argument("--max-det", type=int, default=None, help="most detections per tile (default: the ensemble's)")
    p.add_argument("--no-resume", action="store_true", help="redo every tile, replacing --out's job outputs")
    args = p.parse_args(argv)
    for name in ("tile", "batch_size", "concurrency", "max_det"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not args.cpus_per_actor > 0:
        p.error(f"--cpus-per-actor must be > 0, got {args.cpus_per_actor}")
    if args.halo < 0:
        p.error(f"--halo must be >= 0, got {args.halo}")
    if args.conf is not None and not 0.0 <= args.conf <= 1.0:
        p.error(f"--conf must be in [0, 1], got {args.conf}")
    if args.pixel_size is not None and not (math.isfinite(args.pixel_size) and args.pixel_size > 0):
        p.error(f"--pixel-size must be a positive number of nm, got {args.pixel_size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import ray

    from engine.errors import exit_code_for
    from engine.runtime import configure_offline

    configure_offline()
    started = False
    try:
        from engine.tenants import enforce_job_uris

        enforce_job_uris("reprocess", args)  # the tenant's prefixes, checked again in the job
        from engine.pipeline.ensemble_config import EnsembleConfig
        from engine.pipeline.job import reprocess
        from engine.pipeline.run_folder import earlier_run
        from engine.registry import ModelRegistry

        from engine.registry.backend import check_existing
        from engine.registry.errors import RegistryError
        from engine.registry.schema import BUNDLE_FAMILY
        from engine.stores.catalog import read_catalog

        config = EnsembleConfig(**{k: v for k, v in (("conf", args.conf), ("max_det", args.max_det)) if v is not None})
        # Bad input fails here, before Ray starts: the archive's catalog, a ref that is
        # no registered bundle.
        from engine.stores.uri import durable

        read_catalog(durable(args.archive, "--archive"))
        earlier_run(durable(args.out, "--out"))  # someone else's folder: not written into, not cleared
        check_existing(args.tracking_uri)
        registry = ModelRegistry(args.tracking_uri)
        version = registry.get(args.models)
        if version.family != BUNDLE_FAMILY:
            raise RegistryError(f"{args.models}: {version.ref} is a {version.family} model, not an ensemble bundle "
                                f"(register one with engine.pipeline.bundle.register_ensemble, or run `make demo`)")
        if not ray.is_initialized():
            # Under `ray job submit` RAY_ADDRESS is set and ray.init() joins that cluster;
            # otherwise a new local Ray (never another Ray that happens to run here).
            ray.init() if os.environ.get("RAY_ADDRESS") else ray.init(address="local")
            started = True
        result = reprocess(
            args.archive, args.out, args.models, registry=registry, target_pixel_size_nm=args.pixel_size,
            tile_size=args.tile, halo=args.halo, batch_size=args.batch_size, concurrency=args.concurrency,
            num_gpus=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor, resume=not args.no_resume,
            labels=args.labels, config=config,
        )
    except Exception as exc:
        return exit_code_for(exc, "reprocess")  # a user's error: one line, exit 2; a bug: its traceback
    finally:
        # Before printing: workers' log lines reach the driver asynchronously and must
        # not land after the summary line. A Ray the caller connected stays connected.
        if started and ray.is_initialized():
            ray.shutdown()
    print(json.dumps(result.to_dict(), sort_keys=True, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
