"""The `grainflow serve` command (registered on the app by engine.cli).

    grainflow serve --bundle grainflow-demo --keys keys.json [--tracking-uri URI] [--config serve.yaml] [--port 8000]
    grainflow serve keys add --keys keys.json --tenant lab-a --scope analyze
    grainflow serve keys revoke --keys keys.json k3f9a1c2

A running server reads the keys file again within a second of a change: keys added or
revoked take effect without a restart (engine.serving.keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from engine.errors import printable


def serve_command(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="ServeConfig YAML (engine.serving.config)."),
    bundle: Optional[str] = typer.Option(
        None, help="Registered ensemble bundle's NAME (overrides the config's); its production and canary aliases "
                   "answer as the config's split weighs them."),
    keys: Optional[Path] = typer.Option(None, "--keys", help="Keys file (overrides the config's)."),
    tracking_uri: Optional[str] = typer.Option(
        None, help="Model registry (overrides the config's, which overrides MLFLOW_TRACKING_URI; default: the "
                   "user data dir's). `make demo` registers its models in sqlite:///<repo>/out/demo/registry.db."),
    audit_log: Optional[Path] = typer.Option(None, help="Audit log (default $GRAINFLOW_AUDIT_LOG or the user data dir)."),
    host: str = typer.Option("127.0.0.1", help="Address the HTTP proxy binds; loopback unless you mean otherwise."),
    port: int = typer.Option(8000, min=1, max=65535, help="HTTP port."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join (default: RAY_ADDRESS, else an embedded Ray)."),
) -> None:
    """Serve the ensemble over HTTP on Ray Serve; prints the URL and runs until Ctrl-C."""
    if ctx.invoked_subcommand is not None:
        return
    import os
    import time

    import ray
    from ray import serve

    from engine.errors import GrainflowError
    from engine.serving.app import run
    from engine.serving.config import ServeConfig, check_bundle_name

    if bundle is not None:
        try:
            check_bundle_name(bundle)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--bundle") from None
    cfg = ServeConfig.from_yaml(config) if config else ServeConfig()
    updates = {k: v for k, v in {"bundle": bundle, "keys_file": str(keys) if keys else None,
                                 "audit_log": str(audit_log) if audit_log else None,
                                 "tracking_uri": tracking_uri}.items() if v is not None}
    cfg = cfg.model_copy(update=updates)
    if cfg.keys_file is None:
        raise GrainflowError("no keys file: pass --keys (create one with `grainflow serve keys add`)")
    from engine.serving.keys import KeyStore

    if not len(KeyStore.load(cfg.keys_file)):
        raise GrainflowError(f"{cfg.keys_file}: holds no keys; add one with `grainflow serve keys add`")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        _check_registry(cfg)
        _start_embedded_ray(cfg)
    try:
        url = run(cfg, host=host, port=port)
        typer.echo(f"grainflow is serving {cfg.bundle} at {url}  (viewer: /, API docs: /docs); "
                   f"Ctrl-C stops it", err=False)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


def _check_registry(cfg) -> None:
    """Before an embedded Ray starts (it reads the registry from this machine): the
    registry exists and the config's bundle resolves; else one line naming the registry
    (replicas that cannot load the bundle would only retry)."""
    import os

    from engine.errors import GrainflowError
    from engine.registry.backend import check_existing
    from engine.serving.versions import resolve_arms

    where = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    check_existing(where)
    try:
        resolve_arms(cfg.registry(), cfg.bundle, cfg.split)
    except GrainflowError as exc:
        raise GrainflowError(f"{exc} (registry: {where or 'the default in the user data dir'}; "
                             "--tracking-uri names another)") from None


def _start_embedded_ray(cfg) -> None:
    """ray.init with a logical CPU slot for every replica the config starts (default 5 x
    0.5 CPUs): a 2-core machine has 2 slots and would leave the ingress unscheduled for
    ever; the stages take turns on the real cores. GPUs cannot be conjured: refused."""
    import math
    import os
    import tempfile

    import ray
    import torch

    from engine.errors import GrainflowError

    cpus, gpus = cfg.resource_demand()
    if gpus > 0 and not torch.cuda.is_available():
        raise GrainflowError(f"the serve config asks for {gpus:g} GPU(s) and this machine has none; set "
                             "num_gpus: 0 in its deployments")
    # a short temp dir: Ray's socket paths must stay under 107 bytes
    ray.init(_temp_dir=tempfile.mkdtemp(prefix="gf", dir="/tmp"), include_dashboard=False,
             num_cpus=max(os.cpu_count() or 1, math.ceil(cpus)))


def keys_add(
    keys: Path = typer.Option(..., "--keys", help="Keys file to create or extend (0600)."),
    tenant: str = typer.Option(..., help="Tenant the key belongs to."),
    scope: list[str] = typer.Option(["analyze"], "--scope", help="analyze and/or admin (repeatable)."),
    rate_per_minute: Optional[float] = typer.Option(None, help="Requests per minute (default: the server's)."),
) -> None:
    """Create an API key; it is printed once and stored only as a salted hash."""
    from engine.serving.keys import add_key

    key_id, key = add_key(keys, tenant, scope, rate_per_minute=rate_per_minute)
    typer.echo(printable(f"key id {key_id} for tenant {tenant} (scopes: {', '.join(scope)})"))
    typer.echo(key)


def keys_revoke(
    key_id: str = typer.Argument(..., help="Id of the key to revoke (`keys list`; the part after gf_, before the "
                                           "next _), or the whole key."),
    keys: Path = typer.Option(..., "--keys", help="Keys file holding it."),
) -> None:
    """Revoke an API key: its entry leaves the keys file, and a running server refuses it
    (401) within a second, without a restart."""
    from engine.serving.keys import revoke_key

    principal = revoke_key(keys, key_id)
    typer.echo(printable(f"key id {key_id} of tenant {principal.tenant} revoked"))


def keys_list(keys: Path = typer.Option(..., "--keys", help="Keys file to read.")) -> None:
    """List the keys of a keys file: id, tenant, scopes and rate (never a secret)."""
    from engine.serving.keys import list_keys

    principals = list_keys(keys)
    if not principals:
        typer.echo(printable(f"{keys}: no keys"))
    for k in principals:  # a keys file is text anyone with write access may have edited
        rate = "server default" if k.rate_per_minute is None else f"{k.rate_per_minute:g}/min"
        typer.echo(printable(f"{k.key_id}  tenant {k.tenant}  scopes {','.join(sorted(k.scopes))}  rate {rate}"))


def register(app: typer.Typer) -> None:
    """Add this package's commands to the `grainflow` app."""
    serve_app = typer.Typer(help="Serve the ensemble over HTTP (Ray Serve); `serve keys add` makes API keys.")
    serve_app.callback(invoke_without_command=True)(serve_command)
    keys_app = typer.Typer(help="API keys of `grainflow serve`. A running server reads the keys file again "
                                "within a second of a change: keys added or revoked take effect without a "
                                "restart.", no_args_is_help=True)
    keys_app.command("add")(keys_add)
    keys_app.command("revoke")(keys_revoke)
    keys_app.command("list")(keys_list)
    serve_app.add_typer(keys_app, name="keys")
    app.add_typer(serve_app, name="serve")
