"""Resampling onto a global output grid: exact partition, exact sampling positions."""

from __future__ import annotations

import numpy as np
import pytest

from engine.preprocess.resample import OutputGrid, cast_pixels, resample, resize_nearest
from engine.tiling import LevelTransform, TileGrid


class TestOutputGrid:
    @pytest.mark.parametrize("step", [1.0, 1.7, 2.5, 3.0, 0.6])
    @pytest.mark.parametrize("level", [0, 1])
    def test_core_windows_partition_the_output_grid(self, step, level):
        f = 2.0**level
        shape0 = (500, 333)
        level_shape = tuple(-(-s // int(f)) for s in shape0)
        grid = TileGrid("a", level, level_shape, (16, 16), (48, 32), 3, LevelTransform(factor=(f, f)))
        out = OutputGrid((step, step), (int(np.ceil(shape0[0] / step)), int(np.ceil(shape0[1] / step))), halo=4)
        owned = np.zeros(out.extent, np.int32)
        for spec in grid:
            x0, y0, x1, y1 = spec.core_level0()
            j0, j1, i0, i1 = out.core_window((y0, y1, x0, x1))
            owned[j0:j1, i0:i1] += 1
            top, bottom, left, right = out.halo_of((j0, j1, i0, i1))
            assert 0 <= j0 - top and j1 + bottom <= out.extent[0] and max(top, bottom, left, right) <= 4
        assert (owned == 1).all()

    def test_for_image(self):
        out = OutputGrid.for_image((1000, 600), (2.0, 2.0), 5.0, halo=2)
        assert out.step == (2.5, 2.5) and out.extent == (400, 240) and out.halo == 2


class TestResample:
    @pytest.mark.parametrize("level, step", [(0, 2.5), (0, 0.5), (1, 3.0), (1, 7.0)])
    def test_samples_a_ramp_at_output_pixel_centres(self, level, step):
        """On a linear ramp (unchanged by the prefilter) each output pixel holds its centre's position."""
        f = 2.0**level
        n = 200
        src = (np.arange(n) + 0.5) * f  # level pixel i holds its centre's level-0 x
        src = np.broadcast_to(src, (n, n)).copy()
        out = resample(src, (0, 0), LevelTransform(factor=(f, f)), (step, step), (3, 5), (10, 12))
        expected = (np.arange(5, 17) + 0.5) * step
        np.testing.assert_allclose(out, np.broadcast_to(expected, (10, 12)), atol=1e-3)

    def test_reads_from_a_source_origin(self):
        src = np.broadcast_to(np.arange(100, dtype=np.float32) + 0.5, (100, 100)).copy()
        whole = resample(src, (0, 0), LevelTransform(), (2.0, 2.0), (10, 10), (8, 8))
        part = resample(src[:, 15:60], (0, 15), LevelTransform(), (2.0, 2.0), (10, 10), (8, 8))
        np.testing.assert_allclose(part, whole, atol=1e-4)

    def test_empty_output(self):
        assert resample(np.zeros((4, 4)), (0, 0), LevelTransform(), (2.0, 2.0), (0, 0), (0, 3)).shape == (0, 3)


def test_cast_pixels_rounds_and_clips():
    values = np.array([-3.2, 0.4, 0.6, 254.6, 300.0])
    assert cast_pixels(values, "uint8").tolist() == [0, 0, 1, 255, 255]
    assert cast_pixels(values, "float32").dtype == np.float32


def test_resize_nearest_keeps_label_values():
    mask = np.array([[1, 1, 2, 2], [3, 3, 4, 4]], np.uint32)
    out = resize_nearest(mask, (4, 8))
    assert out.dtype == np.uint32 and set(np.unique(out)) == {1, 2, 3, 4}
    assert out[0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2] and out[3].tolist() == [3, 3, 3, 3, 4, 4, 4, 4]
