"""One Serve application for the serving tests, on the session's Ray.

Two registered versions of a tiny seeded ensemble (v1 production, v2 canary-able), a
keys file with an analyze key, an admin key and a slow key (1 request a minute), an
audit log in tmp; Serve's HTTP proxy on 127.0.0.1 and a free port. Shut down at the
end of the package so other test modules are unaffected.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from engine.local_head import free_port

BUNDLE = "serve-tiny"
ENSEMBLE = {"conf": 0.001, "max_det": 8}  # random weights score low: keep some boxes


def synthetic_image(seed: int = 0, size: int = 256) -> tuple[np.ndarray, float]:
    """A procedural SEM micrograph (engine.synth): (its stored pixels, pixel size nm)."""
    from engine.synth.image import render_image
    from engine.synth.plan import plan_archive

    plan = plan_archive(n_images=1, seed=seed, size=size, chunk=size, materials=["porous_ceramic"],
                        modalities=["SEM"])[0]
    return np.asarray(render_image(plan)[0]), float(plan.pixel_size_nm)


@pytest.fixture(scope="package")
def serve_env(tmp_path_factory):
    """Registry with versions 1 and 2 of BUNDLE, keys, audit path."""
    from engine.pipeline.bundle import register_ensemble
    from engine.pipeline.demo_models import untrained_tiny_models
    from engine.registry import ModelRegistry
    from engine.runtime import configure_offline
    from engine.serving.keys import add_key

    configure_offline()
    root = tmp_path_factory.mktemp("serve")
    tracking = f"sqlite:///{root}/m.db"
    registry = ModelRegistry(tracking_uri=tracking)
    register_ensemble(registry, untrained_tiny_models(0), BUNDLE, workdir=root / "v1")
    register_ensemble(registry, untrained_tiny_models(1), BUNDLE, workdir=root / "v2", promote=False)
    keys = root / "keys.json"
    env = {"root": root, "tracking_uri": tracking, "registry": registry, "keys_file": str(keys),
           "audit_log": str(root / "audit.jsonl"), "cache_dir": str(root / "cache")}
    env["analyze_key"] = add_key(keys, "lab-a", ["analyze"])[1]
    env["admin_key"] = add_key(keys, "ops", ["admin"])[1]
    env["slow_key"] = add_key(keys, "lab-slow", ["analyze"], rate_per_minute=1)[1]
    return env


def serve_config(env, **overrides):
    from engine.serving.config import ServeConfig

    base = dict(bundle=BUNDLE, tracking_uri=env["tracking_uri"], cache_dir=env["cache_dir"],
                keys_file=env["keys_file"], audit_log=env["audit_log"], ensemble=ENSEMBLE, alias_ttl_s=0,
                max_body_bytes=8 * 2**20, max_pixels=2048 * 2048,
                deployments={"detector": {"num_replicas": 2, "num_cpus": 0.25},
                             "ingress": {"num_cpus": 0.25}, "preprocess": {"num_cpus": 0.25},
                             "segmenter": {"num_cpus": 0.25}, "classifier": {"num_cpus": 0.25}})
    base.update(overrides)
    return ServeConfig(**base)


@pytest.fixture(scope="package")
def served(ray_session, serve_env):
    """The running app: {"url", "config", "env", "deploy"(config) -> redeploy}."""
    from ray import serve

    from engine.serving.app import deploy

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = serve_config(serve_env)

    deploy(config)
    yield {"url": f"http://127.0.0.1:{port}", "config": config, "env": serve_env, "deploy": deploy}
    serve.shutdown()


@pytest.fixture(scope="package")
def client(served):
    with httpx.Client(base_url=served["url"], timeout=120) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def png_bytes(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def replica_pids() -> dict[str, int]:
    """Actor name -> pid of this app's live Serve replicas (from the GCS actor table;
    the public state API needs the dashboard, which the test Ray runs without)."""
    import ray

    actors = ray._private.state.actors()
    return {a["Name"]: a["Pid"] for a in actors.values()
            if a["State"] == "ALIVE" and a["ActorClassName"].startswith("ServeReplica:grainflow:")}
