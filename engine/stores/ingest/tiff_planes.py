"""The pixels of one TIFF plane, converted for ingest: decoded whole, or in bands when large.

A plane over `STREAM_BYTES` decoded (a stitched optical mosaic: 40000 x 40000 uint16 is
3.2 GB) becomes a `BandedPlane` that reads it top to bottom, so ingest never holds it
whole. How its rows are read depends on how the file stores them:

- uncompressed, contiguous data: the rows are read straight from the file;
- strips or tiles (compressed or not): a row of strips/tiles at a time is decoded
  through tifffile's Zarr store (`TiffPage.aszarr`);
- one compressed strip holding the whole plane cannot be read in parts: it is decoded
  whole, with a warning giving the memory that takes. So is a page holding several
  planes (a volume), which tifffile decodes as one.

Either way a plane goes through the same conversions (`_to_2d`): RGB(A) to one channel
(`base.to_grayscale`; for a banded plane the whole plane's channels are compared first,
so every band is converted alike), extra samples dropped, MinIsWhite integers inverted;
then an FEI data bar below `image_rows` is cut off. Banded and whole give identical
pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import tifffile
import zarr

from engine.errors import IngestError
from engine.stores.ingest.bands import BandedPlane
from engine.stores.ingest.base import has_equal_channels, native, to_grayscale

logger = logging.getLogger(__name__)

# Planes larger than this, decoded, are read in bands. Below it decoding whole is
# simpler and faster, and memory is no concern.
STREAM_BYTES = 256 << 20
# Bytes decoded per read of a banded plane (rounded to whole rows of strips/tiles):
# large enough that per-read overhead vanishes, small next to a band of a wide mosaic.
_READ_BYTES = 4 << 20
# Page layouts holding exactly one plane; others (volumes: ZYX) are decoded by series.
_PLANE_AXES = ("YX", "YXS", "SYX")

Loader = Callable[[], tuple[np.ndarray | BandedPlane, list[str]]]


@dataclass(frozen=True)
class SeriesRef:
    """Where a series is in its file: `tif.series[series].levels[level]`, so a banded
    plane can find it again in the file opened afresh."""

    series: int
    level: int


@dataclass(frozen=True)
class Conversion:
    """What every plane of a series goes through: `photometric` (TIFF code) decides the
    colour conversion and inversion; rows from `image_rows` down are an FEI data bar
    (None: no data bar)."""

    photometric: int
    image_rows: int | None


def plane_loaders(path: Path, series: tifffile.TiffPageSeries, ref: SeriesRef, conversion: Conversion,
                  where: str) -> list[Loader]:
    """Loaders, one per (y, x) plane of `series` in order, each returning the plane's
    converted pixels ((y, x) array or BandedPlane) and notes on the conversions.

    Pages are read one at a time where the series is one plane per page, so a long
    stack is never held whole.
    """
    key = series.keyframe
    pages = list(series.pages)
    per_page = int(np.prod(key.shape))
    one_plane_per_page = per_page * len(pages) == int(np.prod(series.shape))
    if key.axes in _PLANE_AXES and all(p is not None for p in pages) and one_plane_per_page:
        return [partial(_page_plane, path, ref, j, page, conversion, where) for j, page in enumerate(pages)]
    # One page holding several planes (a volume): read it once, on first use, so a
    # decoding error surfaces where per-plane errors do.
    plane_ndim = 3 if "S" in series.axes else 2
    n_planes = int(np.prod(series.shape[: len(series.shape) - plane_ndim])) if len(series.shape) > plane_ndim else 1
    cache: list[np.ndarray] = []

    def plane(i: int) -> tuple[np.ndarray, list[str]]:
        if not cache:
            if series.nbytes > STREAM_BYTES:
                logger.warning("%s: a %s TIFF page holds several planes and is decoded whole (%d MiB of memory)",
                               where, series.axes, series.nbytes >> 20)
            data = _yxs(series.asarray(), series.axes, where)
            cache.append(data.reshape((-1,) + data.shape[data.ndim - plane_ndim :]))
        return _converted(cache[0][i], conversion, where)

    return [partial(plane, i) for i in range(n_planes)]


def _page_plane(path: Path, ref: SeriesRef, page_no: int, page, conversion: Conversion,
                where: str) -> tuple[np.ndarray | BandedPlane, list[str]]:
    key = page.keyframe
    # Bands reopen the file for each pass: only a file on disk can be (an upload in
    # memory, the endpoint's, is decoded whole, within the endpoint's pixel limit).
    if key.nbytes > STREAM_BYTES and isinstance(path, (str, Path)):
        if _bandable(page):
            return _banded(path, ref, page_no, key, conversion, where)
        logger.warning(
            "%s: a %d MiB plane stored as one compressed strip cannot be read in parts; decoding it whole "
            "(re-save the file tiled, or uncompressed, to ingest it in bounded memory)", where, key.nbytes >> 20,
        )
    return _converted(_yxs(page.asarray(), key.axes, where), conversion, where)


def _bandable(page) -> bool:
    """Whether rows of `page` can be read without decoding the whole page."""
    key = page.keyframe
    if key.axes not in _PLANE_AXES:
        return False
    return bool(page.is_final) or key.chunks[0] < key.imagelength


def _converted(raw: np.ndarray, conversion: Conversion, where: str) -> tuple[np.ndarray, list[str]]:
    """A whole decoded YX(S) plane converted, with notes."""
    pixels, notes = _to_2d(native(raw), conversion.photometric, where)
    rows = conversion.image_rows
    if rows is not None and pixels.shape[0] > rows:
        notes.append(_data_bar_note(rows, pixels.shape[0]))
        pixels = pixels[:rows]
    return np.ascontiguousarray(pixels), notes


def _banded(path: Path, ref: SeriesRef, page_no: int, key, conversion: Conversion,
            where: str) -> tuple[BandedPlane, list[str]]:
    """The page as a BandedPlane of converted rows, with the notes decoding it whole gives."""
    _, _, height, width, _ = key.shaped
    samples = int(key.samplesperpixel)
    rows = height if conversion.image_rows is None else min(height, conversion.image_rows)
    raw = partial(_raw_blocks, path, ref, page_no, rows, where)
    dtype = key.dtype.newbyteorder("=")
    equal = None
    if samples >= 3 and conversion.photometric in (2, 6):
        # One pass before converting, stopping at the first band whose channels differ
        # (at once for a colour image): to_grayscale's choice holds for the whole plane.
        equal = all(has_equal_channels(block) for block in raw())
    # The notes come from converting one pixel of the plane's layout the same way.
    probe = np.zeros((1, 1, samples) if samples > 1 else (1, 1), dtype)
    _, notes = _to_2d(probe, conversion.photometric, where, equal_channels=equal)
    if rows < height:
        notes.append(_data_bar_note(rows, height))
    blocks = partial(_converted_blocks, raw, conversion.photometric, equal, where)
    return BandedPlane((rows, int(width)), dtype, blocks), notes


def _data_bar_note(rows: int, height: int) -> str:
    return f"FEI data bar cut off: kept the top {rows} of {height} rows"


def _converted_blocks(raw: Callable[[], Iterator[np.ndarray]], photometric: int, equal: bool | None,
                      where: str) -> Iterator[np.ndarray]:
    for block in raw():
        yield np.ascontiguousarray(_to_2d(block, photometric, where, equal_channels=equal)[0])


def _raw_blocks(path: Path, ref: SeriesRef, page_no: int, rows: int, where: str) -> Iterator[np.ndarray]:
    """Rows 0..`rows` of the page as consecutive native (rows, x(, samples)) blocks, the
    file opened afresh."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.series[ref.series].levels[ref.level].pages[page_no]
            read = _file_blocks if page.is_final else _segment_blocks
            yield from read(tif, page, rows, where)
    except IngestError:
        raise
    except Exception as exc:  # codecs and truncated files raise assorted types
        raise IngestError(
            f"{where}: pixel data cannot be decoded ({type(exc).__name__}: {exc}); the file may be truncated or corrupt"
        ) from None


