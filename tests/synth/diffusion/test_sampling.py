"""Sampling: deterministic per seed, image and mask together, valid conditioning only."""

from __future__ import annotations

import numpy as np
import pytest

from engine.models import load_model
from engine.synth.diffusion.conditions import Condition, ConditioningError, Vocabulary, expand_conditions
from engine.synth.diffusion.plan import plan_synthesis
from engine.synth.diffusion.sampler import make_sampler, sample_patches


@pytest.fixture(scope="module")
def model(diffusion_checkpoint):
    path, digest = diffusion_checkpoint
    return load_model(path, expected_sha256=digest)


class TestSampling:
    @pytest.mark.parametrize("method", ["ddim", "dpm"])
    def test_same_seed_same_sample(self, model, method):
        a_img, a_mask = sample_patches(model, [0, 7], [11, 12], steps=4, method=method)
        b_img, b_mask = sample_patches(model, [0, 7], [11, 12], steps=4, method=method)
        assert a_img.shape == (2, 32, 32) and a_img.dtype == np.float32
        assert a_mask.shape == (2, 32, 32) and a_mask.dtype == bool
        assert 0.0 <= a_img.min() and a_img.max() <= 1.0
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_mask, b_mask)

    def test_other_seed_or_condition_other_sample(self, model):
        base, _ = sample_patches(model, [0], [11], steps=4)
        other_seed, _ = sample_patches(model, [0], [12], steps=4)
        other_cond, _ = sample_patches(model, [100], [11], steps=4)
        assert not np.array_equal(base, other_seed)
        assert not np.array_equal(base, other_cond)

    def test_a_sample_does_not_depend_on_its_neighbours_seeds(self, model):
        # each sample draws its noise from its own generator
        a, _ = sample_patches(model, [3, 3], [5, 6], steps=3)
        b, _ = sample_patches(model, [3, 3], [5, 99], steps=3)
        np.testing.assert_allclose(a[0], b[0], atol=1e-5)

    def test_unknown_sampler_is_named(self, model):
        with pytest.raises(ValueError, match="euler.*ddim, dpm"):
            make_sampler(model, "euler")

    @pytest.mark.parametrize("method,top", [("ddim", 1000), ("dpm", 999)])
    def test_steps_beyond_one_per_distinct_timestep_are_refused(self, model, method, top):
        # DPM-Solver++ would repeat a timestep and divide by zero: NaN samples
        timesteps = make_sampler(model, method, top).timesteps
        assert len(set(timesteps.tolist())) == len(timesteps) == top
        with pytest.raises(ValueError, match=f"at most {top} for the {method} sampler on the model's 1000 "
                                             f"training timesteps.*got {top + 1}"):
            make_sampler(model, method, top + 1)

    def test_non_finite_samples_are_refused_not_written_as_blanks(self):
        import torch

        from engine.models import create_diffusion
        from engine.synth.diffusion.sampler import NonFiniteSampleError

        broken = create_diffusion("ddpm_tiny")
        with torch.no_grad():
            broken.unet.conv_out.bias.fill_(float("nan"))
        with pytest.raises(NonFiniteSampleError, match="NaN or inf in 2 of 2 samples"):
            sample_patches(broken, [0, 1], [1, 2], steps=2)


class TestConditions:
    vocab = Vocabulary(("pore", "crack"), ("steel", "alloy"), ("SEM", "TEM", "optical"))

    def test_expands_all_when_not_given(self):
        conds, left_out = expand_conditions(self.vocab, defect_classes=["crack"])
        assert len(conds) == 6 and {c.defect_class for c in conds} == {"crack"} and left_out == []

    def test_only_trained_conditions_by_default(self):
        trained = Vocabulary(self.vocab.defect_classes, self.vocab.materials, self.vocab.modalities,
                             frozenset({"pore.steel.SEM", "crack.alloy.TEM"}))
        conds, left_out = expand_conditions(trained)
        assert [c.key() for c in conds] == ["crack.alloy.TEM", "pore.steel.SEM"] and len(left_out) == 10
        conds, left_out = expand_conditions(trained, modalities=["SEM"])
        assert [c.key() for c in conds] == ["pore.steel.SEM"]

    @pytest.mark.parametrize("kw,named", [
        ({"defect_classes": ["crack"], "materials": ["steel"], "modalities": ["SEM"]}, "defect class 'crack'"),
        ({"modalities": ["optical"]}, "modality 'optical'"),
        ({"defect_classes": ["pore", "crack"], "materials": ["steel"]}, "defect class 'crack' was"),
    ])
    def test_a_name_with_no_trained_condition_is_refused_listing_the_trained_ones(self, kw, named):
        trained = Vocabulary(self.vocab.defect_classes, self.vocab.materials, self.vocab.modalities,
                             frozenset({"pore.steel.SEM", "crack.alloy.TEM"}))
        with pytest.raises(ConditioningError, match=f"none with {named}.*trained on these conditions "
                                                    r"\(class.material.modality\): crack.alloy.TEM, pore.steel.SEM"):
            expand_conditions(trained, **kw)

    @pytest.mark.parametrize("kw,bad,plural", [
        ({"defect_classes": ["crak"]}, "crak", "defect classes: pore, crack"),
        ({"materials": ["wood"]}, "wood", "materials: steel, alloy"),
        ({"modalities": ["XRD"]}, "XRD", "modalities: SEM, TEM, optical"),
    ])
    def test_unknown_value_lists_the_valid_ones(self, kw, bad, plural):
        with pytest.raises(ConditioningError, match=f"'{bad}'.*{plural}"):
            expand_conditions(self.vocab, **kw)

    def test_index_matches_the_model(self, model):
        vocab = Vocabulary.of(model)
        c = Condition("void", vocab.materials[-1], "optical")
        assert vocab.index(c) == model.condition_index(4, len(vocab.materials) - 1, 2) == model.num_conditions - 1


class TestPlan:
    def test_seeds_and_batches_are_fixed_by_the_request(self):
        conds = [Condition("pore", "steel", "SEM"), Condition("crack", "steel", "SEM")]
        a = plan_synthesis(conds, 5, seed=1, batch_size=2)
        assert [len(b.samples) for b in a] == [2, 2, 1, 2, 2, 1]
        assert a == plan_synthesis(conds, 5, seed=1, batch_size=2)
        seeds = [s.seed for b in a for s in b.samples]
        assert len(set(seeds)) == 10
        other = plan_synthesis(conds, 5, seed=2, batch_size=2)
        assert not {s.sample_id for b in other for s in b.samples} & {s.sample_id for b in a for s in b.samples}
