"""Archive and checkpoints on S3 (moto's server): the job reads tiles from the bucket in Ray
tasks and Ray Train writes each epoch's checkpoint there.

Slow: the job runs in a process of its own with its own local Ray, so that every Ray
process inherits the AWS_* settings pointing at moto (the session's Ray started before them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.synth.archive import generate_archive

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
class TestS3Storage:
    def test_archive_and_checkpoints_in_a_bucket(self, s3_endpoint, s3_bucket, tracking_uri):
        import s3fs

        archive = f"{s3_bucket}/archive"
        generate_archive(archive, n_images=4, seed=7, size=256, chunk=128)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        cmd = [sys.executable, "-m", "jobs.finetune", "--model", "classifier:resnet10t", "--archive", archive,
               "--storage", f"{s3_bucket}/runs", "--epochs", "2", "--workers", "2", "--batch-size", "8",
               "--tracking-uri", tracking_uri, "--max-samples-per-image", "3", "--run-name", "s3run"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["checkpoint"] == f"{s3_bucket}/runs/s3run/epoch_0002"
        fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
        for epoch in (1, 2):
            assert fs.exists(f"{s3_bucket}/runs/s3run/epoch_{epoch:04d}/model.safetensors")


class TestStorageResolution:
    def test_local_paths_become_absolute(self, tmp_path, monkeypatch):
        from engine.training.trainer import _storage

        monkeypatch.chdir(tmp_path)
        assert _storage("runs") == (str(tmp_path / "runs"), None, "")
        assert _storage(f"file://{tmp_path}/x") == (str(tmp_path / "x"), None, "")

    def test_engine_config_endpoint_gives_an_explicit_filesystem(self, tmp_path, monkeypatch):
        import pyarrow.fs

        from engine.training.trainer import _storage

        config = tmp_path / "config.toml"
        config.write_text('[s3]\nendpoint_url = "http://127.0.0.1:9"\nregion = "eu-west-1"\n')
        monkeypatch.setenv("GRAINFLOW_CONFIG", str(config))
        path, fs, prefix = _storage("s3://bucket/runs")
        assert (path, prefix) == ("bucket/runs", "s3://")
        assert isinstance(fs, pyarrow.fs.S3FileSystem) and fs.region == "eu-west-1"

    def test_other_schemes_are_refused(self):
        from engine.training import TrainingError
        from engine.training.trainer import _storage

        with pytest.raises(TrainingError, match="gs://b/x"):
            _storage("gs://b/x")
