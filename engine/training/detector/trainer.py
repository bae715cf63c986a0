"""Ultralytics' detection trainer, fed from an archive and keeping its weights in memory.

`ArchiveDetectionTrainer` is Ultralytics' `DetectionTrainer` with four seams replaced:

- data: `get_dataset` / `build_dataset` return `ArchiveTileDataset`s built from tile
  plans instead of checking a data YAML and scanning image folders;
- model: `setup_model` hands over the `DetectionModel` inside an engine.models
  `Detector` (1 input channel, our class names) instead of building or downloading one;
- checkpoints: `save_model` keeps the best EMA weights in memory instead of pickling
  the model to last.pt / best.pt; `train_detector` saves them as safetensors, so no
  full-pickle file is written or read back;
- integrations: Ultralytics' logger callbacks (MLflow, Ray Tune, Comet, ...) follow a
  user-wide settings file; a library run must not start MLflow runs in the working
  directory because that file says so, so only the default callbacks are kept.

Everything else (loss, optimiser, EMA, warm-up, augmentation, `DetectionValidator` on
the held-out tiles every epoch) is Ultralytics' own. Imports Ultralytics at import time:
import after `engine.runtime.configure_offline()`.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import callbacks as ul_callbacks
from ultralytics.utils.torch_utils import unwrap_model

from engine.training.detector.dataset import ArchiveTileDataset
from engine.training.detector.tiles import TrainingTile

SPLITS = ("train", "val")


class ArchiveDetectionTrainer(DetectionTrainer):
    """Train `detector.model` on archive tiles.

    detector: an engine.models `Detector` (trained in place); tiles: {"train": plan,
    "val": plan}; overrides: Ultralytics train arguments (epochs, imgsz, batch, device,
    project/name for the run folder, hyperparameters); threads: torch's intra-op threads
    for training (default: this process's count before Ultralytics changes it). After
    `train()`, `best_state` holds the EMA weights of the epoch with the best validation
    fitness and `metrics` their validation metrics.
    """

    def __init__(self, detector, tiles: dict[str, Sequence[TrainingTile]], overrides: dict, *,
                 threads: int | None = None):
        missing = [s for s in SPLITS if not tiles.get(s)]
        if missing:
            raise ValueError(f"no tiles for split(s) {missing}; need both {SPLITS}")
        self._detector = detector
        self._tiles = {s: list(tiles[s]) for s in SPLITS}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch: int | None = None
        self._best_validation: tuple[dict, object] | None = None
        threads = torch.get_num_threads() if threads is None else int(threads)
        super().__init__(overrides=overrides)
        # Ultralytics' device selection (in __init__) sets torch to min(8, cores - 1)
        # threads for CPU training: one core idle on a 2-core machine, and on a Ray worker
        # more threads than the CPUs Ray granted. The caller's count is restored.
        torch.set_num_threads(max(1, threads))
        # Integration callbacks were added in __init__ (from the user's Ultralytics settings);
        # their setup hooks run later (on_pretrain_routine_end), so dropping them here is in time.
        self.callbacks = ul_callbacks.get_default_callbacks()

    # --- data -------------------------------------------------------------------------

    def get_dataset(self) -> dict:
        """Ultralytics' data dict: split names stand for the tile plans held by the trainer."""
        names = dict(enumerate(self._detector.names))
        return {"train": "train", "val": "val", "names": names, "nc": len(names), "channels": 1}

    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None) -> ArchiveTileDataset:
        """The split's tiles as a dataset, with the settings Ultralytics' `build_yolo_dataset`
        would use (augmentation only for training, rectangular letterboxed val batches)."""
        if img_path not in self._tiles:
            raise ValueError(f"unknown split {img_path!r}; this trainer holds {list(self._tiles)}")
        gs = max(int(unwrap_model(self.model).stride.max()), 32)
        return ArchiveTileDataset(
            self._tiles[img_path], class_names=self._detector.names, imgsz=self.args.imgsz,
            augment=mode == "train", hyp=self.args, rect=self.args.rect or mode == "val", batch_size=batch,
            stride=gs, pad=0.0 if mode == "train" else 0.5, cache=self.args.cache, prefix=f"{mode}: ",
        )

    def get_dataloader(self, dataset_path: str, batch_size: int = 16, rank: int = 0, mode: str = "train"):
        loader = super().get_dataloader(dataset_path, batch_size, rank, mode)
        if loader.num_workers > 0:
            # Worker processes are spawned, not forked: tensorstore's reader threads (engine.stores)
            # do not survive fork. The loader starts its workers lazily, so this is in time.
            loader.multiprocessing_context = "spawn"
        return loader

    # --- model and checkpoints --------------------------------------------------------

    def setup_model(self):
        """Train the given detector's `DetectionModel`; nothing is loaded or downloaded."""
        self.model = self._detector.model
        return None  # no checkpoint to resume from

    def save_model(self) -> bool:
        """Remember the EMA weights when this epoch has the best fitness so far (in memory),
        with this epoch's validation of them (Ultralytics calls this right after it)."""
        if self.best_fitness is not None and self.best_fitness == self.fitness:
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.ema.ema.state_dict().items()}
            self.best_epoch = self.epoch
            self._best_validation = (dict(self.metrics), copy.deepcopy(self.validator.metrics))
        return True

    def final_eval(self) -> None:
        """The best epoch's weights in the EMA model and their validation as the trainer's
        `metrics` (and the validator's per-class `metrics`). Ultralytics validates best.pt
        once more here; these weights were validated just before they were kept, and a
        second pass over the same tiles would repeat those numbers for the cost of one
        more epoch's validation, so the numbers kept with the weights are used (the pass is
        made only to draw plots, when asked for)."""
        if self.best_state is None:
            return
        self.ema.ema.load_state_dict(self.best_state)
        if not self.args.plots:
            self.metrics, self.validator.metrics = self._best_validation
            return
        self.validator.args.plots = True  # the pass draws the best epoch's plots
        metrics = self.validator(trainer=self)
        if metrics is not None:
            metrics.pop("fitness", None)
            self.metrics = metrics
