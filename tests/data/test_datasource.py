"""ZarrTileDatasource: planning from metadata, exact reads through Ray, errors, skips."""

from __future__ import annotations

import math
import pickle
import time

import cloudpickle
import numpy as np
import pytest
import zarr

from engine.data.datasource import ZarrTileDatasource
from engine.data.tile_plan import PlanningError, ReadSpec, choose_level, layout, plan_reads
from engine.data.tile_read import COLUMNS, read_tiles
from engine.errors import MetadataError
from engine.preprocess.resample import OutputGrid, resample
from engine.stores.catalog import CatalogRow, image_uri, write_catalog
from engine.stores.image import MultiscaleImage, open_image
from engine.stores.ngff import multiscales_v05
from engine.stores.uri import resolve
from engine.synth.archive import generate_archive
from engine.tiling import crop_to_core
from engine.tiling.transform import LevelTransform

TARGET_NM = 300.0  # synth pixel sizes here: 238 nm (-> level 0), 145 and 129 nm (-> level 1)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Three 600 x 900 images (uint8 optical, uint16 SEM), 128 px chunks, four levels."""
    out = tmp_path_factory.mktemp("tiles") / "archive"
    catalog = generate_archive(out, n_images=3, seed=1, size=(600, 900), chunk=128)
    return resolve(out), catalog


def _images(archive):
    location, catalog = archive
    return {i: open_image(image_uri(location, i)) for i in catalog["image_id"]}


def _rows(blocks) -> list[dict]:
    """Rows of read_tiles' blocks, read in this process (no Ray)."""
    from ray.data.block import BlockAccessor

    return [row for b in blocks for row in BlockAccessor.for_block(b).to_pandas().to_dict("records")]


def _read_all(ds) -> list[dict]:
    import ray

    return ray.data.read_datasource(ds).take_all()


def sparse_archive(root, shape=(2**20, 2**20), chunk=256, pixel_size_nm=1.0) -> str:
    """An archive with one huge image whose arrays hold metadata only (no chunk written)."""
    location = resolve(root)
    image_dir = image_uri(location, "huge")
    group = zarr.open_group(image_dir.zarr_store(read_only=False), mode="w", zarr_format=3)
    levels, size = 1, max(shape)
    while size > chunk:
        size, levels = (size + 1) // 2, levels + 1
    h, w = shape
    for k in range(levels):
        group.create_array(str(k), shape=(h, w), chunks=(chunk, chunk), dtype="uint16", fill_value=0,
                           dimension_names=["y", "x"])
        h, w = (h + 1) // 2, (w + 1) // 2
    ms = multiscales_v05(name="huge", unit="nanometer", pixel_size=(pixel_size_nm,) * 2, n_levels=levels,
                         centre_shift=True)
    group.attrs.update({"ome": {"version": "0.5", "multiscales": [ms]}})
    write_catalog(location, [CatalogRow(
        image_id="huge", uri="images/huge.ome.zarr", modality="SEM", pixel_size_y=pixel_size_nm,
        pixel_size_x=pixel_size_nm, unit="nanometer", height=shape[0], width=shape[1], dtype="uint16",
        levels=levels, chunk=chunk, checksum="",
    )])
    return location.uri


