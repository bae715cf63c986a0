"""Pixels for example overlays: one coarse pyramid level of an image, its predicted label
image at the same resolution, and the run's boxes scaled onto it.

Only a level whose larger side is at most `max_side` pixels is read (the finest such
level; the coarsest level when none is that small), so an overlay of a terabyte image
reads about a megapixel, never level 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.data.sinks import OBJECTS, read_output
from engine.stores.uri import StoreLocation

MAX_SIDE = 1024


@dataclass(frozen=True)
class Overlay:
    """What one example overlay draws.

    image: (h, w) float32 in [0, 1], the level's pixels stretched between their 1st and
    99th percentiles. level: its pyramid level; scale: (sy, sx) level-0 pixels per pixel
    of it. boxes: (N, 4) float64 x0, y0, x1, y1 in its pixels; classes: N class names.
    outlines: (h, w) bool, the predicted label image's instance borders, or None (no
    label image, with the reason in `note`). pixel_size_nm: (y, x) of this level.
    """

    image_id: str
    image: np.ndarray
    level: int
    scale: tuple[float, float]
    boxes: np.ndarray
    classes: list[str]
    outlines: np.ndarray | None
    pixel_size_nm: tuple[float, float]
    labels_uri: str = ""
    note: str = ""


def coarse_level(shapes: list[tuple[int, int]], max_side: int = MAX_SIDE) -> int:
    """The finest level whose larger side is <= max_side; the coarsest one if none is."""
    for i, shape in enumerate(shapes):
        if max(shape) <= max_side:
            return i
    return len(shapes) - 1


def read_overlay(out: StoreLocation, image_id: str, image_loc: StoreLocation, labels_loc: StoreLocation | None,
                 *, max_side: int = MAX_SIDE) -> Overlay:
    """Read one image's overlay: a coarse level, label outlines and the stitched boxes."""
    from skimage.segmentation import find_boundaries

    from engine.stores.image import open_image
    from engine.stores.ngff import to_nanometres

    image = open_image(image_loc)
    level, pixels, skipped = _read_coarse(image, coarse_level([lv.shape for lv in image.levels], max_side))
    info = image.levels[level]
    lo, hi = np.percentile(pixels, [1, 99]) if pixels.size else (0.0, 1.0)
    stretched = np.clip((pixels - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(pixels)
    h0, w0 = image.shape
    scale = (h0 / info.shape[0], w0 / info.shape[1])

    objects = read_output(out, OBJECTS, image_id=image_id).select(["class_name", "x0", "y0", "x1", "y1"])
    boxes = np.stack([objects[c].to_numpy(zero_copy_only=False).astype(np.float64) for c in ("x0", "y0", "x1", "y1")],
                     axis=1) if objects.num_rows else np.zeros((0, 4))
    boxes = boxes / np.array([scale[1], scale[0], scale[1], scale[0]])

    outlines, note, labels_uri = None, skipped, ""
    if labels_loc is None:
        note = _join(note, "the run wrote no label image for this image")
    else:
        labels_uri = labels_loc.uri
        try:
            labels = open_image(labels_loc)
            k = labels.nearest_level(info.pixel_size[1], image.unit)
            if max(labels.levels[k].shape) > 4 * max_side:
                note = _join(note, f"label image {labels_loc.uri} has no level near this resolution")
            else:
                ids = _resize_nearest(labels.read_level(k), info.shape)
                outlines = find_boundaries(ids, mode="inner") & (ids > 0)
        except Exception as exc:  # a report shows what it can: say why the outlines are missing
            note = _join(note, f"label image {labels_loc.uri} not readable ({type(exc).__name__}: {exc})")
    return Overlay(image_id=image_id, image=stretched, level=level, scale=scale, boxes=boxes,
                   classes=[str(c) for c in objects["class_name"].to_pylist()], outlines=outlines,
                   pixel_size_nm=tuple(to_nanometres(v, image.unit) for v in info.pixel_size),
                   labels_uri=labels_uri, note=note)


def _read_coarse(image, level: int) -> tuple[int, np.ndarray, str]:
    """(level read, its pixels as float32, a note): a level with a corrupt chunk gives
    way to the next coarser one (pyramid levels are separate arrays), so an image whose
    tile failed in the run can still be shown."""
    from engine.errors import CorruptChunkError

    note = ""
    for k in range(level, len(image.levels)):
        try:
            return k, image.read_level(k).astype(np.float32), note
        except CorruptChunkError as exc:
            note = _join(note, f"level {k} not readable: chunk {', '.join(exc.chunk_keys)} is corrupt")
            last = exc
    raise last


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def _resize_nearest(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling (label ids are never interpolated)."""
    if a.shape == tuple(shape):
        return a
    rows = np.minimum((np.arange(shape[0]) + 0.5) * a.shape[0] / shape[0], a.shape[0] - 1).astype(np.int64)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * a.shape[1] / shape[1], a.shape[1] - 1).astype(np.int64)
    return a[rows[:, None], cols[None, :]]


__all__ = ["MAX_SIDE", "Overlay", "coarse_level", "read_overlay"]
