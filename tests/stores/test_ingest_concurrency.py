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
from engine.stores.staging import REPLACED
from engine.stores.uri import resolve
from engine.stores.writer import ImageWriter
from tests.dead_writer import dead_writers_sibling

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


class TestKilledWriter:
    def test_the_next_ingest_removes_what_a_killed_one_left(self, tmp_path):
        big = tmp_path / "big.tif"
        _tiff(big, seed=1, shape=(1024, 1024))  # 4096 chunks of 16 px: seconds to write
        archive = tmp_path / "archive"
        images = archive / "images"
        code = ("import sys; from engine.stores.ingest import ingest_files; "
                "ingest_files([sys.argv[1]], sys.argv[2], pixel_size=1.0, modality='SEM', chunk=16)")
        writer = subprocess.Popen([sys.executable, "-c", code, str(big), str(archive)], cwd=REPO)
        try:
            deadline = time.monotonic() + 60
            while not (images.is_dir() and any(".partial-" in p.name for p in images.iterdir())):
                assert writer.poll() is None and time.monotonic() < deadline, "the ingest ended before it was killed"
                time.sleep(0.02)
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
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

    def test_an_image_moved_aside_by_a_writer_killed_mid_swap_is_put_back(self, tmp_path):
        """Replacing an image renames the old one aside, then the new one in: a kill
        between the two leaves no image at the id. The old one comes back."""
        first = _tiff(tmp_path / "a.tif", seed=3, shape=(64, 64))
        archive = tmp_path / "archive"
        ingest_files([tmp_path / "a.tif"], archive, pixel_size=1.0, modality="SEM", chunk=CHUNK)
        aside = dead_writers_sibling("a.ome.zarr", REPLACED)
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
