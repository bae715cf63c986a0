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


def test_accuracy_benchmark_scores_the_members_mean_as_the_ensemble_answers():
    """benchmarks/accuracy.py's classifier_fusion_mean averages the two members'
    probabilities per tile, then per image, as the ensemble and the job's summary do: two
    members each right on a different tile and confidently wrong on the other are right
    on both tiles together, where their confidence lies."""
    from benchmarks.accuracy import members_mean, probs_accuracy
    from engine.models.labels import material_names

    n = len(material_names())

    def member(right_tile: str) -> dict:
        probs = {}
        for key in ("a", "b"):
            p = np.full(n, 0.01, np.float32)
            p[0 if key == right_tile else 1] = 0.6 if key == right_tile else 0.3
            probs[("img", 0, 0, 0 if key == "a" else 64, 64)] = p / p.sum()
        truth = dict.fromkeys(probs, 0)
        return {"material": probs, "grade": dict(probs), "truth": {"material": truth, "grade": dict(truth)}}

    cls, fus = member("a"), member("b")
    assert probs_accuracy(cls)["material_tile_accuracy"] == 0.5
    mean = probs_accuracy(members_mean(cls, fus))
    assert mean["material_tile_accuracy"] == 1.0 and mean["material_accuracy"] == 1.0
    assert mean["tiles"] == 2 and mean["images"] == 1
    assert mean["material_by_image"]["img"]["named"] == material_names()[0]
