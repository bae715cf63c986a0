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


def _pyramid(path, levels, scales, unit="nanometer"):
    """A v0.5 image with arrays `levels` at paths 0.., each with its (y, x) scale."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for i, data in enumerate(levels):
        group.create_array(str(i), data=data, chunks=(32, 32))
    axes = [{"name": n, "type": "space", "unit": unit} for n in ("y", "x")]
    group.attrs.update({"ome": {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
        {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": s}]} for i, s in enumerate(scales)]}]}})


@pytest.mark.parametrize("damage, message", [
    ({"scale": [0, 0]}, r"dataset 0 \('0'\) scale \[0.0, 0.0\] must be positive and finite"),
    ({"scale": [-1, 1]}, r"scale \[-1.0, 1.0\] must be positive"),
    ({"scale": [float("nan"), 1]}, r"scale \[nan, 1.0\] must be positive and finite"),
    ({"scale": ["a", "b"]}, r"malformed 'multiscales' metadata \(ValueError"),
    ({"coordinateTransformations": None}, r"malformed 'multiscales' metadata \(TypeError"),
    ({"no_path": True}, r"malformed 'multiscales' metadata \(KeyError: 'path'\)"),
    ({"datasets": "dict"}, r"malformed 'multiscales' metadata"),
    ({"multiscales": "dict"}, r"malformed 'multiscales' metadata"),
    ({"unit": 7}, r"i\.zarr: unknown spatial unit 7"),
    ({"unit": "furlong"}, r"i\.zarr: unknown spatial unit 'furlong'"),
])
def test_malformed_multiscales_name_the_image_and_field(tmp_path, damage, message):
    """Metadata of the wrong shape, type or value: a MetadataError naming the image (so a
    job records that image and goes on), never a KeyError or a math domain error."""
    _pyramid(tmp_path / "i.zarr", [np.zeros((64, 64), np.uint8)], [[1.0, 1.0]], unit=damage.get("unit", "nanometer"))
    group = zarr.open_group(str(tmp_path / "i.zarr"), mode="r+")
    ome = dict(group.attrs["ome"])
    ms = dict(ome["multiscales"][0])
    ds = dict(ms["datasets"][0])
    if "scale" in damage:
        ds["coordinateTransformations"] = [{"type": "scale", "scale": damage["scale"]}]
    if "coordinateTransformations" in damage:
        ds["coordinateTransformations"] = None
    if "no_path" in damage:
        del ds["path"]
    ms["datasets"] = {"0": ds} if damage.get("datasets") else [ds]
    ome["multiscales"] = {"0": ms} if damage.get("multiscales") else [ms]
    group.attrs["ome"] = ome
    with pytest.raises(MetadataError, match=rf"i\.zarr.*{message}" if "unit" not in damage else message):
        open_image(tmp_path / "i.zarr")


def test_a_level_whose_shape_contradicts_its_scale_is_not_used(tmp_path, caplog):
    """Level 1 says it is 2x coarser but holds 128 x 128 of a 64 x 64 image: its tiles
    would be placed outside the image. It is left out (with the levels below it), named
    in a warning; level 0 still opens."""
    _pyramid(tmp_path / "i.zarr", [np.zeros((64, 64), np.uint8), np.zeros((128, 128), np.uint8),
                                   np.zeros((16, 16), np.uint8)], [[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]])
    image = open_image(tmp_path / "i.zarr")
    assert [lv.shape for lv in image.levels] == [(64, 64)] and len(image.multiscale.levels) == 1
    assert "i.zarr/1: shape (128, 128) does not match level 0's (64, 64)" in caplog.text
    assert "level 1 and coarser are not used" in caplog.text
    _pyramid(tmp_path / "ok.zarr", [np.zeros((65, 65), np.uint8), np.zeros((33, 33), np.uint8)],
             [[1.0, 1.0], [2.0, 2.0]])
    assert open_image(tmp_path / "ok.zarr").levels[1].shape == (33, 33)  # rounded up: one pixel is fine


def test_a_level_of_another_dtype_is_not_used(tmp_path, caplog):
    """A float32 mean level under a uint8 level 0 (some converters write them)."""
    _pyramid(tmp_path / "i.zarr", [np.zeros((64, 64), np.uint8), np.zeros((32, 32), np.float32)],
             [[1.0, 1.0], [2.0, 2.0]])
    assert [lv.dtype for lv in open_image(tmp_path / "i.zarr").levels] == ["uint8"]
    assert "i.zarr/1: dtype float32 differs from level 0's uint8" in caplog.text


def test_level_0_unlike_its_metadata_is_refused(tmp_path):
    _pyramid(tmp_path / "i.zarr", [np.zeros((64, 64), np.uint8)], [[1.0, 1.0]])
    (tmp_path / "i.zarr" / "0" / "zarr.json").write_text("not json")
    with pytest.raises(MetadataError, match=r"i\.zarr/0: the array's metadata cannot be read"):
        open_image(tmp_path / "i.zarr")


def test_a_store_error_on_a_level_is_not_called_bad_metadata(tmp_path, monkeypatch):
    """Expired credentials or a dropped connection are the store's, not the image's:
    they go on up (a job stops planning instead of recording every image as bad)."""
    _pyramid(tmp_path / "i.zarr", [np.zeros((64, 64), np.uint8)], [[1.0, 1.0]])
    real = zarr.Group.__getitem__

    def denied(self, key):
        if key == "0":
            raise PermissionError("AccessDenied (expired token)")
        return real(self, key)

    monkeypatch.setattr(zarr.Group, "__getitem__", denied)
    with pytest.raises(PermissionError, match="expired token"):
        open_image(tmp_path / "i.zarr")


def test_an_empty_level_0(tmp_path):
    _pyramid(tmp_path / "e.zarr", [np.zeros((0, 64), np.uint8)], [[1.0, 1.0]])
    with pytest.raises(MetadataError, match=r"e\.zarr/0: the array is empty"):
        open_image(tmp_path / "e.zarr")
