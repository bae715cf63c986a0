"""ModelRegistry against a real MLflow store (SQLite in tmp_path, local artifacts)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from engine.local_head import free_port
from engine.registry import ArtifactIntegrityError, ModelRegistry, ModelVersion, RegistryError
from engine.registry.backend import sqlite_uri
from engine.registry.digest import sha256_file
from tests.registry.conftest import make_file, stored_artifact

CONFIG = {"arch": "resnet18", "num_classes": 12, "head": {"dropout": 0.1, "dims": [256, 12]}}


def _register(registry, tmp_path, name="cls", data=b"weights-1", **kw) -> ModelVersion:
    kw.setdefault("family", "classifier")
    kw.setdefault("config", CONFIG)
    return registry.register(name, make_file(tmp_path, f"{name}-{data.hex()[:8]}.bin", data), **kw)


class TestRegister:
    def test_register_get_fetch_bit_for_bit(self, registry, weights, tmp_path):
        from safetensors.torch import load_file

        v = registry.register("sam-tiny", weights, family="segmenter", config=CONFIG,
                              metrics={"iou": 0.87}, tags={"dataset": "synth-seed-7"})
        assert (v.name, v.version, v.family) == ("sam-tiny", 1, "segmenter")
        assert v.config == CONFIG
        assert v.metrics == {"iou": 0.87}
        assert v.sha256 == {"model.safetensors": sha256_file(weights)}
        assert v.tags == {"dataset": "synth-seed-7"}
        assert v.source == f"runs:/{v.run_id}/files"
        assert v.aliases == ()

        assert registry.get("sam-tiny/1") == v
        registry.promote("sam-tiny", 1)
        assert registry.get("sam-tiny@production").version == 1
        assert registry.get("sam-tiny").version == 1  # bare name = production

        files = registry.fetch("sam-tiny@production", tmp_path / "fetched")
        assert list(files) == ["model.safetensors"]
        assert files["model.safetensors"].read_bytes() == weights.read_bytes()
        original, loaded = load_file(weights), load_file(files["model.safetensors"])
        assert all((original[k] == loaded[k]).all() for k in original)

    def test_several_files_under_given_names(self, registry, tmp_path):
        a = make_file(tmp_path, "a.tmp", b"A" * 1000)
        b = make_file(tmp_path, "b.tmp", b"B")
        v = registry.register("yolo", {"best.pt": a, "data.yaml": b}, family="detector", config={})
        assert v.files == ("best.pt", "data.yaml")
        files = registry.fetch(v, tmp_path / "out")
        assert files["best.pt"].read_bytes() == b"A" * 1000
        assert files["data.yaml"].read_bytes() == b"B"

    def test_versions_count_up_and_list(self, registry, tmp_path):
        _register(registry, tmp_path, data=b"1")
        _register(registry, tmp_path, data=b"2")
        _register(registry, tmp_path, name="det", data=b"3", family="detector")
        assert [v.version for v in registry.versions("cls")] == [1, 2]
        assert registry.list_models() == ["cls", "det"]

    def test_the_same_files_again_return_the_latest_version(self, registry, tmp_path, caplog):
        """A finished training run started again registers its unchanged checkpoint: with
        reuse_identical that is the latest version, not a copy of it."""
        import logging

        first = _register(registry, tmp_path, data=b"1", reuse_identical=True)
        with caplog.at_level(logging.INFO, logger="engine.registry.registry"):
            again = _register(registry, tmp_path, data=b"1", reuse_identical=True)
        assert again.ref == first.ref == "cls/1"
        assert "cls: not registered again: the latest version, cls/1, holds the same files" in caplog.text
        assert _register(registry, tmp_path, data=b"1").ref == "cls/2"  # without it: a new version, as before
        assert _register(registry, tmp_path, data=b"2", reuse_identical=True).ref == "cls/3"
        # only the latest counts: the bytes of cls/1 and cls/2 after cls/3 are a new version
        assert _register(registry, tmp_path, data=b"1", reuse_identical=True).ref == "cls/4"
        assert _register(registry, tmp_path, data=b"1", family="detector", reuse_identical=True).ref == "cls/5"

    def test_config_flattened_to_run_params(self, registry, db_uri, tmp_path):
        from mlflow import MlflowClient

        v = _register(registry, tmp_path)
        params = MlflowClient(tracking_uri=db_uri).get_run(v.run_id).data.params
        assert params["config.arch"] == "resnet18"
        assert params["config.head.dims"] == "[256, 12]"
        assert params["grainflow.family"] == "classifier"

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"family": "bundle"}, "reserved"),
            ({"family": ""}, "family must be"),
            ({"config": {"bad": object()}}, "not plain JSON"),
            ({"config": {"big": "x" * 7000}}, "param limit"),
            ({"config": {"a/../b": 1}}, "bad config key"),
            ({"metrics": {"a b!": 1.0}}, "bad metric name"),
            ({"metrics": {"acc": float("nan")}}, "not finite"),
            ({"metrics": {"acc": "high"}}, "not a number"),
            ({"tags": {"grainflow.kind": "x"}}, "reserved prefix"),
        ],
    )
    def test_bad_input_refused_before_any_write(self, registry, tmp_path, kwargs, match):
        with pytest.raises(RegistryError, match=match) as info:
            _register(registry, tmp_path, **kwargs)
        assert "'cls'" in str(info.value)
        assert registry.list_models() == []

    def test_bad_files(self, registry, tmp_path):
        with pytest.raises(RegistryError, match="is not a file"):
            registry.register("m", tmp_path / "missing.pt", family="detector", config={})
        with pytest.raises(RegistryError, match="bad artifact file name '../x'"):
            registry.register("m", {"../x": make_file(tmp_path, "x", b"x")}, family="detector", config={})
        with pytest.raises(RegistryError, match="bad model name"):
            registry.register("m@x", make_file(tmp_path, "x", b"x"), family="detector", config={})


class TestAliases:
    def test_promote_and_rollback(self, registry, tmp_path):
        for i in (1, 2, 3):
            _register(registry, tmp_path, data=bytes([i]))
        registry.promote("cls", 1)
        registry.promote("cls", 2)
        assert registry.get("cls@production").version == 2
        assert registry.get("cls/2").aliases == ("production",)
        assert registry.get("cls/1").aliases == ()

        assert registry.rollback("cls").version == 1
        assert registry.get("cls@production").version == 1

        # History is a stack of moves: a rollback undoes the latest one.
        assert registry.alias_history("cls") == [1]
        registry.promote("cls", 2)
        registry.promote("cls", 3)
        assert registry.alias_history("cls") == [1, 2, 3]
        assert registry.rollback("cls").version == 2
        assert registry.rollback("cls").version == 1
        with pytest.raises(RegistryError, match="cls@production: nothing to roll back to"):
            registry.rollback("cls")
        assert registry.get("cls").version == 1

    def test_canary_is_separate(self, registry, tmp_path):
        _register(registry, tmp_path, data=b"1")
        _register(registry, tmp_path, data=b"2")
        registry.promote("cls", 1)
        registry.set_alias("cls", "canary", 2)
        assert registry.get("cls@production").version == 1
        assert registry.get("cls@canary").version == 2
        registry.promote("cls", 1, alias="canary")
        assert registry.rollback("cls", alias="canary").version == 2
        assert registry.get("cls@production").version == 1
        with pytest.raises(RegistryError, match="nothing to roll back to"):
            registry.rollback("cls")

    def test_rollback_skips_deleted_versions(self, registry, db_uri, tmp_path):
        from mlflow import MlflowClient

        for i in (1, 2, 3):
            _register(registry, tmp_path, data=bytes([i]))
            registry.promote("cls", i)
        MlflowClient(tracking_uri=db_uri).delete_model_version("cls", "2")
        assert registry.rollback("cls").version == 1

    def test_rollback_never_lands_on_the_current_version(self, registry, db_uri, tmp_path):
        from mlflow import MlflowClient

        for i in (1, 2):
            _register(registry, tmp_path, data=bytes([i]))
        for i in (1, 2, 1):
            registry.promote("cls", i)
        MlflowClient(tracking_uri=db_uri).delete_model_version("cls", "2")  # 1 -> 2 -> 1, and 2 is gone
        with pytest.raises(RegistryError, match="nothing to roll back to"):
            registry.rollback("cls")
        assert registry.get("cls@production").version == 1

    def test_rollback_after_the_current_version_was_deleted(self, registry, db_uri, tmp_path):
        """Version 2 turned out bad and was deleted (MLflow's UI or client), which drops
        its aliases: rollback still brings production back to version 1."""
        from mlflow import MlflowClient

        for i in (1, 2):
            _register(registry, tmp_path, data=bytes([i]))
            registry.promote("cls", i)
        MlflowClient(tracking_uri=db_uri).delete_model_version("cls", "2")
        with pytest.raises(RegistryError, match="has no alias 'production'"):
            registry.get("cls@production")

        assert registry.rollback("cls").ref == "cls/1"
        assert registry.get("cls@production").version == 1
        assert registry.alias_history("cls") == [1]
        with pytest.raises(RegistryError, match="nothing to roll back to"):
            registry.rollback("cls")

    def test_rollback_of_an_alias_deleted_outside_grainflow_undoes_its_latest_move(self, registry, db_uri,
                                                                                  tmp_path):
        from mlflow import MlflowClient

        for i in (1, 2, 3):
            _register(registry, tmp_path, data=bytes([i]))
            registry.promote("cls", i)
        client = MlflowClient(tracking_uri=db_uri)
        client.delete_model_version("cls", "2")
        client.delete_registered_model_alias("cls", "production")  # version 3 still exists
        assert registry.rollback("cls").version == 1  # 3 undone, 2 gone

    def test_rollback_after_alias_moved_outside_grainflow(self, registry, db_uri, tmp_path):
        from mlflow import MlflowClient

        for i in (1, 2, 3):
            _register(registry, tmp_path, data=bytes([i]))
        registry.promote("cls", 1)
        registry.promote("cls", 2)
        MlflowClient(tracking_uri=db_uri).set_registered_model_alias("cls", "production", "3")
        assert registry.rollback("cls").version == 2

    def test_alias_errors(self, registry, tmp_path):
        _register(registry, tmp_path)
        with pytest.raises(RegistryError, match="'cls' has no version 5"):
            registry.promote("cls", 5)
        with pytest.raises(RegistryError, match="version must be a positive integer"):
            registry.promote("cls", "1")  # type: ignore[arg-type]
        with pytest.raises(RegistryError, match="reserved"):
            registry.set_alias("cls", "latest", 1)
        with pytest.raises(RegistryError, match="cls@production: model 'cls' has no alias 'production'"):
            registry.rollback("cls")


class TestRefErrors:
    @pytest.mark.parametrize("ref", ["a@", "/3", "x/notanumber"])
    def test_malformed(self, registry, ref):
        with pytest.raises(RegistryError, match="bad model ref") as info:
            registry.get(ref)
        assert repr(ref) in str(info.value)

    def test_unknown_name_lists_known(self, registry, tmp_path):
        _register(registry, tmp_path)
        with pytest.raises(RegistryError, match=r"nope@production: no registered model 'nope' \(registered: cls\)"):
            registry.get("nope")
        with pytest.raises(RegistryError, match="no registered model 'nope'"):
            registry.fetch("nope/1", tmp_path / "x")

    def test_unknown_alias_lists_aliases(self, registry, tmp_path):
        _register(registry, tmp_path)
        registry.promote("cls", 1)
        with pytest.raises(RegistryError, match=r"cls@canary: model 'cls' has no alias 'canary' \(aliases: production -> 1\)"):
            registry.get("cls@canary")

    def test_unknown_version(self, registry, tmp_path):
        _register(registry, tmp_path)
        with pytest.raises(RegistryError, match="cls/9: model 'cls' has no version 9"):
            registry.get("cls/9")

    def test_version_not_made_by_grainflow(self, registry, db_uri, tmp_path):
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=db_uri)
        run = client.create_run(client.create_experiment("other", artifact_location=(tmp_path / "o").as_uri()))
        client.create_registered_model("foreign")
        client.create_model_version("foreign", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        with pytest.raises(RegistryError, match="foreign/1: model version was not registered by grainflow"):
            registry.get("foreign/1")


class TestVersionsNotByGrainflow:
    """A shared MLflow server holds versions other tools registered: they are listed,
    marked, and refused only where their files would be used."""

    @pytest.fixture
    def foreign(self, registry, db_uri, tmp_path):
        from mlflow import MlflowClient

        _register(registry, tmp_path)
        client = MlflowClient(tracking_uri=db_uri)
        run = client.create_run(client.create_experiment("other", artifact_location=(tmp_path / "o").as_uri()))
        client.set_terminated(run.info.run_id)
        client.create_registered_model("plain")
        client.create_model_version("plain", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        client.create_model_version("cls", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)  # cls/2
        return registry

    def test_listed_with_no_family(self, foreign):
        (plain,) = foreign.versions("plain")
        assert (plain.ref, plain.family, plain.registered_by_grainflow, plain.sha256) == ("plain/1", None, False, {})
        assert [(v.ref, v.family) for v in foreign.versions("cls")] == [("cls/1", "classifier"), ("cls/2", None)]
        assert foreign.list_models() == ["cls", "plain"]

    def test_refused_where_its_files_would_be_used(self, foreign, tmp_path):
        (plain,) = foreign.versions("plain")
        for use in (lambda: foreign.get("plain/1"), lambda: foreign.fetch(plain, tmp_path / "f"),
                    lambda: foreign.fetch("plain/1", tmp_path / "f"), lambda: foreign.promote("plain", 1),
                    lambda: foreign.register_bundle("ens", {"clf": "plain/1"})):
            with pytest.raises(RegistryError, match="plain/1: model version was not registered by grainflow"):
                use()

    def test_a_new_version_after_one_registered_elsewhere(self, foreign, tmp_path):
        v = _register(foreign, tmp_path, data=b"weights-1", reuse_identical=True)
        assert (v.ref, v.family) == ("cls/3", "classifier")  # cls/2 is not grainflow's: not reused


class TestFetchIntegrity:
    def test_tampered_artifact_refused(self, registry, db_uri, weights, tmp_path):
        v = registry.register("sam-tiny", weights, family="segmenter", config={})
        stored = stored_artifact(db_uri, v.run_id, "model.safetensors")
        data = bytearray(stored.read_bytes())
        data[-1] ^= 0xFF  # one flipped byte in the last tensor
        stored.write_bytes(bytes(data))
        tampered = sha256_file(stored)
        assert tampered != v.sha256["model.safetensors"]

        dest = tmp_path / "fetched"
        with pytest.raises(ArtifactIntegrityError) as info:
            registry.fetch("sam-tiny/1", dest)
        message = str(info.value)
        assert "'model.safetensors'" in message
        assert v.sha256["model.safetensors"] in message and tampered in message
        assert (info.value.file, info.value.expected, info.value.actual) == (
            "model.safetensors", v.sha256["model.safetensors"], tampered)
        assert list(dest.iterdir()) == []  # not returned, not left behind

    def test_missing_artifact_refused(self, registry, db_uri, weights, tmp_path):
        v = registry.register("sam-tiny", weights, family="segmenter", config={})
        stored_artifact(db_uri, v.run_id, "model.safetensors").unlink()
        with pytest.raises(ArtifactIntegrityError, match="'model.safetensors' cannot be read"):
            registry.fetch(v, tmp_path / "fetched")

    def test_verified_local_copy_reused_damaged_one_replaced(self, registry, db_uri, weights, tmp_path):
        v = registry.register("sam-tiny", weights, family="segmenter", config={})
        dest = tmp_path / "fetched"
        local = registry.fetch(v, dest)["model.safetensors"]

        local.write_bytes(b"damaged")  # a damaged local copy is fetched again
        assert registry.fetch(v, dest)["model.safetensors"].read_bytes() == weights.read_bytes()

        # The store is damaged now, but the local copy still matches the record.
        stored_artifact(db_uri, v.run_id, "model.safetensors").write_bytes(b"evil")
        assert registry.fetch(v, dest)["model.safetensors"].read_bytes() == weights.read_bytes()

    def test_default_dest_is_user_cache(self, registry, weights, tmp_path, monkeypatch):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        registry.register("sam-tiny", weights, family="segmenter", config={})
        files = registry.fetch("sam-tiny/1")
        local = files["model.safetensors"]
        assert local.parent.parent == tmp_path / "cache/grainflow/registry/sam-tiny"
        assert local.parent.name.startswith("1-") and local.read_bytes() == weights.read_bytes()

    def test_two_registries_with_one_ref_do_not_share_a_cache_folder(self, registry, weights, tmp_path,
                                                                      monkeypatch):
        """A laptop's and a cluster's registry both hold "sam-tiny/1" with other bytes:
        fetching one must not replace (or delete) the copy the other's loader holds."""
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        other = ModelRegistry(tracking_uri=f"sqlite:///{tmp_path / 'other.db'}")
        (tmp_path / "other").mkdir()
        other_weights = tmp_path / "other" / weights.name
        other_weights.write_bytes(weights.read_bytes() + b" ")
        registry.register("sam-tiny", weights, family="segmenter", config={})
        other.register("sam-tiny", other_weights, family="segmenter", config={})
        mine = registry.fetch("sam-tiny/1")[weights.name]
        theirs = other.fetch("sam-tiny/1")[weights.name]
        assert mine != theirs
        assert mine.read_bytes() == weights.read_bytes() and theirs.read_bytes() == other_weights.read_bytes()
        assert registry.fetch("sam-tiny/1")[weights.name] == mine  # reused, and still the right bytes
        assert mine.read_bytes() == weights.read_bytes()


class TestBundle:
    def test_bundle_pins_versions(self, registry, tmp_path):
        _register(registry, tmp_path, name="det", data=b"d1", family="detector")
        _register(registry, tmp_path, name="det", data=b"d2", family="detector")
        _register(registry, tmp_path, name="seg", data=b"s1", family="segmenter")
        registry.promote("det", 1)
        registry.promote("seg", 1, alias="canary")

        b = registry.register_bundle("ensemble", {"detector": "det@production", "segmenter": "seg@canary"})
        assert (b.name, b.version, b.family) == ("ensemble", 1, "bundle")
        assert b.config == {"members": {"detector": "det/1", "segmenter": "seg/1"}}

        registry.promote("det", 2)  # a later promotion does not change the bundle
        members = registry.get_bundle("ensemble/1")
        assert {r: m.ref for r, m in members.items()} == {"detector": "det/1", "segmenter": "seg/1"}
        assert members["detector"].family == "detector"

        b2 = registry.register_bundle("ensemble", {"detector": "det@production", "segmenter": "seg/1"})
        registry.promote("ensemble", b2.version)
        assert registry.get_bundle("ensemble")["detector"].ref == "det/2"

    def test_member_registered_again_with_other_files_is_refused(self, registry, db_uri, tmp_path):
        """A bundle pins its members' file digests, not just their version numbers: det/1
        deleted and registered again (version 1 again, other bytes) no longer fits."""
        from mlflow import MlflowClient

        def register_det(data: bytes) -> ModelVersion:
            return registry.register("det", {"best.pt": make_file(tmp_path, "best.pt", data)},
                                     family="detector", config={})

        first = register_det(b"d1")
        registry.register_bundle("ensemble", {"detector": "det/1"})
        assert registry.get_bundle("ensemble/1")["detector"].sha256 == first.sha256

        MlflowClient(tracking_uri=db_uri).delete_registered_model("det")
        again = register_det(b"other bytes")
        assert again.ref == "det/1" and again.sha256 != first.sha256
        with pytest.raises(RegistryError, match=r"ensemble/1: member 'detector' det/1 no longer has the files "
                                                r"the bundle pinned"):
            registry.get_bundle("ensemble/1")

    def test_deleted_member_names_the_bundle_and_role(self, registry, db_uri, tmp_path):
        from mlflow import MlflowClient

        _register(registry, tmp_path, name="det", data=b"d1", family="detector")
        _register(registry, tmp_path, name="clf", data=b"c1")
        registry.promote("ens", registry.register_bundle("ens", {"detector": "det/1", "classifier": "clf/1"}).version)
        MlflowClient(tracking_uri=db_uri).delete_model_version("clf", "1")
        with pytest.raises(RegistryError) as info:
            registry.get_bundle("ens")
        message = str(info.value)
        assert message.startswith("bundle ens@production (ens/1): member 'classifier' (clf/1) cannot be read: ")
        assert "model 'clf' has no version 1" in message and "register and promote a new bundle" in message

    def test_bundle_errors(self, registry, tmp_path):
        _register(registry, tmp_path, name="det", family="detector")
        with pytest.raises(RegistryError, match="det@production: model 'det' has no alias 'production'"):
            registry.register_bundle("ens", {"detector": "det"})
        with pytest.raises(RegistryError, match="bad bundle role"):
            registry.register_bundle("ens", {"a/b": "det/1"})
        with pytest.raises(RegistryError, match="no members"):
            registry.register_bundle("ens", {})
        registry.register_bundle("ens", {"detector": "det/1"})
        with pytest.raises(RegistryError, match="is a bundle, not a model"):
            registry.register_bundle("ens2", {"inner": "ens/1"})
        with pytest.raises(RegistryError, match="det/1 is a detector model, not a bundle"):
            registry.get_bundle("det/1")
        with pytest.raises(RegistryError, match="'ens' is registered as a bundle, not a model"):
            _register(registry, tmp_path, name="ens")


class TestMovedRegistry:
    """A SQLite registry folder copied elsewhere still records its old artifact folder."""

    def _moved(self, registry, db_uri, tmp_path) -> tuple[Path, Path]:
        """(old folder, new folder): the registry's folder copied away, the original deleted."""
        import shutil

        registry.promote("cls", _register(registry, tmp_path).version)
        old = Path(db_uri.removeprefix("sqlite:///")).parent
        new = tmp_path / "moved"
        shutil.copytree(old, new)
        shutil.rmtree(old)
        return old, new

    def test_refused_naming_both_folders_and_the_old_one_is_never_written(self, registry, db_uri, tmp_path):
        old, new = self._moved(registry, db_uri, tmp_path)
        copy = ModelRegistry(sqlite_uri(new / "mlflow.db"))
        assert copy.get("cls@production").version == 1  # the records themselves read fine
        for use in (lambda: copy.fetch("cls@production", tmp_path / "fetched"),
                    lambda: _register(copy, tmp_path, name="other")):
            with pytest.raises(RegistryError) as info:
                use()
            message = str(info.value)
            assert f"moved or copied from {old}?" in message
            assert str(old / "artifacts") in message and str(new / "artifacts") in message
            assert "repoint_artifacts" in message
        assert not old.exists()  # nothing written to (or recreated at) the old folder
        assert copy.list_models() == ["cls"]  # the refused registration left no model behind

    def test_repoint_artifacts_adopts_the_copy(self, registry, db_uri, tmp_path):
        from engine.registry.relocation import repoint_artifacts

        old, new = self._moved(registry, db_uri, tmp_path)
        assert repoint_artifacts(new / "mlflow.db") == [(old / "artifacts").as_uri()]
        copy = ModelRegistry(sqlite_uri(new / "mlflow.db"))
        assert copy.fetch("cls@production", tmp_path / "fetched")  # read from the copy, sha256 checked
        v = _register(copy, tmp_path, name="other")
        assert stored_artifact(copy.tracking_uri, v.run_id, next(iter(v.sha256))).is_relative_to(new / "artifacts")
        assert not old.exists()
        assert repoint_artifacts(new / "mlflow.db") == []  # at home now

    def test_artifacts_chosen_elsewhere_are_not_a_move(self, db_uri, tmp_path):
        chosen = (tmp_path / "bucket-mount").as_uri()
        _register(ModelRegistry(db_uri, artifact_location=chosen), tmp_path)
        # opened later without naming the location again: that location is no sign of a move
        reg = ModelRegistry(db_uri)
        assert reg.fetch("cls/1", tmp_path / "fetched")
        assert _register(reg, tmp_path, data=b"w2").version == 2


class TestBackend:
    def test_env_tracking_uri_respected(self, db_uri, tmp_path, monkeypatch):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", db_uri)
        monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        reg = ModelRegistry()
        assert (reg.tracking_uri, reg.registry_uri) == (db_uri, db_uri)
        _register(reg, tmp_path)
        assert ModelRegistry(db_uri).get("cls/1").version == 1

    def test_explicit_uri_wins_over_env(self, db_uri, monkeypatch):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
        monkeypatch.setenv("MLFLOW_REGISTRY_URI", "http://127.0.0.1:2")
        reg = ModelRegistry(db_uri)
        assert (reg.tracking_uri, reg.registry_uri) == (db_uri, db_uri)

    def test_embedded_default_in_user_data_dir(self, empty_db, tmp_path, monkeypatch):
        import shutil

        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
        home = tmp_path / "data" / "grainflow"
        home.mkdir(parents=True)
        shutil.copyfile(empty_db, home / "mlflow.db")  # skip the schema build
        reg = ModelRegistry()
        assert reg.tracking_uri == f"sqlite:///{home / 'mlflow.db'}"
        assert reg.artifact_location == (home / "artifacts").as_uri()
        v = _register(reg, tmp_path)
        assert stored_artifact(reg.tracking_uri, v.run_id, next(iter(v.sha256))).is_relative_to(home / "artifacts")

    def test_quiet_defaults_only_where_the_user_has_not_chosen(self, db_uri, monkeypatch):
        import os

        quiet = ("MLFLOW_DISABLE_TELEMETRY", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT")
        for key in quiet:
            monkeypatch.setenv(key, "-")  # recorded, so what ModelRegistry() sets is undone after
            monkeypatch.delenv(key)
        monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")  # this user wants the bars
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")  # and a patient client
        ModelRegistry(db_uri)
        assert {k: os.environ.get(k) for k in quiet} == {
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "true",  # the user's value kept
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # not MLflow's 7, minutes of backoff
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "300",
        }

    def test_a_server_that_is_down_is_an_error_naming_it_at_once(self, monkeypatch):
        """MLflow's client retries a refused connection for about four minutes; the
        registry says at once which server it could not reach."""
        import time

        port = free_port()  # nothing listens there
        for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
            monkeypatch.setenv(key, "-")  # recorded, so what ModelRegistry() sets is undone after
            monkeypatch.delenv(key)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:secret@127.0.0.1:{port}")
        monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        start = time.monotonic()
        with pytest.raises(RegistryError) as info:
            ModelRegistry().list_models()
        assert time.monotonic() - start < 15
        message = str(info.value)
        assert f"MLflow tracking server http://user:***@127.0.0.1:{port} is not reachable" in message
        assert "Connection refused" in message and "secret" not in message

    def test_pickles_for_ray(self, registry, tmp_path):
        _register(registry, tmp_path)
        clone = pickle.loads(pickle.dumps(registry))
        assert clone.get("cls/1") == registry.get("cls/1")

    def test_import_has_no_side_effects(self):
        import os
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        code = ("import os, sys, engine.registry; "
                "assert 'mlflow' not in sys.modules; "
                "assert not any(k.startswith('MLFLOW_') for k in os.environ)")
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
