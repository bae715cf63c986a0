from __future__ import annotations

import uuid

import pytest

from engine.stores.uri import resolve


@pytest.fixture(params=["memory", "local", "s3"])
def store_root(request, tmp_path):
    """The root of an empty store on each backend, as a StoreLocation."""
    if request.param == "memory":
        return resolve(f"memory://grainflow-tests/{uuid.uuid4().hex}")
    if request.param == "local":
        return resolve(tmp_path / "store")
    return resolve(request.getfixturevalue("s3_bucket") + "/archive")
