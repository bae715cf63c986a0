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


class TestPaintMask:
    """engine.serving.response.paint_mask: what a client (notebook 03) uses to put an
    answer's RLE masks on the uploaded image, at any mask scale."""

    def _answer_mask(self, tile_mask, origin, scale):
        from engine.serving.response import rle_encode

        return {"origin_px": list(origin), "scale": list(scale), "size": list(tile_mask.shape),
                "counts": rle_encode(tile_mask)}

    def test_scale_one_places_the_mask_pixel_for_pixel(self):
        from engine.serving.response import paint_mask

        m = np.zeros((4, 5), bool)
        m[1:3, 2:5] = True
        canvas = paint_mask(np.zeros((20, 20), np.int32), self._answer_mask(m, (10, 3), (1, 1)), 7)
        expected = np.zeros((20, 20), np.int32)
        expected[11:13, 5:8] = 7
        np.testing.assert_array_equal(canvas, expected)

    def test_scale_two_covers_twice_the_pixels_and_half_scale_samples(self):
        from engine.serving.response import paint_mask

        m = np.zeros((3, 3), bool)
        m[1, 1] = True
        big = paint_mask(np.zeros((10, 10), np.int32), self._answer_mask(m, (2, 4), (2, 2)), 1)
        assert big.sum() == 4 and big[4:6, 6:8].all()
        half = np.ones((8, 8), bool)
        small = paint_mask(np.zeros((10, 10), np.int32), self._answer_mask(half, (1, 1), (0.5, 0.5)), 1)
        assert small.sum() == 16 and small[1:5, 1:5].all()

    def test_a_mask_running_off_the_image_is_clipped(self):
        from engine.serving.response import paint_mask

        m = np.ones((6, 6), bool)
        canvas = paint_mask(np.zeros((4, 4), np.int32), self._answer_mask(m, (1, 1), (0.5, 0.5)), 1)
        assert canvas[1:, 1:].all() and canvas[0].sum() == 0
