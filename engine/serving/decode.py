"""Request bodies to pixels: PNG (8/16-bit), TIFF (16-bit included, pixel size from its
metadata when present, (y, x): a TIFF's XResolution and YResolution may differ) or a raw
array with its dtype and shape.

Errors are `UnsupportedMedia` (HTTP 415: declared as a format the endpoint does not
read), `BadImage` (HTTP 422: a supported format whose content or fields are wrong: an
empty upload, bytes that are not the PNG or TIFF they are declared as) and
`TooLarge` (HTTP 413: more pixels than `max_pixels`, refused from the header before any
pixel is decoded); their messages name the field at fault.

One request is one micrograph: a TIFF holding more than one image plane (a multi-page
stack, Z/T/C planes, further images as large as the first) is refused naming the count,
where the batch ingest (`engine.stores.ingest.tiff`) makes each plane an image of its
own; send the planes one by one. Smaller pages (thumbnails, flagged or not) are ignored.
A TIFF is checked from its tags and stream headers before any pixel is decoded
(`engine.serving.tiff_limits.check_tiff_layout`): one plane, of at most `max_pixels`, in
a compression whose decoded size the tags bound (others are refused, 415). Colour is
reduced to one channel by the ingest's rule (`engine.stores.ingest.base.to_grayscale`:
equal channels kept, else BT.709 luma; alpha dropped), palette PNGs included.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from engine.errors import GrainflowError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
RAW_TYPES = ("application/octet-stream", "application/x-numpy-raw")
# declared media types of the formats read by their bytes' magic numbers
DECLARED_FORMATS = {"image/png": "PNG", "image/x-png": "PNG", "image/tiff": "TIFF", "image/tif": "TIFF",
                    "image/x-tiff": "TIFF"}
# what a file's first bytes say it is, to name a mislabelled upload (a JPEG renamed .png)
_OTHER_MAGICS = ((b"\xff\xd8\xff", "a JPEG"), (b"GIF8", "a GIF"), (b"BM", "a BMP"), (b"%PDF", "a PDF"),
                 (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000"), (b"PK\x03\x04", "a ZIP archive"))
RAW_DTYPES = ("uint8", "uint16", "uint32", "int8", "int16", "int32", "float32")
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
    """"png", "tiff" or "raw" from the bytes (magic numbers) and the declared type.

    The bytes decide between PNG and TIFF whatever the declared type. An empty upload,
    or one declared PNG or TIFF whose bytes are neither, is `BadImage` (a supported
    type, wrong content: 422, naming what the bytes start with); a declared type the
    endpoint does not read is `UnsupportedMedia` (415)."""
    if not data:
        raise BadImage("image: empty (0 bytes); send the file's content")
    if data.startswith(PNG_MAGIC):
        return "png"
    if data[:4] in TIFF_MAGICS:
        return "tiff"
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared in RAW_TYPES:
        return "raw"
    if declared in DECLARED_FORMATS:
        raise BadImage(f"image: declared {declared} but its bytes are not a {DECLARED_FORMATS[declared]} "
                       f"({_first_bytes(data)}); send a whole PNG or TIFF file (other formats converted)")
    raise UnsupportedMedia(f"image: unsupported media type {content_type or 'unknown'!r}; send PNG, TIFF or a raw "
                           f"array as application/octet-stream with dtype and shape")


def _first_bytes(data: bytes) -> str:
    """What `data` starts with, in hex, its length, and the format that suggests if it is
    a common one, e.g. "starts with ff d8 ff e0 00 10 4a 46, a JPEG; 11 bytes in all"."""
    head = " ".join(f"{b:02x}" for b in data[:8])
    what = next((f", {name}" for magic, name in _OTHER_MAGICS if data.startswith(magic)), "")
    if not what and PNG_MAGIC.startswith(data):
        what = ", a PNG signature cut short"
    elif not what and any(m.startswith(data) for m in TIFF_MAGICS):
        what = ", a TIFF header cut short"
    return f"starts with {head}{what}; {len(data)} bytes in all"


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


def check_pixels(h: int, w: int, max_pixels: int | None) -> None:
    """Refuse an h x w image of more than `max_pixels` (None: no limit) with `TooLarge`."""
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
        check_pixels(header[0], header[1], max_pixels)
        if header[2] == 16 and header[3] in (2, 4, 6):
            # Pillow reads 16-bit colour and grey+alpha PNGs as 8-bit: imagecodecs keeps 16
            return DecodedImage(_gray(_png16_colour(data), "PNG"), None, "png")
    try:
        im = Image.open(io.BytesIO(data))
        check_pixels(im.height, im.width, max_pixels)
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
    from engine.serving.tiff_limits import check_tiff_layout  # here, not at the top: it imports our errors
    from engine.stores.ingest.tiff import read_tiff

    check_tiff_layout(data, max_pixels)  # from the tags: nothing decoded yet
    try:
        first = next(iter(read_tiff(io.BytesIO(data))))
    except IngestError as exc:
        raise BadImage(f"image: {str(exc).split(': ', 1)[-1]}") from None
    except StopIteration:
        raise BadImage("image: TIFF holds no image") from None
    check_pixels(*first.pixels.shape[:2], max_pixels)
    if first.pixels.dtype.name not in RAW_DTYPES:
        raise BadImage(f"image: TIFF of dtype {first.pixels.dtype.name} is not supported; "
                       f"send one of {', '.join(RAW_DTYPES)}")
    if first.pixels.dtype.kind == "f" and not np.all(np.isfinite(first.pixels)):
        raise BadImage("image: a float32 TIFF must hold finite values")
    size = None
    if first.pixel_size is not None and first.unit in _NM_PER:  # (y, x), as the ingest stores it
        size = (float(first.pixel_size[0]) * _NM_PER[first.unit], float(first.pixel_size[1]) * _NM_PER[first.unit])
    return DecodedImage(_gray(first.pixels, "TIFF"), size, "tiff", first.modality)



def _raw(data: bytes, dtype: str | None, shape, max_pixels: int | None) -> DecodedImage:
    if dtype is None or shape is None:
        raise BadImage("image: a raw array needs the fields dtype and shape (e.g. dtype=uint16, shape=512,512)")
    if dtype not in RAW_DTYPES:
        raise BadImage(f"dtype: {dtype!r} is not one of {', '.join(RAW_DTYPES)}")
    h, w = shape
    if h < 1 or w < 1:
        raise BadImage(f"shape: {h},{w} must be positive")
    check_pixels(h, w, max_pixels)
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
