"""Measurements in physical units on hand-made masks of known geometry."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk, ellipse, polygon

from engine.pipeline.measure import (
    Measurements, area_mm2, defect_density_per_mm2, measure_labels, measure_mask, measure_masks,
)


def disc(radius: float, shape=(200, 200), centre=(100, 90)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[disk(centre, radius, shape=shape)] = True
    return m


def ellipse_mask(a: float, b: float, degrees: float, shape=(240, 240), centre=(120, 110)) -> np.ndarray:
    """Semi-axis a along x, b along y, turned `degrees` counter-clockwise as displayed."""
    m = np.zeros(shape, bool)
    m[ellipse(centre[0], centre[1], b, a, shape=shape, rotation=np.deg2rad(degrees))] = True
    return m


class TestDisc:
    # A drawn disc loses area at its edge: about 1/radius relative, hence the tolerances.
    @pytest.mark.parametrize("radius, pixel_nm, rel", [(40, 5.0, 0.02), (12, 250.0, 0.05)])
    def test_area_diameter_and_roundness(self, radius, pixel_nm, rel):
        r = measure_mask(disc(radius), pixel_nm)
        true_area = np.pi * (radius * pixel_nm) ** 2
        assert r.area_nm2[0] == pytest.approx(true_area, rel=rel)
        assert r.area_um2[0] == pytest.approx(r.area_nm2[0] / 1e6)
        assert r.equivalent_diameter_nm[0] == pytest.approx(2 * radius * pixel_nm, rel=rel / 2)
        assert r.major_axis_nm[0] == pytest.approx(2 * radius * pixel_nm, rel=rel)
        assert r.aspect_ratio[0] == pytest.approx(1.0, abs=0.01)
        assert np.isnan(r.orientation_deg[0]), "a disc has no orientation"
        np.testing.assert_allclose(r.centroid[0], (100, 90))

    def test_area_is_pixel_count_times_pixel_area(self):
        m = disc(30)
        r = measure_mask(m, (4.0, 2.5))  # anisotropic pixels: 4 nm tall, 2.5 nm wide
        assert r.area_px[0] == m.sum()
        assert r.area_nm2[0] == pytest.approx(m.sum() * 10.0)


class TestEllipse:
    @pytest.mark.parametrize("degrees", [0, 30, 45, 90, 120, 160])
    def test_orientation_axes_and_aspect_ratio(self, degrees):
        r = measure_mask(ellipse_mask(60, 20, degrees), 2.0)
        got = r.orientation_deg[0]
        assert min(abs(got - degrees), 180 - abs(got - degrees)) < 1.0
        assert 0 <= got < 180
        assert r.aspect_ratio[0] == pytest.approx(3.0, rel=0.03)
        assert r.major_axis_nm[0] == pytest.approx(2 * 60 * 2.0, rel=0.02)
        assert r.minor_axis_nm[0] == pytest.approx(2 * 20 * 2.0, rel=0.03)

    def test_negative_turn_wraps_into_0_180(self):
        r = measure_mask(ellipse_mask(50, 15, -30), 1.0)
        assert r.orientation_deg[0] == pytest.approx(150.0, abs=1.0)

    def test_anisotropic_pixels_are_measured_in_nm(self):
        # A square of 40 x 40 nm drawn with 2 nm tall, 4 nm wide pixels: 20 rows x 10 columns.
        m = np.zeros((40, 40), bool)
        m[5:25, 5:15] = True
        r = measure_mask(m, (2.0, 4.0))
        assert r.area_nm2[0] == pytest.approx(1600.0)
        assert r.aspect_ratio[0] == pytest.approx(1.0, abs=1e-9)

    def test_thin_line_has_a_width(self):
        m = np.zeros((20, 30), bool)
        m[5, 2:22] = True
        r = measure_mask(m, 1.0)
        assert np.isfinite(r.aspect_ratio[0]) and r.aspect_ratio[0] == pytest.approx(20.0)
        assert r.orientation_deg[0] == pytest.approx(0.0)


class TestManyObjects:
    def test_masks_and_labels_agree(self):
        a, b = disc(20, centre=(50, 50)), ellipse_mask(40, 10, 60, shape=(200, 200), centre=(130, 120))
        tri = np.zeros((200, 200), bool)
        tri[polygon([10, 10, 40], [150, 190, 170], shape=tri.shape)] = True
        labels = a * 1 + b * 2 + tri * 7
        values, by_label = measure_labels(labels.astype(np.uint16), 3.0)
        by_mask = measure_masks(np.stack([a, b, tri]), 3.0)
        np.testing.assert_array_equal(values, [1, 2, 7])
        for name in Measurements._fields:
            np.testing.assert_allclose(getattr(by_label, name), getattr(by_mask, name), err_msg=name)

    def test_overlapping_masks_are_measured_each_whole(self):
        a, b = disc(20, centre=(50, 50)), disc(20, centre=(50, 70))
        r = measure_masks(np.stack([a, b]), 1.0)
        np.testing.assert_allclose(r.area_px, [a.sum(), b.sum()])

    def test_empty_mask_has_zero_area_and_no_shape(self):
        r = measure_masks(np.zeros((2, 10, 10), bool), 1.0)
        np.testing.assert_array_equal(r.area_nm2, [0, 0])
        assert np.isnan(r.equivalent_diameter_nm).all() and np.isnan(r.centroid).all()

    def test_no_masks(self):
        r = measure_masks(np.zeros((0, 10, 10), bool), 1.0)
        assert all(len(v) == 0 for v in r)

    @pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, (1.0, 0.0)])
    def test_bad_pixel_size_is_refused(self, bad):
        with pytest.raises(ValueError, match="pixel_size_nm"):
            measure_mask(disc(5), bad)

    def test_masks_must_be_a_stack(self):
        with pytest.raises(ValueError, match="N x H x W"):
            measure_masks(np.zeros((10, 10), bool), 1.0)


class TestDensity:
    def test_area_of_a_field_of_view(self):
        # 1000 x 2000 pixels of 500 nm: 0.5 mm x 1 mm
        assert area_mm2((1000, 2000), 500.0) == pytest.approx(0.5)
        assert area_mm2(2_000_000, (500.0, 500.0)) == pytest.approx(0.5)

    def test_defects_per_mm2(self):
        assert defect_density_per_mm2(10, 0.5) == pytest.approx(20.0)
        np.testing.assert_allclose(defect_density_per_mm2([0, 3], [0.1, 0.3]), [0.0, 10.0])

    def test_image_density_from_tiles(self):
        counts, areas = np.array([2, 0, 5]), np.array([0.1, 0.1, 0.05])
        assert defect_density_per_mm2(counts.sum(), areas.sum()) == pytest.approx(28.0)

    def test_zero_area_is_nan_and_negative_refused(self):
        assert np.isnan(defect_density_per_mm2(0, 0.0))
        with pytest.raises(ValueError):
            defect_density_per_mm2(-1, 1.0)


def _random_ellipse(rng, a: float, b: float, degrees: float, shape=(80, 80)) -> np.ndarray:
    """Semi-axis a along `degrees` (counter-clockwise from +x as displayed), b across,
    centred a random fraction of a pixel off the array's middle."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = np.array(shape) / 2 + rng.uniform(-0.5, 0.5, 2)
    t = np.radians(degrees)
    x, y = xx - cx, -(yy - cy)
    u, v = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1


