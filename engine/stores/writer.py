"""Write OME-Zarr v0.5 images: level 0 tile by tile, then the pyramid, then metadata.

The multiscales metadata is written last, so a reader never sees an image whose
pyramid is half built: until `close()` the group has no `multiscales`.

Writing over an existing image never destroys it before the new one is complete: the
new image goes to a hidden sibling (`.<name>.partial-<owner>`) and `close()` swaps it in
(see `_commit`). An error or interrupt before then leaves the old image as it was. The
writer holds a lock on each sibling it makes while the sibling exists, so what a killed
process left can be told from what a live one is writing (engine.stores.staging); and
`close()` refuses to swap in a sibling that lost its level arrays meanwhile.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from engine.errors import MetadataError
from engine.stores.dtypes import check_label_dtype, check_pixel_dtype
from engine.stores.ngff import multiscales_v05, normalise_unit
from engine.stores.pyramid import n_levels_for, write_next_level
from engine.stores.staging import PARTIAL, REPLACED, ROOT_METADATA, Sibling
from engine.stores.uri import StoreLocation, resolve

DEFAULT_CHUNK = 512

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageInfo:
    """What `ImageWriter.close()` wrote; feeds a catalog row.

    `replaced`: where the image this one replaced was moved aside, when the writer was
    asked to keep it (`keep_replaced=True`, local disk only); the caller deletes it with
    `ImageWriter.remove_replaced()` (after `write_image`, whose writer is gone:
    `remove_image`) once nothing (a catalog row) describes it any more. Else None.
    """

    uri: str
    shape: tuple[int, int]
    dtype: str
    levels: int
    chunk: int
    pixel_size: tuple[float, float]
    unit: str
    checksum: str
    replaced: str | None = None


class _LevelZeroWriter:
    """Chunk-aligned writes into level 0 of one multiscale group, with a running checksum."""

    def __init__(self, group: zarr.Group, shape, dtype, chunk: int, *, labels: bool):
        self.group, self.shape, self.dtype, self.chunk, self.labels = group, shape, dtype, chunk, labels
        self.level0 = group.create_array(
            "0", shape=shape, chunks=(chunk, chunk), dtype=dtype, fill_value=0,
            dimension_names=["y", "x"], overwrite=True,
        )
        self._chunk_digests: dict[tuple[int, int], str] = {}

    def write_tile(self, y: int, x: int, tile: np.ndarray) -> None:
        """Write an HxW tile at level-0 pixel (y, x); y and x must be chunk multiples."""
        c = self.chunk
        if y < 0 or x < 0 or y % c or x % c:
            raise ValueError(f"tile origin ({y}, {x}) is not aligned to the {c}-pixel chunk grid "
                             f"(non-negative multiples of {c})")
        h, w = tile.shape
        if y + h > self.shape[0] or x + w > self.shape[1]:
            raise ValueError(f"tile {tile.shape} at ({y}, {x}) runs past the image {self.shape}")
        if tile.dtype != self.dtype:
            raise TypeError(f"tile dtype {tile.dtype} differs from the image dtype {self.dtype}")
        tile = np.ascontiguousarray(tile)
        self.level0[y : y + h, x : x + w] = tile
        for ty in range(0, h, c):
            for tx in range(0, w, c):
                piece = np.ascontiguousarray(tile[ty : ty + c, tx : tx + c])
                self._chunk_digests[((y + ty) // c, (x + tx) // c)] = hashlib.sha256(piece.tobytes()).hexdigest()

    def checksum(self) -> str:
        """sha256 over the level-0 chunks' digests in chunk order: independent of write order."""
        h = hashlib.sha256()
        for key in sorted(self._chunk_digests):
            h.update(f"{key[0]},{key[1]}:{self._chunk_digests[key]}\n".encode())
        return h.hexdigest()

    def build_pyramid(self) -> int:
        n = n_levels_for(self.shape, self.chunk)
        finer = self.level0
        for k in range(1, n):
            shape = ((finer.shape[0] + 1) // 2, (finer.shape[1] + 1) // 2)
            coarser = self.group.create_array(
                str(k), shape=shape, chunks=(self.chunk, self.chunk), dtype=self.dtype, fill_value=0,
                dimension_names=["y", "x"], overwrite=True,
            )
            write_next_level(finer, coarser, labels=self.labels)
            finer = coarser
        return n


class LabelWriter(_LevelZeroWriter):
    """A label image under `<image>/labels/<name>`; write with `write_tile`."""


class ImageWriter:
    """Writes one 2-D (y, x) OME-Zarr v0.5 image with its pyramid and label images.

    Usage::

        with ImageWriter(uri, shape=(4096, 4096), dtype="uint16", pixel_size=2.5,
                         unit="nanometer", attributes={"modality": "SEM"}) as w:
            defects = w.add_labels("defects")
            for y, x, tile, mask in tiles:      # chunk-aligned, any order
                w.write_tile(y, x, tile)
                defects.write_tile(y, x, mask)
        info = w.info

    `pixel_size` is the level-0 pixel size in `unit` (one number, or (y, x)).
    `attributes` are stored beside the NGFF metadata under the `grainflow` key.

    An image already at `uri` stays whole and readable until `close()` swaps the new one
    in; with `keep_replaced` (local disk) it is moved aside rather than deleted,
    `info.replaced` says where, and it stays until `remove_replaced()`; should the
    writer die or be garbage collected first, `engine.stores.staging` keeps it too (with
    a warning: nothing confirmed that the new image is described). Leaving the `with`
    block by an exception, or `abort()`, removes what was written and leaves any old
    image as it was.
    """

    def __init__(
        self,
        uri: str | StoreLocation,
        *,
        shape: tuple[int, int],
        dtype: Any,
        pixel_size: float | tuple[float, float],
        unit: str = "nanometer",
        chunk: int = DEFAULT_CHUNK,
        name: str | None = None,
        attributes: dict[str, Any] | None = None,
        keep_replaced: bool = False,
    ):
        self.location = resolve(uri)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"{self.location}: shape {shape} is not a 2-D (y, x) shape")
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = check_pixel_dtype(dtype, str(self.location))
        ps = (pixel_size, pixel_size) if np.isscalar(pixel_size) else tuple(pixel_size)
        if len(ps) != 2 or not all(np.isfinite(p) and p > 0 for p in ps):
            raise ValueError(f"{self.location}: pixel size {pixel_size!r} must be positive and finite")
        self.pixel_size = (float(ps[0]), float(ps[1]))
        self.unit = normalise_unit(unit)
        self.chunk = int(chunk)
        self.name = name or self.location.name
        self.attributes = dict(attributes or {})
        self.keep_replaced = keep_replaced
        self._sibling = _sibling_for(self.location)  # None: written in place
        self._staging = self.location if self._sibling is None else self._sibling.location
        self._replaced: Sibling | None = None
        self._complete = False
        try:
            self.group = zarr.open_group(self._staging.zarr_store(read_only=False), mode="w", zarr_format=3)
            self._image = _LevelZeroWriter(self.group, self.shape, self.dtype, self.chunk, labels=False)
        except BaseException:
            _abort_quietly(self)
            raise
        self._labels: dict[str, tuple[LabelWriter, dict[str, Any]]] = {}
        self.info: ImageInfo | None = None

    def write_tile(self, y: int, x: int, tile: np.ndarray) -> None:
        self._image.write_tile(y, x, tile)

    def add_labels(
        self,
        name: str,
        *,
        dtype: Any = "uint32",
        colors: dict[int, tuple[int, int, int, int]] | None = None,
        properties: list[dict[str, Any]] | None = None,
    ) -> LabelWriter:
        """A label image of this image's shape; `colors` maps label value to RGBA 0-255."""
        if name in self._labels:
            raise ValueError(f"{self.location}: label image {name!r} already added")
        dt = check_label_dtype(dtype, f"{self.location}/labels/{name}")
        group = self.group.require_group("labels").create_group(name, overwrite=True)
        writer = LabelWriter(group, self.shape, dt, self.chunk, labels=True)
        image_label: dict[str, Any] = {"source": {"image": "../../"}}
        if colors:
            image_label["colors"] = [{"label-value": int(k), "rgba": list(map(int, v))} for k, v in sorted(colors.items())]
        if properties:
            image_label["properties"] = properties
        self._labels[name] = (writer, image_label)
        return writer

    def close(self) -> ImageInfo:
        """Build the pyramids, then write the metadata that makes the image readable."""
        n = self._image.build_pyramid()
        arrays = [str(k) for k in range(n)]
        for name, (writer, image_label) in self._labels.items():
            m = writer.build_pyramid()
            arrays += [f"labels/{name}/{k}" for k in range(m)]
            ms = multiscales_v05(name=name, unit=self.unit, pixel_size=self.pixel_size, n_levels=m, centre_shift=True)
            writer.group.attrs.update({"ome": {"version": "0.5", "multiscales": [ms], "image-label": image_label}})
        if self._labels:
            self.group["labels"].attrs.update({"ome": {"version": "0.5", "labels": list(self._labels)}})
        ms = multiscales_v05(name=self.name, unit=self.unit, pixel_size=self.pixel_size, n_levels=n, centre_shift=True)
        attrs: dict[str, Any] = {"ome": {"version": "0.5", "multiscales": [ms]}}
        if self.attributes:
            attrs["grainflow"] = self.attributes
        self.group.attrs.update(attrs)
        _check_arrays(self._staging, arrays, self.location)
        # From here the image is complete: should the swap fail, it stays where it was
        # written rather than being cleaned up with a half-written one.
        self._complete = True
        self._replaced = _commit(self._sibling, self.location, keep_replaced=self.keep_replaced)
        self.info = ImageInfo(
            uri=self.location.uri, shape=self.shape, dtype=str(self.dtype), levels=n, chunk=self.chunk,
            pixel_size=self.pixel_size, unit=self.unit, checksum=self._image.checksum(),
            replaced=None if self._replaced is None else self._replaced.location.uri,
        )
        return self.info

    def remove_replaced(self) -> None:
        """Delete the image this one replaced (`info.replaced`, kept by `keep_replaced`):
        call it once nothing describes that image any more; nothing kept is fine."""
        if self._replaced is not None:
            replaced, self._replaced = self._replaced, None
            replaced.remove()

    def abort(self) -> None:
        """Remove what this writer wrote; an image it was to replace is left untouched."""
        if self._complete:
            return
        if self._sibling is None:
            remove_image(self._staging)
        else:
            self._sibling.remove()

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            _abort_quietly(self)
            return
        try:
            self.close()
        except BaseException:
            _abort_quietly(self)
            raise


