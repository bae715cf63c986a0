"""Fixtures for pipeline tests: offline Ultralytics, a small archive read as datasource
batches (no Ray), tiny seeded models, and a SQLite registry in tmp."""

from __future__ import annotations

import os

import numpy as np
import pytest

from engine.runtime import configure_offline


@pytest.fixture(scope="session", autouse=True)
def offline(tmp_path_factory):
    """No hub access; Ultralytics keeps its settings file out of the user's home."""
    configure_offline()
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics")))


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """One intra-op thread while these tests run (restored after): on a shared 2-core
    machine, torch's second thread mostly spin-waits for a core, several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def archive(tmp_path_factory):
    """Two 256 x 320 images (one optical uint8, one SEM uint16), 128 px chunks: a 2 x 3
    grid of cores per image, the last column 64 px wide, so tiles come in several shapes."""
    from engine.synth.archive import generate_archive

    out = tmp_path_factory.mktemp("pipeline-archive") / "a"
    generate_archive(out, n_images=2, seed=3, size=(256, 320), chunk=128)
    return out


def read_batch(archive, *, halo: int = 16, image_ids=None) -> dict[str, np.ndarray]:
    """Every tile of the archive's images at level 0 (each at its own pixel size, as the
    tiny detector is trained) as one numpy batch of datasource rows, read in this
    process with the datasource's own read function (no Ray)."""
    from ray.data.block import BlockAccessor

    from engine.data.datasource import ZarrTileDatasource
    from engine.data.tile_read import read_tiles
    from engine.stores.catalog import read_catalog

    batches = []
    for row in read_catalog(str(archive)).itertuples():
        if image_ids is not None and row.image_id not in image_ids:
            continue
        ds = ZarrTileDatasource(str(archive), target_pixel_size_nm=float(row.pixel_size_x), halo=halo,
                                image_ids=[row.image_id])
        batches += [BlockAccessor.for_block(b).to_batch_format("numpy") for s in ds.read_specs() for b in read_tiles(s)]
    return concat_batches(batches)


def concat_batches(batches) -> dict[str, np.ndarray]:
    out = {}
    for name in batches[0]:
        values = [v for b in batches for v in b[name]]
        if name == "tile":
            col = np.empty(len(values), object)
            col[:] = values
        else:
            col = np.asarray(values, dtype=object if batches[0][name].dtype == object else None)
        out[name] = col
    return out


def take(batch: dict[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    rows = list(rows)
    return {k: v[rows] for k, v in batch.items()}


@pytest.fixture(scope="session")
def tiles(archive) -> dict[str, np.ndarray]:
    return read_batch(archive)


@pytest.fixture(scope="session")
def tiny_models():
    """Seeded random tiny members (detector, SAM, classifier, fusion)."""
    from engine.pipeline.demo_models import untrained_tiny_models

    return untrained_tiny_models(0, fusion=True)


# Random weights score low: a low threshold keeps some boxes for every step to work on.
TEST_CONFIG = {"conf": 0.001, "max_det": 8}


@pytest.fixture(scope="session")
def ensemble(tiny_models):
    from engine.pipeline import Ensemble, EnsembleConfig

    return Ensemble(tiny_models, config=EnsembleConfig(**TEST_CONFIG))


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory):
    """An MLflow SQLite database with its schema made (~1.5 s of migrations, done once)."""
    from engine.registry import ModelRegistry

    path = tmp_path_factory.mktemp("registry-template") / "m.db"
    ModelRegistry(tracking_uri=f"sqlite:///{path}").list_models()
    return path


@pytest.fixture
def registry(empty_db, tmp_path):
    """A fresh registry per test: a copy of the empty database in this test's tmp_path."""
    import shutil

    from engine.registry import ModelRegistry

    shutil.copyfile(empty_db, tmp_path / "m.db")
    return ModelRegistry(tracking_uri=f"sqlite:///{tmp_path}/m.db")
