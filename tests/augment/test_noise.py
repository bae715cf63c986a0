import numpy as np
import pytest

from engine.augment import Sample, ShotNoise
from engine.augment.noise import DOSE_RANGE


def _noise(dose: float, read: float, black: float) -> ShotNoise:
    return ShotNoise(dose_range=(dose, dose), read_noise_range=(read, read), black_level_range=(black, black))


def _model_variance(grey: float, dose: float, read: float, black: float) -> float:
    """Var of the output at grey level `grey`: Poisson + read noise at the signal
    black + grey * (1 - black), mapped back to grey levels."""
    signal = black + grey * (1.0 - black)
    return (signal / dose + read**2) / (1.0 - black) ** 2


class TestShotNoise:
    @pytest.mark.parametrize("signal, dose, read, black", [(0.5, 100.0, 0.0, 0.2), (0.3, 400.0, 0.02, 0.4),
                                                           (0.6, 30.0, 0.01, 0.1)])
    def test_variance_matches_model(self, signal, dose, read, black):
        s = Sample(np.full((256, 256), signal, np.float32), "TEM", 1.0)
        out = _noise(dose, read, black)(s, np.random.default_rng(0)).image
        assert out.mean() == pytest.approx(signal, abs=0.01)
        # 65536 samples: the sample variance is within a few percent of the truth
        assert out.var() == pytest.approx(_model_variance(signal, dose, read, black), rel=0.05)

    # grey levels at least 4 sigma inside [0, 1], where the final clip to the Sample
    # range does not act
    @pytest.mark.parametrize("grey", [0.15, 0.3, 0.5, 0.7, 0.8])
    def test_mean_unbiased_and_variance_follows_intensity(self, grey):
        """A percentile-normalised tile's grey 0 is not zero signal: every grey level
        gets the noise of its signal, and the mean stays where it was."""
        s = Sample(np.full((256, 256), grey, np.float32), "SEM", 5.0)
        out = _noise(1000.0, 0.01, 0.3)(s, np.random.default_rng(1)).image.astype(np.float64)
        var = _model_variance(grey, 1000.0, 0.01, 0.3)
        assert abs(out.mean() - grey) < 5 * np.sqrt(var / out.size)
        assert out.var() == pytest.approx(var, rel=0.05)

    def test_dark_phase_is_noisy_too(self):
        """Black (grey 0) still counts quanta: its pixels do not all stay at 0, and its
        noise is a sizeable share of a bright phase's (sqrt(black level) of it)."""
        image = np.zeros((128, 128), np.float32)
        image[:, 64:] = 1.0
        t = ShotNoise(dose_range=(50.0, 50.0), read_noise_range=(0.0, 0.0))
        for seed in range(5):
            out = t(Sample(image, "SEM", 5.0), np.random.default_rng(seed)).image
            dark, bright = out[:, :64], out[:, 64:]
            assert (dark > 0).mean() > 0.25
            assert dark.std() > 0.2 * bright.std()

    def test_black_level_is_drawn_and_logged(self):
        s = Sample(np.full((8, 8), 0.5, np.float32), "SEM", 5.0)
        blacks = {ShotNoise()(s, np.random.default_rng(seed)).log[-1][1]["black_level"] for seed in range(10)}
        assert len(blacks) == 10 and all(0.0 < b < 1.0 for b in blacks)

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
