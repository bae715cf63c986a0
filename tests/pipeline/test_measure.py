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
