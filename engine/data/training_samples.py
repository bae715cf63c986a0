"""Training samples through Ray Data: specs in, pixel tiles and labels out, read in tasks.

    specs = plan_samples(archive, layout, materials=..., grades=..., defect_classes=...)
    ds = training_dataset(specs, layout)         # lazy: nothing is read yet
    for batch in ds.iter_batches(batch_format="numpy"): ...

The driver holds only the specs (engine.data.sample_plan). `ReadSamples` runs inside Ray
tasks: it opens each image's store there, reads the detail tile (and the context tile
two levels coarser for fusion models), the `defects` label image under it, and turns
them into model-ready columns.

Images whose pixels are not square (specs with `resampled`, engine.data.sample_plan's
module docstring) are trained on square pixels, as the batch job and the endpoint
deliver them: the detail and context tiles are resampled from their levels with
engine.preprocess.resample (anti-aliased linear interpolation, rounded to the image's
dtype: the job's resampled tiles), the label image by nearest neighbour (a label is an
identity, not a value to blend), and SAM's boxes are in the resampled tile's pixels.

Output columns, B rows (numpy, as `iter_batches(batch_format="numpy")` hands them over):

- image: B x T x T float32 in [0, 1], the detail tile, normalised (see `normalise_tile`);
- context: B x Tc x Tc float32 in [0, 1] (layouts with a context tile only), normalised
  with the same scale as `image`, so one grey level means one signal in both views;
- mask: B x T x T, uint8 defect class per pixel (0 background, 1.. the model's defect
  classes) for mask="semantic"; int32 instance id per pixel for mask="instance";
- boxes (B,) of N_i x 4 float32 XYXY pixel-edge boxes, instance_ids and classes (B,) of
  (N_i,) int64: mask="instance" only; the tight box of each ground-truth instance
  visible in the tile (the prompt SAM learns from) and its 1-based class;
- material (str, "" unknown), modality (str), pixel_size_nm (float64, of the tile's
  level; of its square pixels where resampled), seed (int64, the sample's own seed):
  what engine.augment.AugmentBatch reads;
- material_index, grade_index (int64, -1 unknown): classification targets;
- image_id (str), level, y, x (int64): where the sample came from.

Intensity preprocessing, by the layout's `normalisation` (the input mode the trained
model then expects at inference, engine.pipeline.inputs):

- "tile": a robust percentile normalisation per sample, (v - p1) / (p99 - p1) clipped
  to [0, 1], percentiles of the context tile when there is one (the larger field of
  view gives steadier statistics), else of the detail tile. It removes the differences
  of dtype (uint8 optical, uint16 SEM/TEM, float) and of detector gain between
  instruments, but treats two tiles of one image differently.
- "image": the image's per-modality engine.preprocess parameters, fitted once per image
  (in each read task, from a strided sample of its level 0) and applied to the
  detail and the context tile at their own level-0 places, as the batch job and the
  endpoint apply them: every tile of an image treated alike.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np

from engine.data.sample_plan import SampleLayout, SampleSpec
from engine.preprocess.resample import OutputGrid, cast_pixels, resample
from engine.stores.image import MultiscaleImage, open_image
from engine.tiling.transform import LevelTransform

LABELS = "defects"  # engine.synth.image.LABELS: the label image holding defect instances
LOW_PERCENTILE, HIGH_PERCENTILE = 1.0, 99.0
ROWS_PER_READ_TASK = 16


def normalise_tile(tile: np.ndarray, *, reference: np.ndarray | None = None,
                   low: float = LOW_PERCENTILE, high: float = HIGH_PERCENTILE) -> np.ndarray:
    """(H, W) uint8 / uint16 / float tile -> (H, W) float32 in [0, 1].

    (v - p_low) / (p_high - p_low), clipped, the percentiles taken over `reference`
    (default: the tile itself). A flat reference (p_high == p_low, no signal) maps to 0.5.
    Non-finite pixels (NaN, inf) become 0 and do not count in the percentiles.
    """
    ref = np.asarray(tile if reference is None else reference, dtype=np.float64)
    finite = ref[np.isfinite(ref)]  # a NaN or inf pixel must not make the percentiles NaN
    lo, hi = np.percentile(finite, [low, high]) if finite.size else (np.nan, np.nan)
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return np.full(np.shape(tile), 0.5, np.float32)
    out = (np.asarray(tile, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0), 0.0, 1.0).astype(np.float32, copy=False)


def context_origin(y: int, x: int, detail: int, context: int, offset: int) -> tuple[int, int]:
    """Top-left (row, col), in level k + offset pixels, of the context tile centred on
    the detail tile at (y, x), side `detail`, of level k.

    The same arithmetic as engine.models.fusion.context_origin (tests check they agree),
    kept here so that read tasks need not import torch (seconds per worker process).
    """
    s = 2**offset
    ny, nx = 2 * y + detail - s * context, 2 * x + detail - s * context
    if ny % (2 * s) or nx % (2 * s):
        raise ValueError(f"context tile for detail ({y}, {x}) size {detail} at offset {offset} with side "
                         f"{context} does not start on a whole pixel")
    return ny // (2 * s), nx // (2 * s)


def read_window(image: MultiscaleImage, level: int, y: int, x: int, h: int, w: int,
                *, pad: str = "reflect") -> np.ndarray:
    """Pixels [y, y + h) x [x, x + w) of `level`, padded where the window leaves the image.

    pad: "reflect" (image pixels: the specimen continues plausibly) or "zero" (labels:
    nothing is known there, so background). Stored dtype is kept.
    """
    H, W = image.levels[level].shape
    y0, y1, x0, x1 = max(y, 0), min(y + h, H), max(x, 0), min(x + w, W)
    if y0 >= y1 or x0 >= x1:
        raise ValueError(f"{image.uri}: window {(y, x, h, w)} lies outside level {level} of shape {(H, W)}")
    data = image.read_region(level, y0, y1, x0, x1)
    widths = ((y0 - y, y + h - y1), (x0 - x, x + w - x1))
    if any(a or b for a, b in widths):
        if pad == "zero":
            data = np.pad(data, widths)
        elif data.shape[0] > 1 and data.shape[1] > 1:
            data = np.pad(data, widths, mode="reflect")
        else:
            data = np.pad(data, widths, mode="edge")
    return data


def read_resampled(image: MultiscaleImage, level: int, step: tuple[float, float], origin: tuple[int, int],
                   shape: tuple[int, int]) -> np.ndarray:
    """Pixels [j, j + h) x [i, i + w) of the image's square-pixel grid `step` ((y, x)
    level-0 pixels per pixel, engine.preprocess.resample.OutputGrid's convention),
    sampled from `level`: (h, w) in the image's dtype.

    As the batch job samples its resampled tiles (engine.data.tile_read), so that the
    pixels are the ones the model meets at inference: `resample` from a level window
    with `OutputGrid.source_halo` around the tile's footprint, rounded to the image's
    dtype; output pixels past the image's edge take the edge pixel's value (the job's
    edge rule, where stored tiles are padded by reflection, `read_window`).
    """
    transform = LevelTransform.from_image(image, level)
    halo = OutputGrid(tuple(float(s) for s in step), (0, 0)).source_halo(transform)
    top, left = transform.from_level0(origin[0] * step[0], origin[1] * step[1])
    bottom, right = transform.from_level0((origin[0] + shape[0]) * step[0], (origin[1] + shape[1]) * step[1])
    height, width = image.levels[level].shape
    y0, x0 = max(math.floor(top) - halo, 0), max(math.floor(left) - halo, 0)
    y1, x1 = min(math.ceil(bottom) + halo, height), min(math.ceil(right) + halo, width)
    window = read_window(image, level, y0, x0, y1 - y0, x1 - x0)
    return cast_pixels(resample(window, (y0, x0), transform, step, origin, shape), window.dtype)


def read_nearest(labels: MultiscaleImage, level: int, step: tuple[float, float], origin: tuple[int, int],
                 shape: tuple[int, int]) -> np.ndarray:
    """A label image on the square-pixel grid of `read_resampled`: (h, w), its dtype.

    Each pixel takes the label of `level`'s pixel under its centre (nearest neighbour:
    labels are identities, never blended); zero (background) past the image's edge.
    """
    transform = LevelTransform.from_image(labels, level)
    index = []
    for axis in (0, 1):
        centres = (origin[axis] + np.arange(shape[axis]) + 0.5) * step[axis]  # level-0 edge coordinates
        index.append(np.floor((centres - transform.shift[axis]) / transform.factor[axis]).astype(np.int64))
    ys, xs = index
    window = read_window(labels, level, int(ys[0]), int(xs[0]), int(ys[-1] - ys[0] + 1), int(xs[-1] - xs[0] + 1),
                         pad="zero")
    return window[(ys - ys[0])[:, None], (xs - xs[0])[None, :]]


def read_detail(image: MultiscaleImage, spec: SampleSpec) -> np.ndarray:
    """The detail tile of `spec`: T x T in the image's dtype (its level's pixels, or its
    square pixels resampled from that level)."""
    t = spec.tile
    if spec.resampled:
        return read_resampled(image, spec.level, (spec.step_y, spec.step_x), (spec.y, spec.x), (t, t))
    return read_window(image, spec.level, spec.y, spec.x, t, t)


def read_context(image: MultiscaleImage, spec: SampleSpec) -> np.ndarray:
    """The context tile of `spec`: Tc x Tc float32 at level + context_offset.

    When the pyramid stops short of that level (small images have few levels), the
    coarsest stored level is read and block-averaged down by the missing factor, which
    is exactly how engine.stores.pyramid builds levels (2 x 2 means), up to rounding.
    A resampled spec's context is resampled to square pixels 2**context_offset times
    the detail's, from that level or the coarsest stored one.
    """
    tc, d = spec.context_tile, spec.context_offset
    target = spec.level + d
    source = min(target, len(image.levels) - 1)
    f = 2 ** (target - source)
    cy, cx = context_origin(spec.y, spec.x, spec.tile, tc, d)
    if spec.resampled:
        step = (spec.step_y * 2**d, spec.step_x * 2**d)
        return read_resampled(image, source, step, (cy, cx), (tc, tc)).astype(np.float32)
    window = read_window(image, source, cy * f, cx * f, tc * f, tc * f).astype(np.float32)
    if f > 1:
        window = window.reshape(tc, f, tc, f).mean(axis=(1, 3), dtype=np.float32)
    return window


def semantic_mask(instances: np.ndarray, spec: SampleSpec) -> np.ndarray:
    """(T, T) instance ids -> uint8 defect class per pixel (0 background) via the spec's
    ground truth. An id the ground truth does not list for this tile is an error."""
    out = np.zeros(instances.shape, np.uint8)
    ids = np.unique(instances)
    ids = ids[ids > 0]
    if not len(ids):
        return out
    known = dict(zip(spec.instance_ids, spec.instance_classes))
    missing = [int(i) for i in ids if int(i) not in known]
    if missing:
        raise ValueError(
            f"{spec.image_uri}: label image {LABELS!r} level {spec.level} at ({spec.y}, {spec.x}) has instance "
            f"ids {missing[:5]} that the archive's ground truth does not list for this tile"
        )
    lut = np.zeros(int(ids.max()) + 1, np.uint8)
    for i in ids:
        lut[i] = known[int(i)]
    return lut[instances]


def instance_targets(instances: np.ndarray, spec: SampleSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tight XYXY boxes (N x 4 float32), ids and 1-based classes (N int64) of the spec's
    instances that are visible in the tile; ids listed but not visible are dropped."""
    from engine.augment.sample import boxes_from_mask

    ids = np.asarray(spec.instance_ids, np.int64)
    boxes, present = boxes_from_mask(instances, ids)
    return boxes[present], ids[present], np.asarray(spec.instance_classes, np.int64)[present]


