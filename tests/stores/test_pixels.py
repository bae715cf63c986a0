"""The tensorstore reader: what a failed read leaves behind."""

from __future__ import annotations

import numpy as np
import pytest

from engine.stores.image import open_image
from engine.stores.pixels import TensorstoreReader, open_reader
from engine.stores.writer import write_image


class _RecordingStore:
    """A tensorstore TensorStore that keeps every read future it hands out."""

    def __init__(self, store):
        self.store, self.rank, self.futures = store, store.rank, []

    def __getitem__(self, index):
        view, futures = self.store[index], self.futures

        class _View:
            def read(self):
                futures.append(view.read())
                return futures[-1]

        return _View()


def test_a_failed_region_leaves_no_read_in_flight(tmp_path):
    """One corrupt chunk among many regions: the error is raised once every other read
    has finished (tensorstore's threads would otherwise still be writing for futures,
    a store and a context that Python has let go of)."""
    path = tmp_path / "a.ome.zarr"
    write_image(str(path), np.arange(1024 * 1024, dtype="uint16").reshape(1024, 1024), pixel_size=1.0, chunk=64)
    (path / "0" / "c" / "0" / "0").write_bytes(b"this is not zstd")
    image = open_image(str(path))
    reader = open_reader(image.location, image.array(0), image.levels[0].path)
    assert isinstance(reader, TensorstoreReader), "local files are read with tensorstore"
    reader.store = recording = _RecordingStore(reader.store)
    regions = [(y, y + 64, x, x + 64) for y in range(0, 1024, 64) for x in range(0, 1024, 64)]
    with pytest.raises(ValueError):
        reader.read_regions(regions)  # the first region is the corrupt chunk
    assert len(recording.futures) == len(regions)
    assert all(f.done() for f in recording.futures)
