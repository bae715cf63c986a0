"""Request bodies to pixels: PNG (8/16-bit), TIFF (16-bit included, pixel size from its
metadata when present, (y, x): a TIFF's XResolution and YResolution may differ) or a raw
array with its dtype and shape.

Errors are `UnsupportedMedia` (HTTP 415: not a format the endpoint reads),
`BadImage` (HTTP 422: a supported format whose content or fields are wrong) and
`TooLarge` (HTTP 413: more pixels than `max_pixels`, refused from the header before any
pixel is decoded); their messages name the field at fault.

One request is one micrograph: a TIFF holding more than one image plane (a multi-page
stack, Z/T/C planes, further images as large as the first) is refused naming the count,
where the batch ingest (`engine.stores.ingest.tiff`) makes each plane an image of its
own; send the planes one by one. Smaller pages (thumbnails, flagged or not) are ignored.
A TIFF is checked from its tags and stream headers before any pixel is decoded
(`_check_tiff_layout`): one plane, of at most `max_pixels`, in a compression whose
decoded size the tags bound (others are refused, 415). Colour is reduced to one channel
by the ingest's rule (`engine.stores.ingest.base.to_grayscale`: equal channels kept,
else BT.709 luma; alpha dropped), palette PNGs included.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from engine.errors import GrainflowError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
RAW_TYPES = ("application/octet-stream", "application/x-numpy-raw")
RAW_DTYPES = ("uint8", "uint16", "uint32", "int8", "int16", "int32", "float32")
MAX_TIFF_SAMPLES = 4  # grey, grey + alpha, RGB, RGBA: what the reader turns into one channel
# IFDs (pages and SubIFDs) a TIFF may hold: a micrograph with thumbnails, pyramid levels
# or vendor overviews has a handful; a stack is refused anyway (one plane per request).
MAX_TIFF_PAGES = 64
# Tile sides a TIFF may have beyond its image: GDAL and libvips write 256- or 128-pixel
# tiles whatever the image's size, so a small image's tile is often larger than it; up to
# this a tile decodes to at most 1024 x 1024 x 4 samples x 4 bytes = 16 MiB.
MAX_TIFF_TILE_SIDE = 1024
# TIFF compressions the endpoint reads. For all but JPEG, tifffile decodes each strip or
# tile into a buffer of the size the tags give it and fails if the stream holds more, so
# the tags (checked in _check_segments) bound the pixels. JPEG streams carry their own
# frame size, and _check_jpeg holds it to the tags. The other codecs tifffile reads (JPEG
# 2000, JPEG XL, JPEG XR, WebP, PNG, LERC, ...) also decode at their stream's own size;
# holding each to the tags would take a header parser per format (JPEG XL's is
# bit-packed) for formats micrographs are rarely stored in, so the endpoint refuses them
# (415, naming the compression) and the batch ingest still reads them. A list of what is
# taken, not of what is refused, so a codec tifffile gains later is refused until bounded.
_TIFF_COMPRESSIONS = {1: "none", 5: "LZW", 7: "JPEG", 8: "Deflate", 32946: "Deflate", 32773: "PackBits",
                      34925: "LZMA", 34926: "Zstd", 50000: "Zstd"}
_NM_PER = {"nanometer": 1.0, "micrometer": 1e3, "angstrom": 0.1, "millimeter": 1e6}


class UnsupportedMedia(GrainflowError):
    """The upload is not PNG, TIFF or a raw array (HTTP 415)."""


class BadImage(GrainflowError):
    """The upload's content or fields are wrong (HTTP 422)."""


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """pixels: (H, W) as stored (uint8/uint16/... or float32); pixel_size_yx_nm: (y, x)
    nm per pixel from the file's metadata, as the batch ingest reads it (the two differ
    for non-square pixels: a fast-scan SEM, a line-scan camera), None when it has none;
    format: "png", "tiff" or "raw"."""

    pixels: np.ndarray
    pixel_size_yx_nm: tuple[float, float] | None
    format: str
    modality: str | None = None


