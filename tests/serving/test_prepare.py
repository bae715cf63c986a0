"""An upload resampled to the models' pixel size: sizes that would blow up are refused.

Upsampling multiplies pixels: a 512 x 512 upload whose pixel size is 100x the models'
(often a pixel size given in the wrong unit) would become 51200 x 51200. Preprocessing
refuses it with the sizes in the message (`TooLarge`: the ingress answers 413 with it,
as for an upload over the pixel limit as sent) instead of allocating gigabytes in a
replica.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.serving.decode import BadImage, TooLarge
from engine.serving.prepare import TilingSettings, prepare_image

SETTINGS = TilingSettings(chunk=128, halo=8, target_pixel_size_nm=5.0, max_pixels=2048 * 2048)


def _prepare(pixel_size_nm: float, side: int = 256):
    pixels = (np.arange(side * side, dtype=np.uint32).reshape(side, side) % 251).astype(np.uint8)
    return prepare_image(pixels, modality="SEM", pixel_size_nm=pixel_size_nm, settings=SETTINGS, fit=False)


def test_a_coarse_upload_is_upsampled_to_the_models_pixel_size():
    prepared = _prepare(20.0)  # 4x: 1024 x 1024 at 5 nm
    assert prepared.pixel_size_nm == pytest.approx(5.0)
    first_column = [t for t in prepared.tiles if t.x == 0]
    core_rows = sum(t.tile.shape[0] - t.halo[0] - t.halo[1] for t in first_column)
    assert core_rows == pytest.approx(1024, abs=2)


def test_an_upload_over_the_pixel_limit_once_resampled_is_refused():
    with pytest.raises(TooLarge, match=r"from 50 to 5 nm per pixel .* 2560 x 2560 = 6553600 pixels, over the "
                                       r"limit of 4194304; check its pixel size") as refused:
        _prepare(50.0)
    assert "memory://" not in str(refused.value)  # names the upload, not the replica's scratch store


def test_a_tile_too_wide_once_upsampled_is_refused_whatever_the_limit():
    unlimited = TilingSettings(chunk=128, halo=8, target_pixel_size_nm=5.0, max_pixels=None)
    with pytest.raises(BadImage, match=r"would be 128000 px wide: .* \(5000 nm\) are 1000x coarser"):
        prepare_image(np.zeros((256, 256), np.uint8), modality="SEM", pixel_size_nm=5000.0, settings=unlimited,
                      fit=False)


class TestPreprocessRefusal:
    """What the ingress answers when the preprocess stage refuses the pixels: the
    stage's exception arrives as the `cause` of Ray's RayTaskError."""

    @staticmethod
    def from_stage(cause: Exception):
        from ray.exceptions import RayTaskError

        return RayTaskError("Preprocess.__call__", "Traceback ...", cause).as_instanceof_cause()

    def test_over_the_pixel_limit_once_resampled_is_413(self):
        from engine.serving.ingress import preprocess_refusal

        with pytest.raises(TooLarge) as refused:
            _prepare(50.0)
        refusal = preprocess_refusal(self.from_stage(refused.value))
        assert refusal.status == 413 and "over the limit of 4194304" in refusal.detail

    def test_pixels_that_cannot_be_tiled_are_422_and_other_errors_are_the_servers(self):
        from engine.serving.ingress import preprocess_refusal

        assert preprocess_refusal(self.from_stage(BadImage("image: no core"))).status == 422
        assert preprocess_refusal(self.from_stage(MemoryError("out of memory"))) is None


class TestNonSquarePixels:
    """An upload's (y, x) pixel size reaches its tiles, so the ensemble measures in nm
    along each axis (the batch job's path for an archive image of such pixels)."""

    PIXELS = (np.arange(128 * 256, dtype=np.uint32).reshape(128, 256) % 251).astype(np.uint8)

    def test_tiles_carry_both_sizes(self):
        """Native pixels (no target): the models see the finer of the two sizes on both
        axes (the 10 nm rows upsampled, as the job plans them), placed in the upload's
        (10, 5) nm pixels."""
        prepared = prepare_image(self.PIXELS, modality="SEM", pixel_size_nm=(10.0, 5.0), fit=False,
                                 settings=TilingSettings(chunk=64, halo=8))
        assert prepared.level == 0 and (prepared.pixel_size_y_nm, prepared.pixel_size_nm) == (5.0, 5.0)
        for t in prepared.tiles:
            assert (t.pixel_size_y_nm, t.pixel_size_nm) == (5.0, 5.0) and t.level0_pixel_size_nm == (10.0, 5.0)
        rows = sum(t.tile.shape[0] - t.halo[0] - t.halo[1] for t in prepared.tiles if t.x == 0)
        cols = sum(t.tile.shape[1] - t.halo[2] - t.halo[3] for t in prepared.tiles if t.y == 0)
        assert (rows, cols) == (256, 256)  # 1280 x 1280 nm in 5 nm pixels

    def test_one_number_is_square_pixels(self):
        prepared = prepare_image(self.PIXELS, modality="SEM", pixel_size_nm=5.0, fit=False,
                                 settings=TilingSettings(chunk=64, halo=8))
        assert (prepared.pixel_size_y_nm, prepared.pixel_size_nm) == (5.0, 5.0)
        assert {t.level0_pixel_size_nm for t in prepared.tiles} == {(5.0, 5.0)}

    def test_resampled_to_the_models_square_pixels(self):
        settings = TilingSettings(chunk=64, halo=8, target_pixel_size_nm=2.5)
        prepared = prepare_image(self.PIXELS, modality="SEM", pixel_size_nm=(10.0, 5.0), settings=settings, fit=False)
        assert (prepared.pixel_size_y_nm, prepared.pixel_size_nm) == pytest.approx((2.5, 2.5))
        for t in prepared.tiles:
            assert t.level0_pixel_size_nm == pytest.approx((10.0, 5.0))
        rows = sum(t.tile.shape[0] - t.halo[0] - t.halo[1] for t in prepared.tiles if t.x == 0)
        cols = sum(t.tile.shape[1] - t.halo[2] - t.halo[3] for t in prepared.tiles if t.y == 0)
        assert (rows, cols) == (pytest.approx(512, abs=2), pytest.approx(512, abs=2))  # 4x along y, 2x along x

    def test_the_limit_once_resampled_names_both_sizes(self):
        with pytest.raises(TooLarge, match=r"from 80 x 40 \(y x x\) to 5 nm per pixel .* 4096 x 2048 "):
            prepare_image(np.zeros((256, 256), np.uint8), modality="SEM", pixel_size_nm=(80.0, 40.0), fit=False,
                          settings=SETTINGS)

    @pytest.mark.parametrize("size", [0.0, -1.0, float("nan"), float("inf"), (10.0, 0.0), (1.0, 2.0, 3.0), "abc"])
    def test_a_bad_pixel_size_is_refused_naming_it(self, size):
        with pytest.raises(BadImage, match="pixel_size_nm: .* must be a positive finite number"):
            prepare_image(self.PIXELS, modality="SEM", pixel_size_nm=size, settings=SETTINGS, fit=False)


class TestPixelSizeFields:
    """The ingress's (y, x) pixel size from the form fields pixel_size_nm (x, and y unless
    pixel_size_y_nm is given) or the TIFF's own pair; refusals name the field (422)."""

    @staticmethod
    def pixel_size(given=None, given_y=None, from_file=None):
        from engine.serving.ingress import _pixel_size

        return _pixel_size(given, given_y, from_file)

    def test_one_field_is_square_pixels(self):
        assert self.pixel_size(5.0) == ((5.0, 5.0), "request")

    def test_both_fields_are_y_and_x(self):
        assert self.pixel_size(5.0, 10.0) == ((10.0, 5.0), "request")

    def test_the_tiffs_pair_without_fields_and_the_fields_over_it(self):
        assert self.pixel_size(from_file=(10.0, 5.0)) == ((10.0, 5.0), "tiff metadata")
        assert self.pixel_size(2.0, from_file=(10.0, 5.0)) == ((2.0, 2.0), "request")

    @pytest.mark.parametrize("given, given_y, field", [
        (None, None, "pixel_size_nm: required"),
        (None, 10.0, "pixel_size_y_nm: given without pixel_size_nm"),
        (float("nan"), None, "pixel_size_nm: nan must be a positive"),
        (5.0, 0.0, "pixel_size_y_nm: 0.0 must be a positive"),
        (5.0, -2.0, "pixel_size_y_nm: -2.0 must be a positive"),
        (5.0, float("nan"), "pixel_size_y_nm: nan must be a positive"),
        (5.0, float("inf"), "pixel_size_y_nm: inf must be a positive"),
    ])
    def test_refusals_name_the_field(self, given, given_y, field):
        from engine.serving.ingress import RequestError

        with pytest.raises(RequestError) as refused:
            self.pixel_size(given, given_y)
        assert refused.value.status == 422 and refused.value.detail.startswith(field)
        with pytest.raises(RequestError, match="pixel_size_y_nm: given without"):  # not the file's x beside it
            self.pixel_size(None, 10.0, from_file=(10.0, 5.0))