class TestPlanning:
    def test_level_nearest_the_target(self, archive):
        ds = ZarrTileDatasource(archive[0].uri, target_pixel_size_nm=TARGET_NM)
        levels = {im.image_id: (im.grid.level, im.output) for im in ds.images()}
        for image_id, image in _images(archive).items():
            assert levels[image_id] == (image.nearest_level(TARGET_NM), None)
        assert {lv for lv, _ in levels.values()} == {0, 1}

    def test_resample_where_no_level_is_close(self, archive):
        image = next(iter(_images(archive).values()))
        size0 = image.pixel_size_nm
        assert choose_level(image, size0 * 1.2, 1.5) == (0, False)
        assert choose_level(image, size0 * 1.6, 1.5) == (1, False)  # level 1 is 1.25x off: close enough
        assert choose_level(image, size0 * 1.6, 1.1) == (0, True)  # a tighter tolerance resamples level 0
        assert choose_level(image, size0 * 3.0, 1.2) == (1, True)  # coarsest level finer than the target
        assert choose_level(image, size0 / 2.0, 1.5) == (0, True)  # finer than level 0: upsample
        assert choose_level(image, size0 * 100, 1.5) == (3, True)
        with pytest.raises(ValueError, match="positive"):
            choose_level(image, 0.0, 1.5)

    def test_a_target_far_past_the_coarsest_level_is_refused(self, archive):
        """Resampling from a pyramid that ends far finer than the target would make read
        tasks hold gigantic tiles: refused at planning time, naming the image."""
        image_id, image = next(iter(_images(archive).items()))
        with pytest.raises(PlanningError, match=rf"{image_id}: a tile at .* would read"):
            ZarrTileDatasource(archive[0].uri, target_pixel_size_nm=image.pixel_size_nm * 5000, tile_size=512).images()

    def test_a_target_far_finer_than_level_0_is_refused(self, archive):
        """Upsampling the other way: pixels 5000x coarser than the target (a pixel size
        recorded in the wrong unit, say) would make each delivered tile gigantic."""
        image_id, image = next(iter(_images(archive).items()))
        with pytest.raises(PlanningError, match=rf"{image_id}: a tile resampled to .* px wide: .* 5000x coarser"):
            ZarrTileDatasource(archive[0].uri, target_pixel_size_nm=image.pixel_size_nm / 5000, tile_size=512).images()

    def test_images_that_cannot_be_opened_are_recorded_when_asked(self, archive, tmp_path):
        """on_image_error="record" (the job's): an image without its metadata is left out
        and named with its reason; the default stops planning."""
        import shutil

        location, catalog = archive
        copy = tmp_path / "archive"
        shutil.copytree(location.path, copy)
        broken = sorted(catalog["image_id"])[1]
        (copy / "images" / f"{broken}.ome.zarr" / "zarr.json").unlink()
        with pytest.raises(MetadataError, match="zarr.json"):
            ZarrTileDatasource(str(copy), target_pixel_size_nm=20.0).images()
        source = ZarrTileDatasource(str(copy), target_pixel_size_nm=20.0, on_image_error="record")
        failed = source.failed()
        assert list(failed) == [broken] and isinstance(failed[broken], MetadataError)
        assert {p.image_id for p in source.images()} == set(catalog["image_id"]) - {broken}
        assert source.read_specs() and all(spec.tiles.image_id != broken for spec in source.read_specs())

    def test_catalog_rows_that_cannot_be_planned_are_that_images_errors(self, archive, tmp_path):
        """A catalog row with impossible values is recorded for its image, naming the
        column and value, and the other images are planned; a catalog whose dtype is not
        the stored one is refused (the job would cast the pixels and wrap them)."""
        import shutil

        import pyarrow.parquet as pq

        location, catalog = archive
        copy = tmp_path / "archive"
        shutil.copytree(location.path, copy)
        table = pq.read_table(copy / "catalog.parquet").to_pandas()
        ids = sorted(table["image_id"])
        table.loc[table["image_id"] == ids[0], "pixel_size_x"] = 0.0
        table.loc[table["image_id"] == ids[1], "modality"] = "XRAY"
        table.loc[table["image_id"] == ids[1], "unit"] = "furlong"
        table.loc[table["image_id"] == ids[2], "dtype"] = "float32" if table["dtype"].iloc[2] != "float32" else "uint8"
        table.to_parquet(copy / "catalog.parquet")
        with pytest.raises(MetadataError, match=rf"row '{ids[0]}': pixel_size_x 0.0 must be a positive number"):
            ZarrTileDatasource(str(copy), target_pixel_size_nm=20.0).images()
        source = ZarrTileDatasource(str(copy), target_pixel_size_nm=20.0, on_image_error="record")
        assert source.images() == [] and sorted(source.failed()) == ids
        failed = {i: str(e) for i, e in source.failed().items()}
        assert "modality 'XRAY' is not one of SEM, TEM, optical" in failed[ids[1]]
        assert "unit 'furlong'" in failed[ids[1]]
        assert f"stored as {catalog['dtype'].iloc[2]} but the catalog says" in failed[ids[2]]

        table.loc[table["image_id"] == ids[0], "pixel_size_x"] = 1.0
        table.loc[:, "modality"] = "SEM"
        table.loc[table["image_id"] == ids[1], "unit"] = "nanometer"
        table.loc[table["image_id"] == ids[1], "uri"] = "../../elsewhere.ome.zarr"
        table.to_parquet(copy / "catalog.parquet")
        source = ZarrTileDatasource(str(copy), target_pixel_size_nm=20.0, on_image_error="record")
        assert [p.image_id for p in source.images()] == [ids[0]]
        assert "must be a path inside the archive" in str(source.failed()[ids[1]])

    def test_a_catalog_with_duplicate_or_missing_ids_is_refused(self, archive, tmp_path):
        """Every output is keyed by image id: such a catalog is no job's input."""
        import shutil

        import pyarrow.parquet as pq

        location, _ = archive
        copy = tmp_path / "archive"
        shutil.copytree(location.path, copy)
        table = pq.read_table(copy / "catalog.parquet").to_pandas()
        table.loc[1, "image_id"] = table.loc[0, "image_id"]
        table.to_parquet(copy / "catalog.parquet")
        with pytest.raises(MetadataError, match=rf"catalog.parquet: duplicate image ids \['{table.loc[0, 'image_id']}'\]"):
            ZarrTileDatasource(str(copy), target_pixel_size_nm=20.0, on_image_error="record").images()
        table.loc[1, "image_id"] = None
        table.to_parquet(copy / "catalog.parquet")
        with pytest.raises(MetadataError, match=r"catalog.parquet: rows \[1\] have no image_id"):
            ZarrTileDatasource(str(copy), target_pixel_size_nm=20.0, on_image_error="record").images()

    def test_planning_reads_no_pixels(self, archive, monkeypatch):
        keys = []
        real_get = zarr.storage.LocalStore.get

        async def spy_get(self, key, *args, **kwargs):
            keys.append(key)
            return await real_get(self, key, *args, **kwargs)

        def no_reads(self, *args, **kwargs):
            raise AssertionError("pixels read on the driver")

        monkeypatch.setattr(zarr.storage.LocalStore, "get", spy_get)
        monkeypatch.setattr(MultiscaleImage, "read_regions", no_reads)
        monkeypatch.setattr(MultiscaleImage, "_reader", no_reads)
        ds = ZarrTileDatasource(archive[0].uri, target_pixel_size_nm=TARGET_NM, halo=8)
        tasks = ds.get_read_tasks(8)
        assert tasks and ds.estimate_inmemory_data_size() > 0
        metadata = {"zarr.json", ".zattrs", ".zgroup", ".zarray", ".zmetadata"}  # zarr probes v2 names too
        assert keys and all(k.rsplit("/", 1)[-1] in metadata for k in keys), sorted(set(keys))
        assert any(k.endswith("0/zarr.json") for k in keys)

    @pytest.mark.parametrize("tiles_per_task", [1, 3, 4, 10, 1000])
    def test_task_count_follows_target_bytes(self, archive, tiles_per_task):
        ds = ZarrTileDatasource(archive[0].uri, target_pixel_size_nm=TARGET_NM, halo=8)
        probe = ds.images()
        tile_bytes = max(im.tile_bytes for im in probe)
        assert len({im.tile_bytes for im in probe}) == 1
        ds = ZarrTileDatasource(archive[0].uri, target_pixel_size_nm=TARGET_NM, halo=8,
                                target_bytes=tiles_per_task * tile_bytes)
        specs = ds.read_specs()
        per_image = {im.image_id: im for im in ds.images()}
        expected = sum(math.ceil(im.n_tiles / tiles_per_task) for im in per_image.values())
        # whole rows per task while a row fits, else balanced pieces of a row: within 2x
        assert expected / 2 <= len(specs) <= 2 * expected
        for im in per_image.values():  # the rectangles partition each grid
            seen = np.zeros((im.n_rows, im.n_cols), int)
            for s in specs:
                if s.tiles.image_id == im.image_id:
                    r0, r1, c0, c1 = s.rect
                    seen[r0:r1, c0:c1] += 1
                    assert s.n_tiles <= 2 * tiles_per_task
            assert (seen == 1).all()
        assert sum(t.metadata.num_rows for t in ds.get_read_tasks(1)) == sum(im.n_tiles for im in per_image.values())

    def test_layout_is_balanced(self):
        assert layout(10, 4, 8) == (2, 4)
        assert layout(3, 10, 8) == (1, 5)
        assert layout(32768, 65536, 107375) == (2, 65536)

    def test_planning_cost_grows_with_tasks_not_tiles(self, tmp_path):
        uri = sparse_archive(tmp_path / "sparse", shape=(2**20, 2**21), chunk=256)  # 32 M tiles, 64 TiB
        start = time.perf_counter()
        ds = ZarrTileDatasource(uri, target_pixel_size_nm=1.0, max_tasks=2000)
        tasks = ds.get_read_tasks(200)
        elapsed = time.perf_counter() - start
        assert ds.images()[0].n_tiles == 2**25
        assert 1000 <= len(tasks) <= 4000
        assert sum(t.metadata.num_rows for t in tasks) == 2**25
        assert elapsed < 5.0
        assert len(pickle.dumps(tasks[0].read_fn.__defaults__[0])) < 4096  # a rectangle, not a tile list

    def test_skip_keys_leave_tasks(self, archive):
        ds = ZarrTileDatasource(archive[0].uri, target_pixel_size_nm=TARGET_NM, tile_size=256)
        im = ds.images()[0]
        every = [t.key for t in im.grid]
        specs = plan_reads([im], target_bytes=2 * im.tile_bytes, max_tasks=100)
        first = specs[0]
        r0, r1, c0, c1 = first.rect
        done = [im.grid.tile_at(r, c).key for r in range(r0, r1) for c in range(c0, c1)]  # all of task 0
        done.append(every[-1])  # and one more elsewhere
        done.append(("not-an-image", 0, 0, 0))
        again = plan_reads([im], target_bytes=2 * im.tile_bytes, max_tasks=100, skip=done)
        assert len(again) == len(specs) - 1
        assert sum(s.n_tiles for s in again) == im.n_tiles - len(done) + 1

    @pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")  # Ray's own DataContext defaults
    def test_specs_and_tasks_pickle(self, archive):
        ds = ZarrTileDatasource(archive[0].uri, target_pixel_size_nm=TARGET_NM, halo=4,
                                skip=[("synth-00000", 0, 0, 0)])
        specs = ds.read_specs()
        assert pickle.loads(pickle.dumps(specs)) == specs
        task = ds.get_read_tasks(4)[0]
        clone = cloudpickle.loads(cloudpickle.dumps(task))
        block = next(iter(clone()))  # runs here, in the test process: fine for a pickling test
        assert block.column_names == list(COLUMNS)
        again = pickle.loads(pickle.dumps(ds))
        assert again.read_specs() == specs


