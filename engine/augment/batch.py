"""Augmentation of a columnar batch, the form Ray Data's map_batches hands over.

Batch columns (numpy, batch_format="numpy"), B rows:
  image (B, H, W) uint8/uint16/float: normalised with sample.to_unit_float, returned
    float32 in [0, 1];
  modality (B,) str; pixel_size_nm (B,) float (returned updated by scale jitter);
  material (B,) str, optional; seed (B,) int, optional: the row's own seed;
  mask (B, H, W) int, optional, instance labels (box i <-> label i + 1, or instance_ids);
  boxes (B,) object of (N_i, 4) float32 XYXY, classes and instance_ids (B,) object of
    (N_i,) int, optional: ragged columns, as Ray Data stores lists of arrays.
Other columns pass through untouched.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from engine.augment.pipeline import Compose, build_pipeline
from engine.augment.sample import Sample, SampleError, to_unit_float


@dataclass
class AugmentBatch:
    """Callable for `dataset.map_batches(AugmentBatch(...), batch_format="numpy")`.

    Each row gets a Generator seeded by (seed, epoch, row seed), the row seed being the
    batch's `seed` column or, without one, a CRC of the row's pixels, so a row is
    augmented the same way whichever batch or worker it lands in. Change `epoch` to
    draw new augmentations each epoch. Pipelines come from build_pipeline per
    (modality, material), cached.
    """

    strength: float = 0.5
    seed: int = 0
    epoch: int = 0
    _cache: dict[tuple[str, str | None], Compose] = field(default_factory=dict, repr=False)

    def pipeline(self, modality: str, material: str | None) -> Compose:
        key = (modality, material)
        if key not in self._cache:
            self._cache[key] = build_pipeline(modality, material, self.strength)
        return self._cache[key]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.augment(batch, self.pipeline)

    def augment(self, batch: dict[str, np.ndarray],
                pipeline: Callable[[str, str | None], Compose]) -> dict[str, np.ndarray]:
        """The batch augmented by `pipeline(modality, material)` per row (see class doc)."""
        for col in ("image", "modality", "pixel_size_nm"):
            if col not in batch:
                raise SampleError(f"augmentation batch has no {col!r} column; columns: {', '.join(batch)}")
        n = len(batch["image"])
        out_rows = [self._row(batch, i, pipeline) for i in range(n)]
        out = dict(batch)
        out["image"] = _stack([s.image for s in out_rows])
        out["pixel_size_nm"] = np.array([s.pixel_size_nm for s in out_rows], np.float64)
        if "mask" in batch:
            out["mask"] = _stack([s.mask for s in out_rows])
        for col in ("boxes", "classes", "instance_ids"):
            if col in batch:
                out[col] = _ragged([getattr(s, col) for s in out_rows])
        return out

    def _row(self, batch: dict[str, np.ndarray], i: int, pipeline: Callable[[str, str | None], Compose]) -> Sample:
        image = to_unit_float(batch["image"][i])
        boxes = _get(batch, "boxes", i)
        sample = Sample(
            image=image, modality=str(batch["modality"][i]), pixel_size_nm=float(batch["pixel_size_nm"][i]),
            mask=_get(batch, "mask", i),
            boxes=None if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4),
            classes=_get(batch, "classes", i), instance_ids=_get(batch, "instance_ids", i))
        material = _get(batch, "material", i)
        row_seed = int(batch["seed"][i]) if "seed" in batch else zlib.crc32(np.ascontiguousarray(image).tobytes())
        rng = np.random.default_rng([self.seed, self.epoch, row_seed])
        return pipeline(sample.modality, None if material is None else str(material))(sample, rng)


def _get(batch: dict[str, np.ndarray], col: str, i: int) -> Any:
    if col not in batch:
        return None
    v = batch[col][i]
    if col in ("classes", "instance_ids"):
        return np.asarray(v, np.int64)
    return v


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) == 1:
        return np.stack(arrays)
    return _ragged(arrays)  # keep_shape=False pipelines give rows of different sizes


def _ragged(arrays: list[Any]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out
