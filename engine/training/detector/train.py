"""Train a YOLO defect detector on an archive: `train_detector`.

The archive reaches Ultralytics' trainer as tile plans (`tiles.plan_tiles`: catalog and
ground truth, no pixels) and an `ArchiveTileDataset` that reads each tile's pixels from
the OME-Zarr images when a batch needs it; nothing is exported. Training and the
per-epoch validation are Ultralytics' own (`trainer.ArchiveDetectionTrainer`). The best
epoch's EMA weights are saved as safetensors through `engine.models.save_checkpoint`,
so the file reloads with `engine.models.load_model` / `load_detector_checkpoint`, and
are then evaluated on whole held-out images (`evaluate.evaluate_detector`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.errors import GrainflowError
from engine.stores.catalog import read_catalog
from engine.stores.uri import StoreLocation, resolve
from engine.training.detector.tiles import limit_background, plan_tiles, split_images

CHECKPOINT_NAME = "detector.safetensors"
RESULT_NAME = "result.json"
DEFAULT_MODEL = "yolov8n_tiny"

# Ultralytics' defaults, changed where micrographs differ from photographs. Vertical flips
# where the tile's material allows them (`ArchiveTileDataset` draws them per tile: most
# microstructures have no up, an AM alloy's build direction does); quarter turns are not
# used because SEM scan lines and drift have a direction.
# Colour jitter does nothing to one channel. Plots are off: they would render fonts (a
# font download when missing) and write images beside the run.
DEFAULT_HYPERPARAMETERS: dict[str, Any] = {"flipud": 0.5, "fliplr": 0.5, "degrees": 0.0, "hsv_h": 0.0, "hsv_s": 0.0}


@dataclass(frozen=True)
class DetectorTrainingResult:
    """What a training run produced.

    checkpoint: path of the safetensors file (with `<file>.sha256` beside it); sha256 its
    digest. metrics: whole-image evaluation on the held-out images (`mAP50`, `mAP50-95`,
    `per_class_AP50`, `per_material_mAP50`, ...; see `DetectionEvaluation`). tile_metrics:
    Ultralytics' validator on the held-out tiles for the best epoch (precision, recall,
    mAP50, mAP50-95, per_class_AP50). history: one dict per epoch (Ultralytics' results
    table: losses, metrics, learning rates). train_seconds: wall time of `trainer.train()`.
    registered: "name/version" in the model registry, when registered.
    init: what a warm start moved into the model (`warm_start.WeightTransfer.to_dict()`:
    file, sha256, the source model and classes, tensors adapted and left), else None.
    checkpoint_bytes: the file's bytes, only while a result crosses from a Ray worker.
    """

    checkpoint: str
    sha256: str
    model: str
    metrics: dict[str, Any]
    tile_metrics: dict[str, Any]
    history: tuple[dict[str, float], ...]
    epochs: int
    best_epoch: int | None
    imgsz: int
    batch: int
    device: str
    seed: int
    train_images: tuple[str, ...]
    val_images: tuple[str, ...]
    train_tiles: int
    val_tiles: int
    train_seconds: float
    registered: str | None = None
    init: dict[str, Any] | None = None
    checkpoint_bytes: bytes | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without the checkpoint bytes."""
        d = asdict(self)
        d.pop("checkpoint_bytes")
        return d

    def flat_metrics(self) -> dict[str, float]:
        """Numbers for a registry or tracker: mAP50, mAP50-95, AP50/<class>, mAP50/<material>, tile/..."""
        out = {"mAP50": self.metrics.get("mAP50"), "mAP50-95": self.metrics.get("mAP50-95"),
               "train_seconds": self.train_seconds}
        out |= {f"AP50/{k}": v for k, v in self.metrics.get("per_class_AP50", {}).items()}
        out |= {f"mAP50/{k}": v for k, v in self.metrics.get("per_material_mAP50", {}).items()}
        out |= {f"tile/{k}": v for k, v in self.tile_metrics.items() if not isinstance(v, dict)}
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> cuda when torch sees a GPU, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def ultralytics_device(device: torch.device) -> str:
    """Ultralytics' spelling: "cpu", or the CUDA index as a string ("0")."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        return str(device.index or 0)
    raise ValueError(f"device {device} is not supported for detector training; use cpu or cuda")


def _amp(device: torch.device) -> str | bool:
    """Mixed precision without Ultralytics' AMP check, which downloads a model to run it:
    bf16 autocast where the GPU has it (no check, no GradScaler), full precision elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return False