def sniff(data: bytes, content_type: str | None) -> str:
    """"png", "tiff" or "raw" from the bytes (magic numbers) and the declared type."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data[:4] in TIFF_MAGICS:
        return "tiff"
    if (content_type or "").split(";")[0].strip().lower() in RAW_TYPES:
        return "raw"
    raise UnsupportedMedia(f"image: unsupported media type {content_type or 'unknown'!r}; send PNG, TIFF or a raw "
                           f"array as application/octet-stream with dtype and shape")


def decode(data: bytes, content_type: str | None, *, dtype: str | None = None,
           shape: tuple[int, int] | None = None, max_pixels: int | None = None) -> DecodedImage:
    """Decode an upload (module doc). max_pixels: refuse larger images before decoding
    their pixels where the format allows (raises `TooLarge`)."""
    kind = sniff(data, content_type)
    if kind == "raw":
        return _raw(data, dtype, shape, max_pixels)
    if kind == "png":
        return _png(data, max_pixels)
    return _tiff(data, max_pixels)


class TooLarge(GrainflowError):
    """More pixels than the endpoint takes (HTTP 413)."""


def _check_pixels(h: int, w: int, max_pixels: int | None) -> None:
    if max_pixels is not None and h * w > max_pixels:
        raise TooLarge(f"image: {h} x {w} = {h * w} pixels is over the limit of {max_pixels}")


def _gray(a: np.ndarray, where: str) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] in (3, 4):
        from engine.stores.ingest.base import to_grayscale

        return to_grayscale(a, f"image ({where})")[0]
    if a.ndim != 2:
        raise BadImage(f"image: {where} of shape {a.shape} is not a single-channel 2-D image")
    return a


def _png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(height, width, bit depth, colour type) from a PNG's IHDR chunk, None if it has none."""
    if len(data) < 26 or data[12:16] != b"IHDR":
        return None
    return (int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big"), data[24], data[25])


def _png(data: bytes, max_pixels: int | None) -> DecodedImage:
    from PIL import Image, UnidentifiedImageError

    header = _png_header(data)
    if header is not None:  # from the header, before Pillow (whose own bomb check is a 500 otherwise)
        _check_pixels(header[0], header[1], max_pixels)
        if header[2] == 16 and header[3] in (2, 4, 6):
            # Pillow reads 16-bit colour and grey+alpha PNGs as 8-bit: imagecodecs keeps 16
            return DecodedImage(_gray(_png16_colour(data), "PNG"), None, "png")
    try:
        im = Image.open(io.BytesIO(data))
        _check_pixels(im.height, im.width, max_pixels)
        im.load()
    except TooLarge:
        raise
    except Image.DecompressionBombError as exc:
        size = f"{header[0]} x {header[1]} " if header is not None else ""
        raise TooLarge(f"image: a {size}PNG is over the decoder's limit ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadImage(f"image: not a readable PNG ({type(exc).__name__}: {exc})") from None
    if im.mode in ("I;16", "I;16B", "I;16L"):
        a = np.asarray(im, dtype=np.uint16)
    elif im.mode == "I":
        a = np.asarray(im).astype(np.uint16)
    elif im.mode in ("L", "RGB", "RGBA"):
        a = np.asarray(im)
    elif im.mode == "P":  # palette colours through the ingest's luma (in _gray), not Pillow's ITU-R 601 "L"
        a = np.asarray(im.convert("RGBA" if "transparency" in im.info else "RGB"))
    elif im.mode == "LA":  # the grey channel; alpha is dropped, as RGBA's is
        a = np.asarray(im.getchannel("L"))
    elif im.mode == "1":
        a = np.asarray(im.convert("L"))
    else:
        raise BadImage(f"image: PNG mode {im.mode!r} is not supported; send 8- or 16-bit grayscale")
    return DecodedImage(_gray(np.ascontiguousarray(a), "PNG"), None, "png")


def _png16_colour(data: bytes) -> np.ndarray:
    """A 16-bit RGB(A) or grey+alpha PNG as uint16 (H, W, 3|4) RGB(A) or (H, W) grey."""
    import imagecodecs

    try:
        a = imagecodecs.png_decode(data)
    except imagecodecs.PngError as exc:
        raise BadImage(f"image: not a readable PNG ({exc})") from None
    if a.ndim == 3 and a.shape[2] == 2:  # grey + alpha: the alpha is dropped
        a = a[..., 0]
    return np.ascontiguousarray(a)


def _tiff(data: bytes, max_pixels: int | None) -> DecodedImage:
    from engine.errors import IngestError
    from engine.stores.ingest.tiff import read_tiff

    _check_tiff_layout(data, max_pixels)  # from the tags: nothing decoded yet
    try:
        first = next(iter(read_tiff(io.BytesIO(data))))
    except IngestError as exc:
        raise BadImage(f"image: {str(exc).split(': ', 1)[-1]}") from None
    except StopIteration:
        raise BadImage("image: TIFF holds no image") from None
    _check_pixels(*first.pixels.shape[:2], max_pixels)
    if first.pixels.dtype.name not in RAW_DTYPES:
        raise BadImage(f"image: TIFF of dtype {first.pixels.dtype.name} is not supported; "
                       f"send one of {', '.join(RAW_DTYPES)}")
    if first.pixels.dtype.kind == "f" and not np.all(np.isfinite(first.pixels)):
        raise BadImage("image: a float32 TIFF must hold finite values")
    size = None
    if first.pixel_size is not None and first.unit in _NM_PER:  # (y, x), as the ingest stores it
        size = (float(first.pixel_size[0]) * _NM_PER[first.unit], float(first.pixel_size[1]) * _NM_PER[first.unit])
    return DecodedImage(_gray(first.pixels, "TIFF"), size, "tiff", first.modality)


def _check_tiff_layout(data: bytes, max_pixels: int | None) -> None:
    """Refuse, from the TIFF's tags and stream headers alone, what would make the reader
    decode more than one bounded plane: more than MAX_TIFF_PAGES IFDs (`BadImage`,
    counted before tifffile parses them all); Y x X over `max_pixels` (`TooLarge`); more
    than one image plane (the pages, Z, T or C planes of a stack, or further images at
    least as large as the first: `BadImage` naming the count); more than MAX_TIFF_SAMPLES
    samples per pixel or a dtype the endpoint does not take (`BadImage`); a compression
    whose decoded size the tags do not bound (`UnsupportedMedia`); a tile or JPEG stream
    larger than the image its tags describe (`BadImage`, or `TooLarge` for a tile over
    `max_pixels`). A TIFF that passes decodes at most about max_pixels x MAX_TIFF_SAMPLES
    values of at most 4 bytes.

    The image is the one the reader yields first (`_reader_images`), so the limits hold
    for the pixels decoded. Y and X come from its axes by the reader's own rule
    (`engine.stores.ingest.tiff._shape_yx`), not from positions in its shape, so a
    grey + alpha ('YXS', S = 2) or planar ('SYX') image counts Y x X pixels. Smaller
    images (an unflagged preview or overview) are left out of the plane count: the
    endpoint analyses the image and ignores them, where the batch ingest makes each an
    image of its own."""
    import tifffile

    from engine.errors import IngestError
    from engine.stores.ingest.tiff import _shape_yx

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            _check_page_count(tif)
            _check_ome_planes(tif)
            if not tif.series:
                raise BadImage("image: TIFF holds no readable image; it may be truncated or corrupt")
            images = _reader_images(tif.series)
            if not images:
                raise BadImage("image: TIFF holds only reduced-resolution (thumbnail) images")
            image = images[0]
            shape, axes = tuple(int(n) for n in image.shape), image.axes
            y, x = _shape_yx(image, "image")
            _check_pixels(y, x, max_pixels)
            samples = shape[axes.index("S")] if "S" in axes else 1
            planes = _plane_count(image, y, x)
            # the reader's other images, where as large as the first: a page as large as
            # the micrograph is another micrograph, a smaller one a preview
            others = 0
            for other in images[1:]:
                oy, ox = _shape_yx(other, "image")
                if oy * ox >= y * x:
                    others += _plane_count(other, oy, ox)
            if planes + others > 1:
                where = (f"its first image is {'x'.join(map(str, shape))} with axes {axes!r}" if planes > 1
                         else f"{others} more {'page holds an image' if others == 1 else 'pages hold images'} "
                              f"at least as large as the first, {y} x {x}")
                raise BadImage(f"image: TIFF holds {planes + others} image planes ({where}); /v1/analyze analyses "
                               f"one micrograph per request: split the stack and send each page as its own image")
            if samples > MAX_TIFF_SAMPLES:
                raise BadImage(f"image: TIFF has {samples} samples per pixel; send grayscale (1), grey + alpha (2), "
                               f"RGB (3) or RGBA (4)")
            # Checked again on the decoded pixels (_tiff); here so that 8- or 16-byte samples
            # refused anyway are not first decoded at up to 4x the bytes of the widest taken.
            if image.dtype is None or image.dtype.name not in RAW_DTYPES:
                raise BadImage(f"image: TIFF of dtype {getattr(image.dtype, 'name', None)} is not supported; "
                               f"send one of {', '.join(RAW_DTYPES)}")
            _check_segments(image.keyframe, data, max_pixels)
    except (BadImage, TooLarge, UnsupportedMedia):
        raise
    except IngestError as exc:
        raise BadImage(f"image: {str(exc).split(': ', 1)[-1]}") from None
    except Exception as exc:  # tifffile raises TiffFileError, struct.error, ValueError, ... on bad tags
        raise BadImage(f"image: not a readable TIFF ({type(exc).__name__}: {exc})") from None


def _reader_images(all_series: list) -> list:
    """The tifffile series the batch reader makes images of, in the order it yields them
    (`engine.stores.ingest.tiff.image_levels`)."""
    from engine.stores.ingest.tiff import image_levels

    return [level for _, level in image_levels(all_series)]


def _plane_count(series, y: int, x: int) -> int:
    """How many (y, x) planes a tifffile series holds (pages, Z, T, C; samples not counted)."""
    shape, axes = tuple(int(n) for n in series.shape), series.axes
    samples = shape[axes.index("S")] if "S" in axes else 1
    return math.prod(shape) // (y * x * samples) if y * x * samples else 1


def _check_page_count(tif) -> None:
    """Refuse a TIFF of more than MAX_TIFF_PAGES IFDs, pages and their SubIFDs together.

    tifffile parses every page (and every SubIFD) of the file to group them into series,
    about 0.1 ms each: a 29 MB upload of 150000 one-pixel pages took 19 s of CPU before
    its plane count could refuse it. Pages are parsed here one at a time, as reached, and
    the count stops one past the limit, so no more than MAX_TIFF_PAGES + 1 are parsed."""
    count = 0
    for page in tif.pages:  # lazy: TiffPages reads each IFD when the iteration reaches it
        count += 1 + len(page.subifds or ())
        if count > MAX_TIFF_PAGES:
            raise BadImage(f"image: TIFF holds more than {MAX_TIFF_PAGES} pages; /v1/analyze analyses one micrograph "
                           f"per request: split the stack and send each page as its own image")


def _check_ome_planes(tif) -> None:
    """Refuse OME-XML declaring more than MAX_TIFF_PAGES x MAX_TIFF_SAMPLES planes in
    one image, before tifffile builds its series from it.

    tifffile makes a list entry per declared plane (SizeZ x SizeC x SizeT, a TiffData's
    PlaneCount), however few pages the file holds: a description declaring 10^8 planes
    of an 8 x 8 image took 1.5 GB and 5 s to refuse. Within the bound the stack is
    refused by its plane count, as any other."""
    if not tif.is_ome or not tif.ome_metadata:
        return
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(tif.ome_metadata)
    except ET.ParseError:
        return  # tifffile reads the file as a generic TIFF, ignoring the XML
    limit = MAX_TIFF_PAGES * MAX_TIFF_SAMPLES
    for element in root.iter():
        tag = element.tag.rsplit("}", 1)[-1]
        if tag == "Pixels":
            planes = math.prod(int(element.get(f"Size{axis}", 1)) for axis in "ZCT")
        elif tag == "TiffData":
            planes = max(int(element.get("PlaneCount", 0)), int(element.get("NumPlanes", 0)))
        else:
            continue
        if planes > limit:
            raise BadImage(f"image: TIFF's OME-XML declares {planes} image planes; /v1/analyze analyses one "
                           f"micrograph per request: split the stack and send each page as its own image")


def _round16(n: int) -> int:
    return -(-int(n) // 16) * 16


def _check_segments(page, data: bytes, max_pixels: int | None) -> None:
    """Refuse a page whose strips or tiles would decode to more than its tags' image.

    tifffile decodes each strip or tile into a buffer of the size the tags give the
    segment: a strip is at most the image, but a tile is as large as TileWidth x
    TileLength x TileDepth say, and a 16 x 16 image tagged with one 32768 x 32768 tile
    decoded 2 GiB from a 2 MB upload. A tile may exceed the image rounded up to 16 pixels
    (the TIFF spec's tile multiple) only up to MAX_TIFF_TILE_SIDE, and no tile may hold
    more than `max_pixels`. Compressions outside `_TIFF_COMPRESSIONS` decode at a size of
    their own and are refused; JPEG streams have their frame headers checked
    (`_check_jpeg`)."""
    import tifffile

    compression = int(page.compression)
    if compression not in _TIFF_COMPRESSIONS or page.jpegheader is not None:  # jpegheader: NDPI's whole-strip JPEG
        known = {int(c): c.name for c in tifffile.COMPRESSION}
        name = known.get(compression, "unknown")
        raise UnsupportedMedia(f"image: TIFF compression {name} ({compression}) is not supported by /v1/analyze; "
                               f"send the TIFF uncompressed or compressed with "
                               f"{', '.join(sorted(set(_TIFF_COMPRESSIONS.values()) - {'none'}))}")
    if page.is_tiled:
        tile = (int(page.tiledepth), int(page.tilelength), int(page.tilewidth))
        padded = (int(page.imagedepth), _round16(page.imagelength), _round16(page.imagewidth))
        if tile[0] > padded[0] or any(t > max(p, MAX_TIFF_TILE_SIDE) for t, p in zip(tile[1:], padded[1:])):
            dims = tile if tile[0] > 1 else tile[1:]
            raise BadImage(f"image: TIFF tile of {' x '.join(map(str, dims))} pixels is larger than its "
                           f"{page.imagelength} x {page.imagewidth} image rounded up to 16 pixels and than "
                           f"{MAX_TIFF_TILE_SIDE} x {MAX_TIFF_TILE_SIDE}; the file is malformed")
        if max_pixels is not None and math.prod(tile) > max_pixels:
            raise TooLarge(f"image: TIFF tile of {math.prod(tile)} pixels is over the limit of {max_pixels}")
        segment = ("tile", tile[1], tile[2])
    else:
        segment = ("strip", int(page.rowsperstrip), int(page.imagewidth))  # tifffile clips RowsPerStrip to the image
    if compression == 7:
        _check_jpeg(page, data, *segment)


def _check_jpeg(page, data: bytes, kind: str, length: int, width: int) -> None:
    """Refuse a JPEG-compressed page whose streams declare frames larger than the
    `length` x `width` (rounded up to 16 pixels, the largest JPEG block) its tags give
    each strip or tile.

    The JPEG decoder allocates and decodes at the frame size its stream's SOF header
    gives, whatever the TIFF tags say: a 64 x 64 TIFF carrying an 8192 x 8192 stream
    decoded 67 M pixels. Every frame header of each segment is checked, and a segment
    with none is refused: its size could not be known before decoding. (JPEGTables
    need no check: libjpeg refuses a tables stream holding a frame header.)"""
    limit = (_round16(length), _round16(width))
    for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
        if not offset or not count:  # an empty segment: tifffile fills it, decoding nothing
            continue
        frames = _jpeg_frames(data, int(offset), min(int(offset) + int(count), len(data)))
        if not frames:
            raise BadImage(f"image: JPEG {kind} {index} of the TIFF has no frame header; the file is malformed")
        for h, w in frames:
            if h > limit[0] or w > limit[1]:
                raise BadImage(f"image: JPEG {kind} {index} of the TIFF is {h} x {w}, larger than the "
                               f"{length} x {width} its tags give; the file is malformed")


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0-15 less DHT, JPG and DAC
_JPEG_NO_LENGTH = frozenset([0x01, *range(0xD0, 0xD9)])  # TEM, RST0-7, SOI: markers without a segment


def _jpeg_frames(data: bytes, start: int, end: int) -> list[tuple[int, int]]:
    """(height, width) of each frame header (SOFn) of the JPEG stream data[start:end]
    before its first scan (SOS) or end (EOI); [] where it does not start with SOI.

    Markers are found as libjpeg finds them (jdmarker.c next_marker): bytes up to the
    next 0xFF are skipped, fill 0xFF bytes are skipped, FF 00 is no marker, and a
    marker's segment is skipped by its length field, so the frames seen here are the
    ones the decoder sees."""
    frames: list[tuple[int, int]] = []
    if data[start:start + 2] != b"\xff\xd8":
        return frames
    i = start + 2
    while True:
        i = data.find(b"\xff", i, end)
        if i < 0:
            return frames
        while i < end and data[i] == 0xFF:
            i += 1
        if i >= end:
            return frames
        marker = data[i]
        i += 1
        if marker == 0x00 or marker in _JPEG_NO_LENGTH:
            continue
        if marker in (0xD9, 0xDA):  # EOI, SOS: a frame header comes before the first scan
            return frames
        if i + 2 > end:
            return frames
        if marker in _JPEG_SOF and i + 7 <= end:  # length, precision, height, width
            frames.append((int.from_bytes(data[i + 3:i + 5], "big"), int.from_bytes(data[i + 5:i + 7], "big")))
        i += max(int.from_bytes(data[i:i + 2], "big"), 2)


def _raw(data: bytes, dtype: str | None, shape, max_pixels: int | None) -> DecodedImage:
    if dtype is None or shape is None:
        raise BadImage("image: a raw array needs the fields dtype and shape (e.g. dtype=uint16, shape=512,512)")
    if dtype not in RAW_DTYPES:
        raise BadImage(f"dtype: {dtype!r} is not one of {', '.join(RAW_DTYPES)}")
    h, w = shape
    if h < 1 or w < 1:
        raise BadImage(f"shape: {h},{w} must be positive")
    _check_pixels(h, w, max_pixels)
    dt = np.dtype(dtype).newbyteorder("<")
    if len(data) != h * w * dt.itemsize:
        raise BadImage(f"image: {len(data)} bytes do not hold a {h} x {w} {dtype} array "
                       f"({h * w * dt.itemsize} bytes, little-endian, row-major)")
    a = np.frombuffer(data, dtype=dt).reshape(h, w).astype(dt.newbyteorder("="))
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise BadImage("image: a float32 array must hold finite values")
    return DecodedImage(a, None, "raw")


def parse_shape(text: str | None) -> tuple[int, int] | None:
    """"512,512" or "512x512" -> (512, 512); None stays None; else BadImage."""
    if text is None or text == "":
        return None
    parts = text.replace("x", ",").split(",")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise BadImage(f"shape: {text!r} is not 'height,width'") from None
    return h, w
