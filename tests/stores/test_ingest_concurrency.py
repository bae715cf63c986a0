"""Several writers on one local archive: concurrent ingests, and what a killed one leaves.

The writers are real: processes started with multiprocessing's spawn (as a second
`grainflow ingest` would be), threads, and a subprocess killed with SIGKILL.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tifffile

from engine.stores.catalog import image_uri, read_catalog
from engine.stores.image import open_image
from engine.stores.ingest import ingest_files
from engine.stores.locks import FileLock, lock_for
from engine.stores.staging import REPLACED, sibling_name
from engine.stores.uri import resolve
from engine.stores.writer import ImageWriter

CHUNK = 32
REPO = Path(__file__).resolve().parents[2]


def _tiff(path: Path, seed: int, shape=(256, 256)) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 65535, shape, dtype=np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, pixels)
    return pixels


def _ingest_rounds(files: list[str], archives: list[str], barrier) -> None:
    """One writer: each round, wait until the other writer is ready too, then ingest."""
    for path, archive in zip(files, archives):
        barrier.wait(timeout=120)
        ingest_files([path], archive, pixel_size=2.0, modality="SEM", chunk=CHUNK)


def _ingest_once(path: str, archive: str, pixel_size: float, barrier) -> None:
    barrier.wait(timeout=120)
    ingest_files([path], archive, pixel_size=pixel_size, modality="SEM", chunk=16)


def _kill_while_writing(paths: list[Path], archive: Path, image_id: str) -> None:
    """Ingest `paths` in a subprocess (pixel size 2.5 nm, 16-px chunks) and SIGKILL it
    once it is writing image `image_id`."""
    images = archive / "images"
    code = ("import sys; from engine.stores.ingest import ingest_files; "
            "ingest_files(sys.argv[2:], sys.argv[1], pixel_size=2.5, modality='SEM', chunk=16)")
    writer = subprocess.Popen([sys.executable, "-c", code, str(archive), *map(str, paths)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not (images.is_dir() and any(p.name.startswith(f".{image_id}.ome.zarr.partial-") for p in images.iterdir())):
            assert writer.poll() is None and time.monotonic() < deadline, "the ingest ended before it was killed"
            time.sleep(0.02)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()


def _two_writers_rounds(tmp_path: Path, rounds: int):
    """Per round, an archive and two files of one name from two session folders (both
    would be image 'img'); returns the archives, each writer's files and all pixels."""
    archives = [str(tmp_path / f"archive{r}") for r in range(rounds)]
    files: dict[str, list[str]] = {"a": [], "b": []}
    pixels: dict[str, np.ndarray] = {}
    for r in range(rounds):
        for k, writer in enumerate(files):
            path = tmp_path / f"round{r}" / writer / "img.tif"
            pixels[str(path)] = _tiff(path, seed=10 * r + k)
            files[writer].append(str(path))
    return archives, files, pixels


def _assert_both_kept(archive: str, pixels: dict[str, np.ndarray]) -> None:
    df = read_catalog(archive)
    assert sorted(df.image_id) == ["img", "img-2"], df.image_id.tolist()
    assert set(df.source) <= set(pixels) and df.source.nunique() == 2
    for image_id, source in zip(df.image_id, df.source):
        stored = open_image(image_uri(resolve(archive), image_id)).read_level(0)
        np.testing.assert_array_equal(stored, pixels[source], err_msg=f"{archive}: {image_id}")
    assert sorted(p.name for p in (Path(archive) / "images").iterdir()) == ["img-2.ome.zarr", "img.ome.zarr"]


