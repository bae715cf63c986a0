"""Uploads to pixels: what a lab's files hold comes through at full depth, and what the
endpoint cannot take is refused with the status that says why (decode runs in the
ingress before any model; the HTTP statuses are checked in test_api)."""

from __future__ import annotations

import io
import math
import struct
import zlib

import imagecodecs
import numpy as np
import pytest
import tifffile

from engine.serving.decode import BadImage, TooLarge, UnsupportedMedia, decode
from engine.serving.tiff_limits import MAX_TIFF_PAGES, MAX_TIFF_TILE_SIDE


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


def tiff_bytes(pixels: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, pixels, **kwargs)
    return buf.getvalue()


def tiff_pages(*pages: tuple[np.ndarray, dict]) -> bytes:
    """A TIFF of one page per (pixels, TiffWriter.write keywords), without tifffile's
    shape metadata, so each page is read for what its tags say."""
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as w:
        for pixels, kwargs in pages:
            w.write(pixels, **{"photometric": "minisblack", "metadata": None, **kwargs})
    return buf.getvalue()


def test_tiffs_the_stores_cannot_hold_are_refused_naming_the_problem():
    with pytest.raises(BadImage, match="dtype float64 is not supported"):
        decode(tiff_bytes(np.zeros((8, 8), np.float64)), "image/tiff")
    nan = np.zeros((8, 8), np.float32)
    nan[3, 3] = np.nan
    with pytest.raises(BadImage, match="finite"):
        decode(tiff_bytes(nan), "image/tiff")
    assert decode(tiff_bytes(np.ones((8, 8), np.float32)), "image/tiff").pixels.dtype == np.float32


class TestDeclaredType:
    """What the upload's bytes are decides; a declared PNG or TIFF whose bytes are not
    one, or an empty upload, is a 422 naming what the bytes are, never a 415 that
    calls image/png an unsupported type."""

    def jpeg(self) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="JPEG")
        return buf.getvalue()

    @pytest.mark.parametrize("content_type", ["image/png", "image/png; charset=binary", "IMAGE/PNG"])
    def test_a_jpeg_declared_png_is_named_a_jpeg(self, content_type):
        with pytest.raises(BadImage, match=r"image: declared image/png but its bytes are not a PNG "
                                           r"\(starts with ff d8 ff e0 .*a JPEG; \d+ bytes in all\)"):
            decode(self.jpeg(), content_type)

    def test_a_png_cut_inside_its_signature(self):
        png = imagecodecs.png_encode(np.zeros((8, 8), np.uint8))
        with pytest.raises(BadImage, match=r"not a PNG \(starts with 89 50 4e 47 0d 0a 1a, a PNG signature cut "
                                           r"short; 7 bytes in all\)"):
            decode(png[:7], "image/png")

    def test_a_declared_tiff_that_is_none(self):
        with pytest.raises(BadImage, match=r"declared image/tiff but its bytes are not a TIFF \(starts with "
                                           r"25 50 44 46 2d 31 2e 37, a PDF; 8 bytes in all\)"):
            decode(b"%PDF-1.7", "image/tiff")

    @pytest.mark.parametrize("content_type", ["image/png", "image/tiff", "application/octet-stream", None])
    def test_an_empty_upload_is_empty_whatever_its_type(self, content_type):
        with pytest.raises(BadImage, match=r"^image: empty"):
            decode(b"", content_type, dtype="uint8", shape=(1, 1))

    def test_a_type_the_endpoint_does_not_read_is_still_415(self):
        with pytest.raises(UnsupportedMedia, match="unsupported media type 'image/jpeg'"):
            decode(self.jpeg(), "image/jpeg")
        with pytest.raises(UnsupportedMedia, match="unsupported media type 'unknown'"):
            decode(b"GIF89a", None)

    def test_the_bytes_win_over_the_declared_type(self):
        png = imagecodecs.png_encode(np.full((4, 6), 7, np.uint8))
        assert decode(png, "image/tiff").format == "png"
        assert decode(tiff_bytes(np.zeros((4, 6), np.uint16)), "image/png").format == "tiff"


