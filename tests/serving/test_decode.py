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


def tiff_claiming(height: int, width: int, samples: int = 2) -> bytes:
    """A ~300-byte TIFF whose tags claim a height x width x samples uint8 image (a
    16 x 16 one written by tifffile, its ImageLength, ImageWidth and RowsPerStrip tags
    rewritten): its one strip cannot fill the claimed size, so a reader that decodes it
    fails with BadImage; only a check of the tags answers TooLarge."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((16, 16, samples), np.uint8), photometric="minisblack", planarconfig="contig",
                     compression="zlib", rowsperstrip=16, metadata=None)
    data = bytearray(buf.getvalue())
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tags = tif.pages[0].tags
        for code, value in ((256, width), (257, height), (278, height)):
            struct.pack_into({3: "<H", 4: "<I"}[int(tags[code].dtype)], data, tags[code].valueoffset, value)
    return bytes(data)


class TestTiffLimits:
    def test_grey_and_alpha_tiff_over_the_limit_is_too_large_before_any_pixel_is_decoded(self):
        data = tiff_claiming(20000, 2000, samples=2)  # axes YXS: Y x X = 40 M pixels, X x S only 4000
        assert len(data) < 1000
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            assert tif.series[0].axes == "YXS" and tif.series[0].shape == (20000, 2000, 2)
        with pytest.raises(TooLarge, match="20000 x 2000 = 40000000 pixels is over the limit of 16777216"):
            decode(data, "image/tiff", max_pixels=4096 * 4096)

    def test_grey_and_alpha_tiff_within_the_limit_keeps_its_grey_channel(self):
        grey = np.arange(24 * 32, dtype=np.uint16).reshape(24, 32)
        buf = io.BytesIO()
        tifffile.imwrite(buf, np.dstack([grey, np.full_like(grey, 7)]), photometric="minisblack",
                         planarconfig="contig", metadata=None)
        np.testing.assert_array_equal(decode(buf.getvalue(), "image/tiff", max_pixels=24 * 32).pixels, grey)

    @pytest.mark.parametrize("imagej", [False, True])
    def test_a_stack_is_refused_naming_its_page_count(self, imagej):
        buf = io.BytesIO()
        tifffile.imwrite(buf, np.zeros((3, 16, 16), np.uint16), imagej=imagej, photometric="minisblack")
        with pytest.raises(BadImage, match=r"TIFF holds 3 image planes .* send each page as its own image"):
            decode(buf.getvalue(), "image/tiff", max_pixels=16 * 16)

    def test_pages_of_different_sizes_are_refused_a_flagged_thumbnail_is_not(self):
        for subfiletype, refused in ((0, True), (1, False)):
            buf = io.BytesIO()
            with tifffile.TiffWriter(buf) as w:
                w.write(np.ones((32, 24), np.uint8), photometric="minisblack", metadata=None)
                w.write(np.zeros((8, 6), np.uint8), photometric="minisblack", subfiletype=subfiletype, metadata=None)
            if refused:
                with pytest.raises(BadImage, match="TIFF holds 2 image planes"):
                    decode(buf.getvalue(), "image/tiff")
            else:
                assert decode(buf.getvalue(), "image/tiff").pixels.shape == (32, 24)

    def test_more_samples_than_a_colour_image_are_refused(self):
        buf = io.BytesIO()
        tifffile.imwrite(buf, np.zeros((16, 16, 6), np.uint8), photometric="minisblack", planarconfig="contig",
                         metadata=None)
        with pytest.raises(BadImage, match="6 samples per pixel"):
            decode(buf.getvalue(), "image/tiff")


class TestPngColour:
    """Palette and grey + alpha PNGs become grey by the rule RGB(A) PNGs and the batch
    ingest use (BT.709 luma, alpha dropped), not Pillow's own ITU-R 601 conversion."""

    COLOURS = np.array([[200, 30, 60], [10, 120, 250], [90, 90, 90]], np.uint8)

    def png(self, image) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    def test_palette_png_gives_the_same_grey_as_the_same_colours_in_rgb(self):
        from PIL import Image

        index = np.array([[0, 1, 2, 0], [2, 1, 0, 1]], np.uint8)
        rgb = self.COLOURS[index]
        pal = Image.fromarray(index, mode="P")
        pal.putpalette(self.COLOURS.ravel().tolist())
        assert pal.mode == "P"
        want = decode(self.png(Image.fromarray(rgb, mode="RGB")), "image/png").pixels
        got = decode(self.png(pal), "image/png").pixels
        np.testing.assert_array_equal(got, want)
        assert got[0, 0] == 68  # BT.709 of (200, 30, 60): 0.2125 R + 0.7154 G + 0.0721 B
        assert np.asarray(pal.convert("L"))[0, 0] == 84  # Pillow's ITU-R 601 weights, what it was
        pal.info["transparency"] = 1  # a palette with alpha: dropped, as RGBA's
        np.testing.assert_array_equal(decode(self.png(pal), "image/png").pixels, want)

    def test_grey_and_alpha_png_keeps_its_grey_channel(self):
        from PIL import Image

        grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
        la = Image.fromarray(np.dstack([grey, np.full_like(grey, 17)]), mode="LA")
        np.testing.assert_array_equal(decode(self.png(la), "image/png").pixels, grey)
