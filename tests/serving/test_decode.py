"""Uploads to pixels: what a lab's files hold comes through at full depth, and what the
endpoint cannot take is refused with the status that says why (decode runs in the
ingress before any model; the HTTP statuses are checked in test_api)."""

from __future__ import annotations

import io
import struct
import zlib

import imagecodecs
import numpy as np
import pytest
import tifffile

from engine.serving.decode import BadImage, TooLarge, decode


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height 8-bit grey (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("max_pixels", [4096 * 4096, None])
def test_a_png_claiming_a_huge_size_is_too_large_before_any_pixel_is_decoded(max_pixels):
    with pytest.raises(TooLarge, match="20000"):
        decode(png_header_only(20000, 20000), "image/png", max_pixels=max_pixels)


def test_16_bit_colour_pngs_keep_their_16_bits():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 65536, (24, 32), dtype=np.uint16)
    grey[0, 0] = 61425  # well above 8 bits
    as_rgb = imagecodecs.png_encode(np.dstack([grey] * 3))
    as_grey_alpha = imagecodecs.png_encode(np.dstack([grey, np.full_like(grey, 65535)]))
    for data in (as_rgb, as_grey_alpha):
        pixels = decode(data, "image/png").pixels
        assert pixels.dtype == np.uint16
        np.testing.assert_array_equal(pixels, grey)
    colour = rng.integers(0, 65536, (24, 32, 3), dtype=np.uint16)
    luma = decode(imagecodecs.png_encode(colour), "image/png").pixels
    expected = np.floor(colour.astype(np.float64) @ [0.2125, 0.7154, 0.0721] + 0.5)
    np.testing.assert_allclose(luma, expected, atol=1)  # BT.709 luma at 16 bits, as the archive ingest does


def tiff_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, pixels)
    return buf.getvalue()


def test_tiffs_the_stores_cannot_hold_are_refused_naming_the_problem():
    with pytest.raises(BadImage, match="dtype float64 is not supported"):
        decode(tiff_bytes(np.zeros((8, 8), np.float64)), "image/tiff")
    nan = np.zeros((8, 8), np.float32)
    nan[3, 3] = np.nan
    with pytest.raises(BadImage, match="finite"):
        decode(tiff_bytes(nan), "image/tiff")
    assert decode(tiff_bytes(np.ones((8, 8), np.float32)), "image/tiff").pixels.dtype == np.float32