def with_tags(data: bytes, values: dict[int, int], page: int = 0) -> bytes:
    """`data` with the one-value integer tags of page `page` rewritten in place."""
    out = bytearray(data)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        tags = tif.pages[page].tags
        for code, value in values.items():
            struct.pack_into({3: "<H", 4: "<I", 16: "<Q"}[int(tags[code].dtype)], out, tags[code].valueoffset, value)
    return bytes(out)


def with_segment(data: bytes, payload: bytes) -> bytes:
    """`data` (a TIFF of one strip or tile) with `payload` appended as that segment."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        offsets, counts = (324, 325) if tif.pages[0].is_tiled else (273, 279)
    return with_tags(data + payload, {offsets: len(data), counts: len(payload)})


def tiff_claiming(height: int, width: int, samples: int = 2) -> bytes:
    """A ~300-byte TIFF whose tags claim a height x width x samples uint8 image (a
    16 x 16 one written by tifffile, its ImageLength, ImageWidth and RowsPerStrip tags
    rewritten): its one strip cannot fill the claimed size, so a reader that decodes it
    fails with BadImage; only a check of the tags answers TooLarge."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((16, 16, samples), np.uint8), photometric="minisblack", planarconfig="contig",
                     compression="zlib", rowsperstrip=16, metadata=None)
    return with_tags(buf.getvalue(), {256: width, 257: height, 278: height})


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

    def test_a_smaller_page_is_a_preview_a_page_as_large_is_another_image(self):
        """Only pages as large as the first image count as images of their own; a
        smaller one is a preview (flagged reduced-resolution or not) and is ignored."""
        image = np.arange(32 * 24, dtype=np.uint16).reshape(32, 24)
        previews = [(np.zeros((8, 6), np.uint8), {"subfiletype": 1}),
                    (np.zeros((8, 6), np.uint8), {}),
                    (np.zeros((8, 6, 3), np.uint8), {"photometric": "rgb"})]  # a camera's RGB thumbnail, unflagged
        for preview, kwargs in previews:
            data = tiff_pages((image, {}), (preview, kwargs))
            np.testing.assert_array_equal(decode(data, "image/tiff").pixels, image)
        for other in (np.zeros((32, 24), np.uint8), np.zeros((40, 30), np.uint16)):  # as large, larger
            with pytest.raises(BadImage, match=r"TIFF holds 2 image planes \(1 more page holds an image at least as "
                                               r"large as the first, 32 x 24\)"):
                decode(tiff_pages((image, {}), (other, {})), "image/tiff")

    def test_a_flagged_thumbnail_first_does_not_hide_an_image_over_the_limit(self):
        buf = io.BytesIO()
        with tifffile.TiffWriter(buf) as w:
            w.write(np.zeros((8, 8), np.uint8), photometric="minisblack", subfiletype=1, metadata=None)
            w.write(np.zeros((16, 16, 2), np.uint8), photometric="minisblack", planarconfig="contig",
                    compression="zlib", rowsperstrip=16, metadata=None)
        data = with_tags(buf.getvalue(), {256: 2000, 257: 20000, 278: 20000}, page=1)
        with pytest.raises(TooLarge, match="20000 x 2000 = 40000000 pixels is over the limit"):
            decode(data, "image/tiff", max_pixels=4096 * 4096)

    def test_more_samples_than_a_colour_image_are_refused(self):
        buf = io.BytesIO()
        tifffile.imwrite(buf, np.zeros((16, 16, 6), np.uint8), photometric="minisblack", planarconfig="contig",
                         metadata=None)
        with pytest.raises(BadImage, match="6 samples per pixel"):
            decode(buf.getvalue(), "image/tiff")


