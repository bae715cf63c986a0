"""Registry-driven contract tests: every transform and every modality's pipeline."""

import pickle

import numpy as np
import pytest

from engine.augment import TRANSFORMS, AugmentBatch, Compose, Sample, build_pipeline, create_transform
from engine.augment.symmetry import MATERIAL_SYMMETRY

from .conftest import make_scene

MODALITIES = ("SEM", "TEM", "optical")
PIXEL_NM = {"SEM": 5.0, "TEM": 0.2, "optical": 400.0}
INTENSITY_ONLY = ("defocus", "diffraction", "illumination", "intensity", "shot_noise")


def _scene(modality: str, seed: int = 0) -> Sample:
    # square, so quarter turns are in play where the material and modality allow them
    return make_scene(modality, shape=(96, 96), seed=seed, pixel_size_nm=PIXEL_NM[modality])


def _assert_valid(out: Sample, like: Sample, same_shape: bool = True) -> None:
    assert out.image.dtype == np.float32 and out.image.ndim == 2
    if same_shape:
        assert out.image.shape == like.image.shape
    assert np.isfinite(out.image).all() and out.image.min() >= 0.0 and out.image.max() <= 1.0
    assert out.mask.dtype == like.mask.dtype and out.mask.shape == out.image.shape
    assert out.boxes.dtype == np.float32 and out.boxes.shape[1] == 4 and len(out.classes) == len(out.boxes)
    assert out.classes.dtype == like.classes.dtype
    h, w = out.image.shape
    assert (out.boxes[:, [0, 2]] >= 0).all() and (out.boxes[:, [0, 2]] <= w).all()
    assert (out.boxes[:, [1, 3]] >= 0).all() and (out.boxes[:, [1, 3]] <= h).all()
    assert out.pixel_size_nm > 0


class TestEveryTransform:
    @pytest.mark.parametrize("name", sorted(TRANSFORMS))
    @pytest.mark.parametrize("modality", MODALITIES)
    def test_contract(self, name, modality):
        t = create_transform(name)
        s = _scene(modality)
        for arr in (s.image, s.mask, s.boxes, s.classes):
            arr.flags.writeable = False  # as Ray Data hands over zero-copy Arrow buffers
        a = t(s, np.random.default_rng(11))
        b = t(s, np.random.default_rng(11))
        _assert_valid(a, s)
        # deterministic per seed, and the input is left untouched
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert a.log == b.log and len(a.log) == 1 and a.log[0][0] == name
        assert s.log == () and np.array_equal(s.image, _scene(modality).image)
        assert pickle.loads(pickle.dumps(t)) == t

    @pytest.mark.parametrize("name", INTENSITY_ONLY)
    @pytest.mark.parametrize("modality", MODALITIES)
    def test_intensity_transforms_leave_labels_alone(self, name, modality):
        """optics, intensity and noise change grey levels only: geometry, mask, boxes,
        classes and pixel size stay as they were."""
        s = _scene(modality)
        for seed in range(3):
            out = create_transform(name)(s, np.random.default_rng(seed))
            assert out.log[-1][0] == name
            np.testing.assert_array_equal(out.mask, s.mask)
            np.testing.assert_array_equal(out.boxes, s.boxes)
            np.testing.assert_array_equal(out.classes, s.classes)
            assert out.pixel_size_nm == s.pixel_size_nm and out.image.shape == s.image.shape

    @pytest.mark.parametrize("name", sorted(TRANSFORMS))
    def test_p_zero_is_identity(self, name):
        s = _scene("SEM")
        assert create_transform(name, p=0.0)(s, np.random.default_rng(0)) is s

    def test_unknown_name_lists_valid(self):
        with pytest.raises(KeyError, match="valid names: defocus, diffraction, dihedral"):
            create_transform("elastic")

    def test_bad_parameters(self):
        with pytest.raises(ValueError, match="ShotNoise.dose_range"):
            create_transform("shot_noise", dose_range=(100, 10))
        with pytest.raises(ValueError, match="unknown operations"):
            create_transform("dihedral", ops=["rot45"])
        with pytest.raises(TypeError, match="'scale'"):
            create_transform("scale", zoom=2)


