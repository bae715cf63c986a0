"""What an archive may make the reprocessing job touch: only its own images, under
names a file system takes.

- An image folder that is a symbolic link leading out of the archive (another lab's or
  tenant's image) is not planned: the job neither reads it nor writes label images
  into it; it is that image's error, the other images go on. Links inside the archive
  are fine.
- An image id too long, percent-encoded, for the job's output file names is refused
  before any work (the job could not even write its error row).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.data.datasource import ZarrTileDatasource
from engine.errors import GrainflowError, MetadataError
from engine.stores.catalog import MAX_ENCODED_ID_BYTES

TARGET_NM = 300.0
LONG_ID = "铁素体钢样品截面扫描电镜图像第一批次编号" * 2  # 40 CJK characters: 360 bytes percent-encoded


def files_below(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` (not following links): relative path -> (size, mtime in ns)."""
    found = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            stat = os.lstat(os.path.join(dirpath, name))
            found[os.path.relpath(os.path.join(dirpath, name), folder)] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def source_archive(tmp_path_factory):
    """Two 256 x 256 images of 2 x 2 chunks; tests copy it."""
    from engine.synth.archive import generate_archive

    out = tmp_path_factory.mktemp("confinement") / "a"
    catalog = generate_archive(out, n_images=2, seed=11, size=256, chunk=128)
    return out, sorted(catalog["image_id"])


def linked_out(source_archive, tmp_path) -> tuple[Path, str, Path]:
    """A copy of the archive whose first image's folder was moved to another tenant's
    folder and linked back: (archive, the linked image's id, the image it links to)."""
    archive = tmp_path / "lab-a" / "archive"
    shutil.copytree(source_archive[0], archive)
    image_id = source_archive[1][0]
    folder = archive / "images" / f"{image_id}.ome.zarr"
    elsewhere = tmp_path / "lab-b" / f"{image_id}.ome.zarr"
    elsewhere.parent.mkdir()
    shutil.move(folder, elsewhere)
    os.symlink(elsewhere, folder)
    return archive, image_id, elsewhere


def with_id(archive: Path, old: str, new: str) -> None:
    """Rename one image in the archive's catalog (its folder, found by uri, stays)."""
    table = pq.read_table(archive / "catalog.parquet")
    ids = [new if i == old else i for i in table.column("image_id").to_pylist()]
    pq.write_table(table.set_column(table.schema.get_field_index("image_id"), "image_id", pa.array(ids)),
                   archive / "catalog.parquet")


