import numpy as np
import pytest

from engine.augment import (Compose, Dihedral, Sample, ScaleJitter, ScanDrift, ScanLineJitter,
                            boxes_from_mask, build_pipeline)
from engine.augment.geometry import dihedral_array, dihedral_boxes
from engine.augment.symmetry import D4, MATERIAL_SYMMETRY, ROW_PRESERVING

from .conftest import make_scene

GEOMETRIC = {
    "dihedral": Dihedral(ops=frozenset(D4), keep_shape=False),
    "scale_up": ScaleJitter(factor_range=(1.1, 1.6)),
    "scale_down": ScaleJitter(factor_range=(0.6, 0.9), keep_shape=False),
    "scale_free": ScaleJitter(factor_range=(0.7, 1.4), keep_shape=False),
    # the jitter of a real scan (and of build_pipeline at strength 1); a box without a
    # mask cannot know its object's ragged edge better than the jitter itself
    "scan_jitter": ScanLineJitter(sigma_range_px=(0.05, 0.3)),
    "scan_drift": ScanDrift(drift_range_px=(2.0, 8.0)),
}


def _views(scene_seed: int):
    """The same scene as a TEM image (no scan lines, so all of D4 applies) with and
    without its mask."""
    return make_scene("TEM", seed=scene_seed), make_scene("TEM", seed=scene_seed, with_mask=False)


class TestBoxesFollowMasks:
    @pytest.mark.parametrize("name", sorted(GEOMETRIC))
    @pytest.mark.parametrize("seed", range(8))
    def test_box_from_mask_equals_moved_box(self, name, seed):
        t = GEOMETRIC[name]
        with_mask, boxes_only = _views(seed)
        a = t(with_mask, np.random.default_rng(seed))
        b = t(boxes_only, np.random.default_rng(seed))
        assert a.log == b.log  # the same draws whether or not a mask is present
        assert a.mask.shape == a.image.shape and a.mask.dtype == with_mask.mask.dtype
        from_mask, present = boxes_from_mask(a.mask, a.box_ids())
        assert present.all()
        np.testing.assert_array_equal(a.boxes, from_mask)  # recomputed from the mask
        assert a.classes.tolist() == b.classes.tolist()
        # an object cut by the frame: the box of what is left is not the clipped box
        h, w = a.shape
        whole = (from_mask[:, 0] > 0) & (from_mask[:, 1] > 0) & (from_mask[:, 2] < w) & (from_mask[:, 3] < h)
        # boxes without a mask: within a pixel of the mask's box, except that line jitter
        # widens them to enclose the object (the envelope of their rows' offsets, which
        # may include a glitch line)
        slack = t.glitch_px if isinstance(t, ScanLineJitter) else 0.0
        np.testing.assert_allclose(b.boxes[whole], from_mask[whole], atol=1.0 + slack)
        if isinstance(t, (ScanLineJitter, ScanDrift)):
            assert (b.boxes[whole, :2] <= from_mask[whole, :2] + 0.5).all()
            assert (b.boxes[whole, 2:] >= from_mask[whole, 2:] - 0.5).all()

    @pytest.mark.parametrize("op", sorted(D4))
    def test_dihedral_is_exact(self, op):
        s = make_scene("TEM", seed=3)
        out = dihedral_array(s.mask, op)
        moved = dihedral_boxes(s.boxes, s.shape, op)
        np.testing.assert_array_equal(boxes_from_mask(out, np.arange(1, 5))[0], moved)

    def test_named_ops_match_numpy(self):
        a = np.arange(12).reshape(3, 4)
        assert (dihedral_array(a, "hflip") == np.fliplr(a)).all()
        assert (dihedral_array(a, "vflip") == np.flipud(a)).all()
        assert (dihedral_array(a, "transpose") == a.T).all()
        assert (dihedral_array(a, "rot90") == np.rot90(a)).all()

    def test_objects_leaving_the_frame_are_dropped(self):
        s = make_scene("TEM", seed=1)
        out = ScaleJitter(factor_range=(3.0, 3.0))(s, np.random.default_rng(0))
        ids, present = out.box_ids(), boxes_from_mask(out.mask, out.box_ids())[1]
        assert present.all() and len(ids) == len(out.classes) == len(out.boxes) < 4 + 1
        assert set(ids.tolist()) == set(np.unique(out.mask[out.mask > 0]).tolist())


