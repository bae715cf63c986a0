"""Hidden siblings of images (engine.stores.staging): which a clean-up removes, puts back
or keeps, and the writer's side of that (engine.stores.writer).

A writer's liveness is its lock: here another process holds it (a real subprocess,
killed with SIGKILL as the OOM killer would); a folder whose lock no one holds is a dead writer's.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.errors import MetadataError
from engine.stores.image import open_image
from engine.stores.staging import PARTIAL, REPLACED, remove_stale_siblings, sibling_name
from engine.stores.uri import resolve
from engine.stores.writer import ImageWriter, write_image

CHUNK = 32
REPO = Path(__file__).resolve().parents[2]
_HOLD = ("import sys; from engine.stores.staging import sibling_lock; from engine.stores.uri import resolve; "
         "lock = sibling_lock(resolve(sys.argv[1])); lock.acquire(); print('held', flush=True); sys.stdin.read()")


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65535, (64, 64), dtype=np.uint16)


def _hold_lock_of(sibling: Path) -> subprocess.Popen:
    """A process that holds `sibling`'s writer lock, as the writer would, until killed."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(sibling)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _sibling(images: Path, name: str, kind: str, seed: int = 1) -> np.ndarray:
    """Put a `kind` sibling of image `a.ome.zarr` named `name` in `images`: a real image
    set aside (REPLACED) or a folder with a level array begun (PARTIAL)."""
    if kind == REPLACED:
        pixels = _pixels(seed)
        write_image(images / name, pixels, pixel_size=1.0, chunk=CHUNK)
        return pixels
    (images / name / "0").mkdir(parents=True)
    return np.empty(0)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class TestRemoveStaleSiblings:
    @pytest.mark.parametrize("kind", [PARTIAL, REPLACED])
    def test_a_sibling_whose_lock_a_live_process_holds_is_kept(self, tmp_path, kind):
        """A writer in another process (another container's PID namespace alike: its pid
        is not visible here) is alive while it holds its folder's lock."""
        images = tmp_path / "images"
        name = sibling_name("a.ome.zarr", kind)
        pixels = _sibling(images, name, kind)
        holder = _hold_lock_of(images / name)
        try:
            assert remove_stale_siblings(resolve(images)) == []
            assert (images / name).is_dir() and not (images / "a.ome.zarr").exists()
        finally:
            holder.kill()
            holder.wait()
        assert remove_stale_siblings(resolve(images)) == [str(images / name)]
        if kind == REPLACED:  # its writer died mid-swap: the old image is put back
            assert _names(images) == ["a.ome.zarr"]
            np.testing.assert_array_equal(open_image(images / "a.ome.zarr").read_level(0), pixels)
        else:
            assert _names(images) == []  # the killed holder's lock file too

    @pytest.mark.parametrize("kind", [PARTIAL, REPLACED])
    def test_a_sibling_named_by_a_running_pid_is_tidied_once_no_one_holds_its_lock(self, tmp_path, kind):
        """A container whose grainflow runs as PID 1, killed and restarted: the new PID 1
        must still tidy what the killed one left. Here the name is this (running)
        process's own, and no one holds the lock."""
        images = tmp_path / "images"
        name = sibling_name("a.ome.zarr", kind)
        _sibling(images, name, kind)
        assert remove_stale_siblings(resolve(images)) == [str(images / name)]
        assert _names(images) == (["a.ome.zarr"] if kind == REPLACED else [])

    def test_a_replaced_image_whose_successor_was_not_catalogued_is_kept_with_a_warning(self, tmp_path, caplog):
        """Killed after its swap, before the catalog described the new image: the old
        image is all that matches the catalog row, so it is not deleted."""
        images = tmp_path / "images"
        write_image(images / "a.ome.zarr", _pixels(2), pixel_size=1.0, chunk=CHUNK)
        name = sibling_name("a.ome.zarr", REPLACED)
        old = _sibling(images, name, REPLACED, seed=1)
        with caplog.at_level(logging.WARNING, logger="engine.stores.staging"):
            assert remove_stale_siblings(resolve(images)) == []
        assert _names(images) == sorted([name, "a.ome.zarr"])
        np.testing.assert_array_equal(open_image(images / name).read_level(0), old)
        assert name in caplog.text and "killed before the new image was catalogued" in caplog.text

    def test_a_replaced_image_whose_deletion_had_begun_is_deleted(self, tmp_path):
        """A writer deletes a set-aside image's zarr.json first, once the new one is described."""
        images = tmp_path / "images"
        write_image(images / "a.ome.zarr", _pixels(2), pixel_size=1.0, chunk=CHUNK)
        name = sibling_name("a.ome.zarr", REPLACED)
        _sibling(images, name, REPLACED)
        (images / name / "zarr.json").unlink()
        assert remove_stale_siblings(resolve(images)) == [str(images / name)]
        assert _names(images) == ["a.ome.zarr"]

    def test_older_names_are_kept_with_a_warning(self, tmp_path, caplog):
        """Names from grainflows whose writers held no lock (`<hex>-<pid>@<host>`, `<hex>`
        alone): whether their writer still runs cannot be known, so they are kept and named."""
        images = tmp_path / "images"
        host = sibling_name("a", PARTIAL).rsplit("@", 1)[1]
        names = (f".a.ome.zarr.partial-0123abcd4567-999999@{host}", ".b.ome.zarr.partial-0123abcd4567")
        for name in names:
            (images / name / "0").mkdir(parents=True)
        with caplog.at_level(logging.WARNING, logger="engine.stores.staging"):
            assert remove_stale_siblings(resolve(images)) == []
        assert _names(images) == sorted(names)
        assert all(name in caplog.text for name in names)

    def test_a_sibling_from_another_machine_is_kept_with_a_warning(self, tmp_path, caplog):
        images = tmp_path / "images"
        name = ".a.ome.zarr.partial-0123abcd4567@other-machine.example"
        (images / name / "0").mkdir(parents=True)
        with caplog.at_level(logging.WARNING, logger="engine.stores.staging"):
            assert remove_stale_siblings(resolve(images)) == []
        assert _names(images) == [name] and name in caplog.text


