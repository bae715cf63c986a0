"""The quality gate on archives whose right answer is known: real crops written as
"generated" samples pass; mislabelled, unlabelled, blank and collapsed ones are refused
with the reason."""

from __future__ import annotations

import numpy as np
import pytest

from engine.models import labels
from engine.stores.uri import resolve
from engine.synth.archive import generate_archive
from engine.synth.diffusion.conditions import Condition
from engine.synth.diffusion.gate import gate_archive, real_crops
from engine.synth.diffusion.output import read_rejects, write_index, write_sample
from engine.synth.diffusion.plan import PlannedSample
from engine.training.mixing import accepted_image_ids

CLASSES = labels.defect_class_names()


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "real"
    generate_archive(out, n_images=8, seed=3, size=512, chunk=256)  # 35 defects, 7 pores
    return out


@pytest.fixture(scope="module")
def crops(real):
    """(N x 2 x 32 x 32 patches in [-1, 1], N class indices) of the real archive's defects."""
    return real_crops(real, 32, CLASSES)


def _as_synthetic(out, patches, classes):
    """Write (image, mask) patches as a synthetic archive requesting `classes`."""
    archive = resolve(out)
    records, truth = [], []
    for i, (p, cls) in enumerate(zip(patches, classes)):
        s = PlannedSample(f"s{i:03d}", Condition(cls, "ferritic_steel", "SEM"), i, i)
        rec, t = write_sample(archive, s, (p[0] + 1) / 2, p[1] > 0, pixel_size_nm=1.0,
                              provenance={"model_ref": "test", "model_sha256": "0" * 64, "sampler": "ddim",
                                          "steps": 1, "run_seed": 0, "condition_index": 0})
        records.append(rec)
        truth += [t] if t is not None else []
    write_index(archive, records, truth)


class TestGate:
    def test_real_crops_pass_and_wrong_ones_are_refused(self, real, crops, tmp_path):
        x, y = crops
        assert len(x) > 20 and x.shape[1:] == (2, 32, 32)
        # a crack requested where the patch is a pore, and a sample with an empty mask
        pore, crack = CLASSES.index("pore"), CLASSES.index("crack")
        assert (y == pore).sum() >= 3 and (y == crack).sum() >= 3
        good = list(np.flatnonzero(y == pore)[:-1])
        wrong = int(np.flatnonzero(y == pore)[-1])
        empty = x[good[0]].copy()
        empty[1] = -1.0
        patches = np.stack([*x[good], x[wrong], empty])
        requested = ["pore"] * len(good) + ["crack", "pore"]
        _as_synthetic(tmp_path / "syn", patches, requested)

        report = gate_archive(tmp_path / "syn", real, epochs=30)
        rejects = read_rejects(tmp_path / "syn").set_index("image_id")
        wrong_id, empty_id = f"s{len(good):03d}", f"s{len(good) + 1:03d}"
        assert rejects.loc[empty_id, "reason"].startswith("empty mask")
        assert rejects.loc[wrong_id, "reason"].startswith("classifier disagrees: predicted pore")
        assert report.samples == len(patches)
        assert report.classifier_accuracy > 0.7
        passed = [f"s{i:03d}" for i in range(len(good))]
        assert sum(p not in rejects.index for p in passed) >= 0.75 * len(passed)
        # real pore crops are no further from real pores than other classes are
        assert np.isfinite(report.kid["pore"]) and report.kid["pore"] < report.kid_reference["pore"]
        accepted = accepted_image_ids(tmp_path / "syn")
        assert wrong_id not in accepted and empty_id not in accepted
        assert len(accepted) == report.accepted

    @pytest.mark.parametrize("cls", ["pore", "crack", "inclusion"])
    def test_a_blank_or_noise_image_under_a_real_mask_is_refused(self, real, crops, tmp_path, cls):
        # the defect-shaped mask of a real crop, over an image showing nothing
        x, y = crops
        masks = x[y == CLASSES.index(cls), 1][:6]
        rng = np.random.default_rng(0)
        blank = np.stack([np.zeros_like(masks), masks], axis=1)  # mid grey in [-1, 1]
        noise = np.stack([rng.uniform(-1, 1, masks.shape).astype(np.float32), masks], axis=1)
        _as_synthetic(tmp_path / "syn", np.concatenate([blank, noise]), [cls] * (2 * len(masks)))
        report = gate_archive(tmp_path / "syn", real, epochs=5)  # the contrast check needs no trained classifier
        assert report.accepted == 0 and accepted_image_ids(tmp_path / "syn") == []
        rejects = read_rejects(tmp_path / "syn")
        assert len(rejects) == report.samples
        assert rejects["reason"].str.startswith("no contrast: the image inside the mask stands out").all()

    def test_the_class_is_judged_from_the_image_not_the_mask(self, real, crops, tmp_path):
        # inclusion images under pore masks, asked for as pores: none is a pore
        x, y = crops
        pores, inclusions = x[y == CLASSES.index("pore")], x[y == CLASSES.index("inclusion")]
        n = min(len(pores), len(inclusions))
        swapped = np.stack([inclusions[:n, 0], pores[:n, 1]], axis=1)
        _as_synthetic(tmp_path / "syn", swapped, ["pore"] * n)
        report = gate_archive(tmp_path / "syn", real)
        assert report.accepted == 0
        rejects = read_rejects(tmp_path / "syn")
        judged = rejects[rejects["reason"].str.startswith("classifier disagrees")]
        assert (judged["predicted_class"] != "pore").all()
        assert set(rejects["reason"].str.split(":").str[0]) <= {"classifier disagrees", "no contrast"}

    def test_the_classifier_does_not_read_the_mask(self, crops):
        from engine.synth.diffusion.crop_classifier import predict, train_crop_classifier

        x, y = crops
        clf = train_crop_classifier(x, y, len(CLASSES), seed=0)
        other_masks = x.copy()
        other_masks[:, 1] = np.roll(x[:, 1], 1, axis=0)  # each image under another crop's mask
        for a, b in zip(predict(clf, x), predict(clf, other_masks)):
            np.testing.assert_array_equal(a, b)

    def test_samples_collapsed_onto_one_crop_are_refused_by_kid(self, real, crops, tmp_path):
        # every "generated" crack is a copy of one real crack: each looks real (the
        # classifier agrees), the set does not look like real cracks
        from engine.synth.diffusion.crop_classifier import predict, train_crop_classifier
        from engine.synth.diffusion.kid import kid

        x, y = crops
        cracks = x[y == CLASSES.index("crack")]
        _, feats = predict(train_crop_classifier(x, y, len(CLASSES), seed=0), cracks)
        # the crack least like the others, as the gate's classifier (same seed) sees them
        far = int(np.argmax([kid(np.repeat(f[None], len(feats), 0), feats) for f in feats]))
        _as_synthetic(tmp_path / "syn", np.repeat(cracks[far:far + 1], len(cracks), 0), ["crack"] * len(cracks))
        report = gate_archive(tmp_path / "syn", real, seed=0)
        assert report.accepted == 0 and report.kid["crack"] > report.kid_reference["crack"]
        rejects = read_rejects(tmp_path / "syn")
        assert rejects["reason"].str.startswith("kid: ").all()
        assert (rejects["predicted_class"] == "crack").all()

    def test_the_same_seed_gives_the_same_verdicts(self, real, crops, tmp_path):
        x, y = crops
        pores = x[y == CLASSES.index("pore")]
        blank = pores.copy()
        blank[:, 0] = 0.0
        _as_synthetic(tmp_path / "syn", np.concatenate([pores, blank]), ["pore"] * (2 * len(pores)))
        first = gate_archive(tmp_path / "syn", real, seed=5)
        first_rejects = read_rejects(tmp_path / "syn")
        second = gate_archive(tmp_path / "syn", real, seed=5)
        assert first == second
        assert first_rejects.equals(read_rejects(tmp_path / "syn"))


