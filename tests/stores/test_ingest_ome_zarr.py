"""Ingest of existing OME-Zarr images, and of folders that are not images.

v0.4 images are written by ome-zarr-py (as bioformats2raw users and Python users get
them) or with zarr directly where a layout needs control (big-endian pixels, a
bioformats2raw root); v0.5 images by grainflow's own writer, as another archive holds them.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr.format import FormatV04
from ome_zarr.writer import write_image as ome_write_image

import engine.stores.ingest.ome_zarr as ome_zarr_reader
from engine.errors import IngestError
from engine.stores.catalog import image_uri, read_catalog
from engine.stores.image import open_image
from engine.stores.ingest import BandedPlane, ingest_files, read_instrument_file
from engine.stores.uri import resolve
from engine.stores.writer import write_image

CHUNK = 16  # small chunks: the 70 x 90 test images span several chunks and pyramid levels


def _pixels(shape=(70, 90), dtype=np.uint16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(dtype)


def _stored(archive, image_id) -> np.ndarray:
    return open_image(image_uri(resolve(archive), image_id)).read_level(0)


def write_v04(path, pixels, *, axes="yx", scale=None, units=None):
    """A v0.4 image (Zarr v2) written by ome-zarr-py; `scale`/`units` by axis name."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    ome_write_image(pixels, group, fmt=FormatV04(), axes=axes, scale_factors=(2,), scale=scale, axes_units=units)
    return path


