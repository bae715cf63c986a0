"""Ray Train end to end: 2 CPU workers (DDP over gloo) train the fusion model on an archive.

One run serves every test here (a Ray Train run costs tens of seconds on 2 cores), and it
is the hard case: a worker is SIGKILLed after epoch 1's checkpoint, Ray Train restarts the
worker group, and the loop resumes from the checkpoint. Loss, checkpoints, MLflow metrics
and the registered model are then checked on what that run produced.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from engine.models import load_model
from engine.training import mlflow_metrics, train
from engine.training.checkpointing import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, read_state
from engine.training.schedule import learning_rate, steps_per_epoch

EPOCHS = 3
RUN = "fusion-fault"


def _progress(directory: Path, rank: int) -> list[dict]:
    path = directory / f"rank{rank}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _kill_after_first_checkpoint(progress: Path, run_dir: Path, killed: list, stop: threading.Event) -> None:
    """SIGKILL rank 1's process once epoch 1's checkpoint is registered.

    Registered means listed in Ray Train's checkpoint_manager_snapshot.json: the
    controller collects reports on its ~2 s poll, and a worker that dies before that
    poll takes its last report with it (the run would then resume one epoch earlier).
    """
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while not stop.is_set():
        events = [e for e in _progress(progress, 1) if e["event"] == "checkpoint" and e["epoch"] >= 1]
        if events and snapshot.exists() and "epoch_0001" in snapshot.read_text():
            os.kill(events[0]["pid"], signal.SIGKILL)
            killed.append({**events[0], "killed_at": time.time()})
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def fusion_run(ray_session, train_archive, registry, tmp_path_factory):
    base = tmp_path_factory.mktemp("fusion-run")
    progress, storage = base / "progress", base / "storage"
    killed: list = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_after_first_checkpoint,
                              args=(progress, storage / RUN, killed, stop), daemon=True)
    killer.start()
    start = time.perf_counter()
    try:
        result = train(
            "fusion", "fusion_tiny", str(train_archive), storage_path=storage, epochs=EPOCHS, num_workers=2,
            batch_size=8, lr=3e-3, seed=1, max_samples_per_image=12, max_failures=2, run_name=RUN,
            registry=registry, register_as="fusion-test", progress_dir=progress,
            cache=False,  # the archive read every epoch, restarted workers too (jobs.finetune's test: cached)
            inputs="image",  # each image's engine.preprocess parameters, detail and context alike
        )
    finally:
        stop.set()
        killer.join(5)
    return result, storage, progress, killed, time.perf_counter() - start


class TestFusionTraining:
    def test_loss_falls(self, fusion_run):
        result, _, _, _, seconds = fusion_run
        assert [h["epoch"] for h in result.history] == list(range(1, EPOCHS + 1))
        losses = [h["train_loss"] for h in result.history]
        # Every epoch lower, and by a tenth over three: runs of this setup end at 0.82-0.85
        # of the first epoch's loss (Ray Data's read order and torch's threads vary), so
        # a tighter bound fails on noise, while a run that does not learn stays near 1.
        assert all(a > b for a, b in zip(losses, losses[1:])), losses
        assert losses[-1] < 0.9 * losses[0], losses
        assert (result.train_samples, result.val_samples) == (38, 10)  # 4 images x 12 tiles, 20 % held out
        for h in result.history:
            assert h["train_samples_per_s"] > 0
            assert 0.0 <= h["val_material_acc"] <= 1.0 and 0.0 <= h["val_defect_iou"] <= 1.0
        print(f"fusion_tiny, 2 CPU workers, {EPOCHS} epochs with one restart: {seconds:.1f} s; "
              f"{result.history[-1]['train_samples_per_s']:.1f} samples/s in the last epoch")

    def test_a_checkpoint_per_epoch_in_storage(self, fusion_run):
        result, storage, _, _, _ = fusion_run
        run = Path(storage) / RUN
        for epoch in range(1, EPOCHS + 1):
            d = run / f"epoch_{epoch:04d}"
            for name in (MODEL_FILE, MODEL_FILE + ".sha256", OPTIMIZER_FILE, STATE_FILE):
                assert (d / name).is_file(), d / name
            state = read_state(d)
            assert state.epoch == epoch and len(state.history) == epoch
        assert result.checkpoint_path == str(run / f"epoch_{EPOCHS:04d}")
        model = load_model(Path(result.checkpoint_path) / MODEL_FILE)  # sha256 checked against the sidecar
        assert model.config.name == "fusion_tiny"

    def test_killed_worker_resumed_from_a_checkpoint(self, fusion_run):
        _, _, progress, killed, _ = fusion_run
        assert killed, "the worker was never killed"
        starts = [e for rank in (0, 1) for e in _progress(progress, rank) if e["event"] == "start"]
        first = [e for e in starts if e["time"] < killed[0]["killed_at"]]
        resumed = [e for e in starts if e["time"] > killed[0]["killed_at"]]
        assert [e["epoch"] for e in first] == [0, 0]
        # the restarted group (two new processes) started at epoch >= 1, not from scratch
        assert len(resumed) == 2 and all(e["epoch"] >= 1 for e in resumed), resumed
        assert killed[0]["pid"] not in {e["pid"] for e in resumed}

    def test_resumed_run_kept_to_the_learning_rate_curve(self, fusion_run):
        # cosine (train's default): each epoch's last step's rate, the epochs after the
        # restart included (3 steps an epoch: 19 rows per worker, batch 8)
        result, _, _, _, _ = fusion_run
        steps = steps_per_epoch(result.train_samples, 2, 8)
        assert steps == 3
        expected = [learning_rate("cosine", 3e-3, steps * epoch - 1, steps * EPOCHS) for epoch in range(1, EPOCHS + 1)]
        assert [h["lr"] for h in result.history] == pytest.approx(expected)
        assert expected[0] > expected[1] > expected[2]

    def test_metrics_reached_mlflow(self, fusion_run, tracking_uri):
        result, _, _, _, _ = fusion_run
        assert result.tracking_uri == tracking_uri
        for key in ("train_loss", "val_loss", "train_material_acc", "val_defect_iou", "train_samples_per_s"):
            steps = {step for step, _ in mlflow_metrics.metric_history(tracking_uri, result.run_id, key)}
            assert steps == set(range(1, EPOCHS + 1)), key
        last = dict(mlflow_metrics.metric_history(tracking_uri, result.run_id, "train_loss"))[EPOCHS]
        assert last == pytest.approx(result.history[-1]["train_loss"])
        run = mlflow_metrics._client(tracking_uri).get_run(result.run_id)
        assert run.info.status == "FINISHED" and run.data.params["model"] == "fusion_tiny"
        assert run.data.params["cached"] == "False" and not result.cached

    def test_model_registered_and_fetches_with_its_sha256(self, fusion_run, registry, tmp_path):
        result, _, _, _, _ = fusion_run
        mv = result.model_version
        assert mv is not None and mv.ref == "fusion-test/1" and mv.family == "fusion"
        assert mv.sha256 == {MODEL_FILE: result.model_sha256}
        assert mv.metrics["train_loss"] == pytest.approx(result.history[-1]["train_loss"])
        assert mv.config["model"]["name"] == "fusion_tiny" and mv.config["training"]["epochs"] == EPOCHS
        assert mv.tags["training_run"] == result.run_id
        # trained on each image's preprocessing: a bundle of it runs it in "image" mode
        assert mv.tags["input"] == "image" and mv.config["training"]["inputs"] == "image"
        files = registry.fetch("fusion-test/1", tmp_path)
        model = load_model(files[MODEL_FILE], expected_sha256=result.model_sha256)
        assert model.config.family == "fusion"

    def test_started_again_by_name_it_goes_on_in_the_same_mlflow_run(self, fusion_run, train_archive, tracking_uri):
        """(Last in this class: it adds an epoch to the run's storage.)"""
        result, storage, _, _, _ = fusion_run
        again = train("fusion", "fusion_tiny", str(train_archive), storage_path=storage, epochs=EPOCHS + 1,
                      num_workers=2, batch_size=8, lr=3e-3, seed=1, max_samples_per_image=12, run_name=RUN,
                      tracking_uri=tracking_uri, cache=False)
        assert [h["epoch"] for h in again.history] == list(range(1, EPOCHS + 2))
        assert again.run_id == result.run_id
        steps = {step for step, _ in mlflow_metrics.metric_history(tracking_uri, again.run_id, "train_loss")}
        assert steps == set(range(1, EPOCHS + 2))
        run = mlflow_metrics._client(tracking_uri).get_run(again.run_id)
        assert run.info.status == "FINISHED" and run.data.params["epochs"] == str(EPOCHS)
        assert run.data.tags["resumed.epochs"] == str(EPOCHS + 1)


def test_samples_are_cached_when_they_fit_the_object_store(ray_session):
    from engine.training.trainer import CACHE_SHARE, _fits_object_store

    store = ray_session.cluster_resources()["object_store_memory"]
    assert _fits_object_store(int(CACHE_SHARE * store) - 1)
    assert not _fits_object_store(int(CACHE_SHARE * store) + 1)


class TestRefusedBeforeTraining:
    """Input that would train for nothing, or fail only at the end, is refused at the start."""

    def test_a_validation_archive_without_samples_or_labels(self, train_archive, tmp_path):
        import shutil

        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from engine.training import plan_training
        from engine.training.trainer import TrainingError

        no_defects, no_labels = tmp_path / "no-defects", tmp_path / "no-labels"
        for copy in (no_defects, no_labels):
            shutil.copytree(train_archive, copy)
        truth = pq.read_table(no_defects / "ground_truth.parquet")
        pq.write_table(truth.slice(0, 0), no_defects / "ground_truth.parquet")
        catalog = pq.read_table(no_labels / "catalog.parquet")
        for name in ("material", "quality_grade"):
            i = catalog.schema.get_field_index(name)
            catalog = catalog.set_column(i, name, pc.cast(pc.if_else(True, None, catalog[name]), catalog[name].type))
        pq.write_table(catalog, no_labels / "catalog.parquet")
        with pytest.raises(TrainingError, match="no-defects: no segmenter validation samples.*ground-truth defects"):
            plan_training("segmenter", "sam_tiny", str(train_archive), val_archive=str(no_defects))
        with pytest.raises(TrainingError, match="no-labels: the validation images have no material or quality_grade"):
            plan_training("classifier", "resnet10t", str(train_archive), val_archive=str(no_labels))

    def test_a_bad_registered_name_and_keep_checkpoints(self, train_archive, tmp_path):
        from engine.registry.errors import RegistryError
        from engine.training.trainer import TrainingError

        with pytest.raises(RegistryError, match="bad model name 'fusion/prod'"):
            train("fusion", "fusion_tiny", str(train_archive), storage_path=tmp_path, epochs=1, register_as="fusion/prod")
        with pytest.raises(TrainingError, match="keep_checkpoints"):
            train("fusion", "fusion_tiny", str(train_archive), storage_path=tmp_path, epochs=1, keep_checkpoints=0)
        assert not any(tmp_path.iterdir())  # refused before a run folder or Ray


@pytest.fixture
def no_ray(monkeypatch):
    """train() stops where it would connect to Ray: a check that passes this is too late."""
    import engine.training.trainer as trainer

    class RayStarted(Exception):
        pass

    def ensure_ray(num_workers):
        raise RayStarted("the input was not refused before Ray")

    monkeypatch.setattr(trainer, "ensure_ray", ensure_ray)
    return RayStarted


class TestRefusedBeforeRay:
    """What Ray would misread or only fail on later (a worker, an endless wait) is
    refused before Ray starts, naming the argument."""

    @pytest.mark.parametrize("kwargs, words", [
        ({"lr": -1.0}, "lr must be a finite number > 0, got -1.0"),
        ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
        ({"max_failures": -1}, "max_failures must be a whole number >= 0, got -1"),
        ({"storage_path": "http://host/runs"}, "storage_path 'http://host/runs': use a local path"),
        ({"storage_path": "gs://bucket/runs"}, "storage_path 'gs://bucket/runs': use a local path"),
        ({"tile_size": 0}, "tile_size must be a whole number of pixels >= 1"),
        ({"cpus_per_worker": 0}, "cpus_per_worker must be a whole number >= 1, got 0"),
    ])
    def test_bad_arguments(self, no_ray, train_archive, tmp_path, kwargs, words):
        from engine.training.trainer import TrainingError

        kwargs = {"storage_path": tmp_path / "runs", **kwargs}
        with pytest.raises(TrainingError) as info:
            train("classifier", "resnet10t", str(train_archive), epochs=1, **kwargs)
        assert words in str(info.value)
        assert not (tmp_path / "runs").exists()

    @pytest.fixture
    def stored_run(self, tmp_path):
        """`<storage>/r1/epoch_0001`: a fusion_tiny checkpoint, as Ray Train stores it."""
        import torch

        from engine.models import create_model
        from engine.training.checkpointing import TrainingState, save_training_state

        model = create_model("fusion", "fusion_tiny")
        save_training_state(tmp_path / "runs" / "r1" / "epoch_0001", model, torch.optim.AdamW(model.parameters()),
                            TrainingState("fusion", "fusion_tiny", epoch=1))
        return tmp_path / "runs"

    def test_resuming_a_run_of_another_model_or_config(self, no_ray, train_archive, stored_run, tracking_uri):
        """Ray Train would hand the run's checkpoint to the workers, which failed only after
        every restart (marking the earlier MLflow run FAILED), or loaded it into a model
        built with other arguments."""
        from engine.models import labels
        from engine.training.trainer import TrainingError, check_resume

        common = dict(storage_path=stored_run, epochs=2, run_name="r1", tracking_uri=tracking_uri)
        with pytest.raises(TrainingError, match="'r1' in .* holds a fusion:fusion_tiny checkpoint .*this one trains "
                                                "classifier:resnet10t"):
            train("classifier", "resnet10t", str(train_archive), **common)
        with pytest.raises(TrainingError, match=r"args\.context_level_offset: 2 in the checkpoint, 1 now"):
            train("fusion", "fusion_tiny", str(train_archive), overrides={"context_level_offset": 1}, **common)
        with pytest.raises(TrainingError, match=r"args\.materials: \['ferritic_steel'"):
            train("fusion", "fusion_tiny", str(train_archive),
                  overrides={"materials": list(reversed(labels.material_names()))}, **common)
        with pytest.raises(no_ray):  # the same model resumes
            train("fusion", "fusion_tiny", str(train_archive), **common)
        check_resume(stored_run, "r1", "fusion", "fusion_tiny", {"materials": list(labels.material_names())})
        check_resume(stored_run, "another", "classifier", "resnet10t")  # a new run
        assert sorted(p.name for p in stored_run.iterdir()) == ["r1"]

    def test_gpus_the_cluster_has_not_and_cannot_get(self, monkeypatch, train_archive, tmp_path):
        """Ray Train V2 would retry the worker-group start every minute, forever (max_failures
        does not count it): refused unless an autoscaler will add GPUs."""
        import ray

        import engine.runtime as runtime
        import engine.training.trainer as trainer
        from engine.runtime import GPU_AUTOSCALING_ENV
        from engine.training.trainer import TrainingError, check_gpus

        monkeypatch.setattr(trainer, "ensure_ray", lambda num_workers: None)
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 1.0})
        monkeypatch.setattr(runtime, "autoscaler_max", lambda resource: None)
        monkeypatch.delenv(GPU_AUTOSCALING_ENV, raising=False)
        with pytest.raises(TrainingError, match=r"use_gpu: the run needs 2 GPUs \(one per worker\) but the Ray cluster "
                                                r"has 1 and no autoscaler reports GPU nodes it could add"):
            train("classifier", "resnet10t", str(train_archive), storage_path=tmp_path / "runs", epochs=1,
                  num_workers=2, use_gpu=True, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
        assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was started (and left FAILED)
        check_gpus(1)  # enough
        # an autoscaler reported its maximum
        monkeypatch.setattr(runtime, "autoscaler_max", lambda resource: {"GPU": 1.0}.get(resource, 0.0))
        with pytest.raises(TrainingError, match="its autoscaler can provide at most 1"):
            check_gpus(2)
        monkeypatch.setattr(runtime, "autoscaler_max", lambda resource: {"GPU": 8.0}.get(resource, 0.0))
        check_gpus(2)
        monkeypatch.setattr(runtime, "autoscaler_max", lambda resource: None)
        monkeypatch.setenv(GPU_AUTOSCALING_ENV, "1")  # an autoscaler that does not report its node groups
        check_gpus(2)


def test_gpus_the_session_cpu_cluster_has_not_are_refused(ray_session, monkeypatch, train_archive, tmp_path):
    """use_gpu=True on the session's real Ray (no GPU, no autoscaler): refused at once,
    before Ray Train or MLflow starts."""
    from engine.runtime import GPU_AUTOSCALING_ENV
    from engine.training.trainer import TrainingError
    from tests.gpu_refusal import NO_GPU, PROMPTLY_S, raised_within

    if ray_session.cluster_resources().get("GPU"):
        pytest.skip("the session's Ray has GPUs; this test needs a CPU-only cluster")
    monkeypatch.delenv(GPU_AUTOSCALING_ENV, raising=False)
    error = raised_within(PROMPTLY_S, lambda: train(
        "classifier", "resnet10t", str(train_archive), storage_path=tmp_path / "runs", epochs=1, num_workers=1,
        use_gpu=True, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"))
    assert isinstance(error, TrainingError), error
    assert str(error).startswith(f"use_gpu: the run needs 1 GPU (one per worker) but {NO_GPU}; train on CPUs")
    assert not (tmp_path / "mlflow.db").exists()


def test_workers_holding_every_cpu_while_the_archive_is_read_are_refused(ray_session, train_archive, tmp_path):
    """Without the cache, Ray Data reads the archive each epoch and needs a free CPU slot:
    a run whose workers hold them all would wait forever. Refused before it starts."""
    from engine.training.trainer import TrainingError

    cpus = int(ray_session.cluster_resources()["CPU"])
    with pytest.raises(TrainingError, match=f"hold {cpus} CPU slots of the cluster's {cpus}, leaving none for reading"):
        train("classifier", "resnet10t", str(train_archive), storage_path=tmp_path / "runs", epochs=1, num_workers=1,
              cpus_per_worker=cpus, cache=False, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert not (tmp_path / "runs").exists()


def test_slots_an_autoscaler_reports_it_can_add_count_for_the_reads(ray_session, monkeypatch):
    """A cluster that grows: the slots its autoscaler says it can provide are counted."""
    from engine import runtime
    from engine.training.trainer import TrainingError, _check_cpus_left_for_reads

    cpus = int(ray_session.cluster_resources()["CPU"])
    monkeypatch.setattr(runtime, "autoscaler_max", lambda resource: None)  # reports nothing: the slots of now
    with pytest.raises(TrainingError, match="leaving none for reading"):
        _check_cpus_left_for_reads(cpus)
    monkeypatch.setattr(runtime, "autoscaler_max", lambda resource: {"CPU": cpus + 8.0}.get(resource, 0.0))
    _check_cpus_left_for_reads(cpus)  # 8 more slots can come
