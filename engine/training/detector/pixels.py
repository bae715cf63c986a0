"""Tile pixels as the detector sees them: read from the archive, scaled to 8 bits.

Ultralytics' training pipeline (mosaic, affine, letterbox) works on uint8 images and
divides by 255. `Detector.predict` (engine.models.detector) scales integer tiles by
their dtype's maximum, so a uint16 tile v becomes v / 65535; mapping it to
round(v * 255 / 65535) before training keeps both paths on one intensity scale (up to
8-bit quantisation, at most 1/510 of the range).
"""

from __future__ import annotations

import os

import numpy as np

from engine.stores.uri import StoreLocation


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """(y, x) pixels of any stored dtype -> uint8 on the full-range scale of that dtype.

    Integers are scaled by their dtype's maximum (uint16 65535 -> 255); floats are taken
    as already in [0, 1] and clipped, as `engine.models.tiles.tiles_to_tensor` does.
    """
    a = np.asarray(pixels)
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind in "ui":
        top = np.iinfo(a.dtype).max
        return ((a.astype(np.float64) * 255.0 / top) + 0.5).clip(0, 255).astype(np.uint8)
    if a.dtype.kind == "f":
        return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise TypeError(f"expected integer or float pixels, got dtype {a.dtype}")


class ImageCache:
    """Opened images (metadata and readers) of one process, keyed by store location.

    Opening reads metadata only. The cache forgets everything in a process other than
    the one that filled it, so a pickled or inherited copy never reuses a reader (and
    its thread pool) that belongs to another process.
    """

    def __init__(self):
        self._pid = os.getpid()
        self._images: dict[str, object] = {}
        self._labels: dict[str, object] = {}

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def get(self, location: StoreLocation):
        """The `MultiscaleImage` at `location`, opened once per process."""
        from engine.stores.image import open_image

        if os.getpid() != self._pid:
            self.__init__()
        image = self._images.get(location.uri)
        if image is None:
            image = self._images[location.uri] = open_image(location)
        return image

    def read(self, location: StoreLocation, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of `level`, (y, x) in the stored dtype."""
        return self.get(location).read_region(level, y0, y1, x0, x1)

    def read_resampled(self, location: StoreLocation, level: int, step: tuple[float, float],
                       origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
        """Pixels [j, j + h) x [i, i + w) of the image's square-pixel grid `step` ((y, x)
        level-0 pixels per pixel), resampled from `level` as the batch job resamples
        (`engine.data.training_samples.read_resampled`): (h, w) in the stored dtype."""
        from engine.data.training_samples import read_resampled

        return read_resampled(self.get(location), level, step, origin, shape)

    def label_image(self, location: StoreLocation, name: str, level: int):
        """The image's label image `name` (a `MultiscaleImage`, opened once per process)
        when it has one whose `level` has the image's `level` shape; else None (e.g. an
        ingested archive with boxes only)."""
        key = f"{location.uri}#labels/{name}"
        if key not in self._labels:
            image = self.get(location)
            self._labels[key] = image.open_labels(name) if name in image.labels() else None
        labels = self._labels[key]
        if labels is None or level >= len(labels.levels):
            return None
        if labels.levels[level].shape != self.get(location).levels[level].shape:
            return None
        return labels

    def read_labels(self, location: StoreLocation, name: str, level: int, y0: int, y1: int, x0: int,
                    x1: int) -> np.ndarray | None:
        """Region [y0:y1, x0:x1] of the image's label image `name` at the level of the
        same shape as the image's `level`, (y, x) uint32 instance ids; None when the
        image has no such label image (`label_image`)."""
        labels = self.label_image(location, name, level)
        return None if labels is None else labels.read_region(level, y0, y1, x0, x1)

    def read_labels_nearest(self, location: StoreLocation, name: str, level: int, step: tuple[float, float],
                            origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray | None:
        """The label image `name` on the square-pixel grid of `read_resampled`: (h, w)
        uint32 instance ids, each pixel the label under its centre (labels are
        identities, never blended; `engine.data.training_samples.read_nearest`), 0 past
        the image's edge; None when the image has no such label image (`label_image`)."""
        from engine.data.training_samples import read_nearest

        labels = self.label_image(location, name, level)
        return None if labels is None else read_nearest(labels, level, step, origin, shape)