class TestReadThroughRay:
    @pytest.mark.parametrize("halo", [0, 24])
    def test_cores_reassemble_each_level_exactly(self, archive, ray_session, halo, monkeypatch):
        def no_reads(self, *args, **kwargs):
            raise AssertionError("pixels read on the driver")

        # Read tasks run in Ray workers; this patch only covers the driver process.
        monkeypatch.setattr(MultiscaleImage, "read_regions", no_reads)
        ds = ZarrTileDatasource(archive[0].uri, target_pixel_size_nm=TARGET_NM, tile_size=256, halo=halo,
                                target_bytes=400_000)
        rows = _read_all(ds)
        monkeypatch.undo()
        images = _images(archive)
        plans = {im.image_id: im for im in ds.images()}
        assert len(rows) == sum(im.n_tiles for im in plans.values())
        for image_id, image in images.items():
            level = plans[image_id].grid.level
            expected = image.read_level(level)
            canvas = np.zeros(expected.shape, np.int64)
            count = np.zeros(expected.shape, np.int32)
            for row in (r for r in rows if r["image_id"] == image_id):
                assert row["error"] is None and row["level"] == level and row["modality"] == image.attributes["modality"]
                assert row["tile"].dtype == np.uint16  # uint8 and uint16 images share one tile type
                f = 2**level
                assert tuple(row["scale"]) == (f, f)
                assert row["pixel_size"] == pytest.approx(image.levels[level].pixel_size[1])
                top, bottom, left, right = row["halo"]
                ly, lx = row["y"] // f, row["x"] // f
                assert tuple(row["origin"]) == ((ly - top) * f, (lx - left) * f)
                h, w = row["tile"].shape
                # the whole tile, halo included, is the level's pixels around the core
                np.testing.assert_array_equal(row["tile"], expected[ly - top : ly - top + h, lx - left : lx - left + w])
                core = crop_to_core(row["tile"], row["halo"])
                canvas[ly : ly + core.shape[0], lx : lx + core.shape[1]] = core
                count[ly : ly + core.shape[0], lx : lx + core.shape[1]] += 1
                assert max(top, bottom, left, right) <= halo
            assert (count == 1).all()
            np.testing.assert_array_equal(canvas, expected)

    def test_resampled_tiles_partition_the_output_grid(self, archive, ray_session):
        location, catalog = archive
        image_id = catalog["image_id"][1]
        image = open_image(image_uri(location, image_id))
        target = image.pixel_size_nm * 1.7  # between levels 0 and 1, beyond the tolerance
        ds = ZarrTileDatasource(location.uri, target_pixel_size_nm=target, tolerance=1.1, tile_size=100, halo=6,
                                image_ids=[image_id])
        plan = ds.images()[0]
        assert plan.output is not None and plan.grid.level == 0
        rows = _read_all(ds)
        grid = OutputGrid.for_image(image.shape, (image.pixel_size_nm,) * 2, target, 6)
        whole = resample(image.read_level(0), (0, 0), LevelTransform(), grid.step, (0, 0), grid.extent)
        canvas = np.full(grid.extent, -1.0)
        for row in rows:
            assert row["error"] is None and row["pixel_size"] == pytest.approx(target)
            np.testing.assert_allclose(row["scale"], grid.step)
            top, bottom, left, right = row["halo"]
            j, i = (int(round(v)) for v in np.asarray(row["origin"]) / grid.step)
            h, w = row["tile"].shape
            tile = row["tile"].astype(float)
            # away from the image's edges a tile's pixels match resampling the whole level
            np.testing.assert_allclose(tile, whole[j : j + h, i : i + w], atol=1.0)
            core = crop_to_core(tile, (top, bottom, left, right))
            region = canvas[j + top : j + top + core.shape[0], i + left : i + left + core.shape[1]]
            assert (region == -1).all()  # no output pixel owned twice
            region[...] = core
        assert (canvas >= 0).all()  # and none missed

    @pytest.mark.parametrize("halo", [0, 8])
    def test_corrupt_chunk_gives_one_error_row(self, tmp_path, ray_session, halo):
        out = tmp_path / "bad"
        catalog = generate_archive(out, n_images=1, seed=3, size=256, chunk=64)
        image_id = catalog["image_id"][0]
        image = open_image(image_uri(resolve(out), image_id))
        reference = image.read_level(0)
        chunk = out / "images" / f"{image_id}.ome.zarr" / "0" / "c" / "1" / "2"
        chunk.write_bytes(b"\x00not zstd at all" * 5)
        ds = ZarrTileDatasource(out, target_pixel_size_nm=image.pixel_size_nm, halo=halo, target_bytes=10**9)
        rows = _read_all(ds)
        assert len(rows) == 16  # 4 x 4 tiles of one chunk each, all in one task and one block
        bad = [r for r in rows if r["error"] is not None]
        assert len(bad) == 1  # the chunk's owner; neighbours that see it in their halo complete
        row = bad[0]
        assert (row["y"], row["x"]) == (64, 128) and row["tile"].size == 0
        assert row["error"].startswith("CorruptChunkError") and "0/c/1/2" in row["error"]
        for r in rows:
            if r["error"] is None:
                top, bottom, left, right = r["halo"]
                y, x = r["y"] - top, r["x"] - left
                h, w = r["tile"].shape
                assert (h, w) == (64 + top + bottom, 64 + left + right)
                np.testing.assert_array_equal(r["tile"], reference[y : y + h, x : x + w])
                assert not (y < 128 and y + h > 64 and x < 192 and x + w > 128)  # the bad chunk is left out
        if halo:
            below = next(r for r in rows if (r["y"], r["x"]) == (128, 128))
            assert tuple(below["halo"]) == (0, 8, 8, 8)  # only the side facing the bad chunk is dropped

    def test_resampled_tile_beside_a_bad_chunk_has_no_halo_there(self, tmp_path):
        """Resampled, a side whose source halo held the bad chunk gets no output halo
        either (it would only repeat the core's edge), and the row says so."""
        out = tmp_path / "bad"
        catalog = generate_archive(out, n_images=1, seed=3, size=256, chunk=64)
        image_id = catalog["image_id"][0]
        pixel = float(catalog["pixel_size_x"][0])
        (out / "images" / f"{image_id}.ome.zarr" / "0" / "c" / "1" / "2").write_bytes(b"\x00not zstd" * 5)
        ds = ZarrTileDatasource(out, target_pixel_size_nm=pixel * 1.3, tolerance=1.01, tile_size=64, halo=8)
        assert ds.images()[0].output is not None
        rows = [r for s in ds.read_specs() for r in _rows(read_tiles(s))]
        below = next(r for r in rows if (r["y"], r["x"]) == (128, 128))
        top, bottom, left, right = below["halo"]
        assert top == 0 and left == 8  # the bad chunk is above; the left neighbour reads fine

    def test_resampled_tiles_do_not_depend_on_the_other_images_dtypes(self, tmp_path):
        """A uint16 image resampled beside a float32 one (the dataset's tiles are float32)
        gives the pixels it gives alone, rounded to its own dtype."""
        from engine.stores.catalog import relative_image_path
        from engine.stores.writer import write_image

        rng = np.random.default_rng(1)
        images = {"a": rng.integers(0, 60000, (128, 128)).astype(np.uint16),
                  "b": rng.random((128, 128)).astype(np.float32)}

        def archive(path, ids):
            root = resolve(str(path))
            rows = []
            for i in ids:
                info = write_image(image_uri(root, i), images[i], pixel_size=(10.0, 10.0), unit="nanometer", chunk=64)
                rows.append(CatalogRow(image_id=i, uri=relative_image_path(i), modality="SEM", pixel_size_y=10.0,
                                       pixel_size_x=10.0, unit=info.unit, height=128, width=128, dtype=info.dtype,
                                       levels=info.levels, chunk=info.chunk, checksum=info.checksum))
            write_catalog(root, rows)
            return root

        def tiles_of_a(root):
            ds = ZarrTileDatasource(root.uri, target_pixel_size_nm=13.0, tolerance=1.01, halo=8)
            return [r["tile"] for s in ds.read_specs() for r in _rows(read_tiles(s)) if r["image_id"] == "a"]

        mixed, alone = tiles_of_a(archive(tmp_path / "mixed", "ab")), tiles_of_a(archive(tmp_path / "alone", "a"))
        assert mixed[0].dtype == np.float32 and alone[0].dtype == np.uint16
        for m, a in zip(mixed, alone, strict=True):
            np.testing.assert_array_equal(m, a.astype(np.float32))

    def test_skip_set_honoured(self, archive, ray_session):
        ds = ZarrTileDatasource(archive[0].uri, target_pixel_size_nm=TARGET_NM, tile_size=256)
        every = {t.key for im in ds.images() for t in im.grid}
        done = set(sorted(every)[::3])
        ds = ZarrTileDatasource(archive[0].uri, target_pixel_size_nm=TARGET_NM, tile_size=256, skip=done)
        rows = _read_all(ds)
        got = {(r["image_id"], int(r["level"]), int(r["y"]), int(r["x"])) for r in rows}
        assert got == every - done and len(rows) == len(got)


