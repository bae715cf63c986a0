"""The demo's model set: trained on an archive by the engine's own trainers, registered
as a bundle, and run as an ensemble (slow: Ultralytics and Ray Train runs)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.pipeline import Ensemble, EnsembleConfig
from engine.pipeline.demo_models import TINY, train_demo_models, untrained_tiny_models
from engine.pipeline.results import from_columns

from .conftest import read_batch


def test_untrained_models_are_seeded():
    a, b = untrained_tiny_models(3), untrained_tiny_models(3)
    for role in ("detector", "segmenter", "classifier"):
        sa, sb = getattr(a, role).state_dict(), getattr(b, role).state_dict()
        assert all(np.array_equal(sa[k].numpy(), sb[k].numpy()) for k in sa), role
    assert a.fusion is None and untrained_tiny_models(0, fusion=True).fusion.config.name == TINY["fusion"]


@pytest.mark.slow
def test_train_register_and_run(ray_session, tmp_path, registry):
    from engine.synth.archive import generate_archive

    archive = tmp_path / "archive"
    generate_archive(archive, n_images=4, seed=11, size=256, chunk=128)
    demo = train_demo_models(archive, registry=registry, out_dir=tmp_path / "models", detector_epochs=2, epochs=1)
    assert demo.bundle == "grainflow-demo/1" and demo.production_ref == "grainflow-demo@production"
    assert set(demo.members) == {"detector", "classifier", "segmenter"}
    ens = Ensemble.from_registry(demo.production_ref, registry, config=EnsembleConfig(conf=0.01),
                                 cache_dir=tmp_path / "cache")
    assert ens.model_versions["bundle"] == "grainflow-demo/1"
    out = from_columns(ens(read_batch(archive)))
    assert len(out) == 16 and all(r.error is None for r in out)
