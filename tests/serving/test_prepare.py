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