def _splits(archive: StoreLocation, val_archive: StoreLocation | None, val_fraction: float | None,
            seed: int) -> tuple[list[str], list[str]]:
    ids = [str(i) for i in read_catalog(archive)["image_id"]]
    if val_archive is not None:
        if val_fraction is not None:
            raise ValueError("give val_fraction or val_archive, not both")
        return ids, [str(i) for i in read_catalog(val_archive)["image_id"]]
    return split_images(ids, 0.2 if val_fraction is None else val_fraction, seed)


def _history(csv_path: Path) -> tuple[dict[str, float], ...]:
    if not csv_path.is_file():
        return ()
    with open(csv_path, newline="") as f:
        return tuple({k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f))


def _tile_metrics(trainer) -> dict[str, Any]:
    m = trainer.metrics or {}
    out = {k.split("/", 1)[1].removesuffix("(B)"): float(v) for k, v in m.items() if k.startswith("metrics/")}
    box = trainer.validator.metrics.box
    names = trainer._detector.names
    out["per_class_AP50"] = {names[int(c)]: float(ap) for c, ap in zip(box.ap_class_index, box.ap50)}
    return out


class DetectorArgumentError(GrainflowError, ValueError):
    """A detector training argument out of range (the message names it)."""


def check_detector_args(model: str, *, imgsz: int | None, epochs: int, batch: int,
                        val_fraction: float | None = None) -> int:
    """The tile side to train at (imgsz, default the config's), after checking the
    arguments `train_detector` takes; DetectorArgumentError names a bad one. Cheap: the
    job calls it before starting Ray."""
    from engine.models import get_config

    default = get_config("detector", model).input_size  # an unknown model lists the valid ones
    imgsz = int(default if imgsz is None else imgsz)  # 0 is refused, not read as "the default"
    if imgsz <= 0 or imgsz % 32:
        raise DetectorArgumentError(f"imgsz must be a positive multiple of 32 (YOLO's largest stride), got {imgsz}")
    if not isinstance(epochs, int) or epochs < 1:
        raise DetectorArgumentError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not isinstance(batch, int) or batch < 2:
        raise DetectorArgumentError(f"batch must be an integer >= 2 (BatchNorm needs two samples), got {batch!r}")
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise DetectorArgumentError(f"val_fraction must be in (0, 1) (whole images held out), got {val_fraction}")
    return imgsz