class _Recent:
    """The last `size` values made by this worker process, by key: an opened image (its
    Zarr metadata and a reader per level) or its fitted preprocessing, worth keeping
    between batches of one image. An archive is taken to be immutable while it is being
    trained on."""

    def __init__(self, size: int):
        self.size = size
        self._values: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._values:
            self._values[key] = make()
            if len(self._values) > self.size:
                self._values.popitem(last=False)
        self._values.move_to_end(key)
        return self._values[key]


_IMAGES = _Recent(16)  # uri -> MultiscaleImage
_PARAMS = _Recent(64)  # uri -> engine.preprocess parameters (`fit_preprocessing`)


def _open(uri: str) -> MultiscaleImage:
    return _IMAGES.get(uri, lambda: open_image(uri))


class ReadSamples:
    """Callable for `dataset.map_batches(ReadSamples(mask), batch_format="numpy")`: spec
    columns (SampleSpec.to_row) in, the sample columns of this module's doc out.

    Holds only the mask kind, so it pickles to tasks as a few bytes; stores are opened
    inside the task.
    """

    def __init__(self, mask: str | None = None, normalisation: str = "tile"):
        self.mask = mask
        self.normalisation = normalisation

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        specs = [SampleSpec.from_row({k: v[i] for k, v in batch.items()}) for i in range(n)]
        rows = [self.read(spec) for spec in specs]
        return _columns(rows)

    def read(self, spec: SampleSpec) -> dict[str, Any]:
        image = _open(spec.image_uri)
        t = spec.tile
        detail = read_detail(image, spec)
        row: dict[str, Any] = {}
        context = read_context(image, spec) if spec.context_tile else None
        if self.normalisation == "image":
            from engine.preprocess import apply, fit_preprocessing

            params = _PARAMS.get(image.uri, lambda: fit_preprocessing(image, spec.modality))
            row["image"] = apply(params, detail, *_placement(image, spec, 0, spec.y, spec.x))
            if context is not None:
                cy, cx = context_origin(spec.y, spec.x, spec.tile, spec.context_tile, spec.context_offset)
                row["context"] = apply(params, context, *_placement(image, spec, spec.context_offset, cy, cx))
        elif context is not None:
            row["image"] = normalise_tile(detail, reference=context)
            row["context"] = normalise_tile(context, reference=context)
        else:
            row["image"] = normalise_tile(detail)
        if self.mask is not None:
            labels = _open(image.location.join("labels", LABELS).uri)
            if spec.resampled:
                instances = read_nearest(labels, spec.level, (spec.step_y, spec.step_x), (spec.y, spec.x), (t, t))
            else:
                instances = read_window(labels, spec.level, spec.y, spec.x, t, t, pad="zero")
            if self.mask == "semantic":
                row["mask"] = semantic_mask(instances, spec)
            else:
                row["mask"] = instances.astype(np.int32)
                row["boxes"], row["instance_ids"], row["classes"] = instance_targets(instances, spec)
        row.update(
            material=spec.material or "", modality=spec.modality, pixel_size_nm=spec.pixel_size_nm,
            seed=spec.seed, material_index=spec.material_index, grade_index=spec.grade_index,
            image_id=spec.image_id, level=spec.level, y=spec.y, x=spec.x,
        )
        return row