class TestSemanticMask:
    def test_semantic_mask_moves_and_boxes_are_transformed(self):
        s = make_scene("TEM", shape=(96, 96), seed=2)
        sem = Sample(s.image, "TEM", 1.0, mask=(s.mask > 0).astype(np.uint8), mask_kind="semantic",
                     boxes=s.boxes, classes=s.classes)
        out = Dihedral(ops=frozenset({"rot90"}))(sem, np.random.default_rng(0))
        np.testing.assert_array_equal(out.mask, np.rot90(sem.mask))
        np.testing.assert_array_equal(out.boxes, dihedral_boxes(s.boxes, s.shape, "rot90"))
        assert out.mask.dtype == np.uint8


class TestSymmetryPolicy:
    def test_am_alloy_never_rotated(self):
        """am_alloy builds along y: over many seeds only identity or a left-right mirror."""
        seen = set()
        for seed in range(200):
            for modality in ("SEM", "TEM", "optical"):
                s = make_scene(modality, seed=seed % 5)
                pipe = build_pipeline(modality, "am_alloy", strength=1.0)
                out = pipe.transforms[0](s, np.random.default_rng(seed))
                op = out.log[-1][1]["op"]
                seen.add(op)
                ok = np.array_equal(out.image, s.image) or np.array_equal(out.image, np.fliplr(s.image))
                assert ok and op in ("identity", "hflip")
        assert seen == {"identity", "hflip"}

    @pytest.mark.parametrize("modality", ["SEM", "TEM", "optical"])
    def test_am_alloy_full_pipeline_shapes(self, modality):
        for seed in range(20):
            out = build_pipeline(modality, "am_alloy", 1.0).run(make_scene(modality, shape=(64, 96)), seed)
            assert out.image.shape == (64, 96)
            assert all(p["op"] in ("identity", "hflip") for n, p in out.log if n == "dihedral")

    def test_scanned_image_never_quarter_turned(self):
        ops = set()
        for seed in range(200):
            out = Dihedral(material="ferritic_steel")(make_scene("SEM"), np.random.default_rng(seed))
            ops.add(out.log[-1][1]["op"])
        assert ops == ROW_PRESERVING

    def test_clean_scene_gets_all_of_d4(self):
        ops = set()
        for seed in range(300):
            s = make_scene("SEM", shape=(96, 96), scan_lines=False)
            ops.add(Dihedral(material="ferritic_steel")(s, np.random.default_rng(seed)).log[-1][1]["op"])
        assert ops == set(D4)

    def test_unknown_material_is_conservative(self):
        for seed in range(50):
            out = Dihedral(material="unobtainium")(make_scene("TEM"), np.random.default_rng(seed))
            assert out.log[-1][1]["op"] in ("identity", "hflip")

    def test_quarter_turns_only_for_square_images_by_default(self):
        ops = {Dihedral(material="ferritic_steel")(make_scene("TEM"), np.random.default_rng(seed)).log[-1][1]["op"]
               for seed in range(100)}
        assert ops == ROW_PRESERVING  # (96, 128): a quarter turn would change the shape

    def test_scan_artifacts_mark_the_image(self):
        s = make_scene("TEM")
        assert not s.scan_lines
        assert ScanLineJitter()(s, np.random.default_rng(0)).scan_lines

    def test_compose_refuses_rotation_after_scan(self):
        with pytest.raises(ValueError, match="before 'scan_jitter'"):
            Compose((ScanDrift(), Dihedral()))

    def test_policy_covers_synth_materials(self):
        from engine.synth import MATERIALS

        assert set(MATERIALS) == set(MATERIAL_SYMMETRY)


