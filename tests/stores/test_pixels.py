"""The tensorstore reader's handling of a failed region (real reads of real stores, corrupt
chunks included, are tests/stores/test_store_contract.py's)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from engine.stores.pixels import TensorstoreReader


class _Future:
    """A read's future whose result is a region or `error`; records being waited for."""

    def __init__(self, value: int = 0, error: Exception | None = None):
        self.value, self.error, self.waited = value, error, False

    def result(self):
        self.waited = True
        if self.error is not None:
            raise self.error
        return np.full((2, 2), self.value, np.uint16)


class _Store:
    """A rank-2 store handing out the given futures, one per region read."""

    rank = 2

    def __init__(self, futures):
        self._futures = iter(futures)

    def __getitem__(self, index):
        future = next(self._futures)
        return SimpleNamespace(read=lambda: future)


class TestTensorstoreReader:
    def test_a_failed_region_is_raised_after_every_other_read_has_finished(self):
        """The first region's chunk is corrupt: its error is raised, but only once the
        reads issued beside it have been waited for (none left in flight on tensorstore's
        threads after the caller has moved on)."""
        futures = [_Future(error=ValueError("corrupt chunk 0/c/0/0")), _Future(1), _Future(2)]
        reader = TensorstoreReader(_Store(futures))
        with pytest.raises(ValueError, match="corrupt chunk 0/c/0/0"):
            reader.read_regions([(0, 2, 0, 2), (0, 2, 2, 4), (2, 4, 0, 2)])
        assert all(f.waited for f in futures)

    def test_regions_come_back_in_order(self):
        reader = TensorstoreReader(_Store([_Future(v) for v in (7, 8, 9)]))
        got = reader.read_regions([(0, 2, 0, 2), (0, 2, 2, 4), (2, 4, 0, 2)])
        assert [int(a[0, 0]) for a in got] == [7, 8, 9]
