"""Pixel dtypes grainflow stores as they are."""

from __future__ import annotations

import numpy as np

from engine.errors import UnsupportedDtypeError

# Integer types up to 32 bits and float32: what detectors and cameras write. 64-bit and
# complex data would double memory for no gain in a micrograph and are refused.
PIXEL_DTYPES = tuple(np.dtype(d) for d in ("uint8", "uint16", "uint32", "int8", "int16", "int32", "float32"))
LABEL_DTYPES = tuple(np.dtype(d) for d in ("uint8", "uint16", "uint32", "int32"))


def check_pixel_dtype(dtype, where: str) -> np.dtype:
    """`dtype` as np.dtype if grainflow keeps it as is; else UnsupportedDtypeError naming `where`."""
    dt = np.dtype(dtype)
    if dt not in PIXEL_DTYPES:
        raise UnsupportedDtypeError(
            f"{where}: dtype {dt} is not supported; use one of {', '.join(str(d) for d in PIXEL_DTYPES)}"
        )
    return dt


def check_label_dtype(dtype, where: str) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in LABEL_DTYPES:
        raise UnsupportedDtypeError(f"{where}: label dtype {dt} is not supported; use one of {', '.join(map(str, LABEL_DTYPES))}")
    return dt