@pytest.fixture(scope="module")
def real_without_scratch(real, tmp_path_factory):
    """`real` with every scratch left out of its ground truth: a class with no real crop."""
    import shutil

    import pyarrow.parquet as pq
    import pyarrow.compute as pc

    out = tmp_path_factory.mktemp("gate") / "no-scratch"
    shutil.copytree(real, out)
    truth = pq.read_table(out / "ground_truth.parquet")
    pq.write_table(truth.filter(pc.not_equal(truth["defect_class"], "scratch")), out / "ground_truth.parquet")
    return out


class TestGateRecords:
    def test_no_real_crops_and_unmeasurable_kid_are_named(self, real_without_scratch, tmp_path):
        from engine.synth.diffusion.output import read_gate_record

        x, y = real_crops(real_without_scratch, 32, CLASSES)
        pore = CLASSES.index("pore")
        assert not (y == CLASSES.index("scratch")).any() and (y == pore).sum() >= 3
        first_pore = int(np.flatnonzero(y == pore)[0])
        # one pore sample (KID needs two) and a scratch, of which the real archive has none
        _as_synthetic(tmp_path / "syn", np.stack([x[first_pore], x[first_pore]]), ["pore", "scratch"])
        report = gate_archive(tmp_path / "syn", real_without_scratch, epochs=30)
        rejects = read_rejects(tmp_path / "syn").set_index("image_id")
        assert rejects.loc["s001", "reason"] == (f"no real crops: {real_without_scratch} has no real crops of scratch "
                                                 "to compare with")
        assert "s000" not in rejects.index, "a real pore crop is a pore"
        assert np.isnan(report.kid["pore"])
        assert report.kid_unchecked["pore"].startswith("KID not measurable (1 passing samples")
        record = read_gate_record(tmp_path / "syn")
        assert record["kid_unchecked"] == report.kid_unchecked
        assert sorted(record["judged"]) == ["s000", "s001"] and record["accepted"] == ["s000"]
        assert accepted_image_ids(tmp_path / "syn") == ["s000"]
