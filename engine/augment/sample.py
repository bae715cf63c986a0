"""One training sample as augmentation sees it, and the label bookkeeping geometry needs.

Conventions (every transform in engine.augment keeps them):
- image: (H, W) float32 in [0, 1], a fraction of the detector's full scale. Integer
  micrographs (uint8 optical, uint16 SEM/TEM) become this via `to_unit_float`.
- mask: optional (H, W) integer labels, 0 = background. `mask_kind` says what the
  labels mean: "instance" (label k > 0 is one object; box i belongs to label
  `instance_ids[i]`, by default i + 1) or "semantic" (label = class per pixel).
- boxes: optional (N, 4) float32 XYXY in pixels, pixel-edge coordinates: pixel (r, c)
  covers x in [c, c + 1), y in [r, r + 1), so a box around a mask is
  (min col, min row, max col + 1, max row + 1) and boxes lie in [0, W] x [0, H].
- classes: optional (N,) integer class of each box.
- modality: one of engine.stores.catalog.MODALITIES ("SEM", "TEM", "optical").
- pixel_size_nm: edge length of one pixel on the specimen, nm.
- scan_lines: whether the image already carries the row structure of a scanning
  instrument (SEM). Such an image may only be flipped or turned by 180 degrees, never
  by 90, or its scan lines would run vertically (see geometry.Dihedral). Defaults to
  True for SEM, False otherwise; a clean rendered scene may say False.
- log: what each applied transform drew, ((name, {param: value}), ...), for tests and
  debugging.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from engine.errors import GrainflowError
from engine.stores.catalog import MODALITIES

MASK_KINDS = ("instance", "semantic")


class SampleError(GrainflowError, ValueError):
    """An augmentation input whose arrays or metadata break the conventions of Sample."""


@dataclass(frozen=True, eq=False)
class Sample:
    """An image with its labels and the physical context transforms need. See module doc."""

    image: np.ndarray
    modality: str
    pixel_size_nm: float
    mask: np.ndarray | None = None
    boxes: np.ndarray | None = None
    classes: np.ndarray | None = None
    instance_ids: np.ndarray | None = None
    mask_kind: str = "instance"
    scan_lines: bool | None = None
    log: tuple[tuple[str, dict[str, Any]], ...] = field(default=())

    def __post_init__(self) -> None:
        img = self.image
        if not isinstance(img, np.ndarray) or img.ndim != 2 or img.dtype != np.float32:
            got = f"{type(img).__name__} {getattr(img, 'dtype', '')} {getattr(img, 'shape', '')}"
            raise SampleError(f"Sample.image must be a 2-D float32 array in [0, 1] (use to_unit_float); got {got}")
        if img.size == 0:
            raise SampleError(f"Sample.image is empty, shape {img.shape}")
        lo, hi = float(img.min()), float(img.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise SampleError(f"Sample.image values must be finite and in [0, 1]; got min {lo}, max {hi}")
        if self.modality not in MODALITIES:
            raise SampleError(f"Sample.modality {self.modality!r} is not one of {', '.join(MODALITIES)}")
        px = float(self.pixel_size_nm)
        if not np.isfinite(px) or px <= 0:
            raise SampleError(f"Sample.pixel_size_nm must be a positive number of nm; got {self.pixel_size_nm!r}")
        object.__setattr__(self, "pixel_size_nm", px)
        if self.mask_kind not in MASK_KINDS:
            raise SampleError(f"Sample.mask_kind {self.mask_kind!r} is not one of {', '.join(MASK_KINDS)}")
        if self.mask is not None:
            m = self.mask
            if not isinstance(m, np.ndarray) or m.shape != img.shape or m.dtype.kind not in "iu":
                raise SampleError(
                    f"Sample.mask must be an integer array of the image's shape {img.shape}; "
                    f"got {getattr(m, 'dtype', type(m).__name__)} {getattr(m, 'shape', '')}")
        n = None
        if self.boxes is not None:
            b = np.asarray(self.boxes)
            if b.size == 0:
                b = b.reshape(0, 4)
            if b.ndim != 2 or b.shape[1] != 4 or b.dtype.kind not in "iuf":
                raise SampleError(f"Sample.boxes must be an (N, 4) XYXY array; got shape {np.shape(self.boxes)}")
            b = b.astype(np.float32, copy=False)
            if not np.isfinite(b).all():
                raise SampleError("Sample.boxes contains NaN or infinite coordinates")
            object.__setattr__(self, "boxes", b)
            n = len(b)
        for name in ("classes", "instance_ids"):
            v = getattr(self, name)
            if v is None:
                continue
            if n is None:
                raise SampleError(f"Sample.{name} given without boxes")
            if not isinstance(v, np.ndarray) or v.shape != (n,) or v.dtype.kind not in "iu":
                raise SampleError(f"Sample.{name} must be an (N,) integer array with N = {n} boxes; "
                                  f"got {getattr(v, 'dtype', type(v).__name__)} {np.shape(v)}")
        if self.scan_lines is None:
            object.__setattr__(self, "scan_lines", self.modality == "SEM")

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape  # type: ignore[return-value]

    @property
    def labelled_instances(self) -> bool:
        """True when boxes can be recomputed from the mask (an instance mask with boxes)."""
        return self.mask is not None and self.mask_kind == "instance" and self.boxes is not None

    def box_ids(self) -> np.ndarray:
        """(N,) int64 mask label of each box: `instance_ids`, or 1..N when not given."""
        if self.instance_ids is not None:
            return self.instance_ids.astype(np.int64)
        return np.arange(1, len(self.boxes) + 1, dtype=np.int64)

    def replace(self, **changes: Any) -> Sample:
        return dataclasses.replace(self, **changes)

    def logged(self, name: str, **params: Any) -> Sample:
        """This sample with one more (name, params) entry in its log."""
        return dataclasses.replace(self, log=self.log + ((name, params),))


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """Any micrograph array -> (H, W) float32 in [0, 1].

    Unsigned integers are divided by their dtype's full scale (uint8 / 255, uint16 /
    65535), the convention of the instruments' detectors; floats are clipped to [0, 1]
    (NaN becomes 0) and assumed already normalised.
    """
    a = np.asarray(image)
    if a.dtype.kind == "u":
        return (a.astype(np.float32) / np.float32(np.iinfo(a.dtype).max)).astype(np.float32)
    if a.dtype.kind == "f":
        return np.clip(np.nan_to_num(a.astype(np.float32), nan=0.0), 0.0, 1.0)
    raise SampleError(f"cannot normalise an image of dtype {a.dtype}; expected unsigned integers or floats")


def boxes_from_mask(mask: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tight pixel-edge XYXY boxes of the given labels of an instance mask.

    Returns (boxes (N, 4) float32, present (N,) bool); an absent label's box is zeros.
    """
    ids = np.asarray(ids, dtype=np.int64)
    boxes = np.zeros((len(ids), 4), np.float32)
    present = np.zeros(len(ids), bool)
    if len(ids) == 0:
        return boxes, present
    top = int(ids.max())
    if top <= 0:
        return boxes, present
    # find_objects scans the mask once for all labels up to `top`
    slices = ndimage.find_objects(np.clip(mask, 0, None), max_label=top)
    for i, k in enumerate(ids):
        s = slices[k - 1] if k > 0 else None
        if s is None:
            continue
        ys, xs = s
        boxes[i] = (xs.start, ys.start, xs.stop, ys.stop)
        present[i] = True
    return boxes, present


