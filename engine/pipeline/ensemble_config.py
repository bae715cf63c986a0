"""How the ensemble runs (`EnsembleConfig`): thresholds, batch sizes, input modes.

Its own module, free of torch, so that what only carries a configuration (the job's
driver and its per-image tasks, the serving config, the entrypoints) does not import
the models' stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from engine.pipeline import inputs as inp


@dataclass(frozen=True)
class EnsembleConfig:
    """How the ensemble runs.

    conf: detector score threshold; iou: the detector's NMS IoU; max_det: most boxes per
    tile. max_batch: tiles per model call (1: bit-identical results whatever the batch).
    inputs: input mode per role (`engine.pipeline.inputs`); None: the bundle's, else
    `DEFAULT_INPUTS`. mask_to_box: cut SAM masks to their box.
    """

    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 100
    max_batch: int = 16
    inputs: Mapping[str, str] | None = None
    mask_to_box: bool = True

    def __post_init__(self):
        if not 0.0 <= self.conf <= 1.0 or not 0.0 <= self.iou <= 1.0:
            raise ValueError(f"conf and iou must be in [0, 1], got conf={self.conf}, iou={self.iou}")
        if self.max_det < 1 or self.max_batch < 1:
            raise ValueError(f"max_det and max_batch must be >= 1, got {self.max_det}, {self.max_batch}")
        if self.inputs is not None:
            inp.check_inputs(self.inputs)


__all__ = ["EnsembleConfig"]
