"""The 8-bit display copy the viewer draws (browsers show neither TIFF nor 16-bit contrast)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from engine.serving.preview import display_png


def _decode(b64: str) -> np.ndarray:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.mode == "L"
    return np.asarray(img)


def test_twelve_bits_of_signal_fill_the_eight_bit_range():
    ramp = np.tile(np.linspace(100, 4000, 300), (200, 1)).astype(np.uint16)
    out = _decode(display_png(ramp))
    assert out.shape == (200, 300) and out.min() <= 3 and out.max() >= 252
    assert (np.diff(out[0].astype(int)) >= 0).all()  # monotone: a stretch, not a remap


def test_large_images_are_subsampled_to_the_longest_side():
    out = _decode(display_png(np.random.default_rng(0).integers(0, 65535, (5000, 300), dtype=np.uint16),
                              max_side=1000))
    assert out.shape == (1000, 60)


def test_flat_and_nan_images_are_mid_grey():
    assert (_decode(display_png(np.full((8, 8), 7, np.uint8))) == 128).all()
    nan = np.full((8, 8), np.nan, np.float32)
    assert (_decode(display_png(nan)) == 128).all()
    some = np.arange(64, dtype=np.float32).reshape(8, 8)
    some[0, 0] = np.nan
    assert _decode(display_png(some)).max() == 255
