"""Checks that keep a TIFF upload from making the endpoint decode (or parse) far more
than one bounded image: run on its tags and stream headers before any pixel is decoded
(`check_tiff_layout`, called by `engine.serving.decode`).

Each check stops one attack seen or measured on a small upload:

- IFD chains (`_check_page_count`): a 29 MB file of 150000 one-pixel pages took 19 s of
  CPU while tifffile parsed every page; a TIFF of more than MAX_TIFF_PAGES IFDs is
  refused having parsed at most one more.
- OME-XML plane-count claims (`_check_ome_planes`): a description declaring 10^8 planes
  of an 8 x 8 image made tifffile list them all (1.5 GB, 5 s); such claims are refused
  before tifffile builds its series.
- Pixel count and stacks (`check_tiff_layout`): an image over `max_pixels` (413), more
  than one image plane, more samples than MAX_TIFF_SAMPLES or a dtype the endpoint does
  not take (422) is refused from the tags, before a plane is decoded at all.
- Tiles larger than the image (`_check_segments`): tifffile allocates each tile at its
  tagged size, so a 16 x 16 image tagged with one 32768 x 32768 tile decoded 2 GiB from a
  2 MB upload.
- JPEG frames larger than their strip or tile (`_check_jpeg`): the JPEG decoder decodes
  at its stream's own frame size, whatever the tags say; a 64 x 64 TIFF carrying an
  8192 x 8192 stream decoded 67 M pixels.
- Codecs whose decoded size the tags do not bound (JPEG 2000, JPEG XL, WebP, ...): they
  decode at their stream's own size too and are refused (415, naming the compression);
  only the compressions in `TIFF_COMPRESSIONS` are taken.

Errors are `engine.serving.decode`'s: `BadImage` (422), `TooLarge` (413) and
`UnsupportedMedia` (415), naming what is at fault.
"""

from __future__ import annotations

import io
import math

from engine.serving.decode import RAW_DTYPES, BadImage, TooLarge, UnsupportedMedia, check_pixels

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
TIFF_COMPRESSIONS = {1: "none", 5: "LZW", 7: "JPEG", 8: "Deflate", 32946: "Deflate", 32773: "PackBits",
                     34925: "LZMA", 34926: "Zstd", 50000: "Zstd"}


def check_tiff_layout(data: bytes, max_pixels: int | None) -> None:
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
            check_pixels(y, x, max_pixels)
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
    more than `max_pixels`. Compressions outside `TIFF_COMPRESSIONS` decode at a size of
    their own and are refused; JPEG streams have their frame headers checked
    (`_check_jpeg`)."""
    import tifffile

    compression = int(page.compression)
    if compression not in TIFF_COMPRESSIONS or page.jpegheader is not None:  # jpegheader: NDPI's whole-strip JPEG
        known = {int(c): c.name for c in tifffile.COMPRESSION}
        name = known.get(compression, "unknown")
        raise UnsupportedMedia(f"image: TIFF compression {name} ({compression}) is not supported by /v1/analyze; "
                               f"send the TIFF uncompressed or compressed with "
                               f"{', '.join(sorted(set(TIFF_COMPRESSIONS.values()) - {'none'}))}")
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

