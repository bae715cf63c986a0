"""Pyramid levels: label levels must sit where the image's levels sit and keep thin defects."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from engine.stores.image import open_image
from engine.stores.pyramid import downsample_labels
from engine.stores.writer import write_image

BACKGROUND, BRIGHT = 100, 1100  # uint16 grey levels of the specimen and of a defect


def _block_mode(labels: np.ndarray) -> np.ndarray:
    """Reference: each 2x2 block's most frequent value, then non-zero, then smallest;
    odd edges repeat the last row/column. Slow, one block at a time."""
    h, w = labels.shape
    padded = np.pad(labels, ((0, h % 2), (0, w % 2)), mode="edge")
    out = np.empty(((h + 1) // 2, (w + 1) // 2), labels.dtype)
    for y in range(out.shape[0]):
        for x in range(out.shape[1]):
            counts = Counter(padded[2 * y:2 * y + 2, 2 * x:2 * x + 2].ravel().tolist())
            out[y, x] = max(counts, key=lambda v: (counts[v], v != 0, -v))
    return out


def _level0_centroid(mask_or_weights: np.ndarray, level: int) -> np.ndarray:
    """(y, x) weighted centroid of an array of `level` k's pixels, in level-0 pixel-centre
    coordinates: pixel i stands for level-0 pixels [i * 2**k, (i + 1) * 2**k), centred on
    i * 2**k + (2**k - 1) / 2 (as the image's NGFF translation places it)."""
    weights = np.asarray(mask_or_weights, np.float64)
    ys, xs = np.indices(weights.shape)
    centre = np.array([(ys * weights).sum(), (xs * weights).sum()]) / weights.sum()
    return centre * 2**level + (2**level - 1) / 2


def _write(tmp_path, labels: np.ndarray, pixels: np.ndarray | None = None, chunk: int = 16):
    """A stored image (uniform background unless `pixels`) with `labels` as "defects";
    small chunks, so every level spans several and is built chunk by chunk."""
    if pixels is None:
        pixels = np.full(labels.shape, BACKGROUND, np.uint16)
    write_image(tmp_path / "a.ome.zarr", pixels, pixel_size=5.0, unit="nanometer", chunk=chunk,
                labels={"defects": labels})
    image = open_image(tmp_path / "a.ome.zarr")
    return image, image.open_labels("defects")


class TestLabelLevelsFollowTheImage:
    def test_defect_mask_centroid_matches_bright_blob(self, tmp_path):
        # a 22 px square at (37, 21): off the 2**k grid, its edges fall mid-block at every level
        pixels = np.full((128, 128), BACKGROUND, np.uint16)
        labels = np.zeros((128, 128), np.uint32)
        pixels[37:59, 21:43] = BRIGHT
        labels[37:59, 21:43] = 5
        image, mask = _write(tmp_path, labels, pixels)
        assert len(mask.levels) == len(image.levels) == 4
        for k in (1, 2, 3):
            bright = image.read_level(k).astype(np.float64) - BACKGROUND  # 2x2 means: weight = defect area
            blob = _level0_centroid(bright, k)
            defect = _level0_centroid(mask.read_level(k) == 5, k)
            # the top-left-pixel pyramid put the mask (2**k - 1) / 2 px down-right of the blob
            np.testing.assert_allclose(defect, blob, atol=0.5, err_msg=f"level {k}")

    @pytest.mark.parametrize("side", [13, 16])
    def test_no_systematic_shift_over_all_block_offsets(self, tmp_path, side):
        # 64 squares, one per 32 px cell, at every (dy, dx) offset from the level-3 grid.
        # A label level can only quantise (a mask pixel is in or out): a square's centroid
        # may be off by up to half a level pixel, but on average over offsets not at all.
        cell = 32
        pixels = np.full((8 * cell, 8 * cell), BACKGROUND, np.uint16)
        labels = np.zeros(pixels.shape, np.uint32)
        for dy in range(8):
            for dx in range(8):
                top, left = cell * dy + dy, cell * dx + dx
                pixels[top:top + side, left:left + side] = BRIGHT
                labels[top:top + side, left:left + side] = 1 + 8 * dy + dx
        image, mask = _write(tmp_path, labels, pixels, chunk=32)
        for k in (1, 2, 3):
            c = cell >> k  # a cell in level-k pixels
            bright = image.read_level(k).astype(np.float64) - BACKGROUND
            ids = mask.read_level(k)
            offsets = []
            for dy in range(8):
                for dx in range(8):
                    window = np.s_[c * dy:c * (dy + 1), c * dx:c * (dx + 1)]
                    blob = _level0_centroid(bright[window], k)
                    defect = _level0_centroid(ids[window] == 1 + 8 * dy + dx, k)
                    offsets.append(defect - blob)
            offsets = np.array(offsets)
            # the top-left-pixel pyramid's mean offset was (2**k - 1) / 2 on both axes
            np.testing.assert_allclose(offsets.mean(axis=0), 0.0, atol=0.1, err_msg=f"level {k}")
            assert np.abs(offsets).max() < 2 ** (k - 1), f"level {k}: a mask off by half a level pixel or more"

    def test_one_pixel_line_on_odd_row_and_column_survives(self, tmp_path):
        labels = np.zeros((128, 128), np.uint8)
        labels[37, 10:100] = 3  # a horizontal crack on an odd row
        labels[20:110, 91] = 4  # a vertical one on an odd column
        _, mask = _write(tmp_path, labels)
        for k in range(1, len(mask.levels)):
            level = mask.read_level(k)
            # each end may lose a level pixel (an end pixel alone in its block is outvoted)
            assert (level[37 >> k] == 3).sum() >= 70 // 2**k, f"level {k} lost the horizontal crack"
            assert (level[:, 91 >> k] == 4).sum() >= 70 // 2**k, f"level {k} lost the vertical crack"
            assert (level == 3).sum() <= 90 // 2**k + 1  # one pixel wide still: no growth across the crack

    def test_large_instance_ids_keep_dtype_and_value(self, tmp_path):
        labels = np.zeros((64, 64), np.uint32)
        ids = (2**32 - 1, 2**31 + 7, 70_001)  # past uint16, past int32
        labels[5:21, 3:19], labels[30:50, 33:61], labels[51:63, 1:9] = ids
        _, mask = _write(tmp_path, labels)
        for k in range(1, len(mask.levels)):
            level = mask.read_level(k)
            assert level.dtype == np.uint32
            assert set(np.unique(level).tolist()) == {0, *ids}


class TestDownsampleLabels:
    @pytest.mark.parametrize("block, expected", [
        ([[0, 0], [5, 5]], 5),  # a tie with background goes to the defect
        ([[5, 0], [0, 5]], 5),
        ([[3, 3], [5, 5]], 3),  # a tie of two defects goes to the smaller id
        ([[7, 0], [2, 9]], 2),  # four different values: the smallest non-zero
        ([[0, 0], [0, 4]], 0),  # a majority wins, background included
        ([[0, 6], [6, 9]], 6),
        ([[8, 8], [8, 0]], 8),
    ])
    def test_block_value(self, block, expected):
        assert downsample_labels(np.array(block, np.uint16)).tolist() == [[expected]]

    @pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "int32"])
    @pytest.mark.parametrize("shape", [(8, 10), (7, 9), (1, 5), (6, 1)])
    def test_matches_the_block_mode_and_keeps_dtype(self, dtype, shape):
        rng = np.random.default_rng(sum(shape))
        # few distinct values, so every kind of tie occurs; the dtype's extremes as ids
        info = np.iinfo(dtype)
        values = np.array([0, 0, 1, 2, info.max, info.min or 3], dtype)
        labels = rng.choice(values, shape)
        out = downsample_labels(labels)
        assert out.dtype == labels.dtype and out.shape == ((shape[0] + 1) // 2, (shape[1] + 1) // 2)
        np.testing.assert_array_equal(out, _block_mode(labels))

    def test_value_does_not_depend_on_its_place_in_the_block(self):
        rng = np.random.default_rng(0)
        labels = rng.choice(np.array([0, 0, 1, 2, 3], np.uint16), (64, 64))
        out = downsample_labels(labels)
        np.testing.assert_array_equal(downsample_labels(labels[::-1, ::-1]), out[::-1, ::-1])
        np.testing.assert_array_equal(downsample_labels(labels.T), out.T)

    def test_non_integer_labels_are_refused(self):
        with pytest.raises(TypeError, match="integer labels"):
            downsample_labels(np.zeros((4, 4), np.float32))
