"""Fixtures for cluster tests: no hub access, Ultralytics settings kept in tmp."""

from __future__ import annotations

import os

import pytest

from engine.runtime import configure_offline


@pytest.fixture(scope="session", autouse=True)
def offline_cluster(tmp_path_factory):
    configure_offline()
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics")))
