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
from engine.stores.staging import PARTIAL, sibling_name
from engine.synth.diffusion.conditions import ConditioningError
from engine.synth.diffusion.job import synthesize
from engine.synth.diffusion.output import PROVENANCE_COLUMNS, SettingsMismatchError, read_provenance
from engine.synth.truth import TRUTH_FILE

from .conftest import INTENSITY, TRAINED

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
            labels = open_image(out / row.uri / "labels" / "defects")
            assert labels.shape == (32, 32)
        assert summary.untrained == []  # every combination asked for was trained

    def test_samples_have_the_pixel_size_of_real_crops_of_their_condition(self, written):
        # crack crops were read at a coarser level than the modality's typical crop
        # (conftest.PIXEL_SIZE_NM): a crack sample is written at their scale, and its
        # ground truth measures it at that scale too
        import pandas as pd

        out, _ = written
        expected = {("crack", "SEM"): 10.0, ("void", "SEM"): 2.5, ("crack", "optical"): 250.0,
                    ("void", "optical"): 250.0}
        prov = read_provenance(out).set_index("image_id")
        truth = pd.read_parquet(out / TRUTH_FILE).set_index("image_id")
        for row in read_catalog(out).itertuples():
            px = expected[(prov.loc[row.image_id, "defect_class"], row.modality)]
            assert open_image(out / row.uri).pixel_size == pytest.approx((px, px)), row.image_id
            assert row.pixel_size_x == pytest.approx(px)
            if row.image_id in truth.index:
                t = truth.loc[row.image_id]
                assert t.pixel_size_nm == pytest.approx(px)
                assert t.area_nm2 == pytest.approx(t.area_px * px * px)
                assert (t.y1_nm - t.y0_nm) == pytest.approx((t.y1 - t.y0) * px)

    def test_samples_have_the_grey_levels_of_real_crops_of_their_condition(self, written):
        # the model's [0, 1] maps onto the recorded p1..p99 of real crops (as fractions
        # of full scale), the most specific key the model has for the condition
        out, _ = written
        expected = {("crack", "SEM"): INTENSITY["crack.ferritic_steel.SEM"],
                    ("void", "SEM"): INTENSITY["ferritic_steel.SEM"],
                    ("crack", "optical"): INTENSITY["optical"], ("void", "optical"): INTENSITY["optical"]}
        prov = read_provenance(out).set_index("image_id")
        for image_id, (pixels, _) in _pixels(out).items():
            row = prov.loc[image_id]
            lo, hi = expected[(row.defect_class, row.modality)]
            top = np.iinfo(pixels.dtype).max
            assert lo * top - 1 <= pixels.min() and pixels.max() <= hi * top + 1, image_id
            p1, p99 = np.percentile(pixels, [1, 99]) / top
            assert p99 - p1 > 0.3 * (hi - lo), (image_id, p1, p99)  # the range is used, not a sliver of it

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
        # ... and was killed writing its next sample, leaving a hidden half-written folder
        leftover = partial / "images" / sibling_name("s-unfinished.ome.zarr", PARTIAL)  # its lock not held
        (leftover / "0").mkdir(parents=True)
        resumed = synthesize(str(path), partial, n_per_condition=3, **REQUEST)
        assert resumed.skipped == 6 and resumed.written == 6
        assert not leftover.exists()
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

    def test_rerun_with_another_thread_count_is_refused(self, written, diffusion_checkpoint):
        # torch's thread count changes a sample's last bits: it is a setting like steps
        import json

        out, _ = written
        path, _ = diffusion_checkpoint
        settings = json.loads((out / "synthesis.json").read_text())
        assert settings["torch_threads"] == 2 and settings["device"] == "cpu"
        with pytest.raises(SettingsMismatchError, match="torch_threads: 2 there, 1 now"):
            synthesize(str(path), out, n_per_condition=3, **{**REQUEST, "num_cpus": 1})
        with pytest.raises(SettingsMismatchError, match="torch_threads: 2 there, 3 now"):
            synthesize(str(path), out, n_per_condition=3, **REQUEST, threads=3)

    def test_rerun_on_another_device_is_refused(self, written, diffusion_checkpoint, monkeypatch):
        import engine.runtime as runtime

        out, _ = written
        path, _ = diffusion_checkpoint
        monkeypatch.setattr(runtime, "gpu_shortfall", lambda needed: None)  # as if an autoscaler adds GPUs
        # a GPU request makes the tasks compute on CUDA: other pixels than the CPU wrote
        with pytest.raises(SettingsMismatchError, match="device: 'cpu' there, 'cuda' now"):
            synthesize(str(path), out, n_per_condition=3, **REQUEST, num_gpus=0.5)

    def test_gpus_the_cluster_has_not_and_cannot_get_are_refused(self, ray_session, diffusion_checkpoint,
                                                                  tmp_path, monkeypatch):
        """Tasks asking for a GPU no node has, on a cluster no autoscaler grows, would wait
        forever: refused before any task, naming num_gpus, on the session's CPU-only Ray."""
        from engine.errors import GrainflowError
        from engine.runtime import GPU_AUTOSCALING_ENV
        from tests.gpu_refusal import NO_GPU, PROMPTLY_S, raised_within

        if ray_session.cluster_resources().get("GPU"):
            pytest.skip("the session's Ray has GPUs; this test needs a CPU-only cluster")
        monkeypatch.delenv(GPU_AUTOSCALING_ENV, raising=False)
        path, _ = diffusion_checkpoint
        error = raised_within(PROMPTLY_S, lambda: synthesize(str(path), tmp_path / "out", n_per_condition=1,
                                                             **REQUEST, num_gpus=0.5))
        assert isinstance(error, GrainflowError), error
        assert str(error) == (f"num_gpus (--num-gpus): each synthesis task asks for 0.5 GPU but {NO_GPU}; "
                              "run on CPUs (num_gpus=0, --num-gpus 0)")
        assert not (tmp_path / "out").exists()

    def test_a_task_that_cannot_use_the_recorded_device_refuses(self, ray_session, diffusion_checkpoint, tmp_path):
        from engine.errors import GrainflowError
        from engine.synth.diffusion.conditions import Condition
        from engine.synth.diffusion.job import generate_batch
        from engine.synth.diffusion.plan import plan_synthesis

        path, digest = diffusion_checkpoint
        batch = plan_synthesis([Condition("void", "ferritic_steel", "SEM")], 1, seed=0, batch_size=1)[0]
        with pytest.raises(GrainflowError, match="computed on cuda, and this task can use cpu only"):
            generate_batch(path.read_bytes(), digest, batch, str(tmp_path / "o"), {}, 1, "ddim", device="cuda")

    def test_more_samples_keep_the_ones_written(self, ray_session, diffusion_checkpoint, tmp_path):
        # a sample's bits depend on the batch it is computed in: n=2 then n=3 (batch 4)
        # must compute both in the same window, and never rewrite the first two
        path, _ = diffusion_checkpoint
        one = dict(REQUEST, defect_classes=["void"], modalities=["SEM"], batch_size=4)
        grown, fresh = tmp_path / "grown", tmp_path / "fresh"
        assert synthesize(str(path), grown, n_per_condition=2, **one).written == 2
        before = _pixels(grown)
        checksums = read_catalog(grown).set_index("image_id")["checksum"].to_dict()
        again = synthesize(str(path), grown, n_per_condition=3, **one)
        assert (again.written, again.skipped) == (1, 2)
        synthesize(str(path), fresh, n_per_condition=3, **one)
        after, reference = _pixels(grown), _pixels(fresh)
        assert after.keys() == reference.keys() and len(after) == 3
        for key in before:
            np.testing.assert_array_equal(after[key][0], before[key][0], err_msg=key)
        for key in after:
            np.testing.assert_array_equal(after[key][0], reference[key][0], err_msg=key)
            np.testing.assert_array_equal(after[key][1], reference[key][1], err_msg=key)
        new_checksums = read_catalog(grown).set_index("image_id")["checksum"].to_dict()
        assert {k: new_checksums[k] for k in checksums} == checksums
        assert new_checksums == read_catalog(fresh).set_index("image_id")["checksum"].to_dict()

    def test_a_real_archive_is_refused_before_anything_is_written(self, diffusion_checkpoint, tmp_path):
        from engine.errors import GrainflowError
        from engine.synth.archive import generate_archive

        path, _ = diffusion_checkpoint
        real = tmp_path / "real"
        generate_archive(real, n_images=1, seed=0, size=64, chunk=64)
        before = sorted(p.name for p in real.iterdir())
        with pytest.raises(GrainflowError, match="not a synthetic archive's catalog"):
            synthesize(str(path), real, n_per_condition=1, **REQUEST)
        assert sorted(p.name for p in real.iterdir()) == before, "no synthesis.json left in a real archive"

    def test_bad_conditioning_fails_before_any_work(self, diffusion_checkpoint, tmp_path):
        path, _ = diffusion_checkpoint
        with pytest.raises(ConditioningError, match="'granite'.*ferritic_steel"):
            synthesize(str(path), tmp_path / "x", n_per_condition=1, materials=["granite"])
        assert not (tmp_path / "x").exists()

    def test_uncalibrated_modalities_and_bad_resources_fail_before_any_work(self, diffusion_checkpoint, tmp_path):
        from engine.errors import GrainflowError
        from engine.models import create_diffusion, save_checkpoint

        sem_only = tmp_path / "sem.safetensors"
        save_checkpoint(create_diffusion("ddpm_tiny", pixel_size_nm={"SEM": 2.5},
                                         trained_conditions=["pore.ferritic_steel.SEM", "pore.ferritic_steel.TEM"]),
                        sem_only)
        with pytest.raises(GrainflowError, match="no pixel size for TEM.*trained on crops of SEM"):
            synthesize(str(sem_only), tmp_path / "x", n_per_condition=1, modalities=["TEM"])
        path, _ = diffusion_checkpoint
        for bad, match in (({"num_gpus": 1.5}, "num_gpus"), ({"num_cpus": 0}, "num_cpus"), ({"num_cpus": -1}, "num_cpus")):
            with pytest.raises(GrainflowError, match=match):
                synthesize(str(path), tmp_path / "x", n_per_condition=1, **{**REQUEST, **bad})
        assert not (tmp_path / "x").exists()