class TestConcurrentIngest:
    def test_two_processes_into_one_archive(self, tmp_path):
        rounds = 3
        archives, files, pixels = _two_writers_rounds(tmp_path, rounds)
        spawn = multiprocessing.get_context("spawn")
        barrier = spawn.Barrier(2)
        writers = [spawn.Process(target=_ingest_rounds, args=(mine, archives, barrier)) for mine in files.values()]
        for w in writers:
            w.start()
        for w in writers:
            w.join(timeout=240)
        assert [w.exitcode for w in writers] == [0, 0]
        for archive in archives:
            _assert_both_kept(archive, pixels)

    def test_two_threads_into_one_archive(self, tmp_path):
        archives, files, pixels = _two_writers_rounds(tmp_path, rounds=3)
        barrier, failed = threading.Barrier(2), []

        def writer(mine):
            try:
                _ingest_rounds(mine, archives, barrier)
            except BaseException as exc:  # reported below: a thread's error is otherwise only printed
                failed.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=writer, args=(mine,)) for mine in files.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        assert not failed, failed
        for archive in archives:
            _assert_both_kept(archive, pixels)

    def test_two_processes_ingesting_one_file_give_one_image(self, tmp_path):
        """A scheduled ingest overlapping a manual one of the same file, with another
        pixel size: the second waits for the first and replaces its image, and the one
        catalog row describes the image that stays."""
        scan = tmp_path / "scan.tif"
        pixels = _tiff(scan, seed=5, shape=(256, 256))
        archive = tmp_path / "archive"
        spawn = multiprocessing.get_context("spawn")
        barrier = spawn.Barrier(2)
        writers = [spawn.Process(target=_ingest_once, args=(str(scan), str(archive), size, barrier))
                   for size in (2.0, 3.0)]
        for w in writers:
            w.start()
        for w in writers:
            w.join(timeout=240)
        assert [w.exitcode for w in writers] == [0, 0]
        [row] = read_catalog(archive).itertuples()
        assert (row.image_id, row.source) == ("scan", str(scan))
        assert sorted(p.name for p in (archive / "images").iterdir()) == ["scan.ome.zarr"]
        image = open_image(archive / "images" / "scan.ome.zarr")
        assert image.pixel_size == (row.pixel_size_y, row.pixel_size_x) and row.pixel_size_x in (2.0, 3.0)
        np.testing.assert_array_equal(image.read_level(0), pixels)


class TestKilledWriter:
    def test_the_next_ingest_removes_what_a_killed_one_left(self, tmp_path):
        big = tmp_path / "big.tif"
        _tiff(big, seed=1, shape=(1024, 1024))  # 4096 chunks of 16 px: seconds to write
        archive = tmp_path / "archive"
        images = archive / "images"
        _kill_while_writing([big], archive, "big")
        assert any(p.name.startswith(".big.ome.zarr.partial-") for p in images.iterdir())

        # a writer alive in this process: what it is writing must survive the clean-up
        live = ImageWriter(resolve(images / "live.ome.zarr"), shape=(64, 64), dtype="uint16", pixel_size=1.0, chunk=CHUNK)
        live.write_tile(0, 0, np.full((32, 32), 7, np.uint16))
        small = _tiff(tmp_path / "small.tif", seed=2, shape=(64, 64))
        ingest_files([tmp_path / "small.tif"], archive, pixel_size=1.0, modality="SEM", chunk=CHUNK)
        assert [p.name for p in images.iterdir() if not p.name.startswith(".live.ome.zarr.partial-")] == ["small.ome.zarr"]
        np.testing.assert_array_equal(open_image(images / "small.ome.zarr").read_level(0), small)
        live.close()
        assert open_image(images / "live.ome.zarr").read_level(0)[0, 0] == 7

        [row] = ingest_files([big], archive, pixel_size=1.0, modality="SEM", chunk=64)  # the killed file, again
        assert row.image_id == "big"

    def test_a_re_ingest_killed_later_in_its_batch_left_its_image_catalogued(self, tmp_path):
        """Re-ingesting a.tif with a corrected pixel size in a batch with a large file,
        killed (OOM) while writing the large one: a's new image is in place and its
        catalog row, upserted right after the swap, describes it; a later ingest leaves
        both so and nothing hidden behind."""
        a = tmp_path / "a.tif"
        pixels = _tiff(a, seed=6, shape=(64, 64))
        archive = tmp_path / "archive"
        images = archive / "images"
        ingest_files([a], archive, pixel_size=5.0, modality="SEM", chunk=CHUNK)
        big = tmp_path / "big.tif"
        _tiff(big, seed=7, shape=(1024, 1024))
        _kill_while_writing([a, big], archive, "big")

        _tiff(tmp_path / "c.tif", seed=8, shape=(64, 64))
        ingest_files([tmp_path / "c.tif"], archive, pixel_size=1.0, modality="SEM", chunk=CHUNK)
        assert sorted(p.name for p in images.iterdir()) == ["a.ome.zarr", "c.ome.zarr"]
        row = read_catalog(archive).set_index("image_id").loc["a"]
        image = open_image(images / "a.ome.zarr")
        assert image.pixel_size == (row.pixel_size_y, row.pixel_size_x) == (2.5, 2.5)
        assert (row.height, row.width, row.chunk) == (64, 64, 16)
        np.testing.assert_array_equal(image.read_level(0), pixels)

    def test_an_image_moved_aside_by_a_writer_killed_mid_swap_is_put_back(self, tmp_path):
        """Replacing an image renames the old one aside, then the new one in: a kill
        between the two leaves no image at the id. The old one comes back."""
        first = _tiff(tmp_path / "a.tif", seed=3, shape=(64, 64))
        archive = tmp_path / "archive"
        ingest_files([tmp_path / "a.tif"], archive, pixel_size=1.0, modality="SEM", chunk=CHUNK)
        aside = sibling_name("a.ome.zarr", REPLACED)
        images = archive / "images"
        os.rename(images / "a.ome.zarr", images / aside)

        _tiff(tmp_path / "b.tif", seed=4, shape=(64, 64))
        ingest_files([tmp_path / "b.tif"], archive, pixel_size=1.0, modality="SEM", chunk=CHUNK)
        assert sorted(p.name for p in images.iterdir()) == ["a.ome.zarr", "b.ome.zarr"]
        np.testing.assert_array_equal(open_image(images / "a.ome.zarr").read_level(0), first)
        assert open_image(images / "a.ome.zarr").attributes["source"] == str(tmp_path / "a.tif")