class TestImageWriterSiblings:
    def test_a_replaced_image_is_kept_and_locked_until_remove_replaced(self, tmp_path, caplog):
        images = tmp_path / "images"
        old, new = _pixels(1), _pixels(2)
        write_image(images / "a.ome.zarr", old, pixel_size=1.0, chunk=CHUNK)
        with ImageWriter(images / "a.ome.zarr", shape=new.shape, dtype=new.dtype, pixel_size=2.0, chunk=CHUNK,
                         keep_replaced=True) as writer:
            writer.write_tile(0, 0, new[:32, :32])
        aside = Path(resolve(writer.info.replaced).path)
        np.testing.assert_array_equal(open_image(aside).read_level(0), old)
        with caplog.at_level(logging.WARNING, logger="engine.stores.staging"):
            assert remove_stale_siblings(resolve(images)) == []
        assert caplog.text == ""  # its writer is alive: kept without a word
        assert _names(images) == sorted(["a.ome.zarr", aside.name, aside.name + ".lock"])
        writer.remove_replaced()
        assert _names(images) == ["a.ome.zarr"]

    def test_close_refuses_an_image_whose_folder_was_deleted_while_it_was_written(self, tmp_path):
        """A clean-up that could not see this writer's lock (another machine, an older
        grainflow) deleted its folder; zarr recreated only the later chunks' folders."""
        images = tmp_path / "images"
        old = _pixels(1)
        write_image(images / "a.ome.zarr", old, pixel_size=1.0, chunk=CHUNK)
        writer = ImageWriter(images / "a.ome.zarr", shape=(64, 64), dtype="uint16", pixel_size=2.0, chunk=CHUNK)
        writer.write_tile(0, 0, np.ones((32, 32), np.uint16))
        [partial] = [p for p in images.iterdir() if ".partial-" in p.name and p.is_dir()]
        shutil.rmtree(partial)
        writer.write_tile(32, 32, np.ones((32, 32), np.uint16))
        with pytest.raises(MetadataError, match=r"a\.ome\.zarr: the new image lacks its level arrays 0 .* is unchanged"):
            with writer:
                pass
        image = open_image(images / "a.ome.zarr")
        np.testing.assert_array_equal(image.read_level(0), old)
        assert image.pixel_size == (1.0, 1.0)
        assert _names(images) == ["a.ome.zarr"]  # what it wrote, and its lock, are gone
