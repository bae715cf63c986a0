import numpy as np
import pytest

from engine.augment import Sample, ShotNoise
from engine.augment.noise import DOSE_RANGE


class TestShotNoise:
    @pytest.mark.parametrize("signal, dose, read", [(0.5, 100.0, 0.0), (0.3, 400.0, 0.02), (0.6, 30.0, 0.01)])
    def test_variance_matches_model(self, signal, dose, read):
        s = Sample(np.full((256, 256), signal, np.float32), "TEM", 1.0)
        t = ShotNoise(dose_range=(dose, dose), read_noise_range=(read, read))
        out = t(s, np.random.default_rng(0)).image
        expected = signal / dose + read ** 2
        assert out.mean() == pytest.approx(signal, abs=0.01)
        # 65536 samples: the sample variance is within a few percent of the truth
        assert out.var() == pytest.approx(expected, rel=0.05)

    def test_dose_drawn_from_modality_range(self):
        s = Sample(np.full((8, 8), 0.5, np.float32), "optical", 500.0)
        for seed in range(20):
            dose = dict(ShotNoise()(s, np.random.default_rng(seed)).log[-1][1])["dose"]
            assert DOSE_RANGE["optical"][0] <= dose <= DOSE_RANGE["optical"][1]

    def test_lower_dose_is_noisier(self):
        s = Sample(np.full((128, 128), 0.5, np.float32), "SEM", 1.0)
        var = [ShotNoise(dose_range=(d, d), read_noise_range=(0, 0))(s, np.random.default_rng(1)).image.var()
               for d in (20.0, 1000.0)]
        assert var[0] > 10 * var[1]