def _placement(image: MultiscaleImage, spec: SampleSpec, offset: int, y: int, x: int
               ) -> tuple[tuple[float, float], tuple[float, float]]:
    """(level-0 (y, x) of pixel (y, x)'s corner, level-0 pixels per pixel) of the spec's
    tile at level + offset (0: the detail, context_offset: the context); a level past
    the stored pyramid (a context tile block-averaged from the coarsest one,
    `read_context`) is its 2x means; a resampled spec's pixels are its square ones."""
    if spec.resampled:
        sy, sx = spec.step_y * 2**offset, spec.step_x * 2**offset
        return (y * sy, x * sx), (sy, sx)
    level = spec.level + offset
    stored = min(level, len(image.levels) - 1)
    f = 2 ** (level - stored)
    t = LevelTransform.from_image(image, stored)
    return t.to_level0(y * f, x * f), (t.factor[0] * f, t.factor[1] * f)



_RAGGED = ("boxes", "instance_ids", "classes")
_DTYPES = {"pixel_size_nm": np.float64, "seed": np.int64, "material_index": np.int64,
           "grade_index": np.int64, "level": np.int64, "y": np.int64, "x": np.int64}


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key in _RAGGED:
            col = np.empty(len(values), dtype=object)
            col[:] = [np.asarray(v) for v in values]
            out[key] = col
        elif key in _DTYPES:
            out[key] = np.asarray(values, dtype=_DTYPES[key])
        elif isinstance(values[0], np.ndarray):
            out[key] = np.stack(values)
        else:
            out[key] = np.asarray(values, dtype=object).astype(str)
    return out


def sample_bytes(layout: SampleLayout) -> int:
    """About how many bytes one row of `training_dataset` holds: the float32 tile and
    context, the mask (int32 instance ids at most), a few KB of labels and boxes."""
    context = 4 * layout.context_tile ** 2 if layout.context_tile else 0
    return 4 * layout.tile ** 2 + context + 4 * layout.tile ** 2 + 4096


def training_dataset(specs: Sequence[SampleSpec], layout: SampleLayout, *,
                     rows_per_task: int = ROWS_PER_READ_TASK):
    """A lazy ray.data.Dataset of the samples `specs` describe (columns: module doc).

    One read task per `rows_per_task` specs: enough rows to amortise a task's start and
    the stores' metadata, few enough that the first batches reach training early.
    """
    import ray

    if not specs:
        raise ValueError("training_dataset: no sample specs (the plan found no tiles; check the layout)")
    rows = [s.to_row() for s in specs]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / rows_per_task)))
    return ds.map_batches(ReadSamples(layout.mask, layout.normalisation), batch_format="numpy",
                          batch_size=rows_per_task)