def keep_boxes(sample: Sample, keep: np.ndarray, boxes: np.ndarray) -> dict[str, Any]:
    """Fields replacing boxes/classes/instance_ids with the rows `keep` of `boxes`."""
    out: dict[str, Any] = {"boxes": boxes[keep].astype(np.float32)}
    if sample.classes is not None:
        out["classes"] = sample.classes[keep]
    if sample.instance_ids is not None or sample.labelled_instances:
        # keep the mask link explicit once boxes may have been dropped
        out["instance_ids"] = sample.box_ids()[keep].astype(
            sample.instance_ids.dtype if sample.instance_ids is not None else np.int64)
    return out


def relabel(sample: Sample, image: np.ndarray, mask: np.ndarray | None, box_fn) -> Sample:
    """The sample after a geometric transform: new image and mask, boxes made to follow.

    Boxes of an instance mask are recomputed from the transformed mask (exact, and drops
    objects that left the frame); otherwise `box_fn((N, 4) boxes, (H', W') new shape)`
    maps them, and they are clipped to the frame and dropped when they cover no
    pixel centre.
    """
    changes: dict[str, Any] = {"image": image, "mask": mask}
    if sample.boxes is not None:
        if sample.labelled_instances:
            boxes, keep = boxes_from_mask(mask, sample.box_ids())
        else:
            h, w = image.shape
            boxes = np.asarray(box_fn(sample.boxes.astype(np.float64), (h, w)), np.float64)
            boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
            boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
            # keep a box only if it still covers a pixel centre on each axis: exactly
            # the objects a nearest-neighbour mask would still show
            keep = ((np.ceil(boxes[:, 2] - 0.5) > np.ceil(boxes[:, 0] - 0.5))
                    & (np.ceil(boxes[:, 3] - 0.5) > np.ceil(boxes[:, 1] - 0.5)))
        changes.update(keep_boxes(sample, keep, boxes.astype(np.float32)))
    return sample.replace(**changes)
