"""Tiny model sets for tests and the demo.

- `untrained_tiny_models(seed)`: the tiny configs with seeded random weights, built in
  seconds. Their detections are noise (use a low `EnsembleConfig.conf` to get any),
  which is all that tests of plumbing, determinism, parity and registry round trips need.
- `train_demo_models(archive, registry=..., out_dir=...)`: trains the tiny configs on an
  archive with the engine's own trainers (YOLO through
  `engine.training.detector.train_detector`; the classifier, SAM and optionally the
  fusion model through Ray Train, `engine.training.train`), registers each member and a
  bundle over them, and promotes them. `make demo` calls it when the registry has no
  bundle. Tests keep to untrained models (the one test that trains is marked slow).

What the detector learns is bounded by how many defects the archive holds and which
materials it has seen, not by the epochs alone. Measured for `make demo` on the 2-core
VM, 2026-12-05 (one optimizer step per batch, 15 epochs, 1024-px images, a separate
2-image validation archive): trained on 8 images (4 of the 12 materials never seen), the
job over 6 held-out images reported 225 objects for 69 true defects, 156 of them
confident "cracks" in the unseen materials' textures (precision 0.10); trained on 12
images, one of each material, 93 objects, precision 0.22, recall of pores and voids 0.53
(validation AP50 pore 0.70, void 0.67, crack 0.10; inclusions and scratches not yet
learned). Training took 201 s (detector), 63 s (classifier, 2 epochs) and 28 s (SAM).
On 2026-12-07, with both cores training each model (`threads` / `cpus_per_worker`):
156 s, 62 s and 47 s, against 233 s, 81 s and 50 s on one core the same day.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.pipeline.ensemble import EnsembleModels

TINY = {"detector": "yolov8n_tiny", "segmenter": "sam_tiny", "classifier": "resnet10t", "fusion": "fusion_tiny"}
DEMO_BUNDLE = "grainflow-demo"


def untrained_tiny_models(seed: int = 0, *, fusion: bool = False) -> EnsembleModels:
    """The tiny configs (`TINY`) with random weights drawn from `seed` (same seed, same weights)."""
    import torch

    from engine.models import create_classifier, create_detector, create_fusion, create_segmenter
    from engine.runtime import configure_offline

    configure_offline()
    torch.manual_seed(seed)
    return EnsembleModels(
        detector=create_detector(TINY["detector"]), segmenter=create_segmenter(TINY["segmenter"]),
        classifier=create_classifier(TINY["classifier"]), fusion=create_fusion(TINY["fusion"]) if fusion else None,
    )


@dataclass(frozen=True)
class DemoModels:
    """What `train_demo_models` registered: bundle (its "name/version"), members (role ->
    "name/version"), metrics (role -> final metrics), seconds (role -> training time)."""

    bundle: str
    members: dict[str, str]
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def production_ref(self) -> str:
        """The ref a job names: `<bundle name>@production`."""
        return f"{self.bundle.split('/')[0]}@production"


def train_demo_models(
    archive: str | Path,
    *,
    registry,
    out_dir: str | Path,
    name: str = DEMO_BUNDLE,
    detector_epochs: int = 20,
    epochs: int = 3,
    background_ratio: float | None = 0.5,
    detector_hyperparameters: dict[str, Any] | None = None,
    detector_val_archive: str | Path | None = None,
    fusion: bool = False,
    num_workers: int = 1,
    cpus_per_worker: int | None = None,
    seed: int = 0,
    pixel_size_nm: float | None = None,
) -> DemoModels:
    """Train the tiny models on `archive`, register them and a bundle `name`; promote all.

    registry: an engine.registry.ModelRegistry (checkpoints are registered there and
    metrics logged to its tracking URI). out_dir: checkpoints and Ultralytics' run
    folder. detector_epochs: YOLO epochs (Ultralytics, local); background_ratio: at most
    this many defect-free tiles per tile with a defect in YOLO's training set (None: all;
    fewer background tiles make epochs shorter); detector_hyperparameters: further
    Ultralytics arguments (e.g. ``{"warmup_epochs": 0.5}`` for short runs);
    detector_val_archive: YOLO's validation images (default: a fifth of `archive`'s,
    too few defects on a small archive to pick the best epoch by); epochs: for the Ray
    Train members; num_workers: Ray Train workers each (starts a local Ray when none is
    connected) and cpus_per_worker their CPUs (and torch threads). Members are named
    `<name>-<role>`; the bundle's tags record the input modes the members were trained
    with (`member_inputs`) and `pixel_size_nm`.
    """
    from engine.pipeline.bundle import bundle_tags, member_inputs
    from engine.training import train
    from engine.training.detector import train_detector

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    members, metrics, seconds = {}, {}, {}

    start = time.perf_counter()
    det = train_detector(str(archive), out_dir=out / "detector", model=TINY["detector"], epochs=detector_epochs,
                         seed=seed, pixel_size_nm=pixel_size_nm, background_ratio=background_ratio,
                         hyperparameters=detector_hyperparameters,
                         val_archive=str(detector_val_archive) if detector_val_archive is not None else None,
                         register_as=f"{name}-detector", registry=registry)
    version = registry.get(det.registered)
    registry.promote(version.name, version.version)
    members["detector"], metrics["detector"] = version.ref, det.flat_metrics()
    seconds["detector"] = time.perf_counter() - start

    roles = ["classifier", "segmenter"] + (["fusion"] if fusion else [])
    for role in roles:
        start = time.perf_counter()
        result = train(role, TINY[role], str(archive), storage_path=out / "runs", epochs=epochs,
                       num_workers=num_workers, cpus_per_worker=cpus_per_worker, seed=seed, registry=registry,
                       register_as=f"{name}-{role}", promote=True, run_name=f"{name}-{role}-{int(time.time())}")
        members[role] = result.model_version.ref
        metrics[role] = dict(result.metrics)
        seconds[role] = time.perf_counter() - start

    bundle = registry.register_bundle(name, members, tags=bundle_tags(member_inputs(registry, members), pixel_size_nm))
    bundle = registry.promote(name, bundle.version)
    return DemoModels(bundle=bundle.ref, members=members, metrics=metrics, seconds=seconds)
