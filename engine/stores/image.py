"""Read OME-Zarr multiscale images (NGFF v0.4 on Zarr v2, v0.5 on Zarr v3).

`open_image` reads metadata only; pixels are read per region with `read_region`, so a
task can open a terabyte image and touch one tile. Axes other than y and x (t, c, z)
must have size 1 at every level: grainflow's images are single-channel 2-D micrographs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import zarr
from zarr.errors import GroupNotFoundError, NodeTypeValidationError

from engine.errors import CorruptChunkError, MetadataError
from engine.stores.dtypes import check_pixel_dtype
from engine.stores.ngff import Multiscale, parse_multiscales, to_nanometres
from engine.stores.pixels import ArrayReader, Region, open_reader
from engine.stores.uri import StoreLocation, resolve

_log = logging.getLogger(__name__)


def chunk_grid(arr: zarr.Array) -> tuple[int, int]:
    """(y, x) size of the objects a level's store holds: its shards, else its chunks."""
    return tuple(int(v) for v in (getattr(arr, "shards", None) or arr.chunks)[-2:])


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level: shape and chunks in (y, x) pixels, pixel size in the image unit."""

    index: int
    path: str
    shape: tuple[int, int]
    chunks: tuple[int, int]
    dtype: str
    pixel_size: tuple[float, float]


def open_group(location: StoreLocation) -> zarr.Group:
    """Open a v2 or v3 group read-only; a missing group gets a MetadataError naming the path."""
    try:
        node = zarr.open_group(location.zarr_store(read_only=True), mode="r")
    except (GroupNotFoundError, FileNotFoundError, NodeTypeValidationError, KeyError) as exc:
        raise MetadataError(
            f"{location}: no Zarr group here (neither zarr.json for v0.5 nor .zgroup/.zattrs for v0.4): {exc}"
        ) from None
    except ValueError as exc:
        raise MetadataError(f"{location}: unreadable Zarr metadata: {exc}") from None
    return node


class MultiscaleImage:
    """An opened OME-Zarr image: metadata now, pixels on request.

    Pickles as its URI and storage options, so it can be shipped to Ray workers; each
    process reopens the store.
    """

    def __init__(self, location: StoreLocation):
        self.location = location
        self.group = open_group(location)
        self.multiscale: Multiscale = parse_multiscales(dict(self.group.attrs), str(location))
        self.unit = self.multiscale.spatial_unit(str(location))
        levels: list[LevelInfo] = []
        for i in range(len(self.multiscale.levels)):
            try:
                levels.append(self._level_info(i, levels[0] if levels else None))
            except MetadataError as exc:
                if not levels:
                    raise
                # A coarser level unlike level 0 (missing, another dtype, a shape its scale
                # does not give) is left out with the levels below it: they are shortcuts
                # to coarser pixels, which a job then resamples from a finer level.
                _log.warning("%s; level %d and coarser are not used", exc, i)
                break
        self.levels = tuple(levels)
        self.multiscale = dataclasses.replace(self.multiscale, levels=self.multiscale.levels[: len(levels)])
        self.dtype = self.levels[0].dtype
        self._readers: dict[int, ArrayReader] = {}

    def __reduce__(self):
        return (open_image, (self.location,))

    @property
    def uri(self) -> str:
        return self.location.uri

    @property
    def shape(self) -> tuple[int, int]:
        return self.levels[0].shape

    @property
    def pixel_size(self) -> tuple[float, float]:
        """Level-0 (y, x) pixel size in `unit`."""
        return self.levels[0].pixel_size

    @property
    def pixel_size_nm(self) -> float:
        """Level-0 x pixel size in nanometres."""
        return to_nanometres(self.pixel_size[1], self.unit)

    @cached_property
    def attributes(self) -> dict[str, Any]:
        """grainflow's own attributes (modality, material, ...), {} for foreign images."""
        return dict(self.group.attrs.get("grainflow", {}))

    def array(self, level: int = 0) -> zarr.Array:
        return self.group[self.levels[level].path]

    def _reader(self, level: int) -> ArrayReader:
        if level not in self._readers:
            self._readers[level] = open_reader(self.location, self.array(level), self.levels[level].path)
        return self._readers[level]

    def _level_info(self, index: int, level0: LevelInfo | None) -> LevelInfo:
        level = self.multiscale.levels[index]
        where = f"{self.location}/{level.path}"
        try:
            arr = self.group[level.path]
        except KeyError:
            raise MetadataError(f"{where}: listed in multiscales but no array is stored there") from None
        except (ValueError, TypeError) as exc:  # its zarr.json unreadable: empty, not JSON, not an array's
            # (zarr's errors are ValueErrors; a store's OSError, e.g. expired credentials,
            # is not the image's fault and goes on up)
            raise MetadataError(f"{where}: the array's metadata cannot be read ({type(exc).__name__}: {exc})") from None
        if not isinstance(arr, zarr.Array):
            raise MetadataError(f"{where}: expected an array, found a group")
        names = [a.name for a in self.multiscale.axes]
        if arr.ndim != len(names):
            raise MetadataError(f"{where}: array has {arr.ndim} dimensions but the axes are {names}")
        extra = {n: s for n, s in zip(names[:-2], arr.shape[:-2]) if s != 1}
        if extra:
            raise MetadataError(f"{where}: axes {extra} have size > 1; grainflow reads single-channel 2-D images")
        dtype = check_pixel_dtype(arr.dtype, where) if not self._is_label() else np.dtype(arr.dtype)
        if min(arr.shape[-2:]) < 1:
            raise MetadataError(f"{where}: the array is empty (shape {tuple(arr.shape)})")
        if level0 is not None:
            self._check_against_level0(index, level0, arr.shape[-2:], dtype, where)
        return LevelInfo(
            index, level.path, tuple(arr.shape[-2:]), tuple(arr.chunks[-2:]), str(dtype),
            self.multiscale.pixel_size(index),
        )

    def _check_against_level0(self, index: int, first: LevelInfo, shape, dtype, where: str) -> None:
        """A coarser level holds the same image: level 0's dtype, and level 0's extent over
        its scale factor (to a pixel: pyramids round either way); else its tiles would be
        placed outside the image or read with another dtype."""
        if str(dtype) != first.dtype:
            raise MetadataError(f"{where}: dtype {dtype} differs from level 0's {first.dtype}")
        s0, sk = self.multiscale.pixel_size(0), self.multiscale.pixel_size(index)
        expected = [n0 * a / b for n0, a, b in zip(first.shape, s0, sk)]
        if any(abs(n - e) > 1 for n, e in zip(shape, expected)):
            raise MetadataError(f"{where}: shape {tuple(int(v) for v in shape)} does not match level 0's "
                                f"{tuple(first.shape)} at this level's scale (expected about "
                                f"{tuple(round(e, 1) for e in expected)})")

    def _is_label(self) -> bool:
        ome = self.group.attrs.get("ome", self.group.attrs)
        return "image-label" in ome

    def nearest_level(self, pixel_size: float, unit: str = "nanometer") -> int:
        """The level whose x pixel size is nearest `pixel_size`, compared on a log scale.

        Log distance treats 2x too fine and 2x too coarse alike; ties go to the finer level.
        """
        target = to_nanometres(pixel_size, unit)
        if not target > 0:
            raise ValueError(f"target pixel size must be positive, got {pixel_size} {unit}")
        sizes = [to_nanometres(lv.pixel_size[1], self.unit) for lv in self.levels]
        return min(range(len(sizes)), key=lambda i: (abs(math.log(sizes[i] / target)), i))

    def read_region(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of `level` as a (y, x) array of the stored dtype.

        A chunk that fails to decode raises CorruptChunkError naming its store key.
        """
        return self.read_regions(level, [(y0, y1, x0, x1)])[0]

    def read_regions(self, level: int, regions: list[Region]) -> list[np.ndarray]:
        """Several (y0, y1, x0, x1) regions of one level, read concurrently.

        Regions must lie inside the level. A chunk that fails to decode raises
        CorruptChunkError naming its store key.
        """
        h, w = self.levels[level].shape
        for y0, y1, x0, x1 in regions:
            if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
                raise ValueError(f"{self.location}: region {(y0, y1, x0, x1)} is outside level {level} of shape {(h, w)}")
        try:
            return self._reader(level).read_regions(regions)
        except Exception as exc:  # codecs raise assorted types; find the chunk at fault
            raise self._corrupt_chunk_error(level, regions, exc) from exc

    def read_level(self, level: int) -> np.ndarray:
        """A whole level in memory: only for coarse levels or small images."""
        h, w = self.levels[level].shape
        return self.read_region(level, 0, h, 0, w)

    def labels(self) -> list[str]:
        """Names of the label images in the `labels/` group ([] if none)."""
        if "labels" not in self.group:
            return []
        attrs = dict(self.group["labels"].attrs)
        return list(attrs.get("ome", attrs).get("labels", []))

    def open_labels(self, name: str) -> MultiscaleImage:
        if name not in self.labels():
            raise MetadataError(f"{self.location}: no label image {name!r}; has {self.labels()}")
        return open_image(self.location.join("labels", name))

    def _corrupt_chunk_error(self, level: int, regions: list[Region], exc: Exception) -> CorruptChunkError:
        """Read each stored object under `regions` alone (with zarr-python) to name the bad
        ones: chunks, or for a sharded array its shards (the objects a store holds)."""
        arr = self.array(level)
        ch, cw = chunk_grid(arr)
        lead = (0,) * (arr.ndim - 2)
        chunks = sorted({(cy, cx) for y0, y1, x0, x1 in regions
                         for cy in range(y0 // ch, math.ceil(y1 / ch)) for cx in range(x0 // cw, math.ceil(x1 / cw))})
        bad = []
        for cy, cx in chunks:
            try:
                arr[lead + (slice(cy * ch, (cy + 1) * ch), slice(cx * cw, (cx + 1) * cw))]
            except Exception:
                bad.append(f"{self.levels[level].path}/{arr.metadata.encode_chunk_key(lead + (cy, cx))}")
        if not bad:  # not a decoding fault of one chunk (e.g. the store went away)
            raise exc
        return CorruptChunkError(
            f"{self.location}: chunk {', '.join(bad)} cannot be decoded ({type(exc).__name__}: {exc})",
            array_uri=f"{self.location}/{self.levels[level].path}",
            chunk_keys=tuple(bad),
        )


def open_image(uri: str | StoreLocation, *, storage_options: dict[str, Any] | None = None) -> MultiscaleImage:
    """Open an OME-Zarr image's metadata (no pixels are read)."""
    return MultiscaleImage(resolve(uri, storage_options=storage_options))
