"""The synthesis job: a labelled archive with provenance, resume, identical reruns, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.stores.catalog import read_catalog
from engine.stores.image import open_image
from engine.synth.diffusion.conditions import ConditioningError
from engine.synth.diffusion.job import synthesize
from engine.synth.diffusion.output import PROVENANCE_COLUMNS, SettingsMismatchError, read_provenance
from engine.synth.truth import TRUTH_FILE

REPO = Path(__file__).resolve().parents[3]
# num_cpus=2: at most two tasks at a time on the 4-CPU test Ray, so only two worker
# processes pay torch's import
REQUEST = dict(defect_classes=["crack", "void"], materials=["ferritic_steel"], modalities=["SEM", "optical"],
               steps=3, batch_size=3, seed=7, num_cpus=2)


def _pixels(archive: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for row in read_catalog(archive).itertuples():
        img = open_image(archive / row.uri)
        labels = open_image(archive / row.uri / "labels" / "defects")
        out[row.image_id] = (img.read_region(0, 0, img.shape[0], 0, img.shape[1]),
                             labels.read_region(0, 0, img.shape[0], 0, img.shape[1]))
    return out


@pytest.fixture(scope="module")
def written(ray_session, diffusion_checkpoint, tmp_path_factory):
    path, _ = diffusion_checkpoint
    out = tmp_path_factory.mktemp("synthetic") / "archive"
    summary = synthesize(str(path), out, n_per_condition=3, **REQUEST)
    return out, summary


class TestSynthesisJob:
    def test_writes_a_labelled_archive(self, written, diffusion_checkpoint):
        out, summary = written
        assert summary.planned == summary.written == 12 and not summary.failed
        assert summary.task_resources == {"num_cpus": 2.0, "num_gpus": 0.0}  # no GPU in this cluster
        catalog = read_catalog(out)
        assert len(catalog) == 12
        assert set(catalog["modality"]) == {"SEM", "optical"}
        for row in catalog.itertuples():
            img = open_image(out / row.uri)
            assert img.shape == (32, 32)
            assert np.dtype(img.dtype) == (np.uint8 if row.modality == "optical" else np.uint16)
            assert img.pixel_size[0] == pytest.approx(250.0 if row.modality == "optical" else 2.5)
            labels = open_image(out / row.uri / "labels" / "defects")
            assert labels.shape == (32, 32)

    def test_catalog_records_provenance(self, written, diffusion_checkpoint):
        out, _ = written
        path, digest = diffusion_checkpoint
        prov = read_provenance(out)
        assert set(PROVENANCE_COLUMNS) <= set(prov.columns)
        assert (prov["model_sha256"] == digest).all()
        assert (prov["model_ref"] == path.name).all()
        assert set(prov["defect_class"]) == {"crack", "void"}
        assert (prov["sampler"] == "ddim").all() and (prov["steps"] == 3).all() and (prov["run_seed"] == 7).all()
        assert prov["seed"].nunique() == 12
        assert (prov["source"] == "engine.synth.diffusion").all()
        # the thread count changes a sample's last bits: every task ran with its num_cpus,
        # whichever worker process (started for another task's CPUs) it landed on
        assert (prov["torch_threads"] == REQUEST["num_cpus"]).all()

    def test_provenance_of_archives_before_thread_counts_and_of_plain_archives(self, written, tmp_path):
        import pyarrow.parquet as pq

        from engine.errors import GrainflowError

        out, _ = written
        table = pq.read_table(out / "catalog.parquet")
        older = tmp_path / "older"
        older.mkdir()
        pq.write_table(table.drop_columns(["torch_threads"]), older / "catalog.parquet")
        prov = read_provenance(older)
        assert len(prov) == 12 and prov["torch_threads"].isna().all()
        pq.write_table(table.drop_columns(["sampler"]), older / "catalog.parquet")
        with pytest.raises(GrainflowError, match="not a synthetic archive's catalog.*sampler"):
            read_provenance(older)

    def test_ground_truth_matches_the_masks(self, written):
        out, _ = written
        import pandas as pd

        truth = pd.read_parquet(out / TRUTH_FILE)
        prov = read_provenance(out).set_index("image_id")
        pixels = _pixels(out)
        nonempty = [i for i, (_, lab) in pixels.items() if lab.any()]
        assert sorted(truth["image_id"]) == sorted(nonempty)
        for t in truth.itertuples():
            lab = pixels[t.image_id][1]
            ys, xs = np.nonzero(lab)
            assert (t.y0, t.x0, t.y1, t.x1) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
            assert t.defect_class == prov.loc[t.image_id, "defect_class"]
            assert t.area_px == prov.loc[t.image_id, "mask_pixels"] == (lab == 1).sum()

    def test_rerun_resumes_and_writes_identical_samples(self, written, diffusion_checkpoint, tmp_path):
        out, _ = written
        path, _ = diffusion_checkpoint
        before = _pixels(out)
        # an interrupted run: a fresh archive where only some batches finished
        partial = tmp_path / "partial"
        first = synthesize(str(path), partial, n_per_condition=3, **{**REQUEST, "defect_classes": ["crack"]})
        assert first.written == 6
        resumed = synthesize(str(path), partial, n_per_condition=3, **REQUEST)
        assert resumed.skipped == 6 and resumed.written == 6
        after = _pixels(partial)
        assert after.keys() == before.keys()
        for key in before:
            np.testing.assert_array_equal(after[key][0], before[key][0], err_msg=key)
            np.testing.assert_array_equal(after[key][1], before[key][1], err_msg=key)

    def test_rerun_with_other_settings_is_refused(self, written, diffusion_checkpoint):
        out, _ = written
        path, _ = diffusion_checkpoint
        with pytest.raises(SettingsMismatchError, match="steps: 3 there, 5 now"):
            synthesize(str(path), out, n_per_condition=3, **{**REQUEST, "steps": 5})

    def test_bad_conditioning_fails_before_any_work(self, diffusion_checkpoint, tmp_path):
        path, _ = diffusion_checkpoint
        with pytest.raises(ConditioningError, match="'granite'.*ferritic_steel"):
            synthesize(str(path), tmp_path / "x", n_per_condition=1, materials=["granite"])
        assert not (tmp_path / "x").exists()

    def test_uncalibrated_modalities_and_bad_resources_fail_before_any_work(self, diffusion_checkpoint, tmp_path):
        from engine.errors import GrainflowError
        from engine.models import create_diffusion, save_checkpoint

        sem_only = tmp_path / "sem.safetensors"
        save_checkpoint(create_diffusion("ddpm_tiny", pixel_size_nm={"SEM": 2.5}), sem_only)
        with pytest.raises(GrainflowError, match="no pixel size for TEM.*trained on crops of SEM"):
            synthesize(str(sem_only), tmp_path / "x", n_per_condition=1, modalities=["TEM"])
        path, _ = diffusion_checkpoint
        for bad, match in (({"num_gpus": 1.5}, "num_gpus"), ({"num_cpus": 0}, "num_cpus"), ({"num_cpus": -1}, "num_cpus")):
            with pytest.raises(GrainflowError, match=match):
                synthesize(str(path), tmp_path / "x", n_per_condition=1, **{**REQUEST, **bad})
        assert not (tmp_path / "x").exists()


class TestSynthesizeEntrypoint:
    def test_bad_class_exits_2_naming_the_valid_ones(self, diffusion_checkpoint, tmp_path):
        path, _ = diffusion_checkpoint
        out = tmp_path / "never"
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.synthesize", "--model", str(path), "--out", str(out), "-n", "2",
             "--class", "crack", "--class", "bubble"],
            cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
        assert proc.returncode == 2, proc.stderr
        assert "'bubble'" in proc.stderr and "pore, crack, inclusion, scratch, void" in proc.stderr
        assert "Started a local Ray" not in proc.stderr
        assert not out.exists()

    def test_missing_checkpoint_is_named(self, tmp_path):
        from engine.synth.diffusion.model_source import ModelSourceError

        with pytest.raises(ModelSourceError, match="none.safetensors: no such checkpoint file"):
            synthesize(str(tmp_path / "none.safetensors"), tmp_path / "o", n_per_condition=1)
        assert not (tmp_path / "o").exists()
