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