def write_image(
    uri: str | StoreLocation,
    pixels: np.ndarray,
    *,
    pixel_size: float | tuple[float, float],
    unit: str = "nanometer",
    chunk: int = DEFAULT_CHUNK,
    labels: dict[str, np.ndarray] | None = None,
    attributes: dict[str, Any] | None = None,
    name: str | None = None,
    keep_replaced: bool = False,
) -> ImageInfo:
    """Write an in-memory (y, x) array (and optional same-shape label arrays) as OME-Zarr v0.5.

    An image already at `uri` is replaced only once the new one is complete; see
    `ImageWriter` for `keep_replaced`.
    """
    if pixels.ndim != 2:
        raise ValueError(f"{uri}: expected a 2-D (y, x) array, got shape {pixels.shape}")
    with ImageWriter(uri, shape=pixels.shape, dtype=pixels.dtype, pixel_size=pixel_size, unit=unit,
                     chunk=chunk, name=name, attributes=attributes, keep_replaced=keep_replaced) as writer:
        label_writers = {k: (writer.add_labels(k, dtype=v.dtype), v) for k, v in (labels or {}).items()}
        for y in range(0, pixels.shape[0], chunk):
            for x in range(0, pixels.shape[1], chunk):
                writer.write_tile(y, x, pixels[y : y + chunk, x : x + chunk])
                for lw, arr in label_writers.values():
                    lw.write_tile(y, x, arr[y : y + chunk, x : x + chunk])
    return writer.info


