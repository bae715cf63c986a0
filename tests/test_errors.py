"""Errors raised inside Ray tasks reach the user as their own one-line message."""

from __future__ import annotations

import pytest

from engine.errors import GrainflowError, MetadataError, error_message, user_error_message


def _fails():
    raise MetadataError("images/a.ome.zarr: no 'multiscales' in the group attributes")


def test_an_error_from_a_ray_task_prints_as_its_own_message(ray_session):
    import ray

    with pytest.raises(GrainflowError) as info:  # Ray's RayTaskError(MetadataError) is still one
        ray.get(ray.remote(_fails).remote())
    assert "_fails" in str(info.value)  # Ray's own text: the remote traceback
    assert error_message(info.value) == "images/a.ome.zarr: no 'multiscales' in the group attributes"
    assert error_message(MetadataError("local")) == "local"


def test_errors_of_the_environment_are_the_users_bugs_are_not():
    assert user_error_message(MetadataError("a: no multiscales")) == "a: no multiscales"
    assert user_error_message(PermissionError(13, "Permission denied", "/data/x")).startswith(
        "PermissionError: [Errno 13] Permission denied: '/data/x'")
    import botocore.exceptions

    message = user_error_message(botocore.exceptions.NoCredentialsError())
    assert message.startswith("NoCredentialsError: Unable to locate credentials") and "AWS_ACCESS_KEY_ID" in message
    assert user_error_message(KeyError("column")) is None  # a bug keeps its traceback
    assert user_error_message(ZeroDivisionError()) is None


def test_grainflow_debug_shows_every_traceback_but_grainflows_own(monkeypatch):
    monkeypatch.setenv("GRAINFLOW_DEBUG", "1")
    assert user_error_message(FileNotFoundError(2, "No such file", "/x")) is None
    assert user_error_message(MetadataError("a: no multiscales")) == "a: no multiscales"


def _worker_group_error(failures):
    from ray.train import WorkerGroupError

    return WorkerGroupError("[Rank 0 Error Snippet]:\nTraceback (most recent call last): ...", failures)


def test_an_error_from_a_ray_train_worker_prints_as_its_own_message(capsys):
    """trainer.fit() raises Ray Train's WorkerGroupError, whose text is the workers'
    tracebacks; the fault is in its worker_failures {rank: error}."""
    from engine.errors import exit_code_for
    from engine.models import CheckpointError

    ours = CheckpointError("runs/r1/epoch_0001: does not fit Classifier")
    exc = _worker_group_error({1: ConnectionResetError("gloo: peer gone"), 0: ours})
    assert "Traceback" in str(exc)
    assert error_message(exc) == user_error_message(exc) == "runs/r1/epoch_0001: does not fit Classifier"
    try:
        raise exc
    except Exception as caught:
        assert exit_code_for(caught, "finetune") == 2
    assert capsys.readouterr().err == "finetune: runs/r1/epoch_0001: does not fit Classifier\n"
    assert user_error_message(_worker_group_error({0: KeyError("column")})) is None  # a bug keeps its traceback


def test_grainflow_errors_survive_pickling():
    """Ray carries a worker's error to the driver pickled: errors whose __init__ takes
    other arguments than the message must come back as themselves."""
    import pickle

    from engine.errors import CorruptChunkError
    from engine.models import ChecksumMismatchError
    from engine.registry import ArtifactIntegrityError

    for exc in (CorruptChunkError("a/0.0: bad zstd frame", array_uri="s3://b/a", chunk_keys=("0.0",)),
                ChecksumMismatchError("m.safetensors", "ab" * 32, "cd" * 32),
                ArtifactIntegrityError("m/1: damaged", ref="m/1", file="m.safetensors", expected="ab", actual=None),
                MetadataError("plain")):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc) and back.__dict__ == exc.__dict__


def _fails_in_a_worker(config):
    from engine.errors import CorruptChunkError

    raise CorruptChunkError("images/a/0/c/0/1: bad zstd frame", array_uri="images/a/0", chunk_keys=("c/0/1",))


def test_a_failed_ray_train_run_names_the_workers_error(ray_session, tmp_path):
    """The real thing, once: a Ray Train run whose worker raises (max_failures 0)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(_fails_in_a_worker, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="fails", storage_path=str(tmp_path),
                                                failure_config=FailureConfig(max_failures=0)))
    with pytest.raises(Exception) as info:
        trainer.fit()
    assert user_error_message(info.value) == "images/a/0/c/0/1: bad zstd frame"
