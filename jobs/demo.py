"""The demo `make demo` runs: the whole engine on one machine, on an embedded Ray.

    python -m jobs.demo --dir out/demo

1. Archives: a training archive, a small validation archive (YOLO keeps its best epoch
   on it) and a held-out "lab" archive from engine.synth (a rerun reuses them).
2. Models: when the demo registry (``<dir>/registry.db``) has no ``grainflow-demo``
   bundle, the tiny configs are trained on the training archive (YOLO through
   Ultralytics, SAM and the classifier through Ray Train), registered and promoted.
3. Reprocess: the lab archive through the ensemble on Ray Data (`engine.pipeline.job`).
4. Report: ``<dir>/run/report.html`` (`engine.reports`).

Prints what it did and where the report is; the last line is the report's path. The
sizes are chosen to finish in a few minutes on 2 CPU cores (the detector's quality is
bounded by how many defects the training archive holds: see engine.pipeline.demo_models).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="out/demo", help="where archives, registry, checkpoints and the run go")
    p.add_argument("--train-images", type=int, default=12,
                   help="images in the training archive (12: one of each material, so that no material "
                        "of the archive to reprocess is new to the detector)")
    p.add_argument("--images", type=int, default=6, help="images in the archive to reprocess")
    p.add_argument("--size", type=int, default=1024, help="image edge in pixels")
    p.add_argument("--detector-epochs", type=int, default=15)
    p.add_argument("--epochs", type=int, default=2, help="epochs of the classifier and SAM")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the embedded Ray (default: all)")
    p.add_argument("--retrain", action="store_true", help="train new models even if the registry has some")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import ray

    from engine.errors import exit_code_for
    from engine.runtime import configure_offline

    configure_offline()
    root = Path(args.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        from engine.pipeline.demo_models import DEMO_BUNDLE, train_demo_models
        from engine.pipeline.job import reprocess
        from engine.registry import ModelRegistry
        from engine.reports import write_report

        train_archive = _archive(root / "train-archive", args.train_images, args.size, seed=3)
        val_archive = _archive(root / "validation-archive", 2, args.size, seed=5)
        lab_archive = _archive(root / "archive", args.images, args.size, seed=8)
        registry = ModelRegistry(f"sqlite:///{root / 'registry.db'}")
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ref = f"{DEMO_BUNDLE}@production"
        if args.retrain or DEMO_BUNDLE not in registry.list_models():
            _say(f"training the tiny models on {train_archive} (first run only)")
            models = train_demo_models(train_archive, registry=registry, out_dir=root / "models",
                                       detector_epochs=args.detector_epochs, detector_val_archive=val_archive,
                                       epochs=args.epochs,
                                       # one worker on every CPU of this embedded Ray: nothing else runs
                                       cpus_per_worker=max(1, int(ray.cluster_resources().get("CPU", 1))),
                                       # Ultralytics warms up for 3 epochs by default: most of a short run.
                                       detector_hyperparameters={"warmup_epochs": 0.5})
            for role, seconds in models.seconds.items():
                _say(f"  {role}: {models.members[role]} in {seconds:.0f} s")
            ref = models.production_ref
        _say(f"reprocessing {lab_archive} with {ref}")
        result = reprocess(str(lab_archive), str(root / "run"), ref, registry=registry, resume=False)
        _say(f"  {result.tiles_done} tiles, {result.objects} defects, {result.errors} errors, "
             f"{result.tiles_per_s:.2f} tiles/s")
        report = write_report(str(root / "run"), archive=str(lab_archive))
    except Exception as exc:
        return exit_code_for(exc, "demo")  # a user's error: one line, exit 2; a bug: its traceback
    finally:
        if ray.is_initialized():
            ray.shutdown()
    tracking = f"sqlite:///{(root / 'registry.db').resolve()}"
    _say(f"done in {time.perf_counter() - started:.0f} s. The models are {ref} in the registry {tracking}:")
    _say(f"  grainflow serve --tracking-uri {tracking} --bundle {DEMO_BUNDLE} --keys KEYS.json")
    _say(f"  grainflow reprocess --tracking-uri {tracking} --models {ref} --archive ARCHIVE --out OUT")
    _say("the report:")
    print(report, flush=True)
    return 0


def _archive(path: Path, n_images: int, size: int, *, seed: int) -> Path:
    from engine.errors import MetadataError
    from engine.stores.catalog import read_catalog
    from engine.synth.archive import generate_archive

    try:
        if len(read_catalog(str(path))) == n_images:
            return path
    except MetadataError:  # no archive there yet: write it
        pass
    _say(f"synthesising {n_images} images of {size}² px into {path}")
    generate_archive(str(path), n_images=n_images, seed=seed, size=size, chunk=512)
    return path


def _say(line: str) -> None:
    print(f"[demo] {line}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
