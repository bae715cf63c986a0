"""The Serve application: the ingress bound to the four stage deployments.

    deploy(ServeConfig(bundle="grainflow-demo", keys_file="keys.json"))   # Serve already started
    deploy(config.model_copy(update={"split": {"production": 1.0}, "generation": 3}))  # live update

`deploy` goes through Serve's declarative path, as `serve run cluster/serve.yaml` and
`serve deploy` do: the application is `app_builder` (``import_path:
engine.serving.app:app_builder``) with `args` = the ServeConfig fields that need new
replicas when they change, and each deployment's `user_config` = the live fields
(`ServeConfig.user_config`: split, generation, alias_ttl_s). Serve keeps the running
replicas when only user_config changed and calls their `reconfigure`: a new split, or a
bumped `generation` after a registry promote/rollback, takes effect without a restart.
(`serve.run(build_app(...))`, the imperative path, gives every call a new code version
and replaces all replicas, so it is not used for updates.)
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve import Application

from engine.serving.config import DEPLOYMENTS, ServeConfig

APP_NAME = "grainflow"
IMPORT_PATH = "engine.serving.app:app_builder"


def build_app(config: ServeConfig) -> Application:
    """The bound application (deployment options from `config.deployments`)."""
    from engine.serving.deployments import Classifier, Detector, Preprocess, Segmenter
    from engine.serving.ingress import Ingress

    # Live settings travel only in user_config: a change to them is a reconfigure of the
    # running replicas, whereas changed constructor arguments would replace them.
    data, user = config.model_dump(exclude=set(config.user_config())), config.user_config()

    def bind(deployment, name, *args):
        return deployment.options(user_config=user, **config.settings(name).options()).bind(data, *args)

    stages = [bind(d, n) for d, n in ((Preprocess, "preprocess"), (Detector, "detector"),
                                      (Segmenter, "segmenter"), (Classifier, "classifier"))]
    return bind(Ingress, "ingress", *stages)


def app_builder(args: dict[str, Any]) -> Application:
    """`serve run/deploy` entry: args are ServeConfig fields."""
    return build_app(ServeConfig(**(args or {})))


def application_schema(config: ServeConfig, name: str = APP_NAME) -> dict[str, Any]:
    """This app as one entry of a Serve config file's `applications` (module doc)."""
    user = config.user_config()
    return {"name": name, "route_prefix": "/", "import_path": IMPORT_PATH,
            "args": config.model_dump(exclude=set(user), exclude_defaults=True),
            "deployments": [{"name": d, "user_config": user} for d in DEPLOYMENTS]}


def deploy(config: ServeConfig, *, name: str = APP_NAME, timeout_s: float = 600.0) -> None:
    """Deploy or update the app on the running Serve instance (serve.start first) and
    wait until it is RUNNING (raises TimeoutError or RuntimeError if it fails)."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    # the same call `serve run <config file>` makes (ray/serve/scripts.py)
    _get_global_client().deploy_apps(ServeDeploySchema(applications=[application_schema(config, name)]))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        if app is not None and app.status == "RUNNING" and all(
                d.status == "HEALTHY" for d in app.deployments.values()):
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"serve app {name!r} failed to deploy: {app.message}")
        time.sleep(0.5)
    raise TimeoutError(f"serve app {name!r} not running after {timeout_s:.0f} s")


def run(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME) -> str:
    """Start Serve's HTTP proxy on host:port (in the connected Ray), deploy the app and
    return its URL."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    deploy(config, name=name)
    return f"http://{host}:{port}/"