class TestFileLock:
    def test_one_holder_at_a_time_and_no_file_left(self, tmp_path):
        path = str(tmp_path / ".x.lock")
        first, second = FileLock(path), FileLock(path)
        assert first.acquire(blocking=False)
        assert not second.acquire(blocking=False)
        first.release()
        assert not os.path.exists(path)
        assert second.acquire(blocking=False)
        second.release()

    def test_a_waiter_gets_the_lock_when_its_holder_releases(self, tmp_path):
        path = str(tmp_path / ".x.lock")
        holder, order = FileLock(path), []
        holder.acquire()

        def wait_for_it():
            with FileLock(path):
                order.append("waiter")

        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        time.sleep(0.2)
        order.append("holder")
        holder.release()
        waiter.join(timeout=10)
        assert order == ["holder", "waiter"] and not os.path.exists(path)

    def test_stores_without_locks_get_one_that_guards_nothing(self):
        """memory:// and S3 have no flock: see engine.stores.ingest.pipeline for what that means."""
        first, second = lock_for(resolve("memory://gf-lock/a.ome.zarr")), lock_for(resolve("memory://gf-lock/a.ome.zarr"))
        assert first.acquire(blocking=False) and second.acquire(blocking=False)

    def test_ingest_into_s3_takes_no_locks(self, s3_bucket, tmp_path):
        """An ingest and a re-ingest into an S3 archive: no lock files, no hidden folders."""
        _tiff(tmp_path / "a.tif", seed=9, shape=(64, 64))
        archive = f"{s3_bucket}/archive"
        ingest_files([tmp_path / "a.tif"], archive, pixel_size=1.0, modality="SEM", chunk=CHUNK)
        new = _tiff(tmp_path / "a.tif", seed=10, shape=(32, 64))
        [row] = ingest_files([tmp_path / "a.tif"], archive, pixel_size=2.0, modality="SEM", chunk=CHUNK)
        assert read_catalog(archive).image_id.tolist() == ["a"] and row.pixel_size_x == 2.0
        images = resolve(archive).join("images")
        fs = images.filesystem()
        fs.invalidate_cache()
        assert [p.rsplit("/", 1)[-1] for p in fs.ls(images.path, detail=False)] == ["a.ome.zarr"]
        np.testing.assert_array_equal(open_image(images.join("a.ome.zarr")).read_level(0), new)
