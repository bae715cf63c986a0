"""Interop with code nobody here wrote: ome-zarr-py writes what we read, reads what we write."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Reader
from ome_zarr.writer import write_image as ome_write_image

from engine.stores.image import open_image
from engine.stores.writer import write_image


@pytest.mark.parametrize("fmt,zarr_format", [(FormatV04(), 2), (FormatV05(), 3)])
def test_we_read_ome_zarr_py_images(tmp_path, fmt, zarr_format):
    pixels = np.random.default_rng(1).integers(0, 4000, (256, 320), dtype=np.uint16)
    path = tmp_path / "foreign.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    ome_write_image(
        pixels, group, fmt=fmt, axes="yx", scale_factors=(2, 4),
        scale={"y": 0.35, "x": 0.35}, axes_units={"y": "micrometer", "x": "micrometer"},
    )
    image = open_image(path)
    assert image.multiscale.version == fmt.version
    assert image.unit == "micrometer"
    assert [a.name for a in image.multiscale.axes] == ["y", "x"]
    assert image.pixel_size == pytest.approx((0.35, 0.35))
    assert [lv.pixel_size[1] for lv in image.levels] == pytest.approx([0.35, 0.7, 1.4])
    np.testing.assert_array_equal(image.read_level(0), pixels)
    assert image.nearest_level(1.0, "micrometer") == 2


def test_we_read_a_5d_image_with_singleton_axes(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 255, (1, 1, 1, 128, 96), dtype=np.uint8)
    group = zarr.open_group(str(tmp_path / "tczyx.ome.zarr"), mode="w", zarr_format=2)
    ome_write_image(
        pixels, group, fmt=FormatV04(), axes="tczyx", scale_factors=(2,),
        axes_units={"z": "nanometer", "y": "nanometer", "x": "nanometer"},
    )
    image = open_image(tmp_path / "tczyx.ome.zarr")
    assert image.shape == (128, 96)
    np.testing.assert_array_equal(image.read_region(0, 0, 128, 0, 96), pixels[0, 0, 0])


def test_ome_zarr_py_reads_our_images_and_labels(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 60000, (300, 260), dtype=np.uint16)
    labels = np.zeros(pixels.shape, np.uint32)
    labels[30:80, 40:100] = 1
    labels[200:240, 10:30] = 2
    path = tmp_path / "ours.ome.zarr"
    write_image(path, pixels, pixel_size=1.5, unit="nanometer", chunk=64, labels={"defects": labels})

    nodes = list(Reader(parse_url(str(path)))())
    image_node = nodes[0]
    assert image_node.load(Multiscales)
    ms = image_node.metadata
    assert [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert {a["unit"] for a in ms["axes"]} == {"nanometer"}
    scales = [t[0]["scale"] for t in ms["coordinateTransformations"]]
    assert scales[0] == [1.5, 1.5] and scales[1] == [3.0, 3.0]
    np.testing.assert_array_equal(np.asarray(image_node.data[0]), pixels)
    label_nodes = [n for n in nodes if n.load(Label)]
    assert len(label_nodes) == 1
    assert label_nodes[0].metadata["name"] == "defects"
    np.testing.assert_array_equal(np.asarray(label_nodes[0].data[0]), labels)


def _v04_image(path, unit: str, dataset_scale, shared=None):
    group = zarr.open_group(path, mode="w", zarr_format=2)
    group.create_array("0", shape=(64, 64), chunks=(32, 32), dtype="uint16", fill_value=0)
    ms = {"version": "0.4", "axes": [{"name": "y", "type": "space", "unit": unit},
                                     {"name": "x", "type": "space", "unit": unit}],
          "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": dataset_scale}]}]}
    if shared is not None:
        ms["coordinateTransformations"] = shared
    group.attrs["multiscales"] = [ms]
    return path


def test_the_multiscales_own_scale_applies_to_every_level(tmp_path):
    """NGFF lets a multiscale carry a transform applied after each dataset's."""
    img = open_image(_v04_image(tmp_path / "a.zarr", "micrometer", [1.0, 2.0],
                                [{"type": "scale", "scale": [0.5, 0.5]}, {"type": "translation", "translation": [3, 4]}]))
    assert img.pixel_size_nm == pytest.approx(1000.0)  # x: 2 um x 0.5
    assert img.levels[0].pixel_size == pytest.approx((0.5, 1.0))


def test_atomic_resolution_units(tmp_path):
    img = open_image(_v04_image(tmp_path / "p.zarr", "picometer", [20.0, 20.0]))
    assert img.pixel_size_nm == pytest.approx(0.02)
