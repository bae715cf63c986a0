"""Ensembles through the model registry: register, load with sha256 checks, refuse tampering."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.pipeline import Ensemble, EnsembleConfig, EnsembleModels, register_ensemble
from engine.pipeline.results import from_columns
from engine.registry import ArtifactIntegrityError, RegistryError

from .conftest import TEST_CONFIG, take
from .test_ensemble import assert_same


@pytest.fixture
def members(tiny_models) -> EnsembleModels:
    """Three members (no fusion): enough for a round trip, quicker to register."""
    return EnsembleModels(detector=tiny_models.detector, segmenter=tiny_models.segmenter,
                          classifier=tiny_models.classifier)


def stored_files(registry, ref: str) -> list[Path]:
    """The files the registry stored for a version (artifacts live beside the database)."""
    mv = registry.get(ref)
    root = Path(registry.tracking_uri.removeprefix("sqlite:///")).parent
    return [p for p in root.rglob("*") if p.is_file() and mv.run_id in p.parts]


class TestFromRegistry:
    def test_round_trip(self, registry, members, tiles, tmp_path):
        bundle = register_ensemble(registry, members, "ens", workdir=tmp_path / "work",
                                   inputs={"classifier": "image"}, pixel_size_nm=20.0)
        assert bundle.ref == "ens/1" and "production" in bundle.aliases
        config = EnsembleConfig(**TEST_CONFIG)
        loaded = Ensemble.from_registry("ens@production", registry, config=config, cache_dir=tmp_path / "cache")
        assert loaded.model_versions == {"bundle": "ens/1", "classifier": "ens-classifier/1",
                                         "detector": "ens-detector/1", "segmenter": "ens-segmenter/1"}
        assert loaded.inputs["classifier"] == "image" and loaded.inputs["detector"] == "raw"
        assert loaded.pixel_size_nm == 20.0
        direct = Ensemble(members, config=EnsembleConfig(**dict(TEST_CONFIG, inputs={"classifier": "image"})))
        batch = take(tiles, [0, 5])
        a, b = from_columns(loaded(batch)), from_columns(direct(batch))
        for x, y in zip(a, b):
            assert_same(x, y, exact=True)  # same weights, same batch: bit for bit
        assert json.loads(loaded(batch)["model_versions"][0])["bundle"] == "ens/1"

    def test_constructor_kwargs_for_an_actor(self, registry, members, tmp_path):
        """What the batch job hands map_batches: a ref and a (picklable) registry."""
        import pickle

        register_ensemble(registry, members, "ens", workdir=tmp_path / "work")
        kwargs = pickle.loads(pickle.dumps({"bundle": "ens", "registry": registry, "cache_dir": tmp_path / "c"}))
        ens = Ensemble(**kwargs)
        assert ens.model_versions["detector"] == "ens-detector/1"

    def test_a_pinned_bundle_loads_its_versions_from_the_cache_without_mlflow(self, registry, members, tmp_path):
        """What the job's driver hands its actors: the bundle resolved once. An alias moved
        since does not change what it loads, and a process whose files are in the fetch
        cache loads it with no registry query: MLflow is never imported there (seconds
        of CPU per actor). Fresh interpreter: this one has MLflow loaded."""
        import pickle

        from engine.pipeline.bundle import pin_bundle
        from tests.fresh_imports import run_fresh

        register_ensemble(registry, members, "ens", workdir=tmp_path / "w1")
        pinned = pin_bundle("ens@production", registry)
        cache = tmp_path / "cache"
        Ensemble(bundle=pinned, registry=registry, cache_dir=cache)  # the node's first actor fetches
        register_ensemble(registry, members, "ens", workdir=tmp_path / "w2")  # production -> ens/2
        assert registry.get("ens@production").ref == "ens/2"
        (tmp_path / "kwargs.pkl").write_bytes(pickle.dumps({"bundle": pinned, "registry": registry,
                                                           "cache_dir": cache}))
        code = ("import pickle, sys; from engine.pipeline import Ensemble; "
                f"ens = Ensemble(**pickle.loads(open({str(tmp_path / 'kwargs.pkl')!r}, 'rb').read())); "
                "print(ens.model_versions['bundle'], ens.model_versions['detector'], 'mlflow' in sys.modules)")
        assert run_fresh(code, timeout=300).split() == ["ens/1", "ens-detector/1", "False"]

    def test_a_tampered_member_is_refused(self, registry, members, tmp_path):
        register_ensemble(registry, members, "ens", workdir=tmp_path / "work")
        (stored,) = [p for p in stored_files(registry, "ens-detector/1") if p.suffix == ".safetensors"]
        data = bytearray(stored.read_bytes())
        data[-1] ^= 0xFF  # one flipped bit in the weights
        stored.write_bytes(bytes(data))
        with pytest.raises(ArtifactIntegrityError, match="ens-detector/1") as info:
            Ensemble.from_registry("ens@production", registry, cache_dir=tmp_path / "cache")
        assert info.value.file == "detector.safetensors"
        assert not list((tmp_path / "cache").rglob("detector.safetensors")), "a refused file was left behind"

    def test_a_bundle_needs_a_detector(self, registry, members, tmp_path):
        register_ensemble(registry, EnsembleModels(detector=members.detector, classifier=members.classifier), "a",
                          workdir=tmp_path / "work")
        registry.register_bundle("no-detector", {"classifier": "a-classifier/1"})
        with pytest.raises(RegistryError, match="no 'detector' member"):
            Ensemble.from_registry("no-detector/1", registry, cache_dir=tmp_path / "cache")

    def test_a_member_in_the_wrong_role_is_refused(self, registry, members, tmp_path):
        register_ensemble(registry, EnsembleModels(detector=members.detector, classifier=members.classifier), "a",
                          workdir=tmp_path / "work")
        registry.register_bundle("swapped", {"detector": "a-classifier/1"})
        with pytest.raises(RegistryError, match="needs a Detector"):
            Ensemble.from_registry("swapped/1", registry, cache_dir=tmp_path / "cache")


class TestDescribeFromMetadata:
    """A job plans from registry metadata (no model loaded): it must say what loading says."""

    def test_same_as_the_loaded_ensemble(self, registry, tiny_models, tmp_path):
        from engine.pipeline.bundle import describe_bundle

        register_ensemble(registry, tiny_models, "ens", workdir=tmp_path / "work", inputs={"fusion": "image"},
                          pixel_size_nm=20.0)
        config = EnsembleConfig(**TEST_CONFIG)
        loaded = Ensemble.from_registry("ens/1", registry, config=config, cache_dir=tmp_path / "cache").describe()
        described = describe_bundle("ens@production", registry, config)
        assert described == {k: v for k, v in loaded.items() if k != "device"}
        assert described["class_names"] == list(tiny_models.detector.names) and len(described["materials"]) == 12
        assert described["inputs"]["fusion"] == "image" and described["pixel_size_nm"] == 20.0

    def test_unknown_when_a_member_config_lacks_its_labels(self, registry, members, tmp_path):
        from engine.models import save_checkpoint
        from engine.pipeline.bundle import describe_bundle

        register_ensemble(registry, members, "ens", workdir=tmp_path / "work")
        save_checkpoint(members.detector, tmp_path / "d.safetensors")
        registry.register("hand", tmp_path / "d.safetensors", family="detector", config={"note": "by hand"})
        registry.register_bundle("by-hand", {"detector": "hand/1", "classifier": "ens-classifier/1"})
        assert describe_bundle("by-hand/1", registry) is None
        assert describe_bundle("ens/1", registry) is not None

    def test_unknown_when_a_member_is_in_another_role(self, registry, members, tmp_path):
        from engine.pipeline.bundle import describe_bundle

        register_ensemble(registry, members, "a", workdir=tmp_path / "work")
        registry.register_bundle("swapped", {"detector": "a-detector/1", "classifier": "a-segmenter/1"})
        assert describe_bundle("swapped/1", registry) is None


def test_bundle_tags_check_modes():
    from engine.pipeline.bundle import bundle_tags

    assert bundle_tags({"detector": "image"}, 12.5)["input.detector"] == "image"
    with pytest.raises(ValueError, match="valid modes"):
        bundle_tags({"detector": "histogram"})
    assert np.isclose(float(bundle_tags(None, 12.5)["pixel_size_nm"]), 12.5)


def test_a_bundle_runs_each_member_the_way_it_was_trained(registry, members, tmp_path):
    """`member_inputs`: the input mode a member version was trained with (its `input`
    tag, which engine.training records) becomes the bundle's mode for that role; a
    member without one keeps the role's default."""
    from engine.models import save_checkpoint
    from engine.pipeline.bundle import bundle_tags, member_inputs
    from engine.pipeline.inputs import DEFAULT_INPUTS, TRAINED_INPUT_TAG

    refs = {}
    for role, model in members.members().items():
        path = tmp_path / f"{role}.safetensors"
        save_checkpoint(model, path)
        tags = {TRAINED_INPUT_TAG: "image"} if role == "classifier" else {}
        refs[role] = registry.register(f"m-{role}", path, family=role, config=model.config.to_dict(), tags=tags).ref
    modes = member_inputs(registry, refs)
    assert modes == {"classifier": "image"}
    tags = bundle_tags(modes)
    assert tags["input.detector"] == DEFAULT_INPUTS["detector"] and tags["input.classifier"] == "image"
    bundle = registry.register_bundle("m", refs, tags=tags)
    config = EnsembleConfig(**TEST_CONFIG)
    loaded = Ensemble.from_registry(bundle.ref, registry, config=config, cache_dir=tmp_path / "cache")
    assert loaded.inputs["classifier"] == "image" and loaded.inputs["segmenter"] == "tile"
