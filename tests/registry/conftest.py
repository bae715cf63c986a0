"""Registry fixtures: a fresh SQLite-backed registry per test, no server.

Creating MLflow's schema in a new SQLite file takes ~1.5 s (alembic migrations), so the
schema is made once per session and each test gets a copy of that empty database.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.registry import ModelRegistry
from engine.registry.backend import sqlite_uri


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """An MLflow SQLite database with the schema and no grainflow data."""
    path = tmp_path_factory.mktemp("registry-template") / "mlflow.db"
    ModelRegistry(sqlite_uri(path)).list_models()  # first use creates the tables
    return path


@pytest.fixture
def db_uri(empty_db, tmp_path) -> str:
    """`sqlite:///` URI of a fresh copy of the empty database, in this test's tmp_path."""
    path = tmp_path / "registry" / "mlflow.db"
    path.parent.mkdir()
    shutil.copyfile(empty_db, path)
    return sqlite_uri(path)


@pytest.fixture
def registry(db_uri) -> ModelRegistry:
    return ModelRegistry(db_uri)


@pytest.fixture
def weights(tmp_path) -> Path:
    """A small safetensors checkpoint made here, the format our own models are saved in."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "src" / "model.safetensors"
    path.parent.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    save_file({"conv.weight": torch.randn(8, 3, 3, 3, generator=gen), "fc.bias": torch.zeros(12)}, path)
    return path


def make_file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / "src" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


def stored_artifact(db_uri: str, run_id: str, file_name: str) -> Path:
    """The file the registry stored for a version (artifacts live beside the database)."""
    root = Path(db_uri.removeprefix("sqlite:///")).parent / "artifacts" / run_id
    (found,) = root.rglob(file_name)
    return found
