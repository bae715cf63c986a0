"""Pixels for example overlays: one coarse pyramid level of an image, its predicted label
image at the same resolution, and the run's boxes scaled onto it.

Only a level whose larger side is at most `max_side` pixels is read (the finest such
level; the coarsest level when none is that small, if its larger side is at most
`MAX_SIDE_FACTOR * max_side`; otherwise the image gets no overlay), so an overlay of a
terabyte image reads about a megapixel, never level 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.data.sinks import OBJECTS, read_output
from engine.errors import GrainflowError
from engine.stores.uri import StoreLocation

MAX_SIDE = 1024
# How far past max_side a level (image or labels) may be and still be read whole: a
# pyramid whose coarsest level is 4096 px costs 16 MP, one without levels could cost TB.
MAX_SIDE_FACTOR = 4


class OverlayTooLargeError(GrainflowError):
    """An image whose coarsest pyramid level is too large to read for an overlay."""


@dataclass(frozen=True)
class Overlay:
    """What one example overlay draws.

    image: (h, w) float32 in [0, 1], the level's pixels stretched between the 1st and
    99th percentiles of its finite pixels (0 where a pixel is NaN or inf). nonfinite:
    (h, w) bool, the NaN/inf pixels (masked or saturated data, drawn in a flag colour),
    or None when there are none. level: its pyramid level; scale: (sy, sx) level-0
    pixels per pixel of it. boxes: (N, 4) float64 x0, y0, x1, y1 in its pixels;
    classes: N class names. outlines: (h, w) bool, the predicted label image's instance
    borders, or None (no label image, with the reason in `note`). pixel_size_nm: (y, x)
    of this level, nm per pixel.
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
    nonfinite: np.ndarray | None = None


def coarse_level(shapes: list[tuple[int, int]], max_side: int = MAX_SIDE) -> int:
    """The finest level whose larger side is <= max_side; the coarsest one if none is."""
    for i, shape in enumerate(shapes):
        if max(shape) <= max_side:
            return i
    return len(shapes) - 1


def stretch(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(h, w) pixels of any real dtype -> ((h, w) float32 in [0, 1], (h, w) bool of the
    non-finite pixels or None). The 1st and 99th percentiles of the finite pixels map to
    0 and 1; NaN and inf pixels (masked or saturated data) become 0 and are flagged: one
    of them in a percentile would make every pixel NaN, a black image."""
    pixels = np.asarray(pixels, np.float32)
    finite = np.isfinite(pixels)
    nonfinite = None if finite.all() else ~finite
    values = pixels[finite] if nonfinite is not None else pixels.ravel()
    lo, hi = (float(v) for v in np.percentile(values, [1, 99])) if values.size else (0.0, 1.0)
    if hi > lo:
        stretched = np.clip((pixels - np.float32(lo)) / np.float32(hi - lo), 0, 1)
    else:
        stretched = np.zeros(pixels.shape, np.float32)
    if nonfinite is not None:
        stretched[nonfinite] = 0.0
    return stretched.astype(np.float32, copy=False), nonfinite


def read_overlay(out: StoreLocation, image_id: str, image_loc: StoreLocation, labels_loc: StoreLocation | None,
                 *, max_side: int = MAX_SIDE) -> Overlay:
    """Read one image's overlay: a coarse level, label outlines and the stitched boxes.

    Raises OverlayTooLargeError (reading nothing) when even the image's coarsest level
    is larger than `MAX_SIDE_FACTOR * max_side` on a side."""
    from skimage.segmentation import find_boundaries

    from engine.stores.image import open_image
    from engine.stores.ngff import to_nanometres

    image = open_image(image_loc)
    shapes = [lv.shape for lv in image.levels]
    chosen = coarse_level(shapes, max_side)
    if max(shapes[chosen]) > MAX_SIDE_FACTOR * max_side:
        h, w = shapes[chosen]
        raise OverlayTooLargeError(
            f"{image_id}: even the coarsest pyramid level ({chosen}, {h} x {w} px) is larger than "
            f"{MAX_SIDE_FACTOR * max_side} px on a side; no overlay is drawn (an image with a pyramid down to "
            f"about {max_side} px gets one)")
    level, pixels, skipped = _read_coarse(image, chosen)
    info = image.levels[level]
    stretched, nonfinite = stretch(pixels)
    if nonfinite is not None:
        skipped = _join(skipped, f"{int(nonfinite.sum())} of {nonfinite.size} pixels at this level are NaN or inf "
                                 f"(shown in magenta)")
    h0, w0 = image.shape
    scale = (h0 / info.shape[0], w0 / info.shape[1])

    objects = read_output(out, OBJECTS, image_id=image_id, columns=["class_name", "x0", "y0", "x1", "y1"])
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
            if max(labels.levels[k].shape) > MAX_SIDE_FACTOR * max_side:
                note = _join(note, f"label image {labels_loc.uri} has no level near this resolution")
            else:
                ids = _resize_nearest(labels.read_level(k), info.shape)
                outlines = find_boundaries(ids, mode="inner") & (ids > 0)
        except Exception as exc:  # a report shows what it can: say why the outlines are missing
            note = _join(note, f"label image {labels_loc.uri} not readable ({type(exc).__name__}: {exc})")
    return Overlay(image_id=image_id, image=stretched, level=level, scale=scale, boxes=boxes,
                   classes=[str(c) for c in objects["class_name"].to_pylist()], outlines=outlines,
                   pixel_size_nm=tuple(to_nanometres(v, image.unit) for v in info.pixel_size),
                   labels_uri=labels_uri, note=note, nonfinite=nonfinite)


def _read_coarse(image, level: int) -> tuple[int, np.ndarray, str]:
    """(level read, its pixels as stored, a note): a level with a corrupt chunk gives
    way to the next coarser one (pyramid levels are separate arrays), so an image whose
    tile failed in the run can still be shown."""
    from engine.errors import CorruptChunkError

    note = ""
    for k in range(level, len(image.levels)):
        try:
            return k, image.read_level(k), note
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


__all__ = ["MAX_SIDE", "MAX_SIDE_FACTOR", "Overlay", "OverlayTooLargeError", "coarse_level", "read_overlay",
           "stretch"]
