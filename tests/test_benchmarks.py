"""The benchmarks still run against the engine they measure: the parts of them that
build on engine APIs, checked without the timing runs (each benchmark takes minutes)."""

from __future__ import annotations

import numpy as np


def test_train_benchmark_feeds_what_the_engines_collate_reads(tmp_path):
    """benchmarks/train.py preloads samples for its launchers; its Ray Data variant hands
    them to the engine's FusionCollate, and its tensor variant must give the same keys."""
    import torch

    from benchmarks import train as bench
    from engine.training.collate import FusionCollate

    args = bench.parse_args(["--samples", "8", "--images", "2"])
    path, described = bench.prepare_data(args, tmp_path)
    assert described["samples"] == 8
    collated = FusionCollate(None, context_offset=2)(bench._Rows(str(path))({"id": np.arange(4)}))
    [tensors] = list(bench._tensor_batches(bench._load_arrays(str(path)), 0, 2, batch_size=4, seed=0, epoch=0))
    assert set(tensors) == set(collated)
    for key in collated:
        assert tensors[key].dtype == collated[key].dtype, key
        assert tensors[key].shape == collated[key].shape, key
    assert torch.isfinite(collated["pixel_size_nm"]).all() and (collated["pixel_size_nm"] > 0).all()


def test_synthesis_benchmark_model_is_accepted_by_synthesis(tmp_path):
    """benchmarks/synthesis.py's throughput runs synthesise from an untrained checkpoint:
    synthesis's own checks (before any Ray work) must accept it."""
    from benchmarks import synthesis as bench
    from engine.synth.diffusion.job import prepare

    model = bench.untrained_model(tmp_path / "m.safetensors")
    request = prepare(str(model), n_per_condition=4, batch_size=2, steps=2, **bench.THROUGHPUT_CONDITION)
    assert request is not None
