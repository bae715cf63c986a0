"""Geometric transforms of the whole scene: symmetry operations and scale jitter.

Both move the image, the mask (nearest neighbour: labels are never blended) and the
boxes together; see sample.relabel for how boxes follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy import ndimage

from engine.augment.base import Transform, check_range, log_uniform
from engine.augment.sample import Sample, relabel
from engine.augment.symmetry import D4, allowed_ops, material_symmetry


def dihedral_array(a: np.ndarray, op: str) -> np.ndarray:
    """(H, W) array under D4 operation `op` (see symmetry.D4); a new contiguous array."""
    turns, flip = D4[op]
    if flip:
        a = a[:, ::-1]
    return np.ascontiguousarray(np.rot90(a, turns))


def dihedral_boxes(boxes: np.ndarray, shape: tuple[int, int], op: str) -> np.ndarray:
    """(N, 4) pixel-edge XYXY boxes in an image of `shape` (H, W) under `op`, as dihedral_array."""
    turns, flip = D4[op]
    h, w = shape
    x0, y0, x1, y1 = (boxes[:, i].astype(np.float64) for i in range(4))
    if flip:
        x0, x1 = w - x1, w - x0
    for _ in range(turns):
        # np.rot90 (counter-clockwise): a point (x, y) goes to (y, W - x); W and H swap
        x0, y0, x1, y1 = y0, w - x1, y1, w - x0
        h, w = w, h
    return np.stack([x0, y0, x1, y1], axis=1)


@dataclass(frozen=True)
class Dihedral(Transform):
    """A rotation by a multiple of 90 degrees and/or a mirror, drawn uniformly from those allowed.

    Physics: a section of a specimen with no preferred in-plane direction is
    statistically the same rotated or mirrored, so these make new, equally real images.
    Which operations qualify is a property of the microstructure (`material`, see
    symmetry.MATERIAL_SYMMETRY) and of the instrument: an image that already has scan
    lines (Sample.scan_lines, SEM) only gets row-preserving operations, never a quarter
    turn. The scan artifacts the SEM pipeline adds come after this transform, so they
    stay horizontal.

    material: engine.synth material name, or None for the conservative default.
    ops: explicit operation names (symmetry.D4) overriding the material's set.
    keep_shape: True (default) leaves out the operations that swap H and W when the
      image is not square, so a batch of equal tiles stays stackable.
    No physical units: the operations are exact pixel permutations.
    """

    name: ClassVar[str] = "dihedral"
    material: str | None = None
    ops: frozenset[str] | None = None
    keep_shape: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ops is not None:
            unknown = set(self.ops) - set(D4)
            if unknown:
                raise ValueError(f"Dihedral.ops: unknown operations {sorted(unknown)}; valid: {', '.join(D4)}")
            object.__setattr__(self, "ops", frozenset(self.ops))

    def allowed(self, sample: Sample) -> tuple[str, ...]:
        ops = self.ops if self.ops is not None else material_symmetry(self.material)
        allowed = allowed_ops(ops, bool(sample.scan_lines))
        h, w = sample.shape
        if self.keep_shape and h != w:
            allowed = tuple(op for op in allowed if D4[op][0] % 2 == 0)
        return allowed

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        ops = self.allowed(sample)
        op = ops[int(rng.integers(len(ops)))] if ops else "identity"
        if op == "identity":
            return sample.logged(self.name, op=op)
        image = dihedral_array(sample.image, op)
        mask = dihedral_array(sample.mask, op) if sample.mask is not None else None
        out = relabel(sample, image, mask, lambda b, _shape: dihedral_boxes(b, sample.shape, op))
        return out.logged(self.name, op=op)


@dataclass(frozen=True)
class ScaleJitter(Transform):
    """Resample the image by a factor s, as if recorded with pixels 1/s times the size.

    Physics: the same specimen imaged by an instrument (or magnification) with another
    pixel size; pixel_size_nm becomes pixel_size_nm / s exactly, so measurements in nm
    stay right (AugmentBatch returns the new pixel size in its pixel_size_nm column).
    s > 1 magnifies (smaller pixels), s < 1 shrinks with a Gaussian anti-alias
    prefilter (sigma = (1/s - 1) / 2 input pixels) standing in for the larger pixel's
    footprint.

    Tie to the pixel size: models read the pyramid level nearest their pixel size, so
    at inference a tile's pixel size lies within a factor sqrt(2) of the model's; the
    jitter imitates that spread (build_pipeline: s up to 1.25 at strength 1) and
    pixel_size_range_nm, when set, bounds the result in nm. build_pipeline leaves
    pixel_size_range_nm unset: it does not know the model's pixel size.

    factor_range: (min, max) of s, dimensionless, drawn log-uniformly.
    pixel_size_range_nm: optional (min, max) pixel size in nm the result must stay
      within (an instrument class's range); narrows the factor range per image: an image
      outside it is pulled into it when factor_range allows, else left unscaled.
    keep_shape: True keeps (H, W) and only magnifies: s is drawn from factor_range cut
      to s >= 1 and the magnified image is cropped at a random position. A tile has no
      specimen beyond its edges, so shrinking it would need made-up pixels there (a flat
      frame, or mirrored copies of objects left unlabelled); coarser scales come from
      the archive's pyramid levels instead. A factor_range entirely below 1 therefore
      needs keep_shape=False, which returns round(H*s) x round(W*s) pixels.
    Mapping (pixel-edge coordinates): x_out = s * x_in - offset_x, same for y.
    """

    name: ClassVar[str] = "scale"
    factor_range: tuple[float, float] = (0.8, 1.25)
    pixel_size_range_nm: tuple[float, float] | None = None
    keep_shape: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("ScaleJitter", "factor_range", self.factor_range, lo=1e-3, hi=1e3)
        if self.pixel_size_range_nm is not None:
            check_range("ScaleJitter", "pixel_size_range_nm", self.pixel_size_range_nm, lo=1e-9)
        if self.keep_shape and self.factor_range[1] < 1.0:
            raise ValueError(f"ScaleJitter.factor_range {self.factor_range} only shrinks; with keep_shape=True "
                             "a tile is only magnified (no specimen beyond its edges): use keep_shape=False")

    def factor_bounds(self, pixel_size_nm: float) -> tuple[float, float]:
        """(min, max) of s for an image of this pixel size (nm); (1, 1) when none fits."""
        lo, hi = self.factor_range
        if self.keep_shape:
            lo = max(lo, 1.0)
        if self.pixel_size_range_nm is not None:
            pmin, pmax = self.pixel_size_range_nm
            lo, hi = max(lo, pixel_size_nm / pmax), min(hi, pixel_size_nm / pmin)
            if lo > hi:
                return 1.0, 1.0
        return lo, hi

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        s = log_uniform(rng, self.factor_bounds(sample.pixel_size_nm))
        h, w = sample.shape
        u = rng.random(2)  # drawn always, so the stream does not depend on s
        if self.keep_shape:
            oh, ow = h, w
            # s >= 1 (factor_bounds): crop offset in [0, n*s - n], every output pixel on the specimen
            oy = float(u[0] * (h * s - h))
            ox = float(u[1] * (w * s - w))
        else:
            oh, ow = max(1, round(h * s)), max(1, round(w * s))
            oy = ox = 0.0
        image = resample_image(sample.image, s, (oh, ow), (oy, ox))
        mask = resample_labels(sample.mask, s, (oh, ow), (oy, ox)) if sample.mask is not None else None

        def move(b: np.ndarray, _shape) -> np.ndarray:
            return b * s - np.array([ox, oy, ox, oy])

        out = relabel(sample, image, mask, move)
        out = out.replace(pixel_size_nm=sample.pixel_size_nm / s)
        return out.logged(self.name, factor=s, offset_y=oy, offset_x=ox)


def _source_centres(n_out: int, s: float, offset: float) -> np.ndarray:
    """Input coordinate (pixel-edge units) under the centre of each output pixel."""
    return (np.arange(n_out, dtype=np.float64) + 0.5 + offset) / s


def resample_image(image: np.ndarray, s: float, out_shape: tuple[int, int],
                   offset: tuple[float, float]) -> np.ndarray:
    """Separable linear resampling of a float32 (H, W) image by s; outside the source -> mean.

    ScaleJitter never samples outside the source with keep_shape (it only magnifies
    then); with keep_shape=False the output is exactly the scaled source.
    """
    src = image
    if s < 1.0:
        src = ndimage.gaussian_filter(image, (1.0 / s - 1.0) / 2.0, mode="reflect")
    fill = np.float32(image.mean())
    out = src
    valid = []
    for axis, (n_out, off) in enumerate(zip(out_shape, offset)):
        n_in = image.shape[axis]
        c = _source_centres(n_out, s, off)
        valid.append((c >= 0) & (c < n_in))
        # linear interpolation between pixel centres (index coordinates = edge - 0.5)
        t = np.clip(c - 0.5, 0.0, n_in - 1.0)
        i0 = np.minimum(np.floor(t).astype(np.intp), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        f = (t - i0).astype(np.float32)
        a0, a1 = np.take(out, i0, axis=axis), np.take(out, i1, axis=axis)
        f = f[:, None] if axis == 0 else f[None, :]
        out = a0 + (a1 - a0) * f
    inside = valid[0][:, None] & valid[1][None, :]
    out = np.where(inside, out, fill).astype(np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


def resample_labels(mask: np.ndarray, s: float, out_shape: tuple[int, int],
                    offset: tuple[float, float]) -> np.ndarray:
    """Nearest-neighbour resampling of an (H, W) label mask by s; outside the source -> 0."""
    idx = []
    valid = []
    for axis, (n_out, off) in enumerate(zip(out_shape, offset)):
        c = np.floor(_source_centres(n_out, s, off)).astype(np.intp)
        valid.append((c >= 0) & (c < mask.shape[axis]))
        idx.append(np.clip(c, 0, mask.shape[axis] - 1))
    out = mask[np.ix_(idx[0], idx[1])]
    inside = valid[0][:, None] & valid[1][None, :]
    return np.where(inside, out, 0).astype(mask.dtype)