def remove_image(uri: str | StoreLocation) -> None:
    """Delete an image (a replaced one `ImageInfo.replaced` names); nothing there is fine."""
    location = resolve(uri)
    fs = location.filesystem()
    if fs.exists(location.path):
        fs.rm(location.path, recursive=True)


def _sibling_for(target: StoreLocation) -> Sibling | None:
    """The hidden sibling the writer puts the image in until `close()`, or None to
    write at `target` itself.

    A sibling on local disk, where moving it into place is a rename; elsewhere the
    target itself when nothing is there yet (on an object store moving is a second
    write of every chunk, and a first write has no old image to protect).
    """
    if target.scheme != "file":
        fs = target.filesystem()
        fs.invalidate_cache(target.path)  # s3fs caches listings: another writer may have added it since
        if not fs.exists(target.path):
            return None
    return Sibling(target, PARTIAL)


def _check_arrays(staged: StoreLocation, arrays: list[str], target: StoreLocation) -> None:
    """Refuse to swap in an image at `staged` that lacks any of its `arrays` (paths of
    level arrays): something deleted the folder while it was written, and zarr
    recreated only the folders of the chunks written after that."""
    fs = staged.filesystem()
    fs.invalidate_cache(staged.path)  # written through zarr's own filesystem instance
    missing = [a for a in arrays if not fs.exists(staged.join(a, ROOT_METADATA).path)]
    if missing:
        raise MetadataError(
            f"{target}: the new image lacks its level arrays {', '.join(missing)} at {staged}, so it was not "
            f"swapped in: that folder was deleted while the image was written (by hand, or by a clean-up on "
            f"another machine or of an older grainflow); any image already at {target} is unchanged; write it again"
        )