def _file_blocks(tif: tifffile.TiffFile, page, rows: int, where: str) -> Iterator[np.ndarray]:
    """Rows of an uncompressed, contiguous page read straight from the file."""
    key = page.keyframe
    planes, _, height, width, contig = key.shaped  # planes > 1: planar (separate) samples
    dtype = key.dtype.newbyteorder(tif.byteorder)
    row_bytes = width * contig * dtype.itemsize
    step = max(1, _READ_BYTES // (row_bytes * planes))
    fh, start = tif.filehandle, page.dataoffsets[0]

    def read(offset: int, n_rows: int) -> np.ndarray:
        fh.seek(offset)
        data = fh.read(n_rows * row_bytes)
        if len(data) != n_rows * row_bytes:
            raise IngestError(f"{where}: pixel data ends early; the file is truncated")
        shape = (n_rows, width, contig) if contig > 1 else (n_rows, width)
        return np.frombuffer(data, dtype).reshape(shape)

    for y in range(0, rows, step):
        n = min(step, rows - y)
        if planes == 1:
            block = read(start + y * row_bytes, n)
        else:
            block = np.stack([read(start + (s * height + y) * row_bytes, n) for s in range(planes)], axis=-1)
        yield native(block)


def _segment_blocks(tif: tifffile.TiffFile, page, rows: int, where: str) -> Iterator[np.ndarray]:
    """Rows of a striped or tiled page, whole rows of strips/tiles at a time."""
    axes = page.keyframe.axes
    with page.aszarr() as store:
        z = zarr.open_array(store, mode="r")
        y_axis = axes.index("Y")
        segment = z.chunks[y_axis]
        row_bytes = z.nbytes // z.shape[y_axis]
        step = segment * max(1, _READ_BYTES // (segment * row_bytes))
        for y in range(0, rows, step):
            index = [slice(None)] * z.ndim
            index[y_axis] = slice(y, min(y + step, rows))
            yield native(_yxs(np.asarray(z[tuple(index)]), axes, where))


def _yxs(data: np.ndarray, axes: str, where: str) -> np.ndarray:
    """`data` with samples (S) last, so planes are [..., Y, X(, S)]."""
    if data.ndim != len(axes):
        raise IngestError(f"{where}: TIFF data of shape {data.shape} does not match its axes {axes!r}")
    if "S" in axes and axes.index("S") != len(axes) - 1:
        data = np.moveaxis(data, axes.index("S"), -1)
    return data


def _to_2d(data: np.ndarray, photometric: int, where: str, *,
           equal_channels: bool | None = None) -> tuple[np.ndarray, list[str]]:
    """A YX(S) plane (or band of one) as YX, and notes; see the module docstring."""
    notes: list[str] = []
    if data.ndim == 3:
        if photometric in (2, 6):
            data, note = to_grayscale(data, where, equal_channels=equal_channels)
        else:  # grayscale with extra samples (alpha, masks)
            data, note = data[..., 0], f"kept sample 0 of {data.shape[-1]} (extra samples dropped)"
        notes.append(note)
    if data.ndim != 2:
        raise IngestError(f"{where}: TIFF plane has shape {data.shape}; expected a (y, x) image")
    if photometric == 0 and np.issubdtype(data.dtype, np.integer):
        data = np.iinfo(data.dtype).max - data if np.issubdtype(data.dtype, np.unsignedinteger) else ~data
        notes.append("MinIsWhite image inverted so that high values are bright")
    return data, notes
