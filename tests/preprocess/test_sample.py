"""scan_level: the strided sample and cell sums do not depend on the level's chunking."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from engine.preprocess.sample import scan_level


def _array(pixels, chunk):
    arr = zarr.create_array(store={}, shape=pixels.shape, chunks=(chunk, chunk), dtype=pixels.dtype)
    arr[:] = pixels
    return arr


class TestScanLevel:
    @pytest.mark.parametrize("chunk", [7, 32, 100])
    def test_same_result_for_any_chunking(self, chunk):
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 60000, (100, 90)).astype(np.uint16)
        scan = scan_level(_array(pixels, chunk), stride=3, cells=(8, 10))
        values = np.sort(np.concatenate([b.values.ravel() for b in scan.blocks]))
        np.testing.assert_array_equal(values, np.sort(pixels[::3, ::3].ravel().astype(np.float64)))
        for b in scan.blocks:
            np.testing.assert_array_equal(b.values, pixels[np.ix_(b.rows, b.cols)])
        # 12 x 9 full cells; the rows and columns past them are left out
        expected = pixels[:96, :90].reshape(12, 8, 9, 10).astype(np.float64).sum(axis=(1, 3))
        np.testing.assert_array_equal(scan.sums, expected)
        assert (scan.counts == 80).all()

    def test_non_finite_pixels_are_not_counted(self):
        pixels = np.ones((16, 16), np.float32)
        pixels[0, 0], pixels[0, 1], pixels[8:, 8:] = np.nan, np.inf, np.nan
        scan = scan_level(_array(pixels, 5), stride=1, cells=(8, 8))
        np.testing.assert_array_equal(scan.counts, [[62, 64], [64, 0]])
        np.testing.assert_array_equal(scan.sums, [[62, 64], [64, 0]])
        assert scan.finite_values().size == 256 - 2 - 64