def _commit(staged: Sibling | None, target: StoreLocation, *, keep_replaced: bool) -> Sibling | None:
    """Put the complete image in the sibling `staged` in place at `target` (None: it was
    written there); return the old image's aside sibling, its lock still held, when
    kept (local disk and `keep_replaced` only), else None."""
    if staged is None:
        return None
    if target.scheme == "file":
        # Two renames within one folder: the old image leaves and the new one arrives
        # whole; there is never a half-old, half-new image at `target`.
        aside = None
        if os.path.lexists(target.path):
            aside = Sibling(target, REPLACED)  # locked before the rename makes the folder
            try:
                os.rename(target.path, aside.location.path)
            except BaseException:
                aside.release()
                raise
        try:
            os.rename(staged.location.path, target.path)
        except BaseException:
            if aside is not None:
                os.rename(aside.location.path, target.path)
                aside.release()
            raise
        staged.release()
        if aside is not None and not keep_replaced:
            aside.remove()
            return None
        return aside
    _copy_over(staged.location, target)
    staged.release()
    return None


def _copy_over(staged: StoreLocation, target: StoreLocation) -> None:
    """Replace the image at `target` by the complete one at `staged` on a store without
    rename (S3, memory://).

    S3 cannot swap many keys at once. Writing under a new name and pointing the catalog
    at it would be atomic, but would break the `images/<id>.ome.zarr` layout that tools
    and users rely on. So the slow part (decoding, level 0, the pyramid) happens beside
    the old image, which stays readable throughout; only this copy, done by the store
    server-side, is exposed. The target's root zarr.json goes first and comes back last,
    so during the copy a reader finds no image rather than a mix of old and new chunks;
    if the copy is cut short the complete new image is still at `staged`.
    """
    fs = target.filesystem()
    fs.invalidate_cache(staged.path)  # written through zarr's own filesystem instance
    fs.invalidate_cache(target.path)

    def relative(root: StoreLocation) -> dict[str, str]:
        prefix = root.path.rstrip("/") + "/"
        found = fs.find(root.path) if fs.exists(root.path) else []
        return {p[len(prefix):]: p for p in found if p.startswith(prefix)}

    new, old = relative(staged), relative(target)
    if ROOT_METADATA in old:
        fs.rm_file(old[ROOT_METADATA])
    keys = sorted(k for k in new if k != ROOT_METADATA)
    if keys:
        fs.copy([new[k] for k in keys], [target.join(k).path for k in keys])
    stale = [path for k, path in old.items() if k not in new and k != ROOT_METADATA]
    if stale:  # an old image's extra pyramid levels, labels, ...
        fs.rm(stale)
    fs.copy(new[ROOT_METADATA], target.join(ROOT_METADATA).path)
    fs.rm(staged.path, recursive=True)


def _abort_quietly(writer: ImageWriter) -> None:
    # Called while another exception propagates: that one is what the user must see.
    try:
        writer.abort()
    except Exception as exc:  # a store error while cleaning up
        logger.warning("%s: could not remove the partly written image: %s", writer.location, exc)