class TestScaleJitter:
    @pytest.mark.parametrize("seed", range(10))
    def test_pixel_size_follows_factor(self, seed):
        s = make_scene("optical", pixel_size_nm=350.0, seed=seed)
        out = ScaleJitter(factor_range=(0.5, 2.0))(s, np.random.default_rng(seed))
        factor = out.log[-1][1]["factor"]
        assert out.pixel_size_nm == s.pixel_size_nm / factor
        # the labelled objects' physical size (nm^2) is unchanged, within sampling error
        area_nm2 = lambda x, k: (x.mask == k).sum() * x.pixel_size_nm ** 2  # noqa: E731
        present = set(np.unique(out.mask)) - {0}
        for k in present:
            x0, y0, x1, y1 = out.boxes[list(out.box_ids()).index(k)]
            if min(x0, y0) > 0 and x1 < s.shape[1] and y1 < s.shape[0]:  # not cut by the frame
                assert area_nm2(out, k) == pytest.approx(area_nm2(s, k), rel=0.35)

    def test_disc_radius_scales(self):
        h = w = 101
        yy, xx = np.mgrid[:h, :w]
        disc = ((yy - 50) ** 2 + (xx - 50) ** 2 <= 20 ** 2).astype(np.int32)
        s = Sample(disc.astype(np.float32), "TEM", 1.0, mask=disc)
        out = ScaleJitter(factor_range=(0.75, 0.75), keep_shape=False)(s, np.random.default_rng(0))
        assert out.image.shape == (76, 76)
        r = np.sqrt(out.mask.sum() / np.pi)
        assert r == pytest.approx(20 * 0.75, abs=0.5)
        assert out.pixel_size_nm == 1.0 / 0.75

    def test_pixel_size_range_bounds_the_factor(self):
        s = make_scene("SEM", pixel_size_nm=10.0)
        t = ScaleJitter(factor_range=(0.5, 2.0), pixel_size_range_nm=(8.0, 12.0))
        for seed in range(20):
            assert 8.0 <= t(s, np.random.default_rng(seed)).pixel_size_nm <= 12.0

    def test_keep_shape_only_magnifies(self):
        """A tile has no specimen beyond its edges: with keep_shape every output pixel is
        resampled specimen (no flat fill labelled background), and the pixel size only
        shrinks."""
        img = np.random.default_rng(0).random((64, 64)).astype(np.float32)
        s = Sample(img, "SEM", 5.0, mask=(img > 0.5).astype(np.int32), mask_kind="semantic")
        t = ScaleJitter(factor_range=(0.8, 1.25))
        for seed in range(50):
            out = t(s, np.random.default_rng(seed))
            assert out.log[-1][1]["factor"] >= 1.0 and out.pixel_size_nm <= s.pixel_size_nm
            assert out.image.shape == s.shape
            flat = np.isclose(out.image, img.mean(), rtol=0, atol=1e-7)
            assert flat.mean() < 0.01  # a mean-grey frame would cover ~10 % here

    def test_shrinking_needs_keep_shape_false(self):
        with pytest.raises(ValueError, match="keep_shape=False"):
            ScaleJitter(factor_range=(0.6, 0.9))
        out = ScaleJitter(factor_range=(0.5, 0.5), keep_shape=False)(make_scene("TEM"), np.random.default_rng(0))
        assert out.image.shape == (48, 64) and out.pixel_size_nm == 5.0 / 0.5

    def test_pipeline_zoom_stays_within_the_pyramid_spread(self):
        """build_pipeline's zoom stays within the factor sqrt(2) by which the pyramid
        level a model reads may differ from its pixel size."""
        for modality in ("SEM", "TEM", "optical"):
            scale = [t for t in build_pipeline(modality, strength=1.0).transforms if isinstance(t, ScaleJitter)][0]
            lo, hi = scale.factor_bounds(5.0)
            assert 1.0 <= lo <= hi <= 2**0.5


class TestScanBoxes:
    @pytest.mark.parametrize("transform", [ScanLineJitter(sigma_range_px=(0.5, 0.5), glitch_prob=0.05, glitch_px=2.0),
                                           ScanDrift(drift_range_px=(2.0, 8.0))], ids=["jitter", "drift"])
    def test_box_without_mask_encloses_the_moved_object(self, transform):
        h = w = 64
        img = np.zeros((h, w), np.float32)
        img[10:50, 30:34] = 1.0
        s = Sample(img, "SEM", 5.0, boxes=np.array([[30, 10, 34, 50]], np.float32), classes=np.array([3]))
        for seed in range(100):
            out = transform(s, np.random.default_rng(seed))
            ys, xs = np.nonzero(out.image > 0.5)
            x0, y0, x1, y1 = out.boxes[0]
            # the object's pixels lie in the box (to the half pixel of interpolation)
            assert xs.min() >= x0 - 0.5 and xs.max() + 1 <= x1 + 0.5, (seed, out.boxes[0], xs.min(), xs.max())
            assert ys.min() >= y0 and ys.max() + 1 <= y1