class TestRoundness:
    def test_digitised_discs_have_none_ellipses_of_aspect_1_3_keep_theirs(self):
        """A disc at a sub-pixel centre is never exactly round in pixels; within that
        noise it gets no orientation (before, 197 of 200 got a random one). An ellipse
        of aspect 1.3, semi-axes from 10 and 7.7 px, is not round: it keeps its own."""
        rng = np.random.default_rng(0)
        got = [measure_mask(_random_ellipse(rng, r, r, 0.0), 5.0).orientation_deg[0]
               for r in rng.uniform(4, 20, 200)]
        assert np.isnan(got).all(), f"{np.isfinite(got).sum()} of 200 discs got an orientation"
        for _ in range(100):
            a, degrees = rng.uniform(10, 30), rng.uniform(0, 180)
            got = measure_mask(_random_ellipse(rng, a, a / 1.3, degrees), 5.0).orientation_deg[0]
            assert np.isfinite(got)
            assert min(abs(got - degrees), 180 - abs(got - degrees)) < 5.0  # digitised at a >= 7.7 px

    def test_discs_in_non_square_pixels_have_none(self):
        rng = np.random.default_rng(1)
        for r in rng.uniform(4, 20, 50):  # r in the coarser pixels: 2 nm tall, 1 nm wide
            yy, xx = np.mgrid[:48, :96]
            cy, cx = 24 + rng.uniform(-0.5, 0.5), 48 + rng.uniform(-0.5, 0.5)
            m = ((yy - cy) * 2.0) ** 2 + (xx - cx) ** 2 <= (2 * r) ** 2
            assert np.isnan(measure_mask(m, (2.0, 1.0)).orientation_deg[0])


class TestMoments:
    def test_pieces_pooled_measure_the_whole_mask(self):
        """A mask cut into pieces (as tile cores cut an object): the pieces' moments
        pooled measure what the uncut mask measures, in non-square pixels, far from the
        origin too (as level-0 coordinates of a large image are)."""
        from engine.pipeline.measure import label_moments, measure_moments, pool_moments

        whole = ellipse_mask(70, 12, 25)
        labels = np.zeros(whole.shape, np.uint16)
        rows, cols = np.mgrid[: whole.shape[0], : whole.shape[1]]
        labels[whole] = (1 + (cols >= 100) + 2 * (rows >= 117))[whole]  # 4 pieces, as 4 tile cores
        count, centroid, m2 = label_moments(labels, 5)
        assert count.tolist()[:4] == [np.sum(labels == k) for k in range(1, 5)] and count[4] == 0
        assert np.isnan(centroid[4]).all()
        expected = measure_mask(whole, (4.0, 2.5))
        for far in (0.0, 1e5):
            n, mean, m2_all = pool_moments(count, centroid + far, m2)
            got = measure_moments([n], mean[None] - far, m2_all[None], (4.0, 2.5))
            for name in Measurements._fields:
                np.testing.assert_allclose(getattr(got, name), getattr(expected, name), rtol=1e-9, atol=1e-9,
                                           err_msg=name)

    def test_no_pixels_no_shape(self):
        from engine.pipeline.measure import measure_moments, pool_moments

        n, mean, m2 = pool_moments([0, 0], np.full((2, 2), np.nan), np.zeros((2, 3)))
        got = measure_moments([n], mean[None], m2[None], 1.0)
        assert got.area_px[0] == 0 and np.isnan(got.major_axis_nm[0])
