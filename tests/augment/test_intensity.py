import numpy as np
import pytest

from engine.augment import IntensityMap, Sample
from engine.augment.intensity import monotonic_map

from .conftest import PHASES, make_scene


def _full_range_tile(seed: int = 0) -> np.ndarray:
    """A percentile-normalised tile: values spread over [0, 1], both ends reached."""
    t = np.random.default_rng(seed).random((32, 32)).astype(np.float32)
    t[0, 0], t[0, 1] = 0.0, 1.0
    return t


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
        for gamma, contrast, b in [(0.5, 3.0, 0.4), (2.0, 0.2, -0.4), (1.0, 4.0, 0.0)]:
            y = monotonic_map(x, gamma, contrast, b)
            assert np.all(np.diff(y.ravel()) > 0) and y.min() >= 0 and y.max() <= 1

    def test_brightness_and_contrast_act_on_a_full_range_tile(self):
        """A normalised tile already spans [0, 1]: brightness moves its mid-tones and
        contrast spreads or gathers them, while black and white stay put."""
        t = _full_range_tile()
        mid = (t > 0.25) & (t < 0.75)
        brighter = monotonic_map(t, 1.0, 1.0, 0.1)
        assert brighter[mid].mean() > t[mid].mean() + 0.05
        assert monotonic_map(np.full((1, 1), 0.5, np.float32), 1.0, 1.0, 0.1)[0, 0] == pytest.approx(0.6)
        assert monotonic_map(t, 1.0, 1.0, -0.1)[mid].mean() < t[mid].mean() - 0.05
        assert monotonic_map(t, 1.0, 1.4, 0.0)[mid].std() > 1.2 * t[mid].std()
        assert monotonic_map(t, 1.0, 0.7, 0.0)[mid].std() < 0.85 * t[mid].std()
        for c, b in [(1.4, 0.0), (1.0, 0.1), (0.7, -0.1)]:
            out = monotonic_map(t, 1.0, c, b)
            assert out[0, 0] == 0.0 and out[0, 1] == 1.0

    def test_one_grey_level_one_output_whatever_the_tile(self):
        """The map depends on the grey level only, not on the tile's range: the detail
        tile of a fusion pair (normalised with its context's percentiles, so spanning
        less of [0, 1]) maps a grey level exactly as its context does."""
        detail = np.linspace(0.43, 0.85, 43, dtype=np.float32)[None, :]
        context = np.linspace(0.0, 1.0, 101, dtype=np.float32)[None, :]
        t = IntensityMap(gamma_range=(0.5, 2.0), contrast_range=(0.5, 2.0), brightness_range=(-0.2, 0.2))
        for seed in range(10):
            d = t(Sample(detail, "optical", 300.0), np.random.default_rng(seed)).image
            c = t(Sample(context, "optical", 1200.0), np.random.default_rng(seed)).image
            np.testing.assert_allclose(d[0, 17], c[0, 60], atol=1e-6)  # grey 0.60 in both

    def test_flat_image(self):
        s = Sample(np.full((4, 4), 0.5, np.float32), "SEM", 1.0)
        t = IntensityMap(gamma_range=(1.0, 1.0), contrast_range=(1.0, 1.0), brightness_range=(0.2, 0.2))
        assert np.allclose(t(s, np.random.default_rng(0)).image, 0.7)

    def test_brightness_beyond_mid_grey_range_refused(self):
        with pytest.raises(ValueError, match="IntensityMap.brightness_range"):
            IntensityMap(brightness_range=(-0.5, 0.5))
