"""Configs: cluster/serve.yaml passes Serve's own schema and builds the app; ServeConfig
refuses bad values with messages naming them; keys are stored hashed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from engine.errors import GrainflowError

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_serve_yaml_is_valid_and_builds():
    from ray.serve.schema import ServeDeploySchema

    from engine.serving.app import app_builder
    from engine.serving.config import ServeConfig

    data = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)
    (app,) = schema.applications
    assert app.import_path == "engine.serving.app:app_builder"
    config = ServeConfig(**app.args)
    assert config.settings("segmenter").num_gpus == 0.5
    assert config.settings("detector").options()["autoscaling_config"]["max_replicas"] == 4
    app_builder(app.args)  # the deployments bind with these options
    live = {d.name: d.user_config for d in app.deployments}
    assert set(live) == {"ingress", "preprocess", "detector", "segmenter", "classifier"}
    assert all(v == {"split": {"production": 0.9, "canary": 0.1}, "generation": 0, "alias_ttl_s": 30} for v in live.values())


def test_bad_config_values_are_named():
    from pydantic import ValidationError

    from engine.serving.config import ServeConfig

    with pytest.raises(ValidationError, match="split"):
        ServeConfig(split={"canary": 1.0})
    with pytest.raises(ValidationError, match="deployments"):
        ServeConfig(deployments={"nosuch": {}})
    with pytest.raises(ValidationError, match="conf"):
        ServeConfig(ensemble={"conf": 2})
    # the aliases that answer come from the split: a bundle is named alone
    for ref in ("grainflow-demo@production", "grainflow-demo/3"):
        with pytest.raises(ValidationError, match="give the name alone"):
            ServeConfig(bundle=ref)


class TestLiveSettings:
    """A deployment's user_config reaches the replicas unchecked (`serve deploy` of an
    edited file); `with_live_settings` holds it to the startup rules (the running app's
    refusal: tests/serving/test_versions.py)."""

    @pytest.mark.parametrize("user_config, words", [
        ({"split": {"canary": 1.0}}, "split: needs a 'production' weight (0 is allowed"),
        ({"split": {"Production": 0.9, "canary": 0.1}}, "got 'Production', 'canary'"),
        ({"split": {"production": "most", "canary": 0.1}}, "split.production: Input should be a valid number"),
        ({"split": {"production": float("nan")}}, "split: weights must be finite"),
        ({"split": {"production": 1.0}, "alias_ttl_s": -1}, "alias_ttl_s: Input should be greater than or equal to 0"),
        ({"split": {"production": 1.0}, "spilt": {"canary": 1.0}}, "spilt: not live settings"),
        ({"split": {"production": 1.0}, "max_pixels": 1}, "max_pixels: not live settings"),
        (["production"], "expected a mapping of split, generation, alias_ttl_s, got list"),
    ])
    def test_settings_the_startup_refuses_are_refused_naming_the_field(self, user_config, words):
        from engine.serving.config import ServeConfig

        with pytest.raises(GrainflowError, match=r"^user_config: ") as refused:
            ServeConfig(bundle="b").with_live_settings(user_config)
        assert words in str(refused.value)

    def test_good_settings_apply_over_the_config_as_yaml_would_give_them(self):
        from engine.serving.config import ServeConfig

        config = ServeConfig(bundle="b", max_pixels=1000)
        live = config.with_live_settings({"split": {"production": "0.9", "canary": "0.1"}, "generation": 3})
        assert live.split == {"production": 0.9, "canary": 0.1} and live.generation == 3
        assert live.max_pixels == 1000 and live.alias_ttl_s == config.alias_ttl_s
        assert config.split == {"production": 1.0}  # the config it came from is unchanged


def test_grainflow_serve_bundle_takes_a_name(tmp_path):
    from typer.testing import CliRunner

    from engine.cli import app

    result = CliRunner().invoke(app, ["serve", "--bundle", "grainflow-demo@production", "--keys", "k.json"])
    assert result.exit_code == 2 and "give the name alone" in result.output


def test_serve_config_files_read_or_refused_naming_the_field(tmp_path):
    """`grainflow serve -c` takes a ServeConfig YAML or a Serve config file such as
    cluster/serve.yaml; a bad value or a missing file is one line naming it."""
    from engine.serving.config import ServeConfig

    cluster = ServeConfig.from_yaml(ROOT / "cluster" / "serve.yaml")
    assert cluster.bundle == "grainflow-demo" and cluster.split == {"production": 0.9, "canary": 0.1}
    assert cluster.settings("segmenter").num_gpus == 0.5
    (tmp_path / "bad.yaml").write_text("bundle: b\nmax_pixels: -3\n")
    with pytest.raises(GrainflowError, match=r"bad.yaml: max_pixels: Input should be greater than or equal to 1"):
        ServeConfig.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(GrainflowError, match="nowhere.yaml: cannot read the serve config"):
        ServeConfig.from_yaml(tmp_path / "nowhere.yaml")


class TestKeys:
    def test_stored_hashed_and_verified(self, tmp_path):
        from engine.serving.keys import KeyStore, add_key

        path = tmp_path / "keys.json"
        key_id, key = add_key(path, "lab-a", ["analyze", "admin"])
        text = path.read_text()
        assert key.split("_", 2)[2] not in text and key_id in text
        assert path.stat().st_mode & 0o777 == 0o600
        store = KeyStore.load(path)
        p = store.verify(key)
        assert (p.tenant, p.key_id, p.scopes) == ("lab-a", key_id, frozenset({"analyze", "admin"}))
        assert store.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        assert store.verify(None) is None and store.verify("nonsense") is None

    def test_bad_keys_file_is_a_clear_error(self, tmp_path):
        from engine.serving.keys import KeyStore, add_key

        (tmp_path / "k.json").write_text(json.dumps({"keys": [{"id": "x"}]}))
        with pytest.raises(GrainflowError, match="not a grainflow keys file"):
            KeyStore.load(tmp_path / "k.json")
        with pytest.raises(GrainflowError, match="scopes"):
            add_key(tmp_path / "k2.json", "t", ["root"])
        for rate in (0, -5):  # 0 would silently mean the server's default, -5 a key refused for ever
            with pytest.raises(GrainflowError, match="rate_per_minute"):
                add_key(tmp_path / "k3.json", "t", ["analyze"], rate_per_minute=rate)
        key_id, _ = add_key(tmp_path / "k4.json", "t", ["analyze"], rate_per_minute=5)
        edited = json.loads((tmp_path / "k4.json").read_text())
        edited["keys"][0]["rate_per_minute"] = -1  # edited by hand
        (tmp_path / "k4.json").write_text(json.dumps(edited))
        with pytest.raises(GrainflowError, match=f"key {key_id}: rate_per_minute -1 must be positive"):
            KeyStore.load(tmp_path / "k4.json")

    def test_the_store_follows_the_file_without_a_restart(self, tmp_path):
        from engine.serving.keys import KeyStore, add_key, revoke_key

        path = tmp_path / "keys.json"
        a_id, a = add_key(path, "lab-a", ["analyze"])
        store = KeyStore.load(path, check_every_s=0)
        _, b = add_key(path, "lab-b", ["analyze"])
        assert store.verify(b).tenant == "lab-b"  # added: taken up
        assert revoke_key(path, a_id).tenant == "lab-a"
        assert store.verify(a) is None and store.verify(b) is not None  # revoked: refused at once
        with pytest.raises(GrainflowError, match=f"no key 'k0'; its keys: {b.split('_')[1]}"):
            revoke_key(path, "k0")

    def test_keys_are_listed_without_secrets_and_revoked_by_id_or_whole_key(self, tmp_path):
        """`grainflow serve keys list` shows ids, tenants, scopes and rates; a key can be
        revoked by its id or by the whole key as it was handed out."""
        import subprocess
        import sys

        from engine.serving.keys import add_key, list_keys, revoke_key

        path = tmp_path / "keys.json"
        a_id, a = add_key(path, "lab-a", ["analyze", "admin"], rate_per_minute=30)
        b_id, b = add_key(path, "lab-b", ["analyze"])
        assert [(k.key_id, k.tenant, k.scopes, k.rate_per_minute) for k in list_keys(path)] == sorted([
            (a_id, "lab-a", frozenset({"analyze", "admin"}), 30.0), (b_id, "lab-b", frozenset({"analyze"}), None)])
        cli = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "keys", "list", "--keys", str(path)],
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert f"{a_id}  tenant lab-a  scopes admin,analyze  rate 30/min" in cli.stdout
        assert f"{b_id}  tenant lab-b  scopes analyze  rate server default" in cli.stdout
        assert a.split("_", 2)[2] not in cli.stdout and b.split("_", 2)[2] not in cli.stdout
        assert revoke_key(path, a).tenant == "lab-a"  # the whole key
        assert [k.key_id for k in list_keys(path)] == [b_id]
        # a tenant name with terminal escapes (a keys file is text anyone who may write it
        # can edit) is listed as visible escapes
        add_key(path, "lab-c\x1b]0;title\x07\x1b[2K", ["analyze"])
        cli = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "keys", "list", "--keys", str(path)],
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert "tenant lab-c\\x1b]0;title\\x07\\x1b[2K  scopes analyze" in cli.stdout, cli.stdout
        assert "\x1b" not in cli.stdout and "\x07" not in cli.stdout

    def test_a_file_half_edited_keeps_the_keys_a_removed_file_refuses_all(self, tmp_path):
        from engine.serving.keys import KeyStore, add_key

        path = tmp_path / "keys.json"
        _, a = add_key(path, "lab-a", ["analyze"])
        store = KeyStore.load(path, check_every_s=0)
        text = path.read_text()
        path.write_text(text[: len(text) // 2])  # an editor's save caught half way
        assert store.verify(a).tenant == "lab-a"
        path.write_text(text)
        assert store.verify(a).tenant == "lab-a"
        path.unlink()
        assert store.verify(a) is None and len(store) == 0

    def test_the_file_is_looked_at_once_per_interval(self, tmp_path):
        from engine.serving.keys import KeyStore, add_key, revoke_key

        path = tmp_path / "keys.json"
        a_id, a = add_key(path, "lab-a", ["analyze"])
        store = KeyStore.load(path)  # the default: a stat a second at most, not one per request
        revoke_key(path, a_id)
        assert store.verify(a) is not None  # within the second: not looked at yet
        store._checked_at -= 1.0  # a second later
        assert store.verify(a) is None


def test_rate_limiter_refills():
    from engine.serving.ratelimit import RateLimiter

    now = [0.0]
    rl = RateLimiter(clock=lambda: now[0])
    assert [rl.allow("k", 2)[0] for _ in range(3)] == [True, True, False]
    assert rl.allow("k", 2)[1] == 30  # one token per 30 s
    now[0] = 30.0
    assert rl.allow("k", 2) == (True, 0)


def test_split_is_sticky_and_proportional():
    from engine.serving.versions import Arms

    arms = Arms({"production": "b/1", "canary": "b/2"}, {"production": 0.8, "canary": 0.2})
    picks = [arms.choose(f"r{i}")[0] for i in range(5000)]
    assert abs(picks.count("canary") / 5000 - 0.2) < 0.03
    assert all(arms.choose("same")[0] == arms.choose("same")[0] for _ in range(5))


def test_a_split_without_production_traffic_still_resolves_production(serve_env):
    """production at weight 0 (all traffic to the canary) is valid: production stays
    resolved for /healthz and /v1/models, and answers while no other arm can."""
    from engine.serving.versions import Arms, resolve_arms

    from .conftest import BUNDLE

    arms = resolve_arms(serve_env["registry"], BUNDLE, {"production": 0.0, "canary": 1.0})
    assert arms.refs["production"] == serve_env["registry"].get(f"{BUNDLE}@production").ref
    assert Arms({"production": "b/1"}, {"production": 0.0}).choose("r1") == ("production", "b/1")
    canary_only = Arms({"production": "b/1", "canary": "b/2"}, {"production": 0.0, "canary": 1.0})
    assert {canary_only.choose(f"r{i}") for i in range(50)} == {("canary", "b/2")}


@pytest.mark.parametrize("path, root_path, scope", [
    ("/v1/analyze", "", "analyze"),
    ("/lab/v1/analyze", "/lab", "analyze"),  # Serve's route_prefix arrives as root_path, left on the path
    ("/lab/v1/admin/refresh", "/lab", "admin"),
    ("/lab/healthz", "/lab", None),
    ("/lab", "/lab", None),
])
def test_keys_are_checked_under_any_route_prefix(path, root_path, scope):
    from starlette.requests import Request

    from engine.serving.ingress import _route_path, _scope_of

    request = Request({"type": "http", "method": "GET", "path": path, "root_path": root_path, "headers": []})
    assert _scope_of(_route_path(request)) == scope


def test_grainflow_serve_names_the_registry_when_the_bundle_is_not_in_it(tmp_path):
    """`make demo` registers its models in out/demo/registry.db: serve must be pointed
    there (--tracking-uri or MLFLOW_TRACKING_URI), and says which registry it looked in,
    before any Ray starts."""
    import os
    import subprocess
    import sys

    from engine.serving.keys import add_key

    add_key(tmp_path / "keys.json", "lab", ["analyze"])
    from engine.registry import ModelRegistry

    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    ModelRegistry(tracking_uri=empty).list_models()  # a registry with no models in it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--bundle", "grainflow-demo", "--keys",
           str(tmp_path / "keys.json"), "--tracking-uri", empty, "--port", "9"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "grainflow-demo" in p.stderr and empty in p.stderr and "ray" not in p.stdout.lower()
    # a config's registry wins over the shell's MLFLOW_TRACKING_URI (an explicit setting first)
    (tmp_path / "serve.yaml").write_text(f"bundle: grainflow-demo\ntracking_uri: {empty}\n")
    other = f"sqlite:///{tmp_path / 'other.db'}"
    cmd = [sys.executable, "-m", "engine.cli", "serve", "-c", str(tmp_path / "serve.yaml"), "--keys",
           str(tmp_path / "keys.json"), "--port", "9"]
    p = subprocess.run(cmd, env={**env, "MLFLOW_TRACKING_URI": other}, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert p.returncode == 2 and empty in p.stderr and other not in p.stderr, p.stderr[-2000:]
    # a registry file that does not exist is named, not created empty
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--bundle", "grainflow-demo", "--keys",
           str(tmp_path / "keys.json"), "--tracking-uri", other, "--port", "9"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and "does not exist" in p.stderr and not (tmp_path / "other.db").exists()
