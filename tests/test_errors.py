"""Errors raised inside Ray tasks reach the user as their own one-line message."""

from __future__ import annotations

import pytest

from engine.errors import GrainflowError, MetadataError, error_message


def _fails():
    raise MetadataError("images/a.ome.zarr: no 'multiscales' in the group attributes")


def test_an_error_from_a_ray_task_prints_as_its_own_message(ray_session):
    import ray

    with pytest.raises(GrainflowError) as info:  # Ray's RayTaskError(MetadataError) is still one
        ray.get(ray.remote(_fails).remote())
    assert "_fails" in str(info.value)  # Ray's own text: the remote traceback
    assert error_message(info.value) == "images/a.ome.zarr: no 'multiscales' in the group attributes"
    assert error_message(MetadataError("local")) == "local"
