import numpy as np
import pytest

from engine.augment import IntensityMap, Sample
from engine.augment.intensity import monotonic_map

from .conftest import PHASES, make_scene


class TestIntensityMap:
    @pytest.mark.parametrize("seed", range(50))
    def test_phase_order_kept(self, seed):
        s = make_scene(seed=seed)
        t = IntensityMap(gamma_range=(0.4, 2.5), contrast_range=(0.3, 3.0), brightness_range=(-0.4, 0.4))
        out = t(s, np.random.default_rng(seed)).image
        levels = [float(out[s.image == v].mean()) for v in PHASES]
        assert levels[0] < levels[1] < levels[2]
        # pixel-wise: a darker input pixel is never brighter after the map
        order = np.argsort(s.image.ravel(), kind="stable")
        assert np.all(np.diff(out.ravel()[order]) >= 0)
        assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0

    def test_strictly_increasing_without_clipping(self):
        x = np.linspace(0.1, 0.9, 1001, dtype=np.float32)[None, :]
        for gamma, contrast, b in [(0.5, 3.0, 0.5), (2.0, 0.2, -0.5), (1.0, 10.0, 0.0)]:
            y = monotonic_map(x, gamma, contrast, b)
            assert np.all(np.diff(y.ravel()) > 0) and y.min() >= 0 and y.max() <= 1

    def test_flat_image(self):
        s = Sample(np.full((4, 4), 0.5, np.float32), "SEM", 1.0)
        out = IntensityMap(brightness_range=(0.2, 0.2))(s, np.random.default_rng(0)).image
        assert np.allclose(out, 0.7)
