"""Ingest of instrument files, each made here with its format's own tooling.

TIFF with tifffile (resolution tags, FEI and Zeiss vendor tags written as the
microscopes write them, ImageJ, OME); EMD with rosettasciio's NCEM writer and with h5py
in the Velox layout rosettasciio reads. Nothing writes DigitalMicrograph files outside
DigitalMicrograph, so `write_dm3` below writes the smallest DM3 tag tree rosettasciio
reads: version-3 header, ImageList/ImageData (Calibrations, Data, DataType, Dimensions)
and ImageTags.
"""

from __future__ import annotations

import json
import math
import struct
from datetime import datetime, timezone

import h5py
import numpy as np
import pytest
import tifffile

from engine.errors import IngestError, UnsupportedDtypeError
from engine.stores.catalog import image_uri, read_catalog
from engine.stores.image import open_image
from engine.stores.ingest import (
    IngestBatchError,
    InstrumentImage,
    ingest_files,
    read_instrument_file,
    read_instrument_images,
    sanitise_id,
    supported_extensions,
)
from engine.stores.ngff import to_nanometres
from engine.stores.uri import resolve
from engine.stores.writer import write_image

CHUNK = 32  # small chunks, so 40x50 test images span several chunks and pyramid levels


def _pixels(dtype, shape=(40, 50), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.normal(100, 20, shape).astype(dt)
    return rng.integers(0, min(np.iinfo(dt).max, 2**31 - 1), shape, dtype=np.int64).astype(dt)


def _stored(archive, image_id):
    image = open_image(image_uri(resolve(archive), image_id))
    return image, image.read_level(0)


def _row(archive, image_id):
    df = read_catalog(archive)
    rows = df[df.image_id == image_id]
    assert len(rows) == 1, df.image_id.tolist()
    return rows.iloc[0]


def _nm(value, unit):
    return to_nanometres(value, unit)


# --- file makers -----------------------------------------------------------------------

FEI_TEXT = (
    "[User]\r\nDate=03/14/2024\r\nTime=10:11:12 AM\r\nUser=supervisor\r\n"
    "[System]\r\nType=SEM\r\nSystemType=Helios G4 UX\r\n"
    "[Beam]\r\nHV=5000\r\n"
    "[Scan]\r\nPixelWidth={pw}\r\nPixelHeight={ph}\r\nHorFieldsize=1.6e-07\r\n"
    "[Image]\r\nResolutionX={rx}\r\nResolutionY={ry}\r\n"
)


def write_fei_tiff(path, pixels, pw, ph, *, image_rows=None, tag=34682):
    """An FEI/Thermo Fisher SEM TIFF: INI text in FEI_HELIOS (34682) or FEI_SFEG (34680)."""
    rows = image_rows or pixels.shape[0]
    text = FEI_TEXT.format(pw=pw, ph=ph, rx=pixels.shape[1], ry=rows)
    # Microscopes also write a meaningless 72 dpi; the vendor tag must win over it.
    tifffile.imwrite(path, pixels, resolution=(72, 72), resolutionunit="INCH", extratags=[(tag, "s", 0, text, True)])


def write_zeiss_tiff(path, pixels, size_text: str):
    """A Zeiss SmartSEM TIFF: CZ_SEM (34118) text, latin-1 like the instrument software."""
    text = (
        "0\r\n0\r\n0\r\n"
        f"AP_IMAGE_PIXEL_SIZE\r\nImage Pixel Size = {size_text}\r\n"
        "AP_DATE\r\nDate :15 Mar 2024\r\nAP_TIME\r\nTime :14:22:01\r\n"
        "SV_SERIAL_NUMBER\r\nSerial No. = 4321-77\r\n"
    )
    tifffile.imwrite(path, pixels, extratags=[(34118, "s", 0, text.encode("latin-1"), True)])


def write_ncem_emd(path, data, scale, units, *, title="HAADF", microscope="TEAM 0.5"):
    """A Berkeley/NCEM EMD through rosettasciio's own writer."""
    from rsciio.emd import file_writer

    axes = [
        {"name": n, "size": s, "offset": 0.0, "scale": sc, "units": units, "navigate": False}
        for n, s, sc in zip(("y", "x"), data.shape, scale)
    ]
    file_writer(str(path), {
        "data": data, "axes": axes,
        "metadata": {"General": {"title": title}, "Signal": {"signal_type": ""}},
        "original_metadata": {"microscope": {"name": microscope}},
    })


def write_velox_emd(path, images: dict[str, np.ndarray], pixel_m: tuple[float, float], unix_time: int):
    """A Velox EMD as Velox lays it out (the layout rosettasciio's FeiEMDReader reads):
    /Version JSON, /Data/Image/<uuid>/Data (y, x, frame), /Data/Image/<uuid>/Metadata
    (JSON as a uint8 column) with BinaryResult pixel size in metres, one per detector."""
    detectors = {f"Detector-{i}": {"DetectorName": name} for i, name in enumerate(images)}
    with h5py.File(path, "w") as f:
        f.create_dataset("Version", data=[json.dumps({"format": "Velox", "version": "11"}).encode()])
        for i, (name, pixels) in enumerate(images.items()):
            meta = {
                "BinaryResult": {
                    "PixelSize": {"width": repr(pixel_m[1]), "height": repr(pixel_m[0])},
                    "PixelUnitX": "m", "PixelUnitY": "m", "Offset": {"x": "0", "y": "0"}, "DetectorIndex": str(i),
                },
                "Detectors": detectors,
                "Acquisition": {"AcquisitionStartDatetime": {"DateTime": str(unix_time)}},
                "Instrument": {"InstrumentClass": "Titan", "InstrumentModel": "Titan Themis Z", "Manufacturer": "FEI Company"},
                "Optics": {"AccelerationVoltage": "300000"},
                "Scan": {"FrameTime": "1.0"},
            }
            group = f.create_group(f"Data/Image/{i:032x}")
            group.create_dataset("Data", data=pixels[:, :, None], chunks=(*pixels.shape, 1))
            blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
            group.create_dataset("Metadata", data=blob[:, None])


_DM_ELTYPE = {"uint8": 10, "uint16": 4, "uint32": 5, "int16": 2, "int32": 3, "float32": 6, "float64": 7}
_DM_DATATYPE = {"int16": 1, "float32": 2, "uint8": 6, "int32": 7, "uint16": 10, "uint32": 11, "float64": 12}


def write_dm(path, pixels, scale: float, units: str, tags: dict[str, dict[str, str]], *, version: int = 3):
    """A minimal DM3 or DM4 file: header, tag names and lengths big-endian, tag data
    little-endian; DM4 widens lengths and counts to 8 bytes and sizes each group and tag."""
    q = "I" if version == 3 else "Q"
    size = b"" if version == 3 else struct.pack(">Q", 0)  # DM4 sizes: rosettasciio skips them

    def name(n):
        b = n.encode("latin-1")
        return struct.pack(">H", len(b)) + b

    def data(n, info, payload):
        return b"\x15" + name(n) + size + b"%%%%" + struct.pack(f">{q}{len(info)}{q}", len(info), *info) + payload

    def group(n, tags_):
        return b"\x14" + name(n) + struct.pack(">BB", 0, 0) + size + struct.pack(f">{q}", len(tags_)) + b"".join(tags_)

    def long(n, v):
        return data(n, [3], struct.pack("<i", v))

    def flt(n, v):
        return data(n, [6], struct.pack("<f", v))

    def string(n, s):  # DM strings are arrays of UTF-16 code units
        return data(n, [20, 4, len(s)], struct.pack(f"<{len(s)}H", *map(ord, s)))

    h, w = pixels.shape
    dt = str(pixels.dtype)
    calibration = [group("", [flt("Origin", 0.0), flt("Scale", scale), string("Units", units)]) for _ in range(2)]
    image_data = group("ImageData", [
        group("Calibrations", [
            group("Brightness", [flt("Origin", 0.0), flt("Scale", 1.0), string("Units", "")]),
            group("Dimension", calibration),
        ]),
        data("Data", [20, _DM_ELTYPE[dt], pixels.size], np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()),
        long("DataType", _DM_DATATYPE[dt]),
        group("Dimensions", [long("", w), long("", h)]),
        long("PixelDepth", pixels.dtype.itemsize),
    ])
    image_tags = group("ImageTags", [group(g, [string(k, v) for k, v in kv.items()]) for g, kv in tags.items()])
    image_list = group("ImageList", [group("", [image_data, image_tags, string("Name", "test")])])
    body = struct.pack(f">BB{q}", 1, 0, 1) + image_list + b"\x00" * 8
    with open(path, "wb") as f:
        f.write(struct.pack(f">I{q}I", version, len(body) + 4, 1) + body)


def write_dm3(path, pixels, scale, units, tags):
    write_dm(path, pixels, scale, units, tags, version=3)


DM_TAGS = {
    "DataBar": {"Acquisition Date": "3/14/2024", "Acquisition Time": "10:11:12 AM"},
    "Microscope Info": {"Illumination Mode": "TEM", "Name": "JEM-2100F"},
}


# One maker per registered extension, each writing a 2 nm image: the registry smoke test
# below fails for a newly registered format until it gets a maker here.
MAKERS = {
    ".tif": lambda p, px: tifffile.imwrite(p, px, resolution=(5e6, 5e6), resolutionunit="CENTIMETER"),
    ".tiff": lambda p, px: tifffile.imwrite(p, px, resolution=(5e6, 5e6), resolutionunit="CENTIMETER"),
    ".dm3": lambda p, px: write_dm(p, px, 2.0, "nm", DM_TAGS, version=3),
    ".dm4": lambda p, px: write_dm(p, px, 2.0, "nm", DM_TAGS, version=4),
    ".emd": lambda p, px: write_ncem_emd(p, px, (2.0, 2.0), "nm"),
}


@pytest.mark.parametrize("ext", supported_extensions())
def test_every_registered_format_round_trips(tmp_path, ext):
    assert ext in MAKERS, f"no test-file maker for the registered extension {ext}"
    pixels = _pixels("uint16", shape=(37, 70))
    path = tmp_path / f"smoke{ext}"
    MAKERS[ext](path, pixels)
    [row] = ingest_files([path], tmp_path / "a", modality="TEM", chunk=CHUNK)
    np.testing.assert_array_equal(_stored(tmp_path / "a", row.image_id)[1], pixels)
    assert (row.pixel_size_y, row.pixel_size_x, row.unit) == (pytest.approx(2.0, rel=1e-9), pytest.approx(2.0, rel=1e-9), "nanometer")


# --- TIFF -------------------------------------------------------------------------------


class TestTiffResolutionTags:
    @pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "float32"])
    def test_round_trip_keeps_pixels_and_pixel_size(self, tmp_path, dtype):
        pixels = _pixels(dtype)
        py_cm, px_cm = 3.7e-7, 2.345678e-7  # 3.7 nm by 2.345678 nm: y and x differ on purpose
        path = tmp_path / f"scan {dtype}.tif"
        tifffile.imwrite(path, pixels, resolution=(1 / px_cm, 1 / py_cm), resolutionunit="CENTIMETER",
                         datetime="2024:03:14 10:11:12")
        archive = tmp_path / "archive"
        [row] = ingest_files([path], archive, modality="optical", material="ferritic steel", chunk=CHUNK)

        assert row.image_id == sanitise_id(f"scan {dtype}") == f"scan_{dtype}"
        image, stored = _stored(archive, row.image_id)
        assert stored.dtype == pixels.dtype
        np.testing.assert_array_equal(stored, pixels)
        assert len(image.levels) > 1
        for size_nm, want in zip((_nm(row.pixel_size_y, row.unit), _nm(row.pixel_size_x, row.unit)), (3.7, 2.345678)):
            assert math.isclose(size_nm, want, rel_tol=1e-9)
        assert math.isclose(_nm(image.pixel_size[1], image.unit), 2.345678, rel_tol=1e-9)
        assert math.isclose(_nm(image.pixel_size[0], image.unit), 3.7, rel_tol=1e-9)

        cat = _row(archive, row.image_id)
        assert (cat.modality, cat.material, cat.source, cat["dtype"]) == ("optical", "ferritic steel", str(path.resolve()), dtype)
        assert (cat.height, cat.width) == pixels.shape
        assert cat.acquired_at == datetime(2024, 3, 14, 10, 11, 12, tzinfo=timezone.utc)
        assert image.attributes["pixel_size_source"].startswith("TIFF XResolution")
        assert image.attributes["modality_source"] == "argument"
        # The checksum is the writer's: the same pixels written directly hash the same.
        direct = write_image(tmp_path / "direct.ome.zarr", pixels, pixel_size=1.0, chunk=CHUNK)
        assert cat.checksum == row.checksum == direct.checksum

    def test_inch_resolution_that_is_not_a_default(self, tmp_path):
        path = tmp_path / "dpi.tif"
        tifffile.imwrite(path, _pixels("uint8"), resolution=(25400.0, 25400.0), resolutionunit="INCH")
        image = read_instrument_file(path)
        assert image.unit == "micrometer" and image.pixel_size == pytest.approx((1.0, 1.0), rel=1e-12)

    def test_72_dpi_default_is_no_pixel_size(self, tmp_path):
        path = tmp_path / "screenshot.tif"
        tifffile.imwrite(path, _pixels("uint8"), resolution=(72, 72), resolutionunit="INCH")
        image = read_instrument_file(path)
        assert image.pixel_size is None
        assert any("72" in n for n in image.notes)

    @pytest.mark.parametrize("resolution,unit,imagej", [
        (72.0, "INCH", True),  # ImageJ saving an image it opened from a 72 dpi PNG: unit 'inch'
        (150.0, "INCH", False), (300.0, "INCH", False), (600.0, "INCH", False), (1200.0, "INCH", False),
        (72.0, "CENTIMETER", False),  # the dpi number written per cm
        (72 / 2.54, "CENTIMETER", False),  # 72 dpi converted to cm (GIMP with a cm unit)
        (300 / 2.54, "CENTIMETER", True),
    ])
    def test_screen_and_print_dpi_is_no_pixel_size(self, tmp_path, resolution, unit, imagej):
        path = tmp_path / "exported.tif"
        if imagej:
            tifffile.imwrite(path, _pixels("uint8"), imagej=True, resolution=(resolution, resolution),
                             metadata={"unit": "inch" if unit == "INCH" else "cm"})
        else:
            tifffile.imwrite(path, _pixels("uint8"), resolution=(resolution, resolution), resolutionunit=unit)
        image = read_instrument_file(path)
        assert (image.pixel_size, image.unit) == (None, None)
        assert any("not a calibration" in n for n in image.notes)
        # ingest then asks for the pixel size, and says why the file's resolution was not used
        with pytest.raises(IngestError, match=r"exported\.tif: no pixel size.*screen/print.*--pixel-size"):
            ingest_files([path], tmp_path / "a", modality="optical")

    def test_imagej_unit_and_resolution(self, tmp_path):
        path = tmp_path / "ij.tif"
        tifffile.imwrite(path, _pixels("uint16"), imagej=True, resolution=(1 / 0.125, 1 / 0.125), metadata={"unit": "um"})
        image = read_instrument_file(path)
        assert image.pixel_size == pytest.approx((125.0, 125.0), rel=1e-12) and image.unit == "nanometer"

    def test_ome_physical_size(self, tmp_path):
        path = tmp_path / "sample.ome.tif"
        tifffile.imwrite(path, _pixels("uint16"), ome=True, metadata={
            "PhysicalSizeX": 0.0125, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 0.025, "PhysicalSizeYUnit": "µm",
        })
        image = read_instrument_file(path)
        assert image.pixel_size == pytest.approx((25.0, 12.5), rel=1e-12)
        [row] = ingest_files([path], tmp_path / "a", modality="optical", chunk=CHUNK)
        assert row.image_id == "sample"  # '.ome.tif' comes off whole

    def test_stack_pages_become_images(self, tmp_path):
        stack = np.stack([_pixels("uint16", seed=s) for s in range(3)])
        path = tmp_path / "fib.tif"
        tifffile.imwrite(path, stack, photometric="minisblack", resolution=(1e7 / 5, 1e7 / 5), resolutionunit="CENTIMETER")
        rows = ingest_files([path], tmp_path / "a", modality="SEM", chunk=CHUNK)
        assert [r.image_id for r in rows] == ["fib_0", "fib_1", "fib_2"]
        for k, r in enumerate(rows):
            np.testing.assert_array_equal(_stored(tmp_path / "a", r.image_id)[1], stack[k])
            assert math.isclose(_nm(r.pixel_size_x, r.unit), 5.0, rel_tol=1e-9)

    def test_pages_of_different_sizes_each_become_an_image(self, tmp_path):
        """An acquisition macro appending micrographs of several sizes to one TIFF, with a
        flagged thumbnail and an unflagged preview smaller than the first image."""
        shapes = [(40, 50), (80, 100), (40, 50), (30, 33)]
        pages = [_pixels("uint16", shape=shape, seed=k) for k, shape in enumerate(shapes)]
        path = tmp_path / "session.tif"
        with tifffile.TiffWriter(path) as tw:
            for k, page in enumerate(pages):
                tw.write(page, resolution=(1e7 / 5, 1e7 / 5), resolutionunit="CENTIMETER")
                if k == 1:
                    tw.write(page[::4, ::4], subfiletype=1)  # reduced-resolution preview: not an image
        rows = ingest_files([path], tmp_path / "a", modality="SEM", chunk=CHUNK)
        assert [r.image_id for r in rows] == ["session_0", "session_1", "session_2"]
        assert sorted(read_catalog(tmp_path / "a").image_id) == [r.image_id for r in rows]
        for r, page in zip(rows, pages):
            image, stored = _stored(tmp_path / "a", r.image_id)
            np.testing.assert_array_equal(stored, page)
            assert math.isclose(_nm(r.pixel_size_x, r.unit), 5.0, rel_tol=1e-9)
            assert any("2 smaller or reduced-resolution" in n for n in image.attributes["notes"])

    def test_a_smaller_unflagged_page_is_a_preview_not_an_image(self, tmp_path):
        """A preview written without the reduced-resolution flag, its resolution tags copied
        from the micrograph (so its pixel size would be 4x wrong): left out, as the
        endpoint leaves it out."""
        big, preview = _pixels("uint8", shape=(64, 64), seed=1), _pixels("uint8", shape=(16, 16), seed=2)
        path = tmp_path / "two.tif"
        with tifffile.TiffWriter(path) as tw:
            for page in (big, preview):
                tw.write(page, metadata=None, resolution=(1e7 / 5, 1e7 / 5), resolutionunit="CENTIMETER")
        [image] = list(read_instrument_images(path))
        assert image.part is None
        np.testing.assert_array_equal(image.pixels, big)
        assert any("previews" in n for n in image.notes)

    def test_each_ome_image_takes_its_own_pixel_size(self, tmp_path):
        """An OME-TIFF of an overview and a larger detail acquisition: the second image's
        pixel size is its own OME Image's, not the file's first."""
        overview, detail = _pixels("uint16", shape=(40, 50), seed=1), _pixels("uint16", shape=(64, 64), seed=2)
        path = tmp_path / "session.ome.tif"
        with tifffile.TiffWriter(path, ome=True) as tw:
            tw.write(overview, metadata={"axes": "YX", "PhysicalSizeX": 50.0, "PhysicalSizeXUnit": "nm",
                                         "PhysicalSizeY": 50.0, "PhysicalSizeYUnit": "nm"})
            tw.write(detail, metadata={"axes": "YX", "PhysicalSizeX": 5.0, "PhysicalSizeXUnit": "nm",
                                       "PhysicalSizeY": 5.0, "PhysicalSizeYUnit": "nm"})
        images = list(read_instrument_images(path))
        assert [i.part for i in images] == ["0", "1"]
        sizes = [_nm(i.pixel_size[1], i.unit) for i in images]
        assert math.isclose(sizes[0], 50.0, rel_tol=1e-9) and math.isclose(sizes[1], 5.0, rel_tol=1e-9)

    def test_rgb_with_equal_channels_keeps_one_losslessly(self, tmp_path):
        gray = _pixels("uint8")
        path = tmp_path / "export.tif"
        tifffile.imwrite(path, np.stack([gray] * 3, axis=-1), photometric="rgb")
        image = read_instrument_file(path)
        np.testing.assert_array_equal(image.pixels, gray)
        assert any("equal channels" in n for n in image.notes)

    def test_colour_rgb_becomes_luma_with_a_note(self, tmp_path):
        rgb = np.stack([_pixels("uint8", seed=s) for s in range(3)], axis=-1)
        path = tmp_path / "optical.tif"
        tifffile.imwrite(path, rgb, photometric="rgb", resolution=(1e4, 1e4), resolutionunit="CENTIMETER")
        [row] = ingest_files([path], tmp_path / "a", modality="optical", chunk=CHUNK)
        image, stored = _stored(tmp_path / "a", row.image_id)
        want = np.floor(rgb.astype(float) @ [0.2125, 0.7154, 0.0721] + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(stored, want)
        assert any("BT.709" in n for n in image.attributes["notes"])


    def test_colour_conversion_works_in_bounded_memory(self):
        """A large colour image is converted in blocks, never as a float64 copy of the whole."""
        from tests.traced_memory import run_in_fresh_process

        note, shape, dtype, peak = run_in_fresh_process(_grayscale_traced, (2048, 2048, 3))
        assert "BT.709" in note and shape == (2048, 2048) and dtype == np.uint8
        assert peak < 4 * 2048 * 2048  # the output and one block's arithmetic (whole-image float64: 32x)


class TestSemVendorTiff:
    def test_fei_pixel_size_modality_and_data_bar(self, tmp_path):
        frame = _pixels("uint16", shape=(40, 50))
        with_bar = np.vstack([frame, np.full((8, 50), 65535, np.uint16)])  # the data bar below the scan
        path = tmp_path / "helios.tif"
        write_fei_tiff(path, with_bar, pw=2.5e-9, ph=3.1e-9, image_rows=40)
        [row] = ingest_files([path], tmp_path / "a", chunk=CHUNK)
        image, stored = _stored(tmp_path / "a", row.image_id)
        np.testing.assert_array_equal(stored, frame)
        assert row.modality == "SEM" and row.instrument == "Helios G4 UX"
        assert math.isclose(_nm(row.pixel_size_x, row.unit), 2.5, rel_tol=1e-9)
        assert math.isclose(_nm(row.pixel_size_y, row.unit), 3.1, rel_tol=1e-9)
        assert row.acquired_at == datetime(2024, 3, 14, 10, 11, 12, tzinfo=timezone.utc)
        attrs = image.attributes
        assert attrs["modality"] == "SEM" and attrs["source"] == str(path.resolve())
        assert attrs["source_format"] == "TIFF (FEI/Thermo Fisher)"
        assert attrs["pixel_size_source"].startswith("FEI metadata [Scan]")
        assert attrs["original_metadata"]["FEI.Scan.PixelWidth"] == 2.5e-9
        assert any("data bar" in n for n in attrs["notes"])

    def test_fei_sfeg_tag(self, tmp_path):
        path = tmp_path / "sfeg.tif"
        write_fei_tiff(path, _pixels("uint8"), pw=1.2e-8, ph=1.2e-8, tag=34680)
        image = read_instrument_file(path)
        assert image.modality == "SEM" and image.pixel_size == pytest.approx((12.0, 12.0), rel=1e-12)

    def test_explicit_pixel_size_overrides_the_file_and_is_recorded(self, tmp_path, caplog):
        path = tmp_path / "helios.tif"
        write_fei_tiff(path, _pixels("uint8"), pw=2.5e-9, ph=2.5e-9)
        [row] = ingest_files([path], tmp_path / "a", pixel_size=0.004, unit="um", chunk=CHUNK)
        assert (row.pixel_size_x, row.unit) == (pytest.approx(4.0), "nanometer")
        attrs = open_image(image_uri(resolve(tmp_path / "a"), row.image_id)).attributes
        assert attrs["pixel_size_source"] == "argument"
        assert attrs["file_pixel_size"] == pytest.approx([2.5, 2.5]) and attrs["file_unit"] == "nanometer"
        assert "overrides" in caplog.text

    @pytest.mark.parametrize("size_text,want_nm", [("3.125 nm", 3.125), ("1.25 µm", 1250.0)])
    def test_zeiss_pixel_size_and_modality(self, tmp_path, size_text, want_nm):
        path = tmp_path / "gemini.tif"
        write_zeiss_tiff(path, _pixels("uint16"), size_text)
        [row] = ingest_files([path], tmp_path / "a", chunk=CHUNK)
        assert row.modality == "SEM" and row.instrument == "Zeiss 4321-77"
        assert math.isclose(_nm(row.pixel_size_x, row.unit), want_nm, rel_tol=1e-9)
        assert row.acquired_at == datetime(2024, 3, 15, 14, 22, 1, tzinfo=timezone.utc)


# --- EMD and DM ---------------------------------------------------------------------------


class TestEmd:
    def test_ncem_emd_written_by_rosettasciio(self, tmp_path):
        pixels = _pixels("uint16")
        path = tmp_path / "team.emd"
        write_ncem_emd(path, pixels, (0.0371, 0.0433), "nm")
        [row] = ingest_files([path], tmp_path / "a", chunk=CHUNK)
        image, stored = _stored(tmp_path / "a", row.image_id)
        np.testing.assert_array_equal(stored, pixels)
        assert math.isclose(_nm(row.pixel_size_y, row.unit), 0.0371, rel_tol=1e-9)
        assert math.isclose(_nm(row.pixel_size_x, row.unit), 0.0433, rel_tol=1e-9)
        assert (row.modality, row.instrument) == ("TEM", "TEAM 0.5")
        assert image.attributes["source_format"] == "EMD (NCEM)"

    def test_velox_emd_with_two_detectors(self, tmp_path):
        haadf, bf = _pixels("uint16", seed=1), _pixels("uint16", seed=2)
        path = tmp_path / "velox.emd"
        write_velox_emd(path, {"HAADF": haadf, "BF": bf}, (1.23e-10, 1.17e-10), unix_time=1710411072)
        rows = ingest_files([path], tmp_path / "a", chunk=CHUNK)
        assert sorted(r.image_id for r in rows) == ["velox_BF", "velox_HAADF"]
        for r in rows:
            want = haadf if r.image_id.endswith("HAADF") else bf
            np.testing.assert_array_equal(_stored(tmp_path / "a", r.image_id)[1], want)
            assert math.isclose(_nm(r.pixel_size_y, r.unit), 0.123, rel_tol=1e-9)
            assert math.isclose(_nm(r.pixel_size_x, r.unit), 0.117, rel_tol=1e-9)
            assert (r.modality, r.instrument) == ("TEM", "Titan Themis Z")
            assert r.acquired_at == datetime.fromtimestamp(1710411072, tz=timezone.utc)

    def test_diffraction_units_are_refused(self, tmp_path):
        path = tmp_path / "pattern.emd"
        write_ncem_emd(path, _pixels("float32"), (0.01, 0.01), "1/nm", title="CBED")
        with pytest.raises(IngestError, match=r"pattern\.emd.*not a length.*diffraction"):
            ingest_files([path], tmp_path / "a")


class TestDigitalMicrograph:
    @pytest.mark.parametrize("version,dtype", [(3, "uint16"), (3, "float32"), (3, "int16"), (4, "uint32"), (4, "uint8")])
    def test_dm_pixels_pixel_size_and_tags(self, tmp_path, version, dtype):
        pixels = _pixels(dtype, shape=(30, 40))
        path = tmp_path / f"grain.dm{version}"
        write_dm(path, pixels, 0.0123, "nm", DM_TAGS, version=version)
        [row] = ingest_files([path], tmp_path / "a", chunk=CHUNK)
        np.testing.assert_array_equal(_stored(tmp_path / "a", row.image_id)[1], pixels)
        # DM stores calibrations as float32: that value is what must survive.
        assert math.isclose(_nm(row.pixel_size_x, row.unit), float(np.float32(0.0123)), rel_tol=1e-9)
        assert (row.modality, row.instrument) == ("TEM", "JEM-2100F")
        assert row.acquired_at == datetime(2024, 3, 14, 10, 11, 12, tzinfo=timezone.utc)

    def test_dm3_says_sem(self, tmp_path):
        path = tmp_path / "sem.dm3"
        write_dm3(path, _pixels("uint16"), 1.5, "µm", {"Microscope Info": {"Illumination Mode": "SEM", "Name": "Quanta"}})
        image = read_instrument_file(path)
        assert image.modality == "SEM" and image.pixel_size == pytest.approx((1.5, 1.5)) and image.unit == "micrometer"

    def test_dm3_diffraction_is_refused(self, tmp_path):
        path = tmp_path / "saed.dm3"
        write_dm3(path, _pixels("float32"), 0.02, "1/nm", DM_TAGS)
        with pytest.raises(IngestError, match=r"saed\.dm3.*'1/nm' is not a length"):
            read_instrument_file(path)


# --- errors and archive behaviour -----------------------------------------------------------


class TestErrors:
    def test_no_pixel_size_needs_the_argument(self, tmp_path):
        path = tmp_path / "bare.tif"
        pixels = _pixels("uint16")
        tifffile.imwrite(path, pixels)
        with pytest.raises(IngestError, match=r"bare\.tif: no pixel size.*--pixel-size"):
            ingest_files([path], tmp_path / "a", modality="SEM")
        [row] = ingest_files([path], tmp_path / "a", modality="SEM", pixel_size=2.0, unit="nm", chunk=CHUNK)
        assert (row.pixel_size_x, row.pixel_size_y, row.unit) == (2.0, 2.0, "nanometer")
        np.testing.assert_array_equal(_stored(tmp_path / "a", row.image_id)[1], pixels)

    def test_no_modality_needs_the_argument(self, tmp_path):
        path = tmp_path / "calibrated.tif"
        tifffile.imwrite(path, _pixels("uint8"), resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
        with pytest.raises(IngestError, match=r"calibrated\.tif.*--modality"):
            ingest_files([path], tmp_path / "a")

    def test_non_finite_pixels_and_bad_chunks_are_refused(self, tmp_path):
        path = tmp_path / "nan.tif"
        pixels = _pixels("float32")
        pixels[3, 3] = np.nan
        tifffile.imwrite(path, pixels, resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
        with pytest.raises(IngestError, match=r"nan\.tif: 1 pixels are NaN or infinite"):
            ingest_files([path], tmp_path / "a", modality="SEM", chunk=CHUNK)
        assert not (tmp_path / "a" / "images").exists() or not any((tmp_path / "a" / "images").iterdir())
        with pytest.raises(IngestError, match="chunk: 0 px is too small"):
            ingest_files([path], tmp_path / "b", modality="SEM", chunk=0)

    def test_float64_is_refused_naming_the_file(self, tmp_path):
        path = tmp_path / "sim.tif"
        tifffile.imwrite(path, _pixels("float64"), resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
        with pytest.raises(UnsupportedDtypeError, match=r"sim\.tif.*float64"):
            ingest_files([path], tmp_path / "a", modality="SEM")

    def test_complex_is_refused_naming_the_file(self, tmp_path):
        path = tmp_path / "exit_wave.emd"
        write_ncem_emd(path, (_pixels("float32") + 1j).astype(np.complex64), (0.05, 0.05), "nm")
        with pytest.raises(UnsupportedDtypeError, match=r"exit_wave\.emd.*complex64"):
            ingest_files([path], tmp_path / "a")

    def test_unknown_extension_lists_the_supported(self, tmp_path):
        path = tmp_path / "photo.png"
        path.write_bytes(b"\x89PNG")
        with pytest.raises(IngestError, match=r"photo\.png: unknown file type '\.png'.*\.dm3.*\.emd.*\.tif"):
            read_instrument_file(path)
        assert {".tif", ".tiff", ".dm3", ".dm4", ".emd"} <= set(supported_extensions())

    @pytest.mark.parametrize("name", ["cut.tif", "cut.emd", "cut.dm3"])
    def test_truncated_file_is_an_ingest_error_naming_it(self, tmp_path, name):
        path = tmp_path / name
        pixels = _pixels("uint16", shape=(64, 80))
        if name.endswith(".tif"):
            tifffile.imwrite(path, pixels, resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
        elif name.endswith(".emd"):
            write_ncem_emd(path, pixels, (1.0, 1.0), "nm")
        else:
            write_dm3(path, pixels, 1.0, "nm", DM_TAGS)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(IngestError, match=rf"{name.replace('.', '[.]')}"):
            ingest_files([path], tmp_path / "a", modality="SEM")

    def test_batch_goes_on_past_a_bad_file(self, tmp_path):
        good = [tmp_path / "one.tif", tmp_path / "two.emd"]
        tifffile.imwrite(good[0], _pixels("uint8"), resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
        write_ncem_emd(good[1], _pixels("uint16"), (0.5, 0.5), "nm")
        bad = tmp_path / "broken.tif"
        bad.write_bytes(b"II*\x00" + b"\xff" * 20)
        ticks = []
        with pytest.raises(IngestBatchError) as caught:
            ingest_files([good[0], bad, good[1]], tmp_path / "a", modality="TEM", chunk=CHUNK, progress=ticks.append)
        err = caught.value
        assert isinstance(err, IngestError) and ticks == [1, 1, 1]
        assert [f.path for f in err.failures] == [str(bad)] and "broken.tif" in str(err)
        assert sorted(r.image_id for r in err.rows) == ["one", "two"]
        assert sorted(read_catalog(tmp_path / "a").image_id) == ["one", "two"]
        for image_id in ("one", "two"):
            assert _stored(tmp_path / "a", image_id)[1].shape == (40, 50)

    def test_unit_without_pixel_size_and_bad_modality(self, tmp_path):
        with pytest.raises(IngestError, match="--unit"):
            ingest_files([], tmp_path / "a", unit="nm")
        with pytest.raises(IngestError, match="--modality 'XRD'"):
            ingest_files([], tmp_path / "a", modality="XRD")


class TestArchive:
    def test_ingesting_twice_replaces_the_row(self, tmp_path):
        path = tmp_path / "same.tif"
        tifffile.imwrite(path, _pixels("uint16"), resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
        archive = tmp_path / "a"
        first = ingest_files([path], archive, modality="SEM", chunk=CHUNK)
        tifffile.imwrite(path, _pixels("uint16", seed=9), resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
        second = ingest_files([path], archive, modality="SEM", chunk=CHUNK)
        df = read_catalog(archive)
        assert df.image_id.tolist() == ["same"] == [first[0].image_id] == [second[0].image_id]
        assert df.checksum.iloc[0] == second[0].checksum != first[0].checksum
        np.testing.assert_array_equal(_stored(archive, "same")[1], _pixels("uint16", seed=9))

    def test_same_file_name_from_another_folder_is_another_image(self, tmp_path):
        """Instruments write img001.tif in every session folder; ingested in separate runs."""
        day1, day2 = tmp_path / "day1" / "img001.tif", tmp_path / "day2" / "img001.tif"
        for path, value in ((day1, 11), (day2, 22)):
            path.parent.mkdir()
            tifffile.imwrite(path, np.full((40, 50), value, np.uint8), resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
        archive = tmp_path / "a"
        ingest_files([day1], archive, modality="SEM", material="steel A", chunk=CHUNK)
        ingest_files([day2], archive, modality="SEM", material="steel B", chunk=CHUNK)
        df = read_catalog(archive).set_index("image_id")
        assert df.source.to_dict() == {"img001": str(day1), "img001-2": str(day2)}
        assert df.material.to_dict() == {"img001": "steel A", "img001-2": "steel B"}
        assert _stored(archive, "img001")[1][0, 0] == 11 and _stored(archive, "img001-2")[1][0, 0] == 22

        # re-ingesting either file replaces its own image, whatever the order or batch
        tifffile.imwrite(day2, np.full((40, 50), 33, np.uint8), resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
        [row] = ingest_files([day2], archive, modality="SEM", chunk=CHUNK)
        assert row.image_id == "img001-2"
        again = ingest_files([day2, day1], archive, modality="SEM", chunk=CHUNK)
        assert [r.image_id for r in again] == ["img001-2", "img001"]
        assert sorted(read_catalog(archive).image_id) == ["img001", "img001-2"]
        assert _stored(archive, "img001")[1][0, 0] == 11 and _stored(archive, "img001-2")[1][0, 0] == 33

    def test_an_image_recorded_by_file_name_only_is_not_overwritten(self, tmp_path, caplog):
        """Archives from before full paths were recorded: which folder is unknown, so keep it."""
        import dataclasses

        from engine.stores.catalog import upsert_catalog

        old, new = tmp_path / "old" / "img.tif", tmp_path / "new" / "img.tif"
        for path, value in ((old, 1), (new, 2)):
            path.parent.mkdir()
            tifffile.imwrite(path, np.full((40, 50), value, np.uint8), resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
        archive = tmp_path / "a"
        [row] = ingest_files([old], archive, modality="SEM", chunk=CHUNK)
        upsert_catalog(resolve(archive), [dataclasses.replace(row, source="img.tif")])
        [row] = ingest_files([new], archive, modality="SEM", chunk=CHUNK)
        assert row.image_id == "img-2" and "folder was not recorded" in caplog.text
        assert _stored(archive, "img")[1][0, 0] == 1 and _stored(archive, "img-2")[1][0, 0] == 2

    def test_interrupted_reingest_keeps_the_catalogued_image(self, tmp_path, monkeypatch):
        import errno

        import engine.stores.writer as writer

        path = tmp_path / "a.tif"
        first = _pixels("uint16", seed=1)
        tifffile.imwrite(path, first, resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
        archive = tmp_path / "arch"
        [row] = ingest_files([path], archive, modality="SEM", chunk=CHUNK)

        def disk_full(*args, **kwargs):  # fails while the new image's pyramid is built
            raise OSError(errno.ENOSPC, "No space left on device")

        tifffile.imwrite(path, _pixels("uint16", seed=2), resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
        monkeypatch.setattr(writer, "write_next_level", disk_full)
        with pytest.raises(OSError, match="No space left"):
            ingest_files([path], archive, modality="SEM", chunk=CHUNK)
        assert _row(archive, "a").checksum == row.checksum
        np.testing.assert_array_equal(_stored(archive, "a")[1], first)
        assert sorted(p.name for p in (archive / "images").iterdir()) == ["a.ome.zarr"]

    def test_replaced_image_is_deleted_only_after_the_catalog_is_updated(self, tmp_path, monkeypatch):
        import engine.stores.ingest.pipeline as pipeline

        path = tmp_path / "a.tif"
        tifffile.imwrite(path, _pixels("uint16", seed=1), resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
        archive = tmp_path / "arch"
        ingest_files([path], archive, modality="SEM", chunk=CHUNK)
        tifffile.imwrite(path, _pixels("uint16", seed=2), resolution=(1e6, 1e6), resolutionunit="CENTIMETER")

        def catalog_unwritable(*args, **kwargs):
            raise OSError("catalog.parquet: permission denied")

        monkeypatch.setattr(pipeline, "upsert_catalog", catalog_unwritable)
        with pytest.raises(OSError, match="permission denied"):
            ingest_files([path], archive, modality="SEM", chunk=CHUNK)
        # the catalog still describes the old image, which is kept beside the new one
        old_checksum = _row(archive, "a").checksum
        kept = [p for p in (archive / "images").iterdir() if p.name != "a.ome.zarr"]
        assert len(kept) == 1 and kept[0].name.startswith(".a.ome.zarr")
        assert write_image(tmp_path / "x.ome.zarr", open_image(kept[0]).read_level(0), pixel_size=1.0,
                           chunk=CHUNK).checksum == old_checksum

        monkeypatch.undo()
        [row] = ingest_files([path], archive, modality="SEM", chunk=CHUNK)
        np.testing.assert_array_equal(_stored(archive, "a")[1], _pixels("uint16", seed=2))
        assert _row(archive, "a").checksum == row.checksum != old_checksum

    def test_colliding_stems_get_distinct_ids(self, tmp_path):
        tif, emd = tmp_path / "grain 7.tif", tmp_path / "grain 7.emd"
        tifffile.imwrite(tif, _pixels("uint8"), resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
        write_ncem_emd(emd, _pixels("uint16"), (0.5, 0.5), "nm")
        archive = tmp_path / "a"
        ingest_files([tif], archive, modality="TEM", chunk=CHUNK)
        [row] = ingest_files([emd], archive, modality="TEM", chunk=CHUNK)
        assert row.image_id == "grain_7-2"
        again = ingest_files([tif, emd], archive, modality="TEM", chunk=CHUNK)  # ids are stable on re-ingest
        assert [r.image_id for r in again] == ["grain_7", "grain_7-2"]
        assert sorted(read_catalog(archive).image_id) == ["grain_7", "grain_7-2"]


class TestReaderApi:
    def test_read_instrument_file_is_a_frozen_value(self, tmp_path):
        path = tmp_path / "x.dm3"
        write_dm3(path, _pixels("uint16"), 0.25, "nm", DM_TAGS)
        image = read_instrument_file(path)
        assert isinstance(image, InstrumentImage) and image.pixels.shape == (40, 50)
        with pytest.raises(AttributeError):
            image.unit = "meter"
        assert len(list(read_instrument_images(path))) == 1

    def test_dates_need_a_date(self):
        from engine.stores.ingest.base import parse_datetime

        assert parse_datetime(None, "10:11:12") is None  # a parser would date a lone time today
        assert parse_datetime("15 Mar 2024", "14:22:01") == datetime(2024, 3, 15, 14, 22, 1, tzinfo=timezone.utc)
        assert parse_datetime("2024-03-15T14:22:01+02:00") == datetime(2024, 3, 15, 12, 22, 1, tzinfo=timezone.utc)

    def test_explicit_modality_overrides_and_is_recorded(self, tmp_path):
        path = tmp_path / "x.dm3"
        write_dm3(path, _pixels("uint16"), 0.25, "nm", DM_TAGS)
        [row] = ingest_files([path], tmp_path / "a", modality="sem", chunk=CHUNK)
        attrs = open_image(image_uri(resolve(tmp_path / "a"), row.image_id)).attributes
        assert row.modality == attrs["modality"] == "SEM" and attrs["modality_source"] == "argument"

    @pytest.mark.parametrize("text,want", [("a b/c.tif", "a_b_c.tif"), ("..hidden", "hidden"), ("***", "image")])
    def test_sanitise_id(self, text, want):
        assert sanitise_id(text) == want


def _grayscale_traced(shape) -> tuple[str, tuple[int, int], np.dtype, int]:
    """In a fresh process: a random uint8 colour image of `shape` converted to grey; (note,
    shape, dtype, peak traced bytes of the conversion)."""
    from engine.stores.ingest.base import to_grayscale
    from tests.traced_memory import traced

    rgb = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    (gray, note), peak = traced(to_grayscale, rgb, "big.tif")
    return note, gray.shape, gray.dtype, peak
