import math

import numpy as np
import pytest

from engine.augment import DefocusBlur, DiffractionBlur, Sample, UnevenIllumination
from engine.augment.optics import AIRY_SIGMA, illumination_field

from .conftest import make_scene


def _edge_width(image: np.ndarray) -> float:
    """Spread of a blurred vertical step: the gradient's standard deviation along x, px."""
    g = np.abs(np.diff(image.mean(axis=0).astype(np.float64)))
    x = np.arange(len(g))
    m = (g * x).sum() / g.sum()
    return float(np.sqrt((g * (x - m) ** 2).sum() / g.sum()))


def _step(pixel_size_nm: float, modality: str) -> Sample:
    img = np.full((32, 128), 0.2, np.float32)
    img[:, 64:] = 0.8
    return Sample(img, modality, pixel_size_nm)


class TestDefocusBlur:
    def test_blur_in_nm_scales_with_pixel_size(self):
        t = DefocusBlur(defocus_range_nm=(1000.0, 1000.0), semi_angle_mrad=(1.0, 1.0), fringe_range=(0, 0),
                        max_sigma_px=50.0)
        # sigma = alpha * df / sqrt(2) = 1 mrad * 1000 nm / sqrt(2) = 0.707 nm: 2.83 px at 0.25 nm/px, 0.707 at 1
        for px, sigma in [(0.25, 4.0 / 2**0.5), (1.0, 1.0 / 2**0.5)]:
            out = t(_step(px, "TEM"), np.random.default_rng(0))
            assert out.log[-1][1]["sigma_px"] == pytest.approx(sigma)
            assert _edge_width(out.image) == pytest.approx(sigma, rel=0.15)

    def test_fringe_overshoots_edge_and_stays_in_range(self):
        t = DefocusBlur(defocus_range_nm=(2000.0, 2000.0), semi_angle_mrad=(0.1, 0.1), fringe_range=(0.5, 0.5))
        out = t(_step(0.05, "TEM"), np.random.default_rng(0))
        row = out.image[16]
        # a Fresnel fringe: the profile leaves the [0.2, 0.8] band near the edge
        assert row.max() > 0.81 or row.min() < 0.19
        assert 0.0 <= row.min() and row.max() <= 1.0


class TestDiffractionBlur:
    def test_sigma_from_wavelength_and_na(self):
        t = DiffractionBlur(wavelength_range_nm=(550.0, 550.0), na_range=(0.5, 0.5), max_sigma_px=10.0)
        out = t(_step(100.0, "optical"), np.random.default_rng(0))
        expected = AIRY_SIGMA * 550.0 / 0.5 / 100.0
        assert out.log[-1][1]["sigma_px"] == pytest.approx(expected)
        assert _edge_width(out.image) == pytest.approx(expected, rel=0.15)

    def test_capped(self):
        t = DiffractionBlur(na_range=(0.05, 0.05), max_sigma_px=2.0)
        assert t(_step(10.0, "optical"), np.random.default_rng(0)).log[-1][1]["sigma_px"] == 2.0


class TestUnevenIllumination:
    def test_field_smooth_mean_one(self):
        f = illumination_field((64, 80), 0.3, 0.2, 0.4, 0.6, 1.0)
        assert f.dtype == np.float32 and f.mean() == pytest.approx(1.0, abs=1e-5)
        assert f.min() > 0 and np.abs(np.diff(f, axis=1)).max() < 0.02  # smooth, no structure
        # brightest near the optical axis (vignetting dominates the gradient here)
        iy, ix = np.unravel_index(np.argmax(illumination_field((64, 80), 0.3, 0.0, 0.4, 0.6, 0.0)), (64, 80))
        assert abs(iy - 0.4 * 64) <= 1 and abs(ix - 0.6 * 80) <= 1

    def test_multiplicative(self):
        s = make_scene("optical", pixel_size_nm=400.0)
        out = UnevenIllumination(vignetting_range=(0.3, 0.3), gradient_range=(0.2, 0.2))(s, np.random.default_rng(2))
        ratio = out.image / s.image
        p = out.log[-1][1]
        field = illumination_field(s.shape, p["vignetting"], p["gradient"], p["centre_y"], p["centre_x"], p["angle"])
        unclipped = out.image < 1.0
        np.testing.assert_allclose(ratio[unclipped], field[unclipped], rtol=1e-5)
        assert math.isfinite(float(out.image.sum()))