class TestOmeZarrImages:
    def test_v04_from_ome_zarr_py_with_singleton_axes(self, tmp_path):
        pixels = _pixels()
        source = write_v04(
            tmp_path / "foreign.ome.zarr", pixels[None, None, None], axes="tczyx",
            scale={"t": 1.0, "c": 1.0, "z": 1.0, "y": 0.5, "x": 0.25},
            units={"t": "second", "z": "micrometer", "y": "micrometer", "x": "micrometer"},
        )
        [row] = ingest_files([source], tmp_path / "a", modality="SEM", chunk=CHUNK)
        assert row.image_id == "foreign" and row.source == str(source)
        assert (row.height, row.width, row.dtype) == (70, 90, "uint16")
        assert (row.pixel_size_y, row.pixel_size_x) == pytest.approx((500.0, 250.0)) and row.unit == "nanometer"
        assert read_catalog(tmp_path / "a").image_id.tolist() == ["foreign"]
        stored = open_image(image_uri(resolve(tmp_path / "a"), "foreign"))
        assert stored.multiscale.version == "0.5" and stored.levels[0].chunks == (CHUNK, CHUNK)
        np.testing.assert_array_equal(stored.read_level(0), pixels)
        attrs = stored.attributes
        assert attrs["source_format"] == "OME-Zarr (NGFF 0.4)"
        assert attrs["pixel_size_source"] == "NGFF multiscales: level 0 scale"
        assert "axes t, c, z of size 1 dropped" in attrs["notes"]

    def test_v04_big_endian_written_with_zarr(self, tmp_path):
        pixels = _pixels(dtype=">u2")
        source = tmp_path / "be.zarr"
        group = zarr.open_group(str(source), mode="w", zarr_format=2)
        group.create_array("0", shape=pixels.shape, chunks=(32, 32), dtype=">u2", fill_value=0)[:] = pixels
        group.attrs["multiscales"] = [{
            "version": "0.4", "axes": [{"name": n, "type": "space", "unit": "nm"} for n in "yx"],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.5, 1.5]}]}],
        }]
        [row] = ingest_files([source], tmp_path / "a", modality="TEM", chunk=CHUNK)
        assert (row.image_id, row.dtype, row.pixel_size_x) == ("be", "uint16", pytest.approx(1.5))
        np.testing.assert_array_equal(_stored(tmp_path / "a", "be"), pixels)

    def test_v05_from_another_archive_keeps_modality_and_checksum(self, tmp_path):
        """A folder found by its metadata, not its name; grainflow's own attributes count."""
        pixels = _pixels(dtype=np.float32)
        source = tmp_path / "scan_001"  # no .zarr suffix
        written = write_image(source, pixels, pixel_size=(2.0, 3.0), unit="nanometer", chunk=CHUNK,
                              attributes={"modality": "TEM", "instrument": "Titan",
                                          "acquired_at": "2024-03-14T10:11:12+00:00"})
        [row] = ingest_files([source], tmp_path / "a", chunk=CHUNK)  # no --modality: the image says TEM
        assert (row.image_id, row.modality, row.instrument) == ("scan_001", "TEM", "Titan")
        assert row.acquired_at.isoformat() == "2024-03-14T10:11:12+00:00"
        assert (row.height, row.width, row.dtype) == (70, 90, "float32")
        assert (row.pixel_size_y, row.pixel_size_x, row.unit) == (pytest.approx(2.0), pytest.approx(3.0), "nanometer")
        assert row.checksum == written.checksum  # same pixels, same chunks
        np.testing.assert_array_equal(_stored(tmp_path / "a", "scan_001"), pixels)
        assert image_uri(resolve(tmp_path / "a"), "scan_001").path != str(source)  # a copy of its own

    def test_pixel_size_argument_overrides_and_is_needed_without_units(self, tmp_path):
        pixels = _pixels(seed=1)
        unitless = write_v04(tmp_path / "bare.ome.zarr", pixels)  # ome-zarr-py's default: no units
        with pytest.raises(IngestError, match=r"bare\.ome\.zarr: no pixel size.*carry no unit.*--pixel-size"):
            ingest_files([unitless], tmp_path / "a", modality="SEM")
        calibrated = write_v04(tmp_path / "cal.ome.zarr", pixels, scale={"y": 0.35, "x": 0.35},
                               units={"y": "micrometer", "x": "micrometer"})
        with pytest.raises(IngestError, match=r"cal\.ome\.zarr.*--modality"):
            ingest_files([calibrated], tmp_path / "a")
        rows = ingest_files([unitless, calibrated], tmp_path / "a", modality="SEM", pixel_size=2.0, unit="nm",
                            chunk=CHUNK)
        assert [(r.image_id, r.pixel_size_x, r.unit) for r in rows] == [("bare", 2.0, "nanometer"),
                                                                         ("cal", 2.0, "nanometer")]
        attrs = open_image(image_uri(resolve(tmp_path / "a"), "cal")).attributes
        assert attrs["pixel_size_source"] == "argument"
        assert attrs["file_pixel_size"] == pytest.approx([350.0, 350.0]) and attrs["file_unit"] == "nanometer"

    @pytest.mark.parametrize("axes,shape,why", [
        ("cyx", (3, 40, 50), r"a multichannel image \(axis 'c' has size 3\)"),
        ("zyx", (4, 40, 50), r"a z-stack \(axis 'z' has size 4\)"),
        ("tyx", (2, 40, 50), r"a time series \(axis 't' has size 2\)"),
    ])
    def test_more_than_one_plane_is_refused_naming_why(self, tmp_path, axes, shape, why):
        source = write_v04(tmp_path / "stack.ome.zarr", _pixels(shape), axes=axes)
        with pytest.raises(IngestError, match=rf"stack\.ome\.zarr: {why}; grainflow ingests single-channel 2-D"):
            ingest_files([source], tmp_path / "a", modality="optical", pixel_size=1.0)
        assert not (tmp_path / "a" / "catalog.parquet").exists()

    def test_level_0_is_read_in_bands(self, tmp_path, monkeypatch):
        """A large image is never read whole: bands of whole chunk rows, about _READ_BYTES each."""
        monkeypatch.setattr(ome_zarr_reader, "_READ_BYTES", 1024)  # less than one chunk row
        pixels = _pixels(shape=(100, 40))
        write_image(tmp_path / "big.ome.zarr", pixels, pixel_size=1.0, chunk=CHUNK)
        image = read_instrument_file(tmp_path / "big.ome.zarr")
        assert isinstance(image.pixels, BandedPlane)
        assert [b.shape for b in image.pixels.blocks()] == [(16, 40)] * 6 + [(4, 40)]
        [row] = ingest_files([tmp_path / "big.ome.zarr"], tmp_path / "a", modality="SEM", chunk=32)
        np.testing.assert_array_equal(_stored(tmp_path / "a", row.image_id), pixels)

    def test_bioformats2raw_series_become_images(self, tmp_path):
        root = tmp_path / "slide.zarr"
        group = zarr.open_group(str(root), mode="w", zarr_format=2)
        group.attrs["bioformats2raw.layout"] = 3
        group.create_group("OME").attrs["series"] = ["0", "1"]
        first, second = _pixels(seed=2), _pixels((30, 20), seed=3)
        for name, px, size in (("0", first, 0.1), ("1", second, 0.4)):
            ome_write_image(px, group.create_group(name), fmt=FormatV04(), axes="yx", scale_factors=(2,),
                            scale={"y": size, "x": size}, axes_units={"y": "micrometer", "x": "micrometer"})
        rows = ingest_files([root], tmp_path / "a", modality="optical", chunk=CHUNK)
        assert [(r.image_id, r.height, r.width, r.pixel_size_x) for r in rows] == [
            ("slide_0", 70, 90, pytest.approx(100.0)), ("slide_1", 30, 20, pytest.approx(400.0))]
        np.testing.assert_array_equal(_stored(tmp_path / "a", "slide_0"), first)
        np.testing.assert_array_equal(_stored(tmp_path / "a", "slide_1"), second)