class TestPlanning:
    """The datasource plans from metadata only: no Ray needed."""

    def test_image_linked_out_of_the_archive_is_its_error(self, source_archive, tmp_path):
        archive, image_id, elsewhere = linked_out(source_archive, tmp_path)
        source = ZarrTileDatasource(str(archive), target_pixel_size_nm=TARGET_NM, on_image_error="record")
        assert [im.image_id for im in source.images()] == [source_archive[1][1]]
        error = source.failed()[image_id]
        assert isinstance(error, MetadataError)
        assert f"image {image_id!r}: " in str(error) and f"symbolic link to {elsewhere}, outside the archive" in str(error)
        with pytest.raises(MetadataError, match="symbolic link"):
            ZarrTileDatasource(str(archive), target_pixel_size_nm=TARGET_NM).images()

    def test_labels_folder_linked_out_of_the_archive_is_its_error(self, source_archive, tmp_path):
        """The job writes label images into the image's labels/ group: a link there is a
        way out as much as a linked image folder."""
        archive = tmp_path / "archive"
        shutil.copytree(source_archive[0], archive)
        image_id = source_archive[1][1]
        labels = archive / "images" / f"{image_id}.ome.zarr" / "labels"  # the synthetic truth's
        shutil.move(labels, tmp_path / "other-labels")
        os.symlink(tmp_path / "other-labels", labels)
        source = ZarrTileDatasource(str(archive), target_pixel_size_nm=TARGET_NM, on_image_error="record")
        assert [im.image_id for im in source.images()] == [source_archive[1][0]]
        assert f"symbolic link to {tmp_path / 'other-labels'}" in str(source.failed()[image_id])

    def test_links_inside_the_archive_are_planned(self, source_archive, tmp_path):
        archive = tmp_path / "archive"
        shutil.copytree(source_archive[0], archive)
        image_id = source_archive[1][0]
        folder = archive / "images" / f"{image_id}.ome.zarr"
        (archive / "store").mkdir()
        shutil.move(folder, archive / "store" / folder.name)
        os.symlink(Path("..") / "store" / folder.name, folder)  # relative, inside the archive
        os.symlink(archive, tmp_path / "archive-link")  # and the archive itself through a link
        source = ZarrTileDatasource(str(tmp_path / "archive-link"), target_pixel_size_nm=TARGET_NM,
                                    on_image_error="record")
        assert sorted(im.image_id for im in source.images()) == source_archive[1] and not source.failed()

    def test_id_too_long_for_a_file_name_stops_planning_either_way(self, source_archive, tmp_path):
        archive = tmp_path / "archive"
        shutil.copytree(source_archive[0], archive)
        with_id(archive, source_archive[1][0], LONG_ID)
        for mode in ("record", "raise"):
            with pytest.raises(MetadataError) as info:
                ZarrTileDatasource(str(archive), target_pixel_size_nm=TARGET_NM, on_image_error=mode).images()
            message = str(info.value)
            assert f"image id {LONG_ID!r} is 360 bytes percent-encoded" in message
            assert f"more than the {MAX_ENCODED_ID_BYTES}" in message and "shorter ids" in message
        # asked for the other image only, the long id is not in the way
        source = ZarrTileDatasource(str(archive), target_pixel_size_nm=TARGET_NM, image_ids=[source_archive[1][1]])
        assert [im.image_id for im in source.images()] == [source_archive[1][1]]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """The tiny untrained ensemble as tiny@production in a SQLite registry; offline."""
    from engine.pipeline.bundle import register_ensemble
    from engine.pipeline.demo_models import untrained_tiny_models
    from engine.registry import ModelRegistry
    from engine.runtime import configure_offline

    configure_offline()
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics")))
    root = tmp_path_factory.mktemp("confinement-registry")
    registry = ModelRegistry(tracking_uri=f"sqlite:///{root}/m.db")
    register_ensemble(registry, untrained_tiny_models(0), "tiny", workdir=root / "w")
    return registry


def reprocess(archive, out, registry):
    from engine.pipeline import EnsembleConfig
    from engine.pipeline.job import reprocess

    return reprocess(str(archive), str(out), "tiny@production", registry=registry,
                     config=EnsembleConfig(conf=0.001, max_det=8), halo=16, batch_size=1, concurrency=1)


class TestJob:
    def test_linked_image_is_neither_read_nor_written(self, ray_session, registry, source_archive, tmp_path):
        """labels="auto" writes beside each image: into the other tenant's image, when
        the job followed the link."""
        from engine.data.sinks import ERRORS, SUMMARY_FILE, read_output

        archive, image_id, elsewhere = linked_out(source_archive, tmp_path)
        before = files_below(elsewhere)
        out = tmp_path / "lab-a" / "out"
        result = reprocess(archive, out, registry)

        assert files_below(elsewhere) == before  # nothing written there, nothing replaced
        assert (result.images, result.images_failed, result.tiles_done, result.errors) == (1, 1, 4, 0)
        summary = pd.read_parquet(out / SUMMARY_FILE).set_index("image_id")
        other = source_archive[1][1]
        assert bool(summary.loc[other, "complete"]) and summary.loc[other, "labels_uri"].startswith(str(archive))
        assert not summary.loc[image_id, "complete"] and summary.loc[image_id, "tiles_planned"] == 0
        errors = read_output(out, ERRORS).to_pandas()
        row = errors.loc[errors["image_id"] == image_id].iloc[0]
        assert row["exception"] == "MetadataError" and pd.isna(row["level"])
        assert f"symbolic link to {elsewhere}, outside the archive" in row["message"]

    def test_id_too_long_is_refused_before_any_output(self, ray_session, registry, source_archive, tmp_path):
        """It failed the whole job with "File name too long" after every tile was
        computed, and again on each rerun."""
        archive = tmp_path / "archive"
        shutil.copytree(source_archive[0], archive)
        with_id(archive, source_archive[1][0], LONG_ID)
        out = tmp_path / "out"
        with pytest.raises(GrainflowError) as info:
            reprocess(archive, out, registry)
        assert not isinstance(info.value, OSError)
        assert f"image id {LONG_ID!r} is 360 bytes" in str(info.value) and "no image was processed" in str(info.value)
        assert not out.exists() or not any(out.iterdir())
