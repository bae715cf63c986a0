"""The quality gate on archives whose right answer is known: real crops written as
"generated" samples pass; mislabelled and unlabelled ones are refused with the reason."""

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
    def test_real_crops_pass_and_wrong_ones_are_refused(self, real, tmp_path):
        x, y = real_crops(real, 32, CLASSES)
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
