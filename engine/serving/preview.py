"""A display copy of an uploaded micrograph, for clients that cannot show the upload itself.

Browsers decode neither TIFF nor more than 8 bits per channel: a 16-bit SEM image with
12 bits of signal draws nearly black, a TIFF not at all. `display_png` stretches the
pixels between their 0.5th and 99.5th percentiles to 8 bits and, above `max_side`, takes
every k-th pixel, so a viewer draws it scaled back to the image's size.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np

PREVIEW_MAX_SIDE = 2048  # px: the longest side of a preview; larger images are subsampled


def display_png(pixels: np.ndarray, *, max_side: int = PREVIEW_MAX_SIDE) -> str:
    """(H, W) pixels of any supported dtype -> base64 PNG, 8-bit grey, at most `max_side`
    px on its longest side (every k-th row and column), contrast stretched between the
    0.5th and 99.5th percentiles of its finite pixels (a flat image is mid grey)."""
    from PIL import Image

    step = max(1, math.ceil(max(pixels.shape) / max_side))
    small = np.asarray(pixels[::step, ::step], dtype=np.float64)
    finite = small[np.isfinite(small)]
    lo, hi = (np.percentile(finite, (0.5, 99.5)) if finite.size else (0.0, 0.0))
    if hi > lo:
        grey = np.clip((np.nan_to_num(small, nan=lo) - lo) / (hi - lo), 0.0, 1.0) * 255.0
    else:
        grey = np.full(small.shape, 128.0)
    buf = io.BytesIO()
    Image.fromarray(np.round(grey).astype(np.uint8), mode="L").save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")