class TestWrittenSample:
    """One sample is one defect: the label image and the truth row are the mask's largest
    connected part (engine.synth.diffusion.output.write_sample)."""

    @staticmethod
    def _write(tmp_path, mask):
        from engine.stores.uri import resolve
        from engine.synth.diffusion.conditions import Condition
        from engine.synth.diffusion.output import write_sample
        from engine.synth.diffusion.plan import PlannedSample

        image = np.where(mask, 0.1, 0.6).astype(np.float32)
        sample = PlannedSample("syn-pore-0", Condition("pore", "ferritic_steel", "SEM"), 0, 1)
        record, truth = write_sample(resolve(tmp_path / "syn"), sample, image, mask, pixel_size_nm=2.5,
                                     provenance={})
        labels = open_image(tmp_path / "syn" / "images" / "syn-pore-0.ome.zarr" / "labels" / "defects")
        return record, truth, labels.read_region(0, 0, 32, 0, 32)

    def test_a_stray_speck_is_left_out_of_label_and_box(self, tmp_path):
        # one far pixel stretched the 6 x 6 pore's box to 19 x 17 (the detector learnt that box)
        mask = np.zeros((32, 32), bool)
        mask[12:18, 12:18] = True
        mask[30, 1] = True
        record, truth, labels = self._write(tmp_path, mask)
        blob = np.zeros((32, 32), bool)
        blob[12:18, 12:18] = True
        np.testing.assert_array_equal(labels == 1, blob)
        assert not (labels > 1).any()
        assert (truth.y0, truth.x0, truth.y1, truth.x1) == (12, 12, 18, 18)
        assert truth.area_px == record["mask_pixels"] == 36

    def test_a_thin_diagonal_crack_stays_one_defect(self, tmp_path):
        mask = np.zeros((32, 32), bool)
        idx = np.arange(4, 24)
        mask[idx, idx] = True  # touching at corners only
        mask[2:4, 28:30] = True  # a 2 x 2 speck
        _, truth, labels = self._write(tmp_path, mask)
        assert (labels == 1).sum() == 20 and not labels[2:4, 28:30].any()
        assert (truth.y0, truth.x0, truth.y1, truth.x1) == (4, 4, 24, 24)


