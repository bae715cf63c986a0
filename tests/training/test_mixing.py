"""Mixing a synthetic archive into detector and fusion training plans."""

from __future__ import annotations

import pytest

from engine.stores.uri import resolve
from engine.synth.archive import generate_archive
from engine.synth.diffusion.conditions import Condition
from engine.synth.diffusion.output import GATE_FILE, write_gate_record, write_index, write_rejects, write_sample
from engine.synth.diffusion.plan import PlannedSample
from engine.training.mixing import (
    MixingError, MixingWarning, accepted_image_ids, mix_in, synthetic_count, synthetic_detector_tiles, ungated,
)

import numpy as np

REJECTED = ("v01", "v02", "v03")


def _write_samples(archive, n: int, *, start: int = 0, pixel_size_nm: float = 2.0,
                   modality: str = "SEM") -> list[dict]:
    """n 32 px 'void' samples with a disc mask (v00 empty); the catalog lists all written so far."""
    yy, xx = np.mgrid[:32, :32]
    records, truth = [], []
    for i in range(start, start + n):
        mask = ((yy - 16) ** 2 + (xx - 16) ** 2 < (i % 12 + 3) ** 2) if i else np.zeros((32, 32), bool)
        image = np.where(mask, 0.2, 0.7).astype(np.float32)
        s = PlannedSample(f"v{i:02d}", Condition("void", "ferritic_steel", modality), i, i)
        rec, t = write_sample(archive, s, image, mask, pixel_size_nm=pixel_size_nm, provenance={
            "model_ref": "m", "model_sha256": "0" * 64, "sampler": "ddim", "steps": 1, "run_seed": 0,
            "condition_index": 0})
        records.append(rec)
        truth += [t] if t else []
    return records, truth


def _gate(archive, records, rejected=REJECTED):
    """What gate_archive records, without training its classifier: every record judged."""
    write_rejects(archive, [{"image_id": i, "defect_class": "void", "reason": "kid: test"} for i in rejected])
    write_gate_record(archive, judged={r["image_id"]: r["checksum"] for r in records},
                      accepted=[r["image_id"] for r in records if r["image_id"] not in rejected], real="real")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Twelve 32 px 'void' samples with a disc mask (one empty), gated: three rejected."""
    archive = resolve(tmp_path_factory.mktemp("mix") / "syn")
    records, truth = _write_samples(archive, 12)
    write_index(archive, records, truth)
    _gate(archive, records)
    return archive


@pytest.fixture(scope="module")
def real_sem(tmp_path_factory):
    """A real archive: three 128 px SEM images of ferritic steel, each at its own pixel size."""
    archive = resolve(tmp_path_factory.mktemp("mix-real") / "real")
    generate_archive(archive, n_images=3, seed=3, size=128, chunk=128, materials=["ferritic_steel"],
                     modalities=["SEM"])
    return archive


NAMES = ["pore", "crack", "inclusion", "scratch", "void"]


def _nm_per_tile_pixel(tile) -> float:
    """nm a tile pixel spans along x: level 0's pixel size times the level-0 pixels per tile pixel."""
    from engine.stores.image import open_image
    from engine.tiling.transform import LevelTransform

    return LevelTransform.from_image(open_image(tile.image), tile.level).pixel_size_nm[1] * tile.scale[1]


@pytest.fixture(scope="module")
def coarse(tmp_path_factory, real_sem):
    """(archive, median): four gated 32 px 'void' samples stored at twice the median nm per
    pixel of the real images' tiles (each image read at its own level 0)."""
    from engine.training.detector.tiles import plan_tiles

    real_nm = {round(_nm_per_tile_pixel(t), 6) for t in plan_tiles(real_sem, NAMES, tile=128)}
    assert len(real_nm) == 3, "three real pixel sizes: the median is one of them"
    median = float(np.median(sorted(real_nm)))
    archive = resolve(tmp_path_factory.mktemp("mix-coarse") / "syn")
    records, truth = _write_samples(archive, 4, start=4, pixel_size_nm=2 * median)
    write_index(archive, records, truth)
    _gate(archive, records, rejected=())
    return archive, median