class TestTiffBombs:
    """TIFFs whose few bytes decode to far more than their tags (and max_pixels) allow
    are refused from their tags and stream headers, before any pixel is decoded."""

    def test_a_tile_larger_than_its_image_is_refused(self):
        data = tiff_bytes(np.zeros((16, 16), np.uint16), tile=(16, 16), compression="zlib", metadata=None)
        payload = zlib.compress(bytes(2048 * 2048 * 2), 9)  # 8 KB inflating to a 2048 x 2048 uint16 tile
        bomb = with_tags(with_segment(data, payload), {322: 2048, 323: 2048})
        with pytest.raises(BadImage, match="TIFF tile of 2048 x 2048 pixels is larger than its 16 x 16 image rounded "
                                           f"up to 16 pixels and than {MAX_TIFF_TILE_SIDE} x {MAX_TIFF_TILE_SIDE}"):
            decode(bomb, "image/tiff", max_pixels=4096 * 4096)

    def test_a_tile_over_max_pixels_is_too_large(self):
        odd = np.arange(17 * 17, dtype=np.uint16).reshape(17, 17)  # 289 pixels in one 32 x 32 tile
        with pytest.raises(TooLarge, match="TIFF tile of 1024 pixels is over the limit of 300"):
            decode(tiff_bytes(odd, tile=(32, 32), compression="zlib"), "image/tiff", max_pixels=300)

    @pytest.mark.parametrize("shape, tile", [((40, 40), (16, 16)), ((17, 17), (32, 32)), ((20, 30), (256, 256))])
    def test_tiles_up_to_the_image_or_a_writers_default_size_are_read(self, shape, tile):
        """A tile may pad the image to 16 pixels, or be a GDAL/libvips default 256 x 256
        on a small image."""
        pixels = np.arange(math.prod(shape), dtype=np.uint16).reshape(shape)
        data = tiff_bytes(pixels, tile=tile, compression="zlib")
        np.testing.assert_array_equal(decode(data, "image/tiff", max_pixels=256 * 256).pixels, pixels)

    def test_a_jpeg_stream_larger_than_its_strip_is_refused(self):
        data = tiff_bytes(np.zeros((64, 64), np.uint8), compression="jpeg", rowsperstrip=64, metadata=None)
        bomb = with_segment(data, imagecodecs.jpeg8_encode(np.zeros((1024, 1024), np.uint8), level=10))
        with pytest.raises(BadImage, match="JPEG strip 0 of the TIFF is 1024 x 1024, larger than the 64 x 64 its tags "
                                           "give"):
            decode(bomb, "image/tiff", max_pixels=4096 * 4096)

    @pytest.mark.parametrize("layout", [{"rowsperstrip": 16}, {"tile": (32, 32)}])
    def test_jpeg_tiffs_in_strips_and_tiles_are_read(self, layout):
        ramp = np.add.outer(np.arange(60), np.arange(50)).astype(np.uint8) * 2
        data = tiff_bytes(ramp, compression="jpeg", compressionargs={"level": 95}, **layout)
        pixels = decode(data, "image/tiff", max_pixels=60 * 50).pixels
        assert pixels.shape == (60, 50)
        assert np.abs(pixels.astype(int) - ramp).max() <= 8  # lossy

    @pytest.mark.parametrize("compression, name", [("jpeg2000", r"JPEG2000 \(34712\)"),
                                                   ("jpegxl", r"JPEGXL \(50002\)")])
    def test_compressions_decoding_at_their_own_size_are_refused_naming_them(self, compression, name):
        data = tiff_bytes(np.zeros((16, 16), np.uint8), compression=compression, metadata=None)
        refusal = f"TIFF compression {name} is not supported by /v1/analyze; send the TIFF uncompressed or compressed"
        with pytest.raises(UnsupportedMedia, match=refusal + " with Deflate, JPEG, LZMA, LZW"):
            decode(data, "image/tiff")

    @pytest.mark.parametrize("where", ["pages", "subifds"])
    def test_a_long_ifd_chain_is_refused_parsing_no_more_than_the_limit(self, where, monkeypatch):
        buf = io.BytesIO()
        with tifffile.TiffWriter(buf) as w:
            if where == "subifds":
                w.write(np.zeros((4, 4), np.uint8), subifds=MAX_TIFF_PAGES, metadata=None)
            for _ in range(MAX_TIFF_PAGES if where == "subifds" else 1000):
                w.write(np.zeros((1, 1), np.uint8), contiguous=False, metadata=None)
        parsed = []
        init = tifffile.TiffPage.__init__

        def counting(self, *args, **kwargs):
            parsed.append(1)
            init(self, *args, **kwargs)

        monkeypatch.setattr(tifffile.TiffPage, "__init__", counting)
        with pytest.raises(BadImage, match=f"TIFF holds more than {MAX_TIFF_PAGES} pages; /v1/analyze analyses one "
                                           f"micrograph per request"):
            decode(buf.getvalue(), "image/tiff")
        assert len(parsed) <= MAX_TIFF_PAGES + 2  # the first page on opening, then the count up to one past the limit

    def test_ome_xml_declaring_a_huge_stack_is_refused_before_its_planes_are_listed(self):
        xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
               '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYZCT" Type="uint8" SizeX="8" SizeY="8" '
               'SizeZ="1" SizeC="1" SizeT="1000000"><TiffData IFD="0" PlaneCount="1000000"/></Pixels></Image></OME>')
        data = tiff_bytes(np.zeros((8, 8), np.uint8), description=xml, metadata=None)
        with pytest.raises(BadImage, match="TIFF's OME-XML declares 1000000 image planes"):
            decode(data, "image/tiff")