def test_read_tiles_in_process_matches_spec(archive):
    """A ReadSpec read without Ray: blocks never exceed block_tiles rows."""
    ds = ZarrTileDatasource(archive[0].uri, target_pixel_size_nm=TARGET_NM, halo=4)
    spec = max(ds.read_specs(), key=lambda s: s.n_tiles)
    small = ReadSpec(spec.tiles, spec.rect, spec.skip, block_tiles=2)
    blocks = list(read_tiles(small))
    assert all(b.num_rows <= 2 for b in blocks)
    assert sum(b.num_rows for b in blocks) == small.n_tiles


class TestS3:
    def test_plan_and_read_tasks_on_s3(self, s3_bucket):
        """The same planning and read function against moto's S3 (in this process, no Ray)."""
        uri = f"{s3_bucket}/archive"
        catalog = generate_archive(uri, n_images=1, seed=7, size=256, chunk=128)
        image = open_image(image_uri(resolve(uri), catalog["image_id"][0]))
        ds = ZarrTileDatasource(uri, target_pixel_size_nm=image.pixel_size_nm, halo=16)
        specs = ds.read_specs()
        specs = pickle.loads(pickle.dumps(specs))  # as a worker gets them
        rows = [row for spec in specs for block in read_tiles(spec) for row in block.to_pylist()]
        assert len(rows) == 4 and all(r["error"] is None for r in rows)
        expected = image.read_level(0)
        for r in rows:
            top, bottom, left, right = r["halo"]
            tile = np.asarray(r["tile"])
            y, x = r["y"] - top, r["x"] - left
            np.testing.assert_array_equal(tile, expected[y : y + tile.shape[0], x : x + tile.shape[1]])


