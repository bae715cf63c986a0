"""Fixtures for training tests: a tiny archive, an MLflow store and a registry in tmp."""

from __future__ import annotations

import pytest

from engine.synth.archive import generate_archive


@pytest.fixture(scope="session")
def train_archive(tmp_path_factory):
    """Four 256 x 256 images, 128 px chunks, with ground truth (~1 s to write)."""
    out = tmp_path_factory.mktemp("train-archive") / "a"
    generate_archive(out, n_images=4, seed=7, size=256, chunk=128)
    return out


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """A SQLite MLflow store of this session (metrics and registry side by side)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def registry(tracking_uri):
    from engine.registry import ModelRegistry

    return ModelRegistry(tracking_uri)