class TestTrainedConditions:
    """Only the conditions training saw are generated (conftest.TRAINED)."""

    def test_by_default_every_trained_condition_and_only_those(self, diffusion_checkpoint):
        from engine.synth.diffusion.job import prepare

        path, _ = diffusion_checkpoint
        request = prepare(str(path), n_per_condition=1)
        assert sorted(c.key() for c in request.conditions) == sorted(TRAINED)

    def test_an_untrained_condition_is_refused_naming_the_trained_ones(self, diffusion_checkpoint, tmp_path):
        path, _ = diffusion_checkpoint
        with pytest.raises(ConditioningError, match="none with defect class 'scratch'.*trained on these conditions"
                                                    r".*crack\.ferritic_steel\.SEM") as err:
            synthesize(str(path), tmp_path / "x", n_per_condition=1, defect_classes=["scratch"],
                       materials=["porous_ceramic"], modalities=["SEM"])
        assert all(key in str(err.value) for key in TRAINED)
        # a known material the model never saw with any class asked for
        with pytest.raises(ConditioningError, match="none with material 'martensite'"):
            synthesize(str(path), tmp_path / "x", n_per_condition=1, defect_classes=["crack"],
                       materials=["ferritic_steel", "martensite"])
        assert not (tmp_path / "x").exists()

    def test_untrained_combinations_of_trained_names_are_left_out(self, diffusion_checkpoint):
        from engine.synth.diffusion.job import prepare

        path, _ = diffusion_checkpoint
        request = prepare(str(path), n_per_condition=1, defect_classes=["pore", "crack"],
                          materials=["ferritic_steel"], modalities=["SEM", "optical"])
        assert [c.key() for c in request.conditions] == [
            "crack.ferritic_steel.SEM", "crack.ferritic_steel.optical", "pore.ferritic_steel.SEM"]
        assert [c.key() for c in request.untrained] == ["pore.ferritic_steel.optical"]

    def test_a_model_saved_before_they_were_recorded_still_works_with_a_warning(self, tmp_path):
        from engine.models import create_diffusion, save_checkpoint
        from engine.synth.diffusion.conditions import UntrainedConditionsWarning
        from engine.synth.diffusion.job import prepare

        older = tmp_path / "older.safetensors"
        save_checkpoint(create_diffusion("ddpm_tiny", pixel_size_nm={"SEM": 2.5}), older)
        with pytest.warns(UntrainedConditionsWarning, match="does not record the conditions it was trained on"):
            request = prepare(str(older), n_per_condition=1, modalities=["SEM"])
        assert len(request.conditions) == 5 * 12  # its whole vocabulary in SEM, as before


