"""Mixing a synthetic archive into detector and fusion training plans."""

from __future__ import annotations

import pytest

from engine.stores.uri import resolve
from engine.synth.diffusion.conditions import Condition
from engine.synth.diffusion.output import write_index, write_rejects, write_sample
from engine.synth.diffusion.plan import PlannedSample
from engine.training.mixing import MixingError, accepted_image_ids, mix_in, synthetic_detector_tiles

import numpy as np


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Twelve 32 px 'void' samples with a disc mask (one empty), three of them rejected."""
    archive = resolve(tmp_path_factory.mktemp("mix") / "syn")
    yy, xx = np.mgrid[:32, :32]
    records, truth = [], []
    for i in range(12):
        mask = ((yy - 16) ** 2 + (xx - 16) ** 2 < (i + 3) ** 2) if i else np.zeros((32, 32), bool)
        image = np.where(mask, 0.2, 0.7).astype(np.float32)
        s = PlannedSample(f"v{i:02d}", Condition("void", "ferritic_steel", "SEM"), i, i)
        rec, t = write_sample(archive, s, image, mask, pixel_size_nm=2.0, provenance={
            "model_ref": "m", "model_sha256": "0" * 64, "sampler": "ddim", "steps": 1, "run_seed": 0,
            "condition_index": 0})
        records.append(rec)
        truth += [t] if t else []
    write_index(archive, records, truth)
    write_rejects(archive, [{"image_id": f"v{i:02d}", "defect_class": "void", "reason": "kid: test"} for i in (1, 2, 3)])
    return archive


class TestMixIn:
    def test_ratio_is_synthetic_per_real(self):
        real, syn = list(range(10)), [f"s{i}" for i in range(20)]
        mixed = mix_in(real, syn, 0.5, seed=0)
        assert mixed[:10] == real and len(mixed) == 15 and set(mixed[10:]) <= set(syn)
        assert mix_in(real, syn, 0.5, seed=0) == mixed
        assert len(mix_in(real, syn, 5.0, seed=0)) == 30  # all there is
        assert mix_in(real, syn, 0.0, seed=0) == real

    def test_bad_ratio_and_empty_archive_are_named(self):
        with pytest.raises(MixingError, match="ratio"):
            mix_in([1], [2], -1, seed=0)
        with pytest.raises(MixingError, match="no defect tiles"):
            mix_in([1], [], 0.5, seed=0, what="defect tiles")


class TestSyntheticArchive:
    def test_rejected_samples_are_left_out(self, synthetic):
        ids = accepted_image_ids(synthetic)
        assert len(ids) == 9 and not {"v01", "v02", "v03"} & set(ids)

    def test_detector_tiles_hold_the_labelled_defect(self, synthetic):
        tiles = synthetic_detector_tiles(synthetic, ["pore", "crack", "inclusion", "scratch", "void"], 128)
        # v00 has an empty mask (no truth row: background), v01-v03 rejected
        assert sorted(t.image_id for t in tiles) == [f"v{i:02d}" for i in range(4, 12)]
        for t in tiles:
            assert t.shape == (32, 32) and list(t.classes) == [4]

    def test_fusion_plan_mixes_in_synthetic_specs(self, synthetic, train_archive):
        from engine.training import plan_training

        _, real, val = plan_training("fusion", "fusion_tiny", str(train_archive), tile_size=32, num_workers=1)
        _, mixed, val2 = plan_training("fusion", "fusion_tiny", str(train_archive), tile_size=32, num_workers=1,
                                       synthetic_archive=synthetic.uri, synthetic_ratio=0.1)
        assert val2 == val, "validation stays real"
        extra = mixed[len(real):]
        assert mixed[:len(real)] == real
        assert len(extra) == min(9, round(0.1 * len(real))) and len(extra) > 0
        assert all(s.image_id.startswith("v") and s.image_id not in ("v01", "v02", "v03") for s in extra)


class TestFinetuneArguments:
    def test_synthetic_is_for_detector_and_fusion(self, capsys):
        from jobs.finetune import parse_args

        args = parse_args(["--model", "fusion:fusion_tiny", "--archive", "a", "--storage", "s", "--synthetic", "syn",
                           "--synthetic-ratio", "0.25"])
        assert args.synthetic == "syn" and args.synthetic_ratio == 0.25
        with pytest.raises(SystemExit) as exit_:
            parse_args(["--model", "classifier:resnet10t", "--archive", "a", "--storage", "s", "--synthetic", "x"])
        assert exit_.value.code == 2
        assert "--synthetic mixes into detector or fusion training, not classifier" in capsys.readouterr().err