class TestMixIn:
    def test_ratio_is_synthetic_per_real(self):
        real, syn = list(range(10)), [f"s{i}" for i in range(20)]
        mixed = mix_in(real, syn, 0.5, seed=0)
        assert len(mixed) == 15 and sorted(m for m in mixed if isinstance(m, int)) == real
        assert set(m for m in mixed if isinstance(m, str)) <= set(syn)
        assert mix_in(real, syn, 0.5, seed=0) == mixed, "a rerun plans the same order"
        assert mix_in(real, syn, 0.5, seed=1) != mixed
        assert mix_in(real, syn, 0.0, seed=0) == real

    def test_a_capped_ratio_warns_with_the_achieved_one(self):
        real, syn = list(range(10)), [f"s{i}" for i in range(20)]
        with pytest.warns(MixingWarning, match="20 samples to mix in, 50 asked for.*mixing 20, an achieved ratio of 2"):
            assert len(mix_in(real, syn, 5.0, seed=0)) == 30  # all there is

    def test_synthetic_samples_are_spread_over_the_epoch(self):
        # training reads the list in order through a 64-row shuffle buffer: synthetic
        # samples appended at the end arrived as one block at the end of every epoch
        real, syn = [("r", i) for i in range(600)], [("s", i) for i in range(600)]
        mixed = mix_in(real, syn, 0.5, seed=3)
        third = len(mixed) // 3
        for part in (mixed[:third], mixed[third:2 * third], mixed[2 * third:]):
            share = sum(kind == "s" for kind, _ in part) / len(part)
            assert abs(share - 1 / 3) < 0.08, share

    def test_bad_ratio_and_empty_archive_are_named(self):
        with pytest.raises(MixingError, match="ratio"):
            mix_in([1], [2], -1, seed=0)
        with pytest.raises(MixingError, match="no defect tiles"):
            mix_in([1], [], 0.5, seed=0, what="defect tiles")


class TestSyntheticArchive:
    def test_rejected_samples_are_left_out(self, synthetic):
        ids = accepted_image_ids(synthetic)
        assert len(ids) == 9 and not set(REJECTED) & set(ids)

    def test_an_archive_never_gated_is_refused_naming_the_command(self, tmp_path, real_sem):
        archive = resolve(tmp_path / "ungated")
        records, truth = _write_samples(archive, 4)
        write_index(archive, records, truth)
        with pytest.raises(MixingError, match="never ran.*grainflow synthesize --gate-only --out .*ungated"):
            accepted_image_ids(archive)
        with pytest.raises(MixingError, match="never ran"):
            synthetic_detector_tiles(archive, ["void"], 128, real_archive=real_sem)
        # the explicit opt-out takes every sample, and says so where it is recorded
        assert accepted_image_ids(archive, gated=False) == ["v00", "v01", "v02", "v03"]
        assert accepted_image_ids(ungated(archive)) == ["v00", "v01", "v02", "v03"]
        assert str(ungated(archive)).startswith("ungated:")

    def test_samples_added_or_rewritten_after_gating_are_refused(self, tmp_path):
        archive = resolve(tmp_path / "grown")
        records, truth = _write_samples(archive, 4)
        write_index(archive, records, truth)
        _gate(archive, records, rejected=())
        assert len(accepted_image_ids(archive)) == 4
        more, more_truth = _write_samples(archive, 2, start=4)  # a larger -n after the gate ran
        write_index(archive, records + more, truth + more_truth)
        with pytest.raises(MixingError, match="2 of its 6 samples were added or rewritten after the quality gate "
                                              "ran.*v04.*gate it again"):
            accepted_image_ids(archive)
        _gate(archive, records + more, rejected=())
        assert len(accepted_image_ids(archive)) == 6
        records[1] = {**records[1], "checksum": "f" * 64}  # a sample rewritten since
        write_index(archive, records + more, truth + more_truth)
        with pytest.raises(MixingError, match="1 of its 6 .*v01"):
            accepted_image_ids(archive)
        assert (archive.join(GATE_FILE)).exists()

    def test_detector_tiles_hold_the_labelled_defect(self, synthetic, real_sem):
        # at the samples' own pixel size (2 nm): read as stored, one tile each
        tiles = synthetic_detector_tiles(synthetic, NAMES, 128, real_archive=real_sem, pixel_size_nm=2.0)
        # v00 has an empty mask (no truth row: background), v01-v03 rejected
        assert sorted(t.image_id for t in tiles) == [f"v{i:02d}" for i in range(4, 12)]
        for t in tiles:
            assert t.shape == (32, 32) and list(t.classes) == [4] and not t.resampled

    def test_a_real_archive_is_refused_as_synthetic_gated_or_not(self, real_sem):
        # it was refused as "never gated" (gate it, the message said), and ungated it
        # was mixed in as if its images were synthetic
        words = (r"real: not a synthetic archive \(its catalog has no diffusion provenance\); pass a "
                 r"`grainflow synthesize` output")
        for passed in (real_sem, real_sem.uri, ungated(real_sem)):
            with pytest.raises(MixingError, match=words):
                accepted_image_ids(passed)
            with pytest.raises(MixingError, match=words):
                synthetic_detector_tiles(passed, NAMES, 128, real_archive=real_sem)


