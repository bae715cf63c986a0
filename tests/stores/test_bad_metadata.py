"""Images that are not what they claim: each error names the path and what is wrong."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from engine.errors import MetadataError, UnsupportedDtypeError
from engine.stores.image import open_image
from engine.stores.writer import ImageWriter, write_image


def _write_raw(path, attrs, data, zarr_format=3):
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    group.create_array("0", data=data, chunks=(32,) * data.ndim)
    group.attrs.update(attrs)


def _ms(axes, scale, version="0.5"):
    ms = {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}
    return {"ome": {"version": version, "multiscales": [ms]}}


YX = [{"name": "y", "type": "space", "unit": "nanometer"}, {"name": "x", "type": "space", "unit": "nanometer"}]


def test_wrong_axes_names(tmp_path):
    axes = [{"name": "a", "type": "space", "unit": "nanometer"}, {"name": "b", "type": "space", "unit": "nanometer"}]
    _write_raw(tmp_path / "i.zarr", _ms(axes, [1, 1]), np.zeros((64, 64), np.uint8))
    with pytest.raises(MetadataError, match=r"i\.zarr.*lack spatial axis \['y', 'x'\]"):
        open_image(tmp_path / "i.zarr")


def test_channel_axis_with_many_channels(tmp_path):
    axes = [{"name": "c", "type": "channel"}] + YX
    _write_raw(tmp_path / "rgb.zarr", _ms(axes, [1, 1, 1]), np.zeros((3, 64, 64), np.uint8))
    with pytest.raises(MetadataError, match=r"rgb\.zarr/0.*\{'c': 3\}"):
        open_image(tmp_path / "rgb.zarr")


def test_axes_count_differs_from_array(tmp_path):
    _write_raw(tmp_path / "i.zarr", _ms(YX, [1, 1]), np.zeros((2, 64, 64), np.uint8))
    with pytest.raises(MetadataError, match="3 dimensions but the axes are"):
        open_image(tmp_path / "i.zarr")


def test_missing_unit(tmp_path):
    axes = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    _write_raw(tmp_path / "i.zarr", _ms(axes, [1, 1]), np.zeros((64, 64), np.uint8))
    with pytest.raises(MetadataError, match=r"i\.zarr: y and x axes need one shared spatial unit"):
        open_image(tmp_path / "i.zarr")


def test_not_an_ome_zarr_group(tmp_path):
    _write_raw(tmp_path / "plain.zarr", {"something": 1}, np.zeros((64, 64), np.uint8))
    with pytest.raises(MetadataError, match=r"plain\.zarr: no 'multiscales'"):
        open_image(tmp_path / "plain.zarr")


def test_missing_zattrs_v04(tmp_path):
    write_v04 = _ms(YX, [1, 1])["ome"]["multiscales"]
    write_v04[0]["version"] = "0.4"
    _write_raw(tmp_path / "v4.zarr", {"multiscales": write_v04}, np.zeros((64, 64), np.uint8), zarr_format=2)
    assert open_image(tmp_path / "v4.zarr").multiscale.version == "0.4"
    (tmp_path / "v4.zarr" / ".zattrs").unlink()
    with pytest.raises(MetadataError, match=r"v4\.zarr: no 'multiscales'"):
        open_image(tmp_path / "v4.zarr")


def test_unsupported_version(tmp_path):
    _write_raw(tmp_path / "i.zarr", _ms(YX, [1, 1], version="0.3"), np.zeros((64, 64), np.uint8))
    with pytest.raises(MetadataError, match="version '0.3' is not supported"):
        open_image(tmp_path / "i.zarr")


@pytest.mark.parametrize("dtype", ["float64", "int64", "complex64", "bool"])
def test_unsupported_dtype_on_read(tmp_path, dtype):
    _write_raw(tmp_path / "i.zarr", _ms(YX, [1, 1]), np.zeros((64, 64), dtype))
    with pytest.raises(UnsupportedDtypeError, match=rf"i\.zarr/0: dtype {dtype} is not supported"):
        open_image(tmp_path / "i.zarr")


def test_unsupported_dtype_on_write(tmp_path):
    with pytest.raises(UnsupportedDtypeError, match=r"out\.ome\.zarr: dtype float64"):
        write_image(tmp_path / "out.ome.zarr", np.zeros((8, 8)), pixel_size=1.0)


def test_bad_pixel_size_and_unit(tmp_path):
    with pytest.raises(ValueError, match="pixel size"):
        ImageWriter(tmp_path / "a.zarr", shape=(8, 8), dtype="uint8", pixel_size=0.0)
    with pytest.raises(MetadataError, match="unknown spatial unit 'furlong'"):
        ImageWriter(tmp_path / "a.zarr", shape=(8, 8), dtype="uint8", pixel_size=1.0, unit="furlong")