class TestFoldersThatAreNoImage:
    @pytest.mark.parametrize("name", ["session", "x.tif"])
    def test_a_folder_of_tiffs_asks_for_its_files(self, tmp_path, name):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(2):
            tifffile.imwrite(folder / f"img{i}.tif", _pixels())
        with pytest.raises(IngestError, match=rf"{name} is a folder; pass its files \(e\.g\. .*{name}/\*\.tif\)"):
            ingest_files([folder], tmp_path / "a", modality="SEM", pixel_size=1.0)

    def test_a_folder_of_ome_zarr_images_suggests_them(self, tmp_path):
        write_v04(tmp_path / "all" / "one.ome.zarr", _pixels())
        with pytest.raises(IngestError, match=r"all is a folder; pass its files \(e\.g\. .*all/\*\.zarr\)"):
            read_instrument_file(tmp_path / "all")

    def test_zarr_that_is_no_image_says_what_it_is(self, tmp_path):
        plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3)
        plain.attrs["note"] = "not an image"
        with pytest.raises(IngestError, match=r"plain\.zarr is a Zarr group without OME-NGFF 'multiscales'"):
            read_instrument_file(tmp_path / "plain.zarr")
        write_image(tmp_path / "img.ome.zarr", _pixels(), pixel_size=1.0, chunk=CHUNK,
                    labels={"defects": np.zeros((70, 90), np.uint32)})
        with pytest.raises(IngestError, match=r"img\.ome\.zarr/0 is one pyramid level .*; pass .*img\.ome\.zarr$"):
            read_instrument_file(tmp_path / "img.ome.zarr" / "0")
        with pytest.raises(IngestError, match=r"defects: a label image"):
            read_instrument_file(tmp_path / "img.ome.zarr" / "labels" / "defects")
        with pytest.raises(IngestError, match=r"missing\.ome\.zarr: no such folder"):
            read_instrument_file(tmp_path / "missing.ome.zarr")
        plate = zarr.open_group(str(tmp_path / "plate.zarr"), mode="w", zarr_format=2)
        plate.attrs["plate"] = {"version": "0.4", "wells": [{"path": "A/1", "rowIndex": 0, "columnIndex": 0}]}
        with pytest.raises(IngestError, match=r"plate\.zarr is an HCS plate, not one image; .*plate\.zarr/A/1/0"):
            read_instrument_file(tmp_path / "plate.zarr")
        (tmp_path / "empty.zarr").mkdir()
        with pytest.raises(IngestError, match=r"empty\.zarr is a folder but holds no Zarr metadata"):
            read_instrument_file(tmp_path / "empty.zarr")

    def test_unknown_extension_names_the_folder_format(self, tmp_path):
        (tmp_path / "photo.png").write_bytes(b"\x89PNG")
        with pytest.raises(IngestError, match=r"unknown file type '\.png'.*\.tif \(TIFF\).*folders: OME-Zarr image"):
            read_instrument_file(tmp_path / "photo.png")