class TestDetectorScale:
    """Synthetic detector tiles reach the detector at the real tiles' scale (nm per pixel)."""

    def test_native_real_pixels_take_the_median_real_scale(self, coarse, real_sem):
        from engine.training.detector.pixels import ImageCache

        archive, median = coarse
        tiles = synthetic_detector_tiles(archive, NAMES, 128, real_archive=real_sem)
        assert sorted(t.image_id for t in tiles) == ["v04", "v05", "v06", "v07"]
        cache = ImageCache()
        for t in tiles:
            # was the samples' stored 2 x median: defects half their real size in pixels
            assert _nm_per_tile_pixel(t) == pytest.approx(median, rel=0.01)
            assert t.shape == (64, 64)
            labels = cache.read_labels_nearest(t.image, "defects", t.level, t.scale, (t.y0, t.x0), t.shape)
            ys, xs = np.nonzero(labels == 1)
            box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            np.testing.assert_allclose(t.boxes[0], box, atol=1.0)  # the box is the defect's in the tile read
            r = int(t.image_id[1:]) % 12 + 3  # the disc's radius in stored pixels: twice that in tile pixels
            assert 2 * (2 * r - 1) - 2 <= box[2] - box[0] <= 2 * (2 * r - 1) + 2

    def test_a_model_pixel_size_is_met_exactly(self, coarse, real_sem):
        from engine.training.detector.tiles import plan_tiles

        archive, median = coarse
        # 1.6 x median: the real images are resampled to it (beyond the job's 1.5x
        # tolerance); the samples (2 x median) are within it, and were read as stored
        model_nm = 1.6 * median
        real = {round(_nm_per_tile_pixel(t), 6) for t in plan_tiles(real_sem, NAMES, tile=128,
                                                                     pixel_size_nm=model_nm)}
        tiles = synthetic_detector_tiles(archive, NAMES, 128, real_archive=real_sem, pixel_size_nm=model_nm)
        assert len(tiles) == 4
        for t in tiles:
            assert _nm_per_tile_pixel(t) == pytest.approx(model_nm, rel=0.01)
            assert all(v == pytest.approx(model_nm, rel=0.01) for v in real)

    def test_modalities_the_real_images_lack_are_refused(self, tmp_path, real_sem):
        archive = resolve(tmp_path / "optical")
        records, truth = _write_samples(archive, 3, start=1, modality="optical")
        write_index(archive, records, truth)
        _gate(archive, records, rejected=())
        with pytest.raises(MixingError, match=r"modalities \['optical'\] and the real training images are "
                                              r"\['SEM'\].*grainflow synthesize --modality"):
            synthetic_detector_tiles(archive, NAMES, 128, real_archive=real_sem)
        with pytest.raises(MixingError, match="optical"):
            synthetic_detector_tiles(archive, NAMES, 128, real_archive=real_sem, pixel_size_nm=100.0)

    def test_fusion_plan_mixes_in_synthetic_specs(self, synthetic, train_archive):
        from engine.training import plan_training

        _, real, val = plan_training("fusion", "fusion_tiny", str(train_archive), tile_size=32, num_workers=1)
        with pytest.warns(MixingWarning, match="9 samples to mix in"):  # fewer than 0.1 x real
            _, mixed, val2 = plan_training("fusion", "fusion_tiny", str(train_archive), tile_size=32, num_workers=1,
                                           synthetic_archive=synthetic.uri, synthetic_ratio=0.1)
        assert val2 == val, "validation stays real"
        extra = [s for s in mixed if s not in real]
        key = lambda s: (s.image_id, s.level, s.y, s.x)  # noqa: E731
        assert sorted((s for s in mixed if s in real), key=key) == sorted(real, key=key)
        assert len(extra) == min(9, round(0.1 * len(real))) and len(extra) > 0
        assert all(s.image_id.startswith("v") and s.image_id not in REJECTED for s in extra)
        assert synthetic_count(mixed, synthetic.uri) == len(extra)
        with pytest.warns(MixingWarning):
            _, again, _ = plan_training("fusion", "fusion_tiny", str(train_archive), tile_size=32, num_workers=1,
                                        synthetic_archive=synthetic.uri, synthetic_ratio=0.1)
        assert again == mixed, "the same seed plans the same order"

    def test_fusion_plan_interleaves_real_and_synthetic(self, synthetic, train_archive):
        from engine.training import plan_training

        _, real, _ = plan_training("fusion", "fusion_tiny", str(train_archive), tile_size=32, num_workers=1,
                                   val_fraction=0)
        with pytest.warns(MixingWarning):  # 9 accepted samples, fewer than asked
            _, mixed, _ = plan_training("fusion", "fusion_tiny", str(train_archive), tile_size=32, num_workers=1,
                                        val_fraction=0, synthetic_archive=synthetic.uri, synthetic_ratio=1.0)
        # the 9 accepted samples spread over the epoch (appended, all 9 were in its last third)
        third = len(mixed) // 3
        counts = [synthetic_count(part, synthetic.uri) for part in (mixed[:third], mixed[third:2 * third],
                                                                   mixed[2 * third:])]
        assert sum(counts) == 9 and all(1 <= c <= 6 for c in counts), counts

    def test_fusion_tile_larger_than_the_samples_is_named(self, synthetic, train_archive):
        from engine.training import plan_training

        # fusion_tiny's tile is 64 px; the samples are 32 px
        with pytest.raises(MixingError, match="samples are 32 px at most and the model's training tile is 64 px"):
            plan_training("fusion", "fusion_tiny", str(train_archive), num_workers=1,
                          synthetic_archive=synthetic.uri, synthetic_ratio=0.1)


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