class TestTiffImageAgreesWithIngest:
    """The endpoint analyses the image the batch ingest yields first, and checks its
    limits on that one."""

    IMAGE = np.arange(32 * 48, dtype=np.uint16).reshape(32, 48)
    LAYOUTS = {
        "flagged thumbnail first": [(np.zeros((8, 12), np.uint16), {"subfiletype": 1}), (IMAGE, {})],
        "unflagged RGB thumbnail after": [(IMAGE, {}), (np.zeros((8, 12, 3), np.uint8), {"photometric": "rgb"})],
        "unflagged half-size page after": [(IMAGE, {}), (np.zeros((16, 24), np.uint16), {})],
        "reduced SubIFD level": [(IMAGE, {"subifds": 1}), (np.zeros((16, 24), np.uint16), {"subfiletype": 1})],
    }

    @pytest.mark.parametrize("layout", list(LAYOUTS))
    def test_the_endpoint_reads_the_ingests_first_image(self, layout):
        from engine.stores.ingest.tiff import read_tiff

        data = tiff_pages(*self.LAYOUTS[layout])
        first = next(iter(read_tiff(io.BytesIO(data))))
        np.testing.assert_array_equal(first.pixels, self.IMAGE)
        np.testing.assert_array_equal(decode(data, "image/tiff", max_pixels=32 * 48).pixels, self.IMAGE)


def test_a_tiff_over_the_ingests_streaming_size_decodes_whole(monkeypatch):
    """Ingest streams planes over STREAM_BYTES by reopening their file; an upload is
    bytes in memory and must come back as the whole array."""
    from engine.stores.ingest import tiff_planes

    monkeypatch.setattr(tiff_planes, "STREAM_BYTES", 1024)
    pixels = (np.arange(256 * 256) % 4000).astype(np.uint16).reshape(256, 256)
    got = decode(tiff_bytes(pixels, tile=(64, 64), compression="zlib"), "image/tiff", max_pixels=1 << 20)
    assert isinstance(got.pixels, np.ndarray) and np.array_equal(got.pixels, pixels)


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


class TestTiffPixelSize:
    """A TIFF's pixel size is read as the batch ingest reads it: (y, x) in nm, the two
    differing where XResolution and YResolution do (a fast-scan SEM, a line-scan camera)."""

    @pytest.mark.parametrize("resolution, unit, want", [
        ((2e6, 1e6), "CENTIMETER", (10.0, 5.0)),  # pixels per cm: x 5 nm, y 10 nm
        ((4e6, 4e6), "CENTIMETER", (2.5, 2.5)),
        ((25400.0, 12700.0), "INCH", (2000.0, 1000.0)),  # pixels per inch: x 1 µm, y 2 µm
    ])
    def test_both_sizes_as_the_ingest_reads_them(self, resolution, unit, want):
        from engine.stores.ingest.tiff import read_tiff

        data = tiff_bytes(np.zeros((16, 32), np.uint16), resolution=resolution, resolutionunit=unit)
        first = next(iter(read_tiff(io.BytesIO(data))))
        assert decode(data, "image/tiff").pixel_size_yx_nm == pytest.approx(want)
        nm = {"nanometer": 1.0, "micrometer": 1e3}[first.unit]
        assert decode(data, "image/tiff").pixel_size_yx_nm == pytest.approx(tuple(v * nm for v in first.pixel_size))

    def test_no_calibration_no_size(self):
        assert decode(tiff_bytes(np.zeros((16, 32), np.uint16)), "image/tiff").pixel_size_yx_nm is None
        assert decode(imagecodecs.png_encode(np.zeros((16, 32), np.uint8)), "image/png").pixel_size_yx_nm is None
