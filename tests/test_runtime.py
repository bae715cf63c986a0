"""engine.runtime's GPU rule on the session's real Ray (CPU-only), and the jobs that ask
Ray for GPUs refusing a request that can never be met before any task or actor starts:
Ray would queue that work forever.

A regression shows as a wait, not an error, so every such call runs under
`raised_within`, which fails the test after a bounded time instead of hanging the run.
"""

from __future__ import annotations

import pytest

from engine.runtime import GPU_AUTOSCALING_ENV, cluster_gpus, gpu_shortfall
from tests.gpu_refusal import NO_GPU, PROMPTLY_S, raised_within


@pytest.fixture
def cpu_cluster(ray_session, monkeypatch):
    """The session's Ray with no GPU and no GPU autoscaling announced."""
    if ray_session.cluster_resources().get("GPU"):
        pytest.skip("the session's Ray has GPUs; these tests need a CPU-only cluster")
    monkeypatch.delenv(GPU_AUTOSCALING_ENV, raising=False)
    return ray_session


class TestGpuRule:
    def test_a_cpu_cluster_has_no_gpus(self, cpu_cluster):
        gpus = cluster_gpus()
        assert gpus == 0.0 and isinstance(gpus, float)

    def test_gpus_no_node_has_and_none_can_get(self, cpu_cluster, monkeypatch):
        assert gpu_shortfall(0) is None
        assert gpu_shortfall(0.25) == NO_GPU
        monkeypatch.setenv(GPU_AUTOSCALING_ENV, "1")  # an autoscaler that does not report its node groups
        assert gpu_shortfall(0.25) is None
        assert gpu_shortfall(4) is None


class TestExplicitGpuRequestsAreRefused:
    """Each job asked for GPUs on this CPU-only cluster refuses at once, naming the
    option and gpu_shortfall's reason, and writes nothing."""

    def test_detector_training_task(self, cpu_cluster, tmp_path):
        from engine.synth.archive import generate_archive
        from engine.training.detector.ray_task import train_detector_on_ray
        from engine.training.trainer import TrainingError

        archive = tmp_path / "archive"
        generate_archive(archive, n_images=1, seed=0, size=64, chunk=64)
        error = raised_within(PROMPTLY_S, lambda: train_detector_on_ray(
            str(archive), out_dir=tmp_path / "out", num_gpus=1, epochs=1))
        assert isinstance(error, TrainingError), error
        assert str(error).startswith(f"num_gpus: the detector's training task asks for 1 GPU but {NO_GPU}; "
                                     "train on CPUs")
        assert not (tmp_path / "out").exists()

    def test_reprocess_job(self, cpu_cluster, tmp_path):
        from engine.errors import GrainflowError
        from engine.pipeline.job import reprocess
        from engine.registry import ModelRegistry
        from engine.synth.archive import generate_archive

        archive = tmp_path / "archive"
        generate_archive(archive, n_images=1, seed=0, size=64, chunk=64)
        registry = ModelRegistry(tracking_uri=f"sqlite:///{tmp_path}/m.db")
        error = raised_within(PROMPTLY_S, lambda: reprocess(
            str(archive), str(tmp_path / "out"), "tiny@production", registry=registry, num_gpus=1, concurrency=1))
        assert isinstance(error, GrainflowError), error
        assert str(error) == (f"num_gpus (--gpus-per-actor): each ensemble actor asks for 1 GPU but {NO_GPU}; "
                              "run on CPUs (num_gpus=0, --gpus-per-actor 0)")
        assert not (tmp_path / "out").exists()
        assert not (archive / "labels").exists() and not any(archive.glob("*/labels"))