class TestSamplingSteps:
    @pytest.mark.parametrize("sampler,steps", [("ddim", 1001), ("dpm", 1000)])
    def test_more_steps_than_the_schedule_fail_before_any_work(self, diffusion_checkpoint, tmp_path, sampler, steps):
        from engine.errors import GrainflowError

        path, _ = diffusion_checkpoint
        with pytest.raises(GrainflowError, match=f"steps must be at most {steps - 1} for the {sampler} sampler on "
                                                 f"the model's 1000 training timesteps.*got {steps}"):
            synthesize(str(path), tmp_path / "x", n_per_condition=1, **{**REQUEST, "steps": steps, "sampler": sampler})
        assert not (tmp_path / "x").exists(), "no settings recorded for a run that cannot start"

    def test_the_entrypoint_exits_2_on_too_many_steps(self, diffusion_checkpoint, tmp_path, capsys):
        from jobs.synthesize import main

        path, _ = diffusion_checkpoint
        assert main(["--model", str(path), "--out", str(tmp_path / "x"), "-n", "1", "--class", "crack",
                     "--material", "ferritic_steel", "--modality", "SEM", "--steps", "1001"]) == 2
        assert "steps must be at most 1000 for the ddim sampler" in capsys.readouterr().err
        assert not (tmp_path / "x").exists()

    def test_nan_samples_fail_their_batch_and_a_corrected_rerun_takes_the_empty_archive(
            self, ray_session, diffusion_checkpoint, tmp_path):
        import json

        import torch

        from engine.models import create_diffusion, save_checkpoint

        broken = tmp_path / "broken.safetensors"
        model = create_diffusion("ddpm_tiny", pixel_size_nm={"SEM": 2.5}, trained_conditions=TRAINED)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        save_checkpoint(model, broken)
        one = dict(REQUEST, defect_classes=["void"], modalities=["SEM"], batch_size=2)
        out = tmp_path / "archive"
        failed = synthesize(str(broken), out, n_per_condition=2, **one)
        assert failed.written == 0 and len(failed.failed) == 1
        assert "NaN" in next(iter(failed.failed.values()))
        assert len(read_catalog(out)) == 0, "no blank sample with an empty mask is written"
        # the archive holds no sample: the settings of the failed run do not bind it
        path, digest = diffusion_checkpoint
        fixed = synthesize(str(path), out, n_per_condition=2, **{**one, "steps": 4})
        assert fixed.written == 2 and not fixed.failed
        settings = json.loads((out / "synthesis.json").read_text())
        assert settings["model_sha256"] == digest and settings["steps"] == 4
        with pytest.raises(SettingsMismatchError, match="steps: 4 there, 3 now"):  # now it holds samples
            synthesize(str(path), out, n_per_condition=2, **one)


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

    def test_gate_only_needs_a_real_archive_and_no_model(self, tmp_path, capsys):
        from jobs.synthesize import main, parse_args

        with pytest.raises(SystemExit) as exit_:
            parse_args(["--gate-only", "--out", "x"])
        assert exit_.value.code == 2 and "--gate-only needs --gate-real" in capsys.readouterr().err
        with pytest.raises(SystemExit) as exit_:
            parse_args(["--out", "x", "-n", "2"])
        assert exit_.value.code == 2 and "--model and -n/--samples are required" in capsys.readouterr().err
        # a folder that is no synthetic archive (a typo) is named, not "gated" with 0 samples
        assert main(["--gate-only", "--out", str(tmp_path / "syn"), "--gate-real", str(tmp_path / "real")]) == 2
        assert "syn: no catalog.parquet" in capsys.readouterr().err
        assert not (tmp_path / "syn").exists()

    def test_missing_checkpoint_is_named(self, tmp_path):
        from engine.synth.diffusion.model_source import ModelSourceError

        with pytest.raises(ModelSourceError, match="none.safetensors: no such checkpoint file"):
            synthesize(str(tmp_path / "none.safetensors"), tmp_path / "o", n_per_condition=1)
        assert not (tmp_path / "o").exists()


def test_the_entrypoint_leaves_a_ray_it_did_not_start(ray_session, tmp_path):
    """Called in a process already connected to Ray (a notebook, a test session), a job
    entrypoint leaves that Ray as it was, even when it fails."""
    from jobs.finetune import main as finetune
    from jobs.synthesize import main as synthesize

    assert synthesize(["--gate-only", "--out", str(tmp_path / "nothing"), "--gate-real", str(tmp_path / "no")]) == 2
    assert finetune(["--model", "fusion:fusion_tiny", "--archive", str(tmp_path / "no"), "--storage",
                     str(tmp_path / "runs")]) == 2
    assert ray_session.is_initialized()
