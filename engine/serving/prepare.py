"""One uploaded image -> the tiles the batch job would read from it, and its preprocessing.

The image is written as an OME-Zarr image to an in-process memory store (chunks of
`chunk` px, with its pyramid), then planned and read by the batch job's own code
(`engine.data.tile_plan.plan_image`, `engine.data.tile_read.read_tiles`) and, when a
member takes "image" inputs, fitted with `engine.preprocess.fit_preprocessing`. So an
image uploaded here and the same pixels in an archive read by `jobs.reprocess` (same
chunk, tile_size, halo and target pixel size) give the ensemble the same tiles and
parameters, and the same answer. The memory store is removed afterwards.

Large images (2048 x 2048 and more) are tiled like the job: cores of one chunk (or
tile_size) with a halo, each tile analysed on its own, detections reported by the
tile whose core holds their box centre.

Pixels need not be square: the scratch image records the upload's (y, x) pixel size,
as the batch ingest records a TIFF's, so its tiles carry both sizes and every
measurement in nm (areas, axes, orientation, image area) is in physical units. The
models get square pixels, as in the job: the shared planner resamples an image of
non-square pixels to the target pixel size on both axes, or without one to the finer of
its two sizes (`engine.data.tile_plan`), and boxes and masks come back in the upload's
pixels through each tile's origin and (y, x) scale in level-0 pixels.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import numpy as np

from engine.errors import GrainflowError
from engine.pipeline.ensemble import TileInput, tiles_from_batch
from engine.serving.decode import BadImage, TooLarge


@dataclass(frozen=True)
class TilingSettings:
    """chunk: storage chunk edge (px); tile_size: core edge (None: one chunk); halo: px;
    target_pixel_size_nm: the models' pixel size (None: the image's own, read at level 0);
    max_pixels: the most pixels an image may have once resampled to that size (None: no
    limit), since upsampling a coarse image multiplies its pixels."""

    chunk: int = 512
    tile_size: int | None = None
    halo: int = 32
    target_pixel_size_nm: float | None = None
    max_pixels: int | None = None


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """tiles: the image's tiles as datasource rows give them; params: the image's
    PreprocessParams (None when no member takes "image" inputs); level, pixel_size_nm
    and pixel_size_y_nm: the pyramid level read and its pixel size along x and y (nm;
    equal for square pixels)."""

    tiles: list[TileInput]
    params: object | None
    level: int
    pixel_size_nm: float
    pixel_size_y_nm: float


def pixel_size_yx(pixel_size_nm) -> tuple[float, float]:
    """(y, x) nm from one number (square pixels) or a (y, x) pair; `BadImage` naming the
    field unless both are positive and finite."""
    try:
        values = [float(v) for v in np.asarray(pixel_size_nm, dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError):
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise BadImage(f"pixel_size_nm: {pixel_size_nm!r} must be a positive finite number of nanometres or a "
                       f"(y, x) pair of them")
    return values[0], values[1]


def prepare_image(pixels: np.ndarray, *, modality: str, pixel_size_nm: float | tuple[float, float],
                  settings: TilingSettings, fit: bool, image_id: str = "upload") -> PreparedImage:
    """pixels: (H, W) raw (as stored); pixel_size_nm: level-0 pixel size, nm: one number
    for square pixels or (y, x) (not positive and finite: `BadImage`). A target pixel
    size resamples to square pixels of that size where no level is near it, as the job
    does; non-square pixels always reach the models square (module doc).

    More pixels than `max_pixels` once resampled to the models' pixel size raise
    `TooLarge` (HTTP 413, as an upload over the limit as sent). Pixels that cannot be
    tiled or fitted otherwise (a tile too wide once upsampled, a dtype the store refuses,
    ...) raise `BadImage` (the input's fault: HTTP 422). Both name the upload, not the
    scratch store."""
    import fsspec

    from engine.stores.uri import resolve

    size_yx = pixel_size_yx(pixel_size_nm)
    loc = resolve(f"memory://grainflow-serve/{uuid.uuid4().hex}.ome.zarr")
    try:
        return _prepare(loc, pixels, modality=modality, pixel_size_yx_nm=size_yx, settings=settings, fit=fit,
                        image_id=image_id)
    except TooLarge:
        raise
    except GrainflowError as exc:  # what our planning and stores raise about their input; else a bug: 500
        raise BadImage(str(exc).replace(loc.uri, image_id).replace(loc.path, image_id)) from exc
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(loc.path):
            fs.rm(loc.path, recursive=True)


def _prepare(loc, pixels: np.ndarray, *, modality: str, pixel_size_yx_nm: tuple[float, float],
             settings: TilingSettings, fit: bool, image_id: str) -> PreparedImage:
    """`prepare_image` through the scratch store `loc` (a StoreLocation); pixel_size_yx_nm: (y, x) nm."""
    from ray.data.block import BlockAccessor

    from engine.data.datasource import DEFAULT_TARGET_BYTES
    from engine.data.tile_plan import DEFAULT_TOLERANCE, pixel_size_text, plan_image, plan_reads
    from engine.data.tile_read import read_tiles
    from engine.stores.image import open_image
    from engine.stores.writer import write_image

    py, px = pixel_size_yx_nm
    write_image(loc, np.ascontiguousarray(pixels), pixel_size=(py, px), unit="nanometer",
                chunk=settings.chunk, attributes={"modality": modality}, name=image_id)
    image = open_image(loc)
    if settings.target_pixel_size_nm is None:  # as the job does for native pixels: level 0
        target, tolerance = px, math.inf  # (the job chooses levels by their x size)
    else:
        target, tolerance = float(settings.target_pixel_size_nm), DEFAULT_TOLERANCE
    plan = plan_image(image, image_id, loc, modality, target_nm=target, tolerance=tolerance,
                      tile_size=settings.tile_size, halo=settings.halo, tile_dtype=str(pixels.dtype))
    if plan.output is not None and settings.max_pixels is not None:
        h, w = plan.output.extent
        if h * w > settings.max_pixels:
            raise TooLarge(  # the pixel limit of the upload as sent (decode), here once resampled
                f"{image_id}: resampled from {pixel_size_text(py, px)} to {plan.pixel_size_nm:.6g} nm per pixel the image "
                f"would be {h} x {w} = {h * w} pixels, over the limit of {settings.max_pixels}; check its pixel size")
    tiles: list[TileInput] = []
    for spec in plan_reads([plan], target_bytes=DEFAULT_TARGET_BYTES, max_tasks=10_000):
        for block in read_tiles(spec):
            tiles += tiles_from_batch(BlockAccessor.for_block(block).to_batch_format("numpy"))
    params = None
    if fit:
        from engine.preprocess import fit_preprocessing

        params = fit_preprocessing(image, modality)
    first = tiles[0]
    return PreparedImage(tiles, params, int(plan.grid.level), float(first.pixel_size_nm),
                         float(first.pixel_size_nm if first.pixel_size_y_nm is None else first.pixel_size_y_nm))
