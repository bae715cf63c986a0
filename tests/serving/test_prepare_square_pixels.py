"""Non-square pixels reach the models square: an upload of (y, x) pixel sizes that differ
is resampled to the models' pixel size on both axes, even where a pyramid level lies
within the level tolerance of that size along x, by the batch job's own planner
(`engine.data.tile_plan`; the job's side: tests/data/test_square_pixels.py).

The upload is 512 x 1024 pixels of (2, 1) nm: its pyramid's levels are (2, 1), (4, 2)
and (8, 4) nm. What the models see is in the tiles; the answer's boxes and masks are
placed by each tile's origin and scale in the upload's pixels (test_response).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.serving.decode import TooLarge
from engine.serving.prepare import TilingSettings, prepare_image

PIXELS = (np.arange(512 * 1024, dtype=np.uint32).reshape(512, 1024) % 251).astype(np.uint8)
SIZE_YX = (2.0, 1.0)


def prepare(target_nm: float, pixel_size_nm=SIZE_YX, pixels=PIXELS, **settings):
    settings = TilingSettings(chunk=128, halo=4, target_pixel_size_nm=target_nm, **settings)
    return prepare_image(pixels, modality="SEM", pixel_size_nm=pixel_size_nm, settings=settings, fit=False)


class TestSquarePixelsForTheModels:
    @pytest.mark.parametrize("target_nm, level", [
        (4.0, 1),  # level 2 is 4 nm along x, but 8 along y: level 1's (4, 2) is resampled along x only
        (3.0, 0),  # level 2 is nearest along x (4 nm, within 1.5x), level 1 is 4 nm along y: level 0
        (1.0, 0),  # level 0 is the target along x: its rows are upsampled
    ])
    def test_a_level_near_the_target_along_x_is_resampled_to_square_pixels(self, target_nm, level):
        prepared = prepare(target_nm)
        assert (prepared.pixel_size_y_nm, prepared.pixel_size_nm) == pytest.approx((target_nm, target_nm))
        # from the coarsest level no coarser than the target along either axis
        assert prepared.level == level
        for t in prepared.tiles:
            assert (t.pixel_size_y_nm, t.pixel_size_nm) == pytest.approx((target_nm, target_nm))
            assert t.level0_pixel_size_nm == pytest.approx(SIZE_YX)  # placed in the upload's pixels
        rows = sum(t.tile.shape[0] - t.halo[0] - t.halo[1] for t in prepared.tiles if t.x == 0)
        cols = sum(t.tile.shape[1] - t.halo[2] - t.halo[3] for t in prepared.tiles if t.y == 0)
        # the upload's 1024 x 1024 nm in square pixels of the target
        assert (rows, cols) == (pytest.approx(1024 / target_nm, abs=1), pytest.approx(1024 / target_nm, abs=1))

    def test_pixels_square_within_a_percent_are_read_as_they_are(self):
        prepared = prepare(1.0, pixel_size_nm=(1.005, 1.0))  # a TIFF's rounded resolutions
        assert prepared.level == 0 and (prepared.pixel_size_y_nm, prepared.pixel_size_nm) == (1.005, 1.0)
        first = prepared.tiles[0]
        assert first.scale == (1.0, 1.0)
        np.testing.assert_array_equal(first.tile, PIXELS[: first.tile.shape[0], : first.tile.shape[1]])

    def test_an_upload_over_the_pixel_limit_once_made_square_is_refused(self):
        pixels = np.zeros((128, 256), np.uint8)
        assert prepare(5.0, pixel_size_nm=5.0, pixels=pixels, max_pixels=128 * 256).level == 0  # square: as sent
        with pytest.raises(TooLarge, match=r"from 10 x 5 \(y x x\) to 5 nm per pixel the image would be 256 x 256 = "
                                           r"65536 pixels, over the limit of 32768"):
            prepare(5.0, pixel_size_nm=(10.0, 5.0), pixels=pixels, max_pixels=128 * 256)
