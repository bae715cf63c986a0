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


def _normalised_tile(shape=(256, 256), seed: int = 0) -> np.ndarray:
    """A tile as training_samples.normalise_tile makes it: p1 -> 0, p99 -> 1, clipped."""
    raw = np.random.default_rng(seed).normal(1000.0, 200.0, shape)
    lo, hi = np.percentile(raw, [1, 99])
    return np.clip((raw - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


class TestDefocusBlur:
    def test_blur_in_pixels_from_semi_angle_and_relative_defocus(self):
        # |df| = 1000 pixel sizes; sigma = alpha |df| / sqrt(2) = 1 mrad * 1000 px / sqrt(2) = 0.707 px
        t = DefocusBlur(defocus_range_px=(1000.0, 1000.0), semi_angle_mrad=(1.0, 1.0), fringe_range=(0, 0))
        for px in (0.25, 1.0):
            out = t(_step(px, "TEM"), np.random.default_rng(0))
            assert abs(out.log[-1][1]["defocus_nm"]) == pytest.approx(1000.0 * px)
            assert out.log[-1][1]["sigma_px"] == pytest.approx(1.0 / 2**0.5)
            assert _edge_width(out.image) == pytest.approx(1.0 / 2**0.5, rel=0.15)

    def test_blur_in_a_sensible_pixel_range_at_every_magnification(self):
        """The defocus an operator leaves scales with the magnification: the blur in
        pixels neither sits at its cap at atomic resolution nor vanishes at low
        magnification."""
        img = np.random.default_rng(0).random((32, 32)).astype(np.float32)
        t = DefocusBlur()
        for px in (0.02, 0.2, 5.0):
            sig = np.array([t(Sample(img, "TEM", px), np.random.default_rng(i)).log[-1][1]["sigma_px"]
                            for i in range(200)])
            assert (sig < t.max_sigma_px).all()
            assert 0.3 < np.median(sig) < 1.5
            assert (sig > 0.3).mean() > 0.5

    def test_lattice_fringes_survive_a_typical_defocus(self):
        """0.25 nm lattice fringes imaged at 8 px per period keep most of their contrast
        after a median draw (the archive's thin_film_lattice)."""
        x = np.arange(64)
        img = (0.5 + 0.3 * np.cos(2 * np.pi * x / 8))[None].repeat(64, 0).astype(np.float32)
        t = DefocusBlur(fringe_range=(0.0, 0.0))
        kept = [np.ptp(t(Sample(img, "TEM", 0.25 / 8), np.random.default_rng(i)).image[32]) / 0.6
                for i in range(40)]
        assert np.median(kept) > 0.8

    def test_fringe_is_a_line_bright_in_underfocus_dark_in_overfocus(self):
        t = DefocusBlur(defocus_range_px=(2000.0, 2000.0), semi_angle_mrad=(0.01, 0.01), fringe_range=(0.5, 0.5))
        plain = DefocusBlur(defocus_range_px=(2000.0, 2000.0), semi_angle_mrad=(0.01, 0.01), fringe_range=(0, 0))
        s = _step(0.05, "TEM")
        seen = set()
        for seed in range(10):
            out = t(s, np.random.default_rng(seed))
            base = plain(s, np.random.default_rng(seed)).image
            df = out.log[-1][1]["defocus_nm"]
            line = (out.image - base)[16]
            if df < 0:  # underfocus: a bright fringe leaving the [0.2, 0.8] band
                assert line.min() >= -1e-6 and out.image[16].max() > 0.85
            else:  # overfocus: the reversed (dark) fringe, not a softer edge
                assert line.max() <= 1e-6 and out.image[16].min() < 0.15
            assert abs(line[63]) > 0.1 and abs(line[0]) < 1e-3  # on the edge, nowhere else
            assert 0.0 <= out.image.min() and out.image.max() <= 1.0
            seen.add(df < 0)
        assert seen == {True, False}

    def test_tiny_images(self):
        for shape in ((1, 1), (1, 5), (3, 3)):
            s = Sample(np.full(shape, 0.4, np.float32), "TEM", 0.01)
            out = DefocusBlur(fringe_range=(0.3, 0.3))(s, np.random.default_rng(0))
            assert out.image.shape == shape and np.isfinite(out.image).all()


class TestDiffractionBlur:
    def test_added_blur_is_the_quadrature_difference(self):
        t = DiffractionBlur(wavelength_range_nm=(550.0, 550.0), na_range=(0.5, 0.5), native_na=0.95,
                            max_sigma_px=10.0)
        out = t(_step(100.0, "optical"), np.random.default_rng(0))
        target, native = AIRY_SIGMA * 550.0 / 0.5, AIRY_SIGMA * 550.0 / 0.95
        expected = math.sqrt(target**2 - native**2) / 100.0
        assert out.log[-1][1]["sigma_px"] == pytest.approx(expected)
        assert _edge_width(out.image) == pytest.approx(expected, rel=0.15)

    def test_best_aperture_adds_no_blur(self):
        """An image recorded at the best aperture is not blurred to imitate that aperture."""
        s = make_scene("optical", pixel_size_nm=100.0)
        for na in (0.95, 1.2):
            out = DiffractionBlur(na_range=(na, na), native_na=0.95)(s, np.random.default_rng(0))
            assert out.log[-1][1]["sigma_px"] == 0.0
            np.testing.assert_array_equal(out.image, s.image)
        # the default native aperture is the best of na_range
        out = DiffractionBlur(na_range=(0.95, 0.95))(s, np.random.default_rng(0))
        assert out.log[-1][1]["sigma_px"] == 0.0

    def test_capped(self):
        t = DiffractionBlur(na_range=(0.05, 0.05), native_na=0.95, max_sigma_px=2.0)
        assert t(_step(10.0, "optical"), np.random.default_rng(0)).log[-1][1]["sigma_px"] == 2.0


class TestUnevenIllumination:
    def test_field_smooth_and_at_most_one(self):
        f = illumination_field((64, 80), 0.3, 0.2, 0.4, 0.6, 1.0)
        assert f.dtype == np.float32 and f.max() <= 1.0 and f.max() > 0.95
        assert f.min() > 0 and np.abs(np.diff(f, axis=1)).max() < 0.02  # smooth, no structure
        # over the whole frame: brightest near the optical axis (vignetting dominates here)
        iy, ix = np.unravel_index(np.argmax(illumination_field((64, 80), 0.3, 0.0, 0.4, 0.6, 0.0)), (64, 80))
        assert abs(iy - 0.4 * 64) <= 1 and abs(ix - 0.6 * 80) <= 1

    def test_a_tile_gets_a_mild_gradient_not_a_vignette(self):
        """A 256-px tile is a small part of the frame: its field varies by a few percent,
        not by the whole frame's vignette (0.78-1.11 before)."""
        s = Sample(np.full((256, 256), 0.5, np.float32), "optical", 300.0)
        t = UnevenIllumination(vignetting_range=(0.3, 0.3), gradient_range=(0.2, 0.2))
        spread = []
        for seed in range(100):
            f = t(s, np.random.default_rng(seed)).image / 0.5
            spread.append(f.max() / f.min())
        assert max(spread) < 1.25 and np.median(spread) < 1.12

    def test_no_new_clipping(self):
        tile = _normalised_tile()
        t = UnevenIllumination(vignetting_range=(0.0, 0.3), gradient_range=(0.0, 0.2))
        for seed in range(50):
            out = t(Sample(tile, "optical", 300.0), np.random.default_rng(seed)).image
            assert not ((out >= 1.0) & (tile < 1.0)).any()

    def test_multiplicative(self):
        s = make_scene("optical", pixel_size_nm=400.0)
        t = UnevenIllumination(vignetting_range=(0.3, 0.3), gradient_range=(0.2, 0.2))
        out = t(s, np.random.default_rng(2))
        p = out.log[-1][1]
        field = illumination_field(s.shape, p["vignetting"], p["gradient"], p["centre_y"], p["centre_x"], p["angle"],
                                   tile=(p["tile_y"], p["tile_x"], t.tile_fraction))
        np.testing.assert_allclose(out.image, s.image * field, rtol=1e-6)

    def test_one_field_at_two_scales(self):
        """A view that is the central half of another (view_fraction 0.5) gets the central
        half of the other's field, pixel for pixel."""
        outer = Sample(np.full((64, 64), 0.5, np.float32), "optical", 300.0)
        inner = Sample(np.full((32, 32), 0.5, np.float32), "optical", 300.0)
        t = UnevenIllumination(vignetting_range=(0.3, 0.3), gradient_range=(0.2, 0.2), tile_fraction=0.5)
        t_inner = UnevenIllumination(vignetting_range=(0.3, 0.3), gradient_range=(0.2, 0.2), tile_fraction=0.5,
                                     view_fraction=0.5)
        for seed in range(5):
            a = t(outer, np.random.default_rng(seed)).image
            b = t_inner(inner, np.random.default_rng(seed)).image
            np.testing.assert_allclose(b, a[16:48, 16:48], rtol=1e-6)
            assert np.ptp(a) > 0.01  # the field is not flat
