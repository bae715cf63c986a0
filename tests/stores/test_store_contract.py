"""One contract for every store backend: memory://, local disk and S3 (moto on loopback)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from engine.errors import CorruptChunkError, InvalidURIError, MetadataError
from engine.stores.catalog import CatalogRow, read_catalog, upsert_catalog, write_catalog
from engine.stores.image import open_image
from engine.stores.pyramid import downsample_labels, downsample_mean
from engine.stores.writer import ImageWriter, write_image


def _image(shape=(300, 450), dtype="uint16", seed=0):
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if np.issubdtype(np.dtype(dtype), np.integer) else None
    if info is None:
        return rng.normal(100, 20, shape).astype(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)


def _row(image_id: str, **kw) -> CatalogRow:
    base = dict(
        image_id=image_id, uri=f"images/{image_id}.ome.zarr", modality="SEM", pixel_size_y=2.5,
        pixel_size_x=2.5, unit="nanometer", height=64, width=64, dtype="uint16", levels=1, chunk=64,
        checksum="0" * 64, material="ferritic_steel",
    )
    return CatalogRow(**{**base, **kw})


class TestImageRoundTrip:
    @pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "int16", "float32"])
    def test_pixels_and_dtype_survive(self, store_root, dtype):
        pixels = _image(dtype=dtype)
        write_image(store_root.join("a.ome.zarr"), pixels, pixel_size=3.25, unit="nm", chunk=128)
        image = open_image(store_root.join("a.ome.zarr"))
        assert image.dtype == dtype
        np.testing.assert_array_equal(image.read_level(0), pixels)

    def test_metadata_is_ngff_v05_with_units(self, store_root):
        write_image(store_root.join("a.ome.zarr"), _image(), pixel_size=(2.0, 2.5), unit="micrometer", chunk=128)
        image = open_image(store_root.join("a.ome.zarr"))
        assert image.multiscale.version == "0.5"
        assert [(a.name, a.type, a.unit) for a in image.multiscale.axes] == [
            ("y", "space", "micrometer"), ("x", "space", "micrometer")]
        assert image.pixel_size == (2.0, 2.5)
        assert [lv.pixel_size for lv in image.levels] == [(2.0 * 2**k, 2.5 * 2**k) for k in range(len(image.levels))]
        assert image.pixel_size_nm == pytest.approx(2500.0)

    def test_pyramid_levels_are_2x_means(self, store_root):
        pixels = _image(shape=(300, 450))
        write_image(store_root.join("a.ome.zarr"), pixels, pixel_size=1.0, chunk=64)
        image = open_image(store_root.join("a.ome.zarr"))
        assert [lv.shape for lv in image.levels] == [(300, 450), (150, 225), (75, 113), (38, 57)]
        expected = pixels
        for k in range(1, len(image.levels)):
            expected = downsample_mean(expected)
            np.testing.assert_array_equal(image.read_level(k), expected)

    def test_tiles_written_in_any_order_give_one_checksum(self, store_root):
        pixels = _image(shape=(256, 256))
        infos = []
        for name, order in (("fwd.ome.zarr", 1), ("rev.ome.zarr", -1)):
            with ImageWriter(store_root.join(name), shape=pixels.shape, dtype=pixels.dtype, pixel_size=1.0, chunk=128) as w:
                for y, x in [(0, 0), (0, 128), (128, 0), (128, 128)][::order]:
                    w.write_tile(y, x, pixels[y:y + 128, x:x + 128])
            infos.append(w.info)
        assert infos[0].checksum == infos[1].checksum
        assert infos[0].checksum == write_image(store_root.join("whole.ome.zarr"), pixels, pixel_size=1.0, chunk=128).checksum

    def test_misaligned_tile_is_refused(self, store_root):
        w = ImageWriter(store_root.join("a.ome.zarr"), shape=(256, 256), dtype="uint8", pixel_size=1.0, chunk=128)
        for y in (64, -128):  # a negative origin would write nowhere
            with pytest.raises(ValueError, match="not aligned"):
                w.write_tile(y, 0, np.zeros((128, 128), np.uint8))

    def test_labels_round_trip(self, store_root):
        pixels = _image(shape=(200, 200))
        labels = np.zeros((200, 200), np.uint32)
        labels[10:50, 20:90] = 1
        labels[121:180, 101:110] = 7  # odd edges: blocks split between the defect and background
        write_image(store_root.join("a.ome.zarr"), pixels, pixel_size=4.0, chunk=64, labels={"defects": labels})
        image = open_image(store_root.join("a.ome.zarr"))
        assert image.labels() == ["defects"]
        mask = image.open_labels("defects")
        np.testing.assert_array_equal(mask.read_level(0), labels)
        # label levels take each 2x2 block's own most frequent value, built chunk by chunk as
        # on the whole array: a value never becomes the average of two ids
        assert set(np.unique(mask.read_level(1))) <= {0, 1, 7}
        expected = labels
        for k in range(1, len(mask.levels)):
            expected = downsample_labels(expected)
            np.testing.assert_array_equal(mask.read_level(k), expected)
        assert mask.levels[1].pixel_size == (8.0, 8.0)

    def test_nearest_level(self, store_root):
        write_image(store_root.join("a.ome.zarr"), _image(shape=(512, 512)), pixel_size=2.0, unit="nanometer", chunk=64)
        image = open_image(store_root.join("a.ome.zarr"))  # levels at 2, 4, 8, 16 nm
        assert image.nearest_level(2.0) == 0
        assert image.nearest_level(5.0) == 1
        assert image.nearest_level(0.009, "micrometer") == 2
        assert image.nearest_level(12.0) == 3  # nearer 16 than 8 on a log scale
        assert image.nearest_level(1000.0) == len(image.levels) - 1
        assert image.nearest_level(0.01) == 0

    def test_region_read_touches_only_that_region(self, store_root):
        pixels = _image(shape=(512, 512))
        write_image(store_root.join("a.ome.zarr"), pixels, pixel_size=1.0, chunk=128)
        image = open_image(store_root.join("a.ome.zarr"))
        np.testing.assert_array_equal(image.read_region(0, 100, 300, 250, 260), pixels[100:300, 250:260])


class TestReplacingAnImage:
    """Writing over an image keeps the old one whole until the new one is complete."""

    @staticmethod
    def _listing(location):
        fs = location.filesystem()
        fs.invalidate_cache()
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(location.path, detail=False))

    def test_old_image_readable_until_the_new_one_is_closed(self, store_root):
        old, new = _image(shape=(256, 256), seed=1), _image(shape=(64, 128), seed=2)
        labels = {"defects": (old > 30000).astype(np.uint8)}
        write_image(store_root.join("a.ome.zarr"), old, pixel_size=1.0, chunk=64, labels=labels)
        with ImageWriter(store_root.join("a.ome.zarr"), shape=new.shape, dtype=new.dtype, pixel_size=2.0, chunk=64) as w:
            w.write_tile(0, 0, new[:, :64])
            w.write_tile(0, 64, new[:, 64:])
            np.testing.assert_array_equal(open_image(store_root.join("a.ome.zarr")).read_level(0), old)
        image = open_image(store_root.join("a.ome.zarr"))
        np.testing.assert_array_equal(image.read_level(0), new)
        assert (len(image.levels), image.labels(), image.pixel_size) == (2, [], (2.0, 2.0))
        # nothing of the old image is left behind: not its third level, not its labels
        assert self._listing(store_root.join("a.ome.zarr")) == ["0", "1", "zarr.json"]
        assert self._listing(store_root) == ["a.ome.zarr"]

    @pytest.mark.parametrize("fail_in", ["tiles", "pyramid"])
    def test_a_failed_rewrite_leaves_the_old_image(self, store_root, monkeypatch, fail_in):
        import errno

        import engine.stores.writer as writer

        old = _image(shape=(256, 256), seed=1)
        write_image(store_root.join("a.ome.zarr"), old, pixel_size=1.0, chunk=64)

        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        if fail_in == "pyramid":
            monkeypatch.setattr(writer, "write_next_level", disk_full)
        with pytest.raises(OSError, match="No space left"):
            with ImageWriter(store_root.join("a.ome.zarr"), shape=(256, 256), dtype="uint16", pixel_size=1.0, chunk=64) as w:
                w.write_tile(0, 0, _image(shape=(64, 64), seed=3))
                if fail_in == "tiles":
                    disk_full()
        image = open_image(store_root.join("a.ome.zarr"))
        np.testing.assert_array_equal(image.read_level(0), old)
        assert image.pixel_size == (1.0, 1.0)
        assert self._listing(store_root) == ["a.ome.zarr"]  # the half-written copy is cleaned up


class TestBadInput:
    def test_corrupt_chunk_names_its_key(self, store_root):
        write_image(store_root.join("a.ome.zarr"), _image(shape=(256, 256)), pixel_size=1.0, chunk=128)
        fs = store_root.filesystem()
        chunk = store_root.join("a.ome.zarr", "0", "c", "1", "0")
        fs.pipe_file(chunk.path, b"this is not zstd")
        image = open_image(store_root.join("a.ome.zarr"))
        np.testing.assert_array_equal(image.read_region(0, 0, 128, 0, 256).shape, (128, 256))  # other chunks fine
        with pytest.raises(CorruptChunkError) as err:
            image.read_region(0, 0, 256, 0, 256)
        assert err.value.chunk_keys == ("0/c/1/0",)
        assert "a.ome.zarr" in str(err.value) and "0/c/1/0" in str(err.value)

    def test_a_corrupt_shard_names_the_shard(self, tmp_path):
        """In a sharded array the store holds shards; the error names the one to repair."""
        import zarr

        group = zarr.open_group(tmp_path / "s.ome.zarr", mode="w", zarr_format=3)
        arr = group.create_array("0", shape=(64, 64), chunks=(16, 16), shards=(32, 32), dtype="uint16", fill_value=0)
        arr[:] = 1
        group.attrs["ome"] = {"version": "0.5", "multiscales": [{
            "axes": [{"name": "y", "type": "space", "unit": "nanometer"}, {"name": "x", "type": "space", "unit": "nanometer"}],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0]}]}]}]}
        (tmp_path / "s.ome.zarr" / "0" / "c" / "1" / "0").write_bytes(b"garbage" * 10)
        with pytest.raises(CorruptChunkError) as err:
            open_image(tmp_path / "s.ome.zarr").read_region(0, 0, 64, 0, 64)
        assert err.value.chunk_keys == ("0/c/1/0",)

    def test_missing_metadata_names_the_path(self, store_root):
        write_image(store_root.join("a.ome.zarr"), _image(shape=(64, 64)), pixel_size=1.0, chunk=64)
        store_root.filesystem().rm(store_root.join("a.ome.zarr", "zarr.json").path)
        with pytest.raises(MetadataError, match=r"a\.ome\.zarr.*zarr\.json"):
            open_image(store_root.join("a.ome.zarr"))

    def test_nothing_there(self, store_root):
        with pytest.raises(MetadataError, match="nothing.ome.zarr"):
            open_image(store_root.join("nothing.ome.zarr"))

    def test_escaping_the_root_is_refused(self, store_root):
        with pytest.raises(InvalidURIError, match="outside the allowed root"):
            store_root.join("images", "..", "..", "elsewhere")


class TestCatalog:
    def test_round_trip_and_upsert(self, store_root):
        write_catalog(store_root, [_row("b"), _row("a", material=None, seed=3)])
        df = read_catalog(store_root)
        assert list(df.image_id) == ["a", "b"]
        assert df.loc[0, "seed"] == 3 and pd.isna(df.loc[0, "material"]) and pd.isna(df.loc[1, "seed"])
        upsert_catalog(store_root, [_row("b", modality="TEM"), _row("c")])
        df = read_catalog(store_root)
        assert list(df.image_id) == ["a", "b", "c"]
        assert df.set_index("image_id").loc["b", "modality"] == "TEM"

    def test_upsert_keeps_the_columns_it_does_not_know(self, store_root):
        """A synthetic archive's catalog carries provenance columns; adding images keeps them."""
        import dataclasses

        import pyarrow as pa

        from engine.stores.catalog import CATALOG_FILE, read_table, write_table

        records = [dataclasses.asdict(_row(i)) | {"model_sha256": f"sha-{i}", "run_seed": 7, "conditioning": [1, 2]}
                   for i in ("a", "b")]  # a list column too: Arrow's join would refuse it
        write_table(store_root.join(CATALOG_FILE), pa.Table.from_pylist(records))
        upsert_catalog(store_root, [_row("b", modality="TEM"), _row("c")])
        table = read_table(store_root.join(CATALOG_FILE)).to_pydict()
        assert table["image_id"] == ["a", "b", "c"] and table["modality"][1] == "TEM"
        assert table["model_sha256"] == ["sha-a", None, None] and table["run_seed"] == [7, None, None]
        assert table["conditioning"] == [[1, 2], None, None]

    def test_missing_catalog_names_the_archive(self, store_root):
        with pytest.raises(MetadataError, match="no catalog.parquet"):
            read_catalog(store_root)

    def test_removing_catalogued_images_touches_nothing_else(self, store_root):
        """How an archive is replaced (`grainflow synth --overwrite`): its images and
        catalog go; the user's own files, and a row pointing at one, do not."""
        from engine.stores.catalog import CATALOG_FILE, remove_catalogued_images

        for name in ("a", "b", "mine"):
            write_image(store_root.join("images", f"{name}.ome.zarr"), _image(shape=(64, 64)), pixel_size=1.0, chunk=64)
        fs = store_root.filesystem()
        fs.pipe_file(store_root.join("notes.txt").path, b"the user's")
        write_catalog(store_root, [_row("a"), _row("b"), _row("notes", uri="notes.txt")])

        removed = remove_catalogued_images(store_root)
        assert sorted(removed) == [store_root.join("images", f"{n}.ome.zarr").uri for n in ("a", "b")]
        fs.invalidate_cache()
        assert not fs.exists(store_root.join(CATALOG_FILE).path)
        assert not fs.exists(store_root.join("images", "a.ome.zarr").path)
        assert open_image(store_root.join("images", "mine.ome.zarr")).shape == (64, 64)
        assert fs.cat_file(store_root.join("notes.txt").path) == b"the user's"

    def test_bad_modality_refused(self, store_root):
        with pytest.raises(ValueError, match="modality 'XRAY'"):
            write_catalog(store_root, [_row("a", modality="XRAY")])
