"""The "raw" input mode scales pixels as the detector's training did, for every stored dtype."""

from __future__ import annotations

import numpy as np
import pytest

from engine.pipeline.inputs import raw_scale
from engine.training.detector.pixels import to_uint8


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "float32"])
def test_raw_scale_matches_the_detectors_training_pixels(dtype):
    if np.dtype(dtype).kind == "f":
        tile = np.array([[-0.5, 0.0, 0.25, 1.0, 2.0]], dtype)
    else:
        info = np.iinfo(dtype)
        tile = np.array([[info.min, info.min // 2, 0, info.max // 2, info.max]], dtype)
    scaled = raw_scale(tile)
    assert scaled.dtype == np.float32 and scaled.min() >= 0.0 and scaled.max() <= 1.0
    np.testing.assert_allclose(scaled, to_uint8(tile) / 255.0, atol=0.5 / 255 + 1e-6)
