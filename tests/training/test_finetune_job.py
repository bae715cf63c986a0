"""jobs.finetune as a process of its own, joining the test session's Ray like a submitted job.

It trains the classifier (resnet10t) for one epoch on 2 CPU workers: this is also the
classifier's Ray Train test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import math
from pathlib import Path

import pytest

from jobs.finetune import parse_args

ROOT = Path(__file__).resolve().parents[2]


class TestArguments:
    def test_model_must_be_family_and_name(self, capsys):
        with pytest.raises(SystemExit):
            parse_args(["--model", "fusion_tiny", "--archive", "a", "--storage", "s"])
        assert "FAMILY:NAME" in capsys.readouterr().err

    def test_promote_needs_register(self, capsys):
        with pytest.raises(SystemExit):
            parse_args(["--model", "fusion:fusion_tiny", "--archive", "a", "--storage", "s", "--promote"])
        assert "--promote needs --register" in capsys.readouterr().err


    def test_ray_train_options_are_refused_for_the_detector(self, capsys):
        with pytest.raises(SystemExit):
            parse_args(["--model", "detector:yolov8n_tiny", "--archive", "a", "--storage", "s", "--augment", "0",
                        "--workers", "4"])
        assert "--workers, --augment: Ray Train options" in capsys.readouterr().err
        with pytest.raises(SystemExit):  # Ultralytics fine-tunes from its own .pt files, not these options
            parse_args(["--model", "detector:yolov8n_tiny", "--archive", "a", "--storage", "s",
                        "--train-only", "model.22"])
        assert "--train-only: Ray Train options" in capsys.readouterr().err
        args = parse_args(["--model", "fusion:fusion_tiny", "--archive", "a", "--storage", "s"])
        assert (args.workers, args.augment, args.lr_schedule, args.max_failures) == (2, 0.5, "cosine", 2)

    @pytest.mark.parametrize("bad, words", [
        (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--max-failures", "-1"], "--max-failures must be >= 0 (Ray Train would read -1 as unlimited)"),
        (["--tile", "0"], "--tile must be >= 1 pixel"),
        (["--init-sha256", "ab" * 32], "--init-sha256 needs --init-weights FILE"),
        (["--storage", "http://host/runs"], "--storage must be a local path, file:// or s3:// URI"),
        (["--storage", "gs://bucket/runs"], "--storage must be a local path, file:// or s3:// URI"),
    ])
    def test_values_ray_would_misread_are_refused(self, capsys, bad, words):
        """-1 failures is unlimited restarts to Ray Train, --tile 0 was the default tile, a
        bad learning rate or storage failed only once Ray had started."""
        with pytest.raises(SystemExit) as info:
            parse_args(["--model", "fusion:fusion_tiny", "--archive", "a", "--storage", "s", *bad])
        assert info.value.code == 2 and words in capsys.readouterr().err

    def test_detector_name_and_archive_are_checked_before_ray(self, monkeypatch, capsys, tmp_path):
        """A bad --register name was found after the whole training, a bad --archive
        once the Ray task ran."""
        import engine.training.detector as detector
        import engine.training.trainer as trainer
        from engine.synth.archive import generate_archive
        from jobs import finetune

        def started(*args, **kwargs):
            raise AssertionError("Ray started")

        monkeypatch.setattr(trainer, "ensure_ray", started)
        monkeypatch.setattr(detector, "train_detector_on_ray", started)
        import engine.models as M

        generate_archive(tmp_path / "a", n_images=2, seed=0, size=128, chunk=64)
        small = tmp_path / "yolov8n_tiny.safetensors"
        M.save_checkpoint(M.create_detector("yolov8n_tiny"), small)
        for bad, words in ((["--register", "yolo/prod"], "bad model name 'yolo/prod'"),
                           (["--archive", str(tmp_path / "nope")], "nope: no catalog.parquet"),
                           (["--val-archive", str(tmp_path / "nope")], "nope: no catalog.parquet"),
                           (["--init-weights", str(tmp_path / "none.pt")], "none.pt: no such file"),
                           (["--init-weights", str(small), "--model", "detector:yolov8s"],
                            "only 1% of this detector's weights fit those of the file's 'yolov8n_tiny'")):
            argv = ["--model", "detector:yolov8n_tiny", "--archive", str(tmp_path / "a"), "--storage",
                    str(tmp_path / "runs"), "--batch-size", "4", *bad]
            assert finetune.main(argv) == 2
            assert words in capsys.readouterr().err

    @pytest.mark.parametrize("model", ["detector:yolov8n_tiny", "fusion:fusion_tiny"])
    def test_a_real_archive_as_synthetic_is_named_before_ray(self, monkeypatch, capsys, tmp_path, model):
        """It was named as a synthetic archive never gated (gate it, the message said), and
        for the detector only by the Ray task, ~30 s after Ray started."""
        import engine.training.detector as detector
        import engine.training.trainer as trainer
        from engine.synth.archive import generate_archive
        from jobs import finetune

        def started(*args, **kwargs):
            raise AssertionError("Ray started")

        monkeypatch.setattr(trainer, "ensure_ray", started)
        monkeypatch.setattr(detector, "train_detector_on_ray", started)
        generate_archive(tmp_path / "a", n_images=2, seed=0, size=128, chunk=64)
        argv = ["--model", model, "--archive", str(tmp_path / "a"), "--storage", str(tmp_path / "runs"),
                "--batch-size", "4", "--synthetic", str(tmp_path / "a")]
        assert finetune.main(argv) == 2
        err = capsys.readouterr().err
        assert ("a: not a synthetic archive (its catalog has no diffusion provenance); pass a `grainflow "
                "synthesize` output") in err
        assert "quality gate" not in err

    def test_bad_detector_arguments_exit_2_before_ray_starts(self, tmp_path):
        from engine.synth.archive import generate_archive

        generate_archive(tmp_path / "a", n_images=2, seed=0, size=128, chunk=64)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        cases = ((["--tile", "100"], "multiple of 32"), (["--val-fraction", "0"], "val_fraction"))
        # Both jobs at once: each is mostly a Python start-up importing torch and Ray on
        # one core, so one after the other would leave the second core idle.
        running = [(words, subprocess.Popen(
            [sys.executable, "-m", "jobs.finetune", "--model", "detector:yolov8n_tiny", "--archive",
             str(tmp_path / "a"), "--storage", str(tmp_path / "runs"), *bad],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)) for bad, words in cases]
        try:
            for words, proc in running:
                _, stderr = proc.communicate(timeout=120)
                assert proc.returncode == 2 and words in stderr, stderr[-2000:]
                assert "Started a local Ray" not in stderr
        finally:
            for _, proc in running:  # one that failed an assertion or hung must not outlive the test
                proc.kill()
                proc.wait()


class TestFinetuneJob:
    def test_runs_and_prints_a_json_summary(self, ray_session, train_archive, tracking_uri, tmp_path):
        env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
        cmd = [sys.executable, "-m", "jobs.finetune", "--model", "classifier:resnet10t",
               "--archive", str(train_archive), "--storage", str(tmp_path / "runs"), "--epochs", "1",
               "--workers", "2", "--batch-size", "8", "--tracking-uri", tracking_uri,
               "--register", "clf-job", "--promote", "--max-samples-per-image", "3"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["model"] == "resnet10t" and summary["epochs"] == 1
        assert summary["model_version"] == "clf-job/1" and summary["aliases"] == ["production"]
        assert Path(summary["checkpoint"]).is_dir() and len(summary["sha256"]) == 64
        assert summary["train_samples"] + summary["val_samples"] == 12
        assert summary["cached"] is True  # --cache auto: a dozen tiles fit the object store
        m = summary["metrics"]
        assert {"train_loss", "train_material_acc", "train_grade_acc", "val_loss", "val_material_acc"} <= set(m)
        assert all(math.isfinite(v) for v in m.values())

    def test_bad_input_exits_2_naming_it(self, tmp_path):
        cmd = [sys.executable, "-m", "jobs.finetune", "--model", "fusion:fusion_huge",
               "--archive", str(tmp_path), "--storage", str(tmp_path / "runs")]
        # the model name is checked before any Ray starts
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "fusion_huge" in proc.stderr and "fusion_tiny" in proc.stderr
