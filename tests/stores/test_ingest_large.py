"""Ingest of TIFF planes too large to decode whole: read in bands, same pixels as whole.

The threshold for reading a plane in bands (`tiff_planes.STREAM_BYTES`, 256 MiB) is
lowered here, so small files made with tifffile take the banded path; the same file
read with the threshold as shipped takes the whole-plane path, and the two must agree
bit for bit, down to the catalog checksum.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile

import engine.stores.ingest.tiff_planes as tiff_planes
from engine.errors import IngestError
from engine.stores.catalog import image_uri, read_catalog
from engine.stores.image import open_image
from engine.stores.ingest import ingest_files, read_instrument_file, read_instrument_images
from engine.stores.ingest.bands import BandedPlane, as_banded
from engine.stores.uri import resolve
from tests.stores.test_ingest import write_fei_tiff
from tests.traced_memory import run_in_fresh_process, traced

CHUNK = 32
SHAPE = (300, 170)  # several chunks, bands and strips; edges not multiples of any of them
NM_PER_CM = dict(resolution=(5e6, 5e6), resolutionunit="CENTIMETER")  # 2 nm pixels


@pytest.fixture
def banded(monkeypatch):
    """Planes over 1 KiB are read in bands, 4 KiB at a time (several reads per band)."""
    monkeypatch.setattr(tiff_planes, "STREAM_BYTES", 1024)
    monkeypatch.setattr(tiff_planes, "_READ_BYTES", 4096)


def _random(dtype, shape=SHAPE, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100, 20, shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, shape, dtype=np.int64).astype(dtype)


def _stored(archive, image_id) -> np.ndarray:
    return open_image(image_uri(resolve(archive), image_id)).read_level(0)


# One maker per storage layout the banded path reads differently.
LAYOUTS = {
    # straight from the file
    "uncompressed one strip": lambda p: tifffile.imwrite(p, _random(np.uint16), **NM_PER_CM),
    "uncompressed strips": lambda p: tifffile.imwrite(p, _random(np.uint16), rowsperstrip=7, **NM_PER_CM),
    "big-endian": lambda p: tifffile.imwrite(p, _random(np.uint16), byteorder=">", **NM_PER_CM),
    "float32": lambda p: tifffile.imwrite(p, _random(np.float32), **NM_PER_CM),
    "MinIsWhite": lambda p: tifffile.imwrite(p, _random(np.uint16), photometric="miniswhite", **NM_PER_CM),
    "RGB colour": lambda p: tifffile.imwrite(p, _random(np.uint8, SHAPE + (3,)), photometric="rgb", **NM_PER_CM),
    "RGB planar": lambda p: tifffile.imwrite(p, _random(np.uint8, (3,) + SHAPE), photometric="rgb",
                                             planarconfig="separate", **NM_PER_CM),
    "RGB equal channels": lambda p: tifffile.imwrite(p, np.stack([_random(np.uint16)] * 3, axis=-1),
                                                     photometric="rgb", **NM_PER_CM),
    "RGB float32": lambda p: tifffile.imwrite(p, _random(np.float32, SHAPE + (3,)), photometric="rgb", **NM_PER_CM),
    "gray with alpha": lambda p: tifffile.imwrite(p, _random(np.uint8, SHAPE + (2,)), photometric="minisblack",
                                                  planarconfig="contig", extrasamples=["unassalpha"], **NM_PER_CM),
    # decoded a row of strips or tiles at a time
    "tiled deflate": lambda p: tifffile.imwrite(p, _random(np.uint16), tile=(48, 64), compression="zlib", **NM_PER_CM),
    "strips deflate predictor": lambda p: tifffile.imwrite(p, _random(np.uint16), rowsperstrip=10, compression="zlib",
                                                           predictor=True, **NM_PER_CM),
    "tiled RGB jpeg": lambda p: tifffile.imwrite(p, _random(np.uint8, SHAPE + (3,)), photometric="rgb", tile=(64, 64),
                                                 compression="jpeg", **NM_PER_CM),
    "tiled RGB planar": lambda p: tifffile.imwrite(p, _random(np.uint8, (3,) + SHAPE), photometric="rgb", tile=(32, 32),
                                                   planarconfig="separate", compression="zlib", **NM_PER_CM),
    "tiled MinIsWhite int16": lambda p: tifffile.imwrite(p, _random(np.int16), photometric="miniswhite", tile=(32, 48),
                                                         compression="zlib", **NM_PER_CM),
    # one plane per page
    "stack": lambda p: tifffile.imwrite(p, np.stack([_random(np.uint16, seed=s) for s in range(3)]),
                                        photometric="minisblack", **NM_PER_CM),
    "ImageJ stack": lambda p: tifffile.imwrite(p, np.stack([_random(np.uint16, seed=s) for s in range(3)]),
                                               imagej=True, resolution=(1 / 0.002, 1 / 0.002), metadata={"unit": "um"}),
    "FEI with data bar": lambda p: write_fei_tiff(p, _random(np.uint16), pw=2e-9, ph=2e-9, image_rows=250),
}


class TestBandedTiff:
    @pytest.mark.parametrize("layout", list(LAYOUTS))
    def test_banded_and_whole_give_identical_images(self, tmp_path, monkeypatch, layout):
        path = tmp_path / "mosaic.tif"
        LAYOUTS[layout](path)
        whole = list(read_instrument_images(path))
        [row_whole] = ingest_files([path], tmp_path / "whole", modality="optical", chunk=CHUNK)[:1]

        monkeypatch.setattr(tiff_planes, "STREAM_BYTES", 1024)
        monkeypatch.setattr(tiff_planes, "_READ_BYTES", 4096)
        streamed = list(read_instrument_images(path))
        [row_banded] = ingest_files([path], tmp_path / "banded", modality="optical", chunk=CHUNK)[:1]

        assert len(streamed) == len(whole)
        for w, s in zip(whole, streamed):
            assert isinstance(w.pixels, np.ndarray) and isinstance(s.pixels, BandedPlane)
            assert (s.pixels.shape, s.pixels.dtype) == (w.pixels.shape, w.pixels.dtype)
            np.testing.assert_array_equal(np.asarray(s.pixels), w.pixels)
            assert s.notes == w.notes
        # every image of the file, stored and catalogued the same
        cat_whole, cat_banded = read_catalog(tmp_path / "whole"), read_catalog(tmp_path / "banded")
        assert cat_whole.checksum.tolist() == cat_banded.checksum.tolist()
        assert row_whole.checksum == row_banded.checksum
        for image_id in cat_whole.image_id:
            np.testing.assert_array_equal(_stored(tmp_path / "banded", image_id), _stored(tmp_path / "whole", image_id))

    def test_banded_plane_outlives_the_reader(self, tmp_path, banded):
        """read_instrument_file closes the file; a banded plane opens it again to read."""
        path = tmp_path / "mosaic.tif"
        pixels = _random(np.uint16)
        tifffile.imwrite(path, pixels, tile=(64, 64), compression="zlib", **NM_PER_CM)
        image = read_instrument_file(path)
        assert isinstance(image.pixels, BandedPlane)
        np.testing.assert_array_equal(np.asarray(image.pixels), pixels)
        bands = list(image.pixels.bands(64))
        assert [b.shape for b in bands] == [(64, 170)] * 4 + [(44, 170)]

    def test_one_compressed_strip_is_decoded_whole_with_a_warning(self, tmp_path, banded, caplog):
        path = tmp_path / "onestrip.tif"
        pixels = _random(np.uint16)
        tifffile.imwrite(path, pixels, rowsperstrip=SHAPE[0], compression="zlib", **NM_PER_CM)
        with caplog.at_level(logging.WARNING, logger="engine.stores.ingest.tiff_planes"):
            [row] = ingest_files([path], tmp_path / "a", modality="SEM", chunk=CHUNK)
        assert "one compressed strip cannot be read in parts; decoding it whole" in caplog.text
        np.testing.assert_array_equal(_stored(tmp_path / "a", row.image_id), pixels)

    def test_non_finite_pixels_in_any_band_are_all_counted_and_nothing_is_kept(self, tmp_path, banded):
        path = tmp_path / "nan.tif"
        pixels = _random(np.float32)
        pixels[3, 3], pixels[290, 160] = np.nan, np.inf  # in the first band and the last
        tifffile.imwrite(path, pixels, **NM_PER_CM)
        with pytest.raises(IngestError, match=r"nan\.tif: 2 pixels are NaN or infinite"):
            ingest_files([path], tmp_path / "a", modality="SEM", chunk=CHUNK)
        assert not any((tmp_path / "a" / "images").iterdir())

    def test_truncated_pixel_data_is_an_ingest_error_naming_the_file(self, tmp_path, banded):
        path = tmp_path / "cut.tif"
        tifffile.imwrite(path, _random(np.uint16), **NM_PER_CM)  # tags first, then the pixel data
        path.write_bytes(path.read_bytes()[:-1000])
        with pytest.raises(IngestError, match=r"cut\.tif: pixel data ends early; the file is truncated"):
            ingest_files([path], tmp_path / "a", modality="SEM", chunk=CHUNK)
        assert not any((tmp_path / "a" / "images").iterdir())

    def test_peak_memory_stays_well_below_the_plane(self, tmp_path):
        """A tiled 4096 x 4096 uint16 plane (32 MiB) read in bands: Python-side peak well under the plane."""
        path = tmp_path / "mosaic.tif"

        def tiles():  # the file is written tile by tile, never whole
            for i in range(16 * 16):
                yield np.full((256, 256), i * 97 % 65536, np.uint16)

        tifffile.imwrite(path, tiles(), shape=(4096, 4096), dtype=np.uint16, tile=(256, 256), compression="zlib",
                         **NM_PER_CM)
        plane_bytes = 4096 * 4096 * 2
        small = tmp_path / "warm.tif"
        tifffile.imwrite(small, _random(np.uint16, (512, 512)), tile=(256, 256), compression="zlib", **NM_PER_CM)
        shape, image_id, peak = run_in_fresh_process(_banded_ingest_traced, path, small, tmp_path)
        assert shape == (4096, 4096)
        assert peak < plane_bytes / 3, f"peak {peak / 2**20:.1f} MiB for a {plane_bytes / 2**20:.0f} MiB plane"
        stored = _stored(tmp_path / "a", image_id)
        assert stored[0, 0] == 0 and stored[4095, 4095] == 255 * 97 % 65536


def _banded_ingest_traced(path, warm, tmp_path) -> tuple[tuple[int, int], str, int]:
    """In a fresh process: ingest `path` into tmp_path / "a" through the banded path (1 MiB
    threshold, one row of 256-px tiles a read) after a warm-up ingest of `warm` (codecs and
    stores allocate once on first use: not memory per image); ((height, width), image id,
    peak traced bytes of the ingest)."""
    tiff_planes.STREAM_BYTES = 1 << 20
    tiff_planes._READ_BYTES = 2 << 20
    ingest_files([warm], tmp_path / "warm", modality="SEM", chunk=256)
    [row], peak = traced(ingest_files, [path], tmp_path / "a", modality="SEM", chunk=256)
    return (row.height, row.width), row.image_id, peak


class TestBandedPlane:
    def test_blocks_of_any_height_become_bands_of_the_asked_height(self):
        data = np.arange(29 * 4).reshape(29, 4)
        cuts = [0, 5, 8, 28, 29]
        plane = BandedPlane((29, 4), data.dtype, lambda: iter(data[a:b] for a, b in zip(cuts, cuts[1:])))
        bands = list(plane.bands(8))
        assert [b.shape[0] for b in bands] == [8, 8, 8, 5]
        np.testing.assert_array_equal(np.concatenate(bands), data)
        np.testing.assert_array_equal(np.asarray(plane), data)
        with pytest.raises(ValueError, match="at least one row"):
            next(plane.bands(0))

    def test_an_in_memory_array_is_banded_without_copies(self):
        data = np.zeros((100, 7), np.uint16)
        plane = as_banded(data)
        assert plane.ndim == 2 and (plane.shape, plane.dtype) == ((100, 7), np.uint16)
        assert all(np.shares_memory(b, data) for b in plane.bands(32))
        assert as_banded(plane) is plane
