"""The pixel sizes a run's models saw: per image (level read, model pixel, resampling)
and for the report's header.

What the job records (`engine.pipeline.job`, `engine.data.sinks.SUMMARY_COLUMNS`):
each summary row's ``level`` (the pyramid level read) and ``pixel_size_nm`` (the x size
of the tiles the models saw, nm); the manifest's ``settings.target_pixel_size_nm`` and
``settings.tolerance``. A tolerance of ``"inf"`` marks a run at native pixels (no
``--pixel-size`` and a bundle that records none): each image read at its own level 0,
and the recorded target is then only the finest level-0 size of the archive. Otherwise
the target is the models' pixel size and each image is read at a pyramid level within
`tolerance` of it, or resampled to it.

Resampling is found by comparing the model pixel with the pixel size of the level read:
the summary's ``level_pixel_size_y_nm`` / ``_x_nm``; runs written before those columns
take level 0 from the catalog and coarser levels from the image's metadata (one small
read per image). Model pixels are square (the job resamples images of non-square pixels to
square ones), so an image whose level pixels are not square is resampled along at
least one axis.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from engine.reports.html import plain_number
from engine.reports.run import Run

# Pixel sizes within this factor are the same pixels (TIFF resolutions are rationals
# that round; the job's own tolerance for "square" is the same 1 %).
SAME_WITHIN = 1.01


def factor_text(factor: float) -> str:
    """A resampling factor for a reader: 4.4 -> "4.4", 8.449 -> "8.45", 12.34 -> "12.3"."""
    return f"{factor:.3g}"


def resampling_text(level_nm: tuple[float, float], model_nm: float) -> str:
    """How tiles of a level with (y, x) pixels of `level_nm` (nm) reached square model
    pixels of `model_nm` (nm): "" (read as stored), "upsampled 4.4x", "downsampled 2x",
    or per axis ("upsampled 2x in y (to square pixels)") when the two axes differ. Upsampled: the models saw
    pixels finer than the archive stores (detail made up by interpolation)."""
    factors = {axis: size / model_nm for axis, size in zip("yx", level_nm)}  # > 1: upsampled along the axis
    changed = {axis: f for axis, f in factors.items() if max(f, 1 / f) > SAME_WITHIN}
    if not changed:
        return ""
    fy, fx = factors["y"], factors["x"]
    if max(fy / fx, fx / fy) <= SAME_WITHIN:  # the same on both axes
        return f"upsampled {factor_text(fx)}x" if fx > 1 else f"downsampled {factor_text(1 / fx)}x"
    return ", ".join(f"upsampled {factor_text(f)}x in {axis}" if f > 1 else
                     f"downsampled {factor_text(1 / f)}x in {axis}" for axis, f in changed.items()) \
        + " (to square pixels)"


def pixel_text(size_y_nm: float, size_x_nm: float) -> str:
    """A level's pixel size for a reader: "147.3 nm" (square within SAME_WITHIN), else
    "200 x 100 nm (y x x)"; "unknown size" when either is not a positive number."""
    if not (_positive(size_y_nm) and _positive(size_x_nm)):
        return "unknown size"
    if max(size_y_nm, size_x_nm) <= SAME_WITHIN * min(size_y_nm, size_x_nm):
        return f"{plain_number(size_x_nm)} nm"
    return f"{plain_number(size_y_nm)} x {plain_number(size_x_nm)} nm (y x x)"


def is_upsampled(text: str) -> bool:
    """Whether a `resampling_text` says the models saw invented detail on some axis."""
    return "upsampled" in text


def level_pixel_sizes(run: Run) -> dict[str, tuple[float, float] | None]:
    """image_id -> (y, x) pixel size in nm of the level the job read, for every image of
    the summary; None where it is unknown (no level recorded: the image was not
    planned; not in the catalog; its metadata not readable).

    The summary's recorded sizes where the run has them; else level 0 from the catalog
    and a coarser level from the image's metadata (its ``zarr.json``, read in a thread
    pool: object stores answer small reads slowly)."""
    from engine.stores.ngff import to_nanometres

    levels = _levels(run)
    sizes: dict[str, tuple[float, float] | None] = dict.fromkeys(run.summary["image_id"].astype(str))
    sizes.update(_recorded_level_sizes(run))
    if run.catalog is None:
        return sizes
    cat = run.catalog.drop_duplicates("image_id").set_index("image_id")
    coarser = []
    for image_id, level in levels.items():
        if level is None or image_id not in cat.index or sizes[image_id] is not None:
            continue
        if level == 0:
            row = cat.loc[image_id]
            sizes[image_id] = (to_nanometres(float(row["pixel_size_y"]), str(row["unit"])),
                               to_nanometres(float(row["pixel_size_x"]), str(row["unit"])))
        else:
            coarser.append((image_id, level))
    if coarser:
        with ThreadPoolExecutor(max_workers=8) as pool:
            for (image_id, _), size in zip(coarser, pool.map(lambda il: _read_level_size(run, *il), coarser)):
                sizes[image_id] = size
    return sizes


def _recorded_level_sizes(run: Run) -> dict[str, tuple[float, float]]:
    """image_id -> (y, x) nm of the level read, as the job recorded it (runs since the
    summary's level_pixel_size columns; images with no recorded size are left out)."""
    summary = run.summary
    if "level_pixel_size_y_nm" not in summary or "level_pixel_size_x_nm" not in summary:
        return {}
    return {str(i): (float(y), float(x)) for i, y, x in
            zip(summary["image_id"], summary["level_pixel_size_y_nm"], summary["level_pixel_size_x_nm"])
            if _positive(y) and _positive(x)}


def _levels(run: Run) -> dict[str, int | None]:
    """image_id -> the summary's level (None where it has none: an image not planned)."""
    return {str(i): (None if pd.isna(v) else int(v))
            for i, v in zip(run.summary["image_id"], run.summary["level"])}


def _read_level_size(run: Run, image_id: str, level: int) -> tuple[float, float] | None:
    from engine.errors import GrainflowError
    from engine.stores.image import open_image
    from engine.stores.ngff import to_nanometres

    loc = run.image_location(image_id)
    if loc is None:
        return None
    try:
        image = open_image(loc)
        size = image.levels[level].pixel_size
    except (GrainflowError, OSError, IndexError, KeyError, ValueError):
        return None  # the table shows the level and the model pixel; only the comparison is missing
    return (to_nanometres(float(size[0]), image.unit), to_nanometres(float(size[1]), image.unit))


def image_resampling(run: Run) -> pd.Series:
    """image_id -> `resampling_text` of each summary image ("" where read as stored or
    unknown), in the summary's order."""
    sizes = level_pixel_sizes(run)
    texts = {}
    for image_id, model_nm in zip(run.summary["image_id"].astype(str), run.summary["pixel_size_nm"]):
        level_nm = sizes.get(image_id)
        ok = level_nm is not None and _positive(model_nm) and all(_positive(v) for v in level_nm)
        texts[image_id] = resampling_text(level_nm, float(model_nm)) if ok else ""
    return pd.Series(texts, name="resampled", dtype=object)


def header_text(run: Run) -> str:
    """The header's model pixel size: "each image's own level 0 (128.9-1089 nm)" for a
    run at native pixels, else the target ("25 nm"), with the span the images were
    read at when a level within the tolerance was read as stored instead."""
    model = run.summary["pixel_size_nm"].to_numpy(np.float64)
    model = model[np.isfinite(model) & (model > 0)]
    span = ""
    if model.size:
        lo, hi = float(model.min()), float(model.max())
        span = f"{plain_number(lo)} nm" if hi <= lo * SAME_WITHIN else f"{plain_number(lo)}-{plain_number(hi)} nm"
    tolerance = run.settings.get("tolerance")
    if tolerance == "inf" or (isinstance(tolerance, (int, float)) and math.isinf(tolerance)):
        return "each image's own level 0" + (f" ({span})" if span else "")
    target = run.settings.get("target_pixel_size_nm", run.result.get("target_pixel_size_nm"))
    if not _positive(target):
        return span or "–"
    text = f"{plain_number(float(target))} nm"
    if model.size and (model.min() < target / SAME_WITHIN or model.max() > target * SAME_WITHIN):
        within = f"within {tolerance:g}x of it " if isinstance(tolerance, (int, float)) else ""
        text += f" (images read at {span}: a pyramid level {within}is read as stored)"
    return text


def _positive(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value) and value > 0


__all__ = ["SAME_WITHIN", "header_text", "image_resampling", "is_upsampled", "level_pixel_sizes", "pixel_text",
           "resampling_text"]