def train_detector(
    archive: str | StoreLocation,
    *,
    out_dir: str | Path,
    model: str = DEFAULT_MODEL,
    epochs: int = 10,
    imgsz: int | None = None,
    batch: int = 16,
    val_fraction: float | None = None,
    val_archive: str | StoreLocation | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    overlap: int | None = None,
    pixel_size_nm: float | None = None,
    background_ratio: float | None = None,
    workers: int = 2,
    threads: int | None = None,
    hyperparameters: dict[str, Any] | None = None,
    evaluate: bool = True,
    register_as: str | None = None,
    registry=None,
    synthetic_archive: str | StoreLocation | None = None,
    synthetic_ratio: float = 0.5,
    init_weights: str | Path | None = None,
    init_sha256: str | None = None,
) -> DetectorTrainingResult:
    """Train the registered detector config `model` on the defect boxes of `archive`.

    Held-out images: `val_archive` (all its images), else a seeded `val_fraction` of the
    archive's images (default 0.2; whole images, never tiles of a training image).
    imgsz: tile side in pixels (a multiple of 32; default the config's input_size);
    training tiles overlap by `overlap` pixels (default imgsz // 4) so a defect a tile
    edge cuts is whole in a neighbour. pixel_size_nm: the model's pixel size; each image
    is read as the batch job reads it for such a model (a square one at the pyramid level
    nearest it when that is within the job's tolerance, else, and for pixels that are not
    square, resampled to exactly that size: `tiles.image_entries`; default level 0).
    background_ratio: train on every tile with a defect and at most this many times as
    many without (None: all tiles).
    device: None picks cuda when present, else cpu.
    workers: data-loading processes on GPU (Ultralytics uses none on CPU).
    threads: torch's threads on CPU (default: this process's count; in
    `train_detector_on_ray`, the CPUs Ray granted. Ultralytics would take min(8, cores - 1)).
    hyperparameters: further Ultralytics train arguments (lr0, mosaic, scale, ...). `nbs`,
    the batch gradients are accumulated to, defaults to the batch: one optimizer step per
    batch. Ultralytics scales weight decay per step by batch / nbs and picks its "auto"
    optimizer by the number of steps, so against its default (nbs 64) a long run gets
    64 / batch times the total weight decay and may get SGD where it got AdamW; pass
    `nbs` 64 (or `weight_decay`, `optimizer`) to keep Ultralytics' behaviour.
    out_dir receives `detector.safetensors` (+ .sha256), `result.json` and Ultralytics'
    run folder `ultralytics/` (args.yaml, results.csv; no images, no .pt files).
    register_as: register the checkpoint under this name in `registry` (default: a
    `ModelRegistry()` on the embedded default store).
    synthetic_archive / synthetic_ratio: add the defect tiles of a synthetic archive
    (engine.synth.diffusion; gate-rejected samples left out), `synthetic_ratio` per real
    training tile (engine.training.mixing); validation stays real. The synthetic samples
    are read at the real tiles' scale: at `pixel_size_nm`, or, with none, at the median
    level-0 pixel size of the real training images of their modality (a modality no real
    training image has is refused).
    init_weights: start from this detector checkpoint (a grainflow .safetensors, e.g. the
    production version; an Ultralytics .pt) instead of a random initialisation, its
    tensors moved in by name and shape, class outputs by class name
    (`warm_start.transfer_weights`; a file of another architecture is refused before
    training; a local path or s3:// URI); init_sha256: the digest it must have (a .pt,
    a pickle, needs it; a .safetensors defaults to its `.sha256` file, else its own).
    """
    from engine.runtime import configure_offline

    configure_offline()  # before Ultralytics is first imported: it checks connectivity on import
    from engine.models import create_detector, save_checkpoint
    from engine.training.detector.evaluate import evaluate_detector
    from engine.training.detector.trainer import ArchiveDetectionTrainer

    archive = resolve(archive)
    val_location = resolve(val_archive) if val_archive is not None else None
    imgsz = check_detector_args(model, imgsz=imgsz, epochs=epochs, batch=batch,
                                val_fraction=val_fraction if val_archive is None else None)
    if register_as is not None:
        from engine.registry.refs import check_name

        check_name(register_as)  # before the training, not after it
    overlap = imgsz // 4 if overlap is None else int(overlap)
    dev = resolve_device(device)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)  # the detector's initial weights
    detector = create_detector(model)
    init = None
    if init_weights is not None:
        from engine.training.detector.warm_start import warm_start

        init = warm_start(detector, init_weights, init_sha256).to_dict()
    train_ids, val_ids = _splits(archive, val_location, val_fraction, seed)
    names = detector.names
    tiles = {
        "train": limit_background(plan_tiles(archive, names, tile=imgsz, overlap=overlap, image_ids=train_ids,
                                             pixel_size_nm=pixel_size_nm), background_ratio, seed),
        "val": plan_tiles(val_location or archive, names, tile=imgsz, overlap=0, image_ids=val_ids,
                          pixel_size_nm=pixel_size_nm),
    }
    if synthetic_archive is not None:
        from engine.training.mixing import mix_in, synthetic_detector_tiles

        synthetic = synthetic_detector_tiles(synthetic_archive, names, imgsz, real_archive=archive,
                                             real_image_ids=train_ids, pixel_size_nm=pixel_size_nm, overlap=overlap)
        tiles["train"] = mix_in(tiles["train"], synthetic, synthetic_ratio, seed=seed, what="defect tiles")
    overrides = {
        "model": f"grainflow-detector-{model}",  # a label only: setup_model hands over our model
        "task": "detect", "mode": "train", "epochs": epochs, "imgsz": imgsz, "batch": batch,
        "device": ultralytics_device(dev), "seed": seed, "deterministic": True, "workers": workers,
        "project": str(out_dir), "name": "ultralytics", "exist_ok": True, "plots": False, "amp": _amp(dev),
        "val": True, "save": True, "cache": False, "pretrained": False, "verbose": False,
        **DEFAULT_HYPERPARAMETERS, **(hyperparameters or {}),
    }
    # Ultralytics accumulates gradients up to a nominal batch of 64 (`nbs`): on an archive
    # of a few images (4 batches of 16 an epoch) that is one optimizer step per epoch, and
    # 10 epochs learned next to nothing, differently in every process. One step per batch
    # (2026-12-05, 6 images, 10 epochs): held-out pore AP50 0.81, void 0.58.
    overrides.setdefault("nbs", overrides["batch"])
    trainer = ArchiveDetectionTrainer(detector, tiles, overrides, threads=threads)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    with contextlib.suppress(OSError):  # Ultralytics' weights/ folder: empty, weights stay in memory
        trainer.wdir.rmdir()
    if trainer.best_state is None:
        raise RuntimeError(f"training on {archive} produced no validated weights (no finite validation fitness)")

    detector = detector.cpu()
    detector.model.load_state_dict(trainer.best_state)
    detector.eval()
    checkpoint = out_dir / CHECKPOINT_NAME
    metadata = {"archive": archive.uri, "epochs": str(epochs), "imgsz": str(imgsz), "seed": str(seed)}
    if init is not None:
        metadata["init_sha256"] = init["sha256"]
    digest = save_checkpoint(detector, checkpoint, metadata=metadata)
    metrics: dict[str, Any] = {}
    if evaluate:
        ev = evaluate_detector(detector, val_location or archive, image_ids=val_ids, pixel_size_nm=pixel_size_nm)
        metrics = {"mAP50": ev.map50, "mAP50-95": ev.map50_95, "per_class_AP50": ev.per_class_ap50,
                   "per_material_mAP50": ev.per_material_map50, "targets": ev.targets, "images": ev.images}
    result = DetectorTrainingResult(
        checkpoint=str(checkpoint), sha256=digest, model=model, metrics=metrics, tile_metrics=_tile_metrics(trainer),
        history=_history(trainer.csv), epochs=epochs, best_epoch=trainer.best_epoch, imgsz=imgsz, batch=batch,
        device=str(dev), seed=seed, train_images=tuple(train_ids), val_images=tuple(val_ids),
        train_tiles=len(tiles["train"]), val_tiles=len(tiles["val"]), train_seconds=seconds, init=init,
    )
    if register_as is not None:
        result = register_result(result, register_as, registry, archive=archive.uri)
    write_result(result, out_dir)
    return result


def register_result(result: DetectorTrainingResult, name: str, registry=None, *, archive: str | None = None
                    ) -> DetectorTrainingResult:
    """Register the result's checkpoint as a new version of `name` (or find it is the
    latest one already: the same bytes are not registered twice); returns the result
    with `registered` set to "name/version"."""
    from dataclasses import replace

    from engine.models.checkpoint import read_config

    if registry is None:
        from engine.registry import ModelRegistry

        registry = ModelRegistry()
    tags = {"trainer": "engine.training.detector", "imgsz": str(result.imgsz), "epochs": str(result.epochs)}
    if archive:
        tags["archive"] = archive
    if result.init:
        tags["init_sha256"] = result.init["sha256"]
    version = registry.register(name, result.checkpoint, family="detector",
                                config=read_config(result.checkpoint).to_dict(), metrics=result.flat_metrics(),
                                tags=tags, reuse_identical=True)
    return replace(result, registered=f"{version.name}/{version.version}")


def write_result(result: DetectorTrainingResult, out_dir: str | Path) -> Path:
    """`result.json` in `out_dir` (NaN written as NaN, as Python's json does)."""
    path = Path(out_dir) / RESULT_NAME
    path.write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True, default=str))
    return path