class TestBuildPipeline:
    @pytest.mark.parametrize("modality", MODALITIES)
    @pytest.mark.parametrize("material", [None, "ferritic_steel", "am_alloy", "thin_film_lattice"])
    def test_many_seeds_valid_and_deterministic(self, modality, material):
        pipe = build_pipeline(modality, material, strength=1.0)
        s = _scene(modality, seed=1)
        for seed in range(6):
            a, b = pipe.run(s, seed), pipe.run(s, seed)
            _assert_valid(a, s)
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.mask, b.mask)
            assert a.log == b.log
        assert not np.array_equal(pipe.run(s, 0).image, pipe.run(s, 1).image)

    def test_order_follows_the_instrument(self):
        assert build_pipeline("SEM").names == (
            "dihedral", "scale", "intensity", "scan_drift", "scan_jitter", "shot_noise")
        assert build_pipeline("TEM").names == (
            "dihedral", "scale", "defocus", "illumination", "intensity", "shot_noise")
        assert build_pipeline("optical").names == (
            "dihedral", "scale", "diffraction", "illumination", "intensity", "shot_noise")

    def test_strength_zero_is_identity(self):
        s = _scene("SEM")
        assert build_pipeline("SEM", strength=0.0).run(s, 3) is s

    def test_errors(self):
        with pytest.raises(ValueError, match="valid modalities: SEM, TEM, optical"):
            build_pipeline("XRD")
        with pytest.raises(ValueError, match="strength"):
            build_pipeline("SEM", strength=2.0)

    def test_config_round_trip_and_pickle(self):
        pipe = build_pipeline("optical", "am_alloy", 0.7)
        again = Compose.from_config(pipe.to_config())
        assert again == pipe
        assert pickle.loads(pickle.dumps(pipe)) == pipe
        s = _scene("optical")
        np.testing.assert_array_equal(again.run(s, 5).image, pipe.run(s, 5).image)

    def test_every_material_policy_is_a_group_with_identity(self):
        from engine.augment.geometry import dihedral_array

        a = np.arange(16).reshape(4, 4)
        for name, ops in MATERIAL_SYMMETRY.items():
            # closed under composition, so applying twice never leaves the allowed set
            for p in ops:
                for q in ops:
                    pq = dihedral_array(dihedral_array(a, p), q)
                    assert any(np.array_equal(pq, dihedral_array(a, r)) for r in ops), (name, p, q)


class TestAugmentBatch:
    def _batch(self, n: int = 4) -> dict:
        scenes = [make_scene("SEM", seed=i) for i in range(n)]
        boxes = np.empty(n, dtype=object)
        classes = np.empty(n, dtype=object)
        for i, s in enumerate(scenes):
            boxes[i], classes[i] = s.boxes, s.classes
        return {
            "image": np.stack([(s.image * 65535).astype(np.uint16) for s in scenes]),
            "mask": np.stack([s.mask for s in scenes]),
            "boxes": boxes, "classes": classes,
            "modality": np.array(["SEM"] * n), "material": np.array(["am_alloy"] * n),
            "pixel_size_nm": np.full(n, 5.0), "seed": np.arange(100, 100 + n),
            "image_id": np.array([f"img{i}" for i in range(n)]),
        }

    def test_rows_do_not_depend_on_batching(self):
        batch = self._batch()
        aug = AugmentBatch(strength=1.0, seed=3)
        whole = aug(batch)
        halves = [aug({k: v[sl] for k, v in batch.items()}) for sl in (slice(0, 2), slice(2, 4))]
        for col in ("image", "mask", "pixel_size_nm"):
            np.testing.assert_array_equal(whole[col], np.concatenate([h[col] for h in halves]))
        for col in ("boxes", "classes"):
            for i, got in enumerate(np.concatenate([h[col] for h in halves])):
                np.testing.assert_array_equal(whole[col][i], got)
        assert whole["image"].dtype == np.float32 and whole["image"].shape == batch["image"].shape
        assert whole["mask"].shape == batch["mask"].shape
        assert whole["image_id"].tolist() == batch["image_id"].tolist()
        for i in range(4):
            assert whole["boxes"][i].shape[1] == 4 and len(whole["classes"][i]) == len(whole["boxes"][i])

    def test_every_column_is_the_rows_own_augmentation(self):
        """Each row's image, mask, boxes, classes and pixel size are those of the row's
        pipeline run with the Generator seeded by (seed, epoch, row seed)."""
        batch = self._batch(6)
        aug = AugmentBatch(strength=1.0, seed=3, epoch=2)
        out = aug(batch)
        pipe = build_pipeline("SEM", "am_alloy", 1.0)
        for i in range(6):
            s = Sample(batch["image"][i].astype(np.float32) / 65535, "SEM", 5.0, mask=batch["mask"][i],
                       boxes=batch["boxes"][i], classes=batch["classes"][i])
            want = pipe(s, np.random.default_rng([3, 2, int(batch["seed"][i])]))
            np.testing.assert_array_equal(out["image"][i], want.image)
            np.testing.assert_array_equal(out["mask"][i], want.mask)
            np.testing.assert_array_equal(out["boxes"][i], want.boxes)
            np.testing.assert_array_equal(out["classes"][i], want.classes)
            assert out["pixel_size_nm"][i] == want.pixel_size_nm
        # the draws moved masks and changed pixel sizes (scale jitter), so a column left
        # as it came in would be caught above
        assert any(not np.array_equal(out["mask"][i], batch["mask"][i]) for i in range(6))
        assert (out["pixel_size_nm"] < 5.0).any()

    def test_epoch_changes_draws(self):
        batch = self._batch(2)
        a = AugmentBatch(strength=1.0, epoch=0)(batch)["image"]
        b = AugmentBatch(strength=1.0, epoch=1)(batch)["image"]
        assert not np.array_equal(a, b)

    def test_missing_column(self):
        with pytest.raises(ValueError, match="'pixel_size_nm'"):
            AugmentBatch()({"image": np.zeros((1, 4, 4), np.uint8), "modality": np.array(["SEM"])})
