"""Tiny synthetic archives for the training-sample tests (made by engine.synth)."""

from __future__ import annotations

import pytest

from engine.synth.archive import generate_archive


@pytest.fixture(scope="session")
def small_archive(tmp_path_factory):
    """Four 256 x 256 images in 128 px chunks (two pyramid levels), with ground truth."""
    out = tmp_path_factory.mktemp("data-archive") / "a"
    catalog = generate_archive(out, n_images=4, seed=5, size=256, chunk=128)
    return out, catalog


@pytest.fixture(scope="session")
def deep_archive(tmp_path_factory):
    """Two 256 x 256 images in 64 px chunks: three levels, so a context level exists."""
    out = tmp_path_factory.mktemp("data-deep") / "a"
    catalog = generate_archive(out, n_images=2, seed=6, size=256, chunk=64)
    return out, catalog
