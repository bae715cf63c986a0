"""The Serve application: the ingress bound to the four stage deployments.

    app = build_app(ServeConfig(bundle="grainflow-demo", keys_file="keys.json"))
    serve.run(app, name="grainflow", route_prefix="/")

`app_builder` is what `serve run` / `serve deploy` import (cluster/serve.yaml:
``import_path: engine.serving.app:app_builder``, `args` = ServeConfig fields).
Every deployment gets `ServeConfig.user_config()` as its user_config: changing the
split, or bumping `generation` after a promotion or rollback, reaches the running
replicas through `reconfigure` (no restart).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from engine.serving.config import ServeConfig

APP_NAME = "grainflow"


def build_app(config: ServeConfig) -> Application:
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
    """`serve run engine.serving.app:app_builder` entry: args are ServeConfig fields."""
    return build_app(ServeConfig(**(args or {})))


def run(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME):
    """Start Serve's HTTP proxy on host:port (in the connected Ray) and run the app.
    Returns the ingress's DeploymentHandle; the URL is http://host:port/."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(config), name=name, route_prefix="/")
