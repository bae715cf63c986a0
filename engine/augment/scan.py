"""Artifacts of a scanned beam (SEM): per-line jitter and slow drift.

A scanning instrument records the image one row at a time, left to right, rows top to
bottom. Anything that moves the beam relative to the specimen during the frame shows as
a horizontal displacement of whole rows. Both transforms here displace rows; they are
geometric, so the mask and boxes move with the pixels. They belong after any rotation
or flip of the scene (build_pipeline orders them so): the rows they shift must be the
rows of the final image, and mark the sample as carrying scan lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from engine.augment.base import Transform, check_range
from engine.augment.sample import Sample, relabel


def shift_rows(sample: Sample, shifts: np.ndarray) -> Sample:
    """Move row r of the scene right by shifts[r] pixels (float, (H,)).

    Image: linear interpolation along the row, edge pixels repeated where a row samples
    beyond the frame (the scan keeps reading the specimen there). Mask: nearest
    neighbour with the same sampling. Boxes of an instance mask are recomputed from the
    moved mask (sample.relabel); other boxes (which rows of the box the object reaches
    its sides in is unknown) are widened by the extremes of the shifts over their rows,
    the envelope, so they still contain the object wherever along its rows it lies
    (for smooth shifts such as drift this is the sheared box; for line jitter the box
    grows by the jitter's extremes, the price of not knowing the object's outline).
    """
    h, w = sample.shape
    shifts = np.asarray(shifts, np.float64).reshape(h)
    x = np.arange(w, dtype=np.float64)[None, :] - shifts[:, None]  # source index coordinate
    xc = np.clip(x, 0.0, w - 1.0)
    i0 = np.floor(xc).astype(np.intp)
    i1 = np.minimum(i0 + 1, w - 1)
    f = (xc - i0).astype(np.float32)
    a0 = np.take_along_axis(sample.image, i0, axis=1)
    a1 = np.take_along_axis(sample.image, i1, axis=1)
    image = np.clip(a0 + (a1 - a0) * f, 0.0, 1.0).astype(np.float32)
    mask = None
    if sample.mask is not None:
        near = np.clip(np.floor(x + 0.5), 0, w - 1).astype(np.intp)
        mask = np.take_along_axis(sample.mask, near, axis=1)

    def move(b: np.ndarray, _shape) -> np.ndarray:
        out = b.copy()
        for k, (x0, y0, x1, y1) in enumerate(b):
            r0 = int(np.clip(np.floor(y0), 0, h - 1))
            r1 = int(np.clip(np.ceil(y1), r0 + 1, h))
            rows = shifts[r0:r1]
            out[k, 0] = x0 + rows.min()
            out[k, 2] = x1 + rows.max()
        return out

    return relabel(sample, image, mask, move).replace(scan_lines=True)


@dataclass(frozen=True)
class ScanLineJitter(Transform):
    """Independent horizontal offsets of each scan line, with rare larger slips.

    Physics: noise in the beam deflection electronics, stray AC fields and stage
    vibration move the beam during each line; lines are short, so each line is offset
    as a whole, independently of the next. Now and then the scan generator slips (a
    glitch line) by a larger amount.

    sigma_range_px: (min, max) of the per-line offset's standard deviation, in pixels
      (deflection noise is a fraction of the scan width, so it is fixed in pixels, not nm).
    glitch_prob: chance per line of a slip; glitch_px: largest slip, pixels.
    Boxes without an instance mask take the envelope of their rows' offsets (see
    shift_rows), so they still enclose the object; with one they are recomputed from it.
    """

    name: ClassVar[str] = "scan_jitter"
    sigma_range_px: tuple[float, float] = (0.05, 0.5)
    glitch_prob: float = 0.004
    glitch_px: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("ScanLineJitter", "sigma_range_px", self.sigma_range_px, lo=0.0)
        if not 0.0 <= self.glitch_prob <= 1.0 or self.glitch_px < 0:
            raise ValueError("ScanLineJitter.glitch_prob must be in [0, 1] and glitch_px >= 0; "
                             f"got {self.glitch_prob}, {self.glitch_px}")

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        h = sample.shape[0]
        sigma = float(rng.uniform(*self.sigma_range_px))
        shifts = rng.normal(0.0, 1.0, h) * sigma
        slips = rng.random(h) < self.glitch_prob
        shifts += np.where(slips, rng.uniform(-self.glitch_px, self.glitch_px, h), 0.0)
        out = shift_rows(sample, shifts)
        return out.logged(self.name, sigma_px=sigma, glitches=int(slips.sum()))


@dataclass(frozen=True)
class ScanDrift(Transform):
    """A shear that accumulates over the frame: slow drift of the specimen under the beam.

    Physics: thermal expansion of the stage and charging move the specimen at a slowly
    changing velocity while the frame is recorded; since rows are recorded in time order,
    row r (time t = r / (H - 1) of the frame) is displaced by
        shift(t) = d * ((1 - c) * t + c * t^2),
    d the total displacement over the frame and c in [-0.5, 0.5] how much the drift
    speeds up (c > 0) or settles (c < 0). Only the horizontal component is modelled; a
    vertical one would stretch rows apart and is left out.

    drift_range_px: (min, max) of |d|, pixels per frame; its sign is random.
    """

    name: ClassVar[str] = "scan_drift"
    drift_range_px: tuple[float, float] = (0.0, 4.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("ScanDrift", "drift_range_px", self.drift_range_px, lo=0.0)

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        h = sample.shape[0]
        d = float(rng.uniform(*self.drift_range_px)) * (1.0 if rng.random() < 0.5 else -1.0)
        c = float(rng.uniform(-0.5, 0.5))
        t = np.arange(h, dtype=np.float64) / max(h - 1, 1)
        out = shift_rows(sample, d * ((1.0 - c) * t + c * t * t))
        return out.logged(self.name, drift_px=d, curvature=c)