@pytest.mark.parametrize("target_nm, tolerance", [(10.0, math.inf), (5.0, 1.1), (10.0, 1.5)])
def test_rows_carry_both_pixel_sizes_of_non_square_pixels(tmp_path, target_nm, tolerance):
    """Pixels 20 nm tall and 10 nm wide reach the models square: native (tolerance inf),
    at the finer 10 nm; with a target, at the target on both axes, even where level 0
    is the target along x. `scale` says how many level-0 pixels each is, per axis."""
    from ray.data.block import BlockAccessor

    from engine.stores.writer import write_image

    location = resolve(tmp_path / "a")
    pixels = np.arange(64 * 96, dtype=np.uint16).reshape(64, 96)
    write_image(image_uri(location, "tall"), pixels, pixel_size=(20.0, 10.0), chunk=32)
    write_catalog(location, [CatalogRow(image_id="tall", uri="images/tall.ome.zarr", modality="SEM", pixel_size_y=20.0,
                                        pixel_size_x=10.0, unit="nanometer", height=64, width=96, dtype="uint16",
                                        levels=1, chunk=32, checksum="")])
    ds = ZarrTileDatasource(location.uri, target_pixel_size_nm=target_nm, tolerance=tolerance)
    rows = [r for s in ds.read_specs() for b in read_tiles(s)
            for r in BlockAccessor.for_block(b).iter_rows(public_row_format=False)]
    assert rows and all(r["error"] is None for r in rows)
    for r in rows:
        expected = (10.0, 10.0) if math.isinf(tolerance) else (target_nm, target_nm)
        assert (r["pixel_size_y"], r["pixel_size"]) == pytest.approx(expected)
        np.testing.assert_allclose(np.asarray(r["scale"]) * [20.0, 10.0], expected)
