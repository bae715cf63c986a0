"""What the serving application runs with: `ServeConfig`, read from YAML or built in code.

    config = ServeConfig.from_yaml("serve.yaml")      # or ServeConfig(bundle="grainflow-demo", ...)

Everything a replica needs travels in this one object (it pickles and is JSON-able), so
the same config drives `grainflow serve`, tests and cluster/serve.yaml's arguments.

Fields (units in the names):

- bundle: registry name of the ensemble bundle; deployments load `bundle@production` and,
  when `split.canary` > 0 and the alias exists, `bundle@canary`.
- tracking_uri: the MLflow registry (None: the embedded default); cache_dir: where
  fetched model files go.
- split: traffic weights per alias (`{"production": 0.9, "canary": 0.1}`); a request's
  arm is chosen from its `X-Request-ID` (sticky), `engine.serving.versions`.
- alias_ttl_s: how often replicas look at the registry's aliases again (0: only on
  reconfigure). `generation`: bump it (serve.run / serve deploy with a new user_config)
  to make every replica re-read the aliases now. split, alias_ttl_s and generation are
  the live settings (`LIVE_FIELDS`): a replica takes a new user_config through
  `with_live_settings`, which checks it by the same rules as here and refuses it whole
  (the replica goes on with the settings it has) when any of it is wrong.
- ensemble: `EnsembleConfig` fields (conf, iou, max_det, max_batch, inputs, mask_to_box).
- tiling: tile_size (core edge, px; None: one chunk of `chunk` px) and halo (px), as the
  batch job's `reprocess(tile_size=, halo=)`; target_pixel_size_nm (None: the bundle's).
- limits: max_body_bytes, max_pixels (height x width of one image, as uploaded and once
  resampled to the models' pixel size).
- keys_file (hashed API keys, `engine.serving.keys`), audit_log (None: $GRAINFLOW_AUDIT_LOG
  or the default), rate_per_minute (default per-key rate when a key sets none).
- deployments: per deployment name ("ingress", "preprocess", "detector", "segmenter",
  "classifier") its `DeploymentSettings` (replicas/autoscaling, CPUs, GPU fraction,
  batch size and wait).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

DEPLOYMENTS = ("ingress", "preprocess", "detector", "segmenter", "classifier")
MODEL_DEPLOYMENTS = ("detector", "segmenter", "classifier")
# the fields a running replica takes through `reconfigure` (Serve's user_config)
LIVE_FIELDS = ("split", "generation", "alias_ttl_s")


class DeploymentSettings(BaseModel):
    """One deployment's resources and scaling.

    num_replicas: fixed count (ignored when autoscaling is given); autoscaling: Serve's
    autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...);
    num_cpus, num_gpus: per replica (a fraction shares a GPU); max_batch_size and
    batch_wait_timeout_s: @serve.batch on model deployments (a request waits up to the
    timeout for others to share its batch while the replica has others of its stage in
    flight; a lone request goes at once); health_check_period_s.
    """

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1)
    autoscaling: Optional[dict[str, Any]] = None
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0, le=1)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    max_ongoing_requests: int = Field(32, ge=1)
    health_check_period_s: float = Field(2.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)

    def options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options`."""
        out: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        if self.autoscaling:
            out["autoscaling_config"] = dict(self.autoscaling)  # the autoscaler picks the count
        else:
            out["num_replicas"] = self.num_replicas
        return out


def check_bundle_name(name: str) -> str:
    """A bundle's registry name, as `bundle` takes it: the aliases that answer come from
    `split` (production, canary), so a ref with an alias or a version is refused."""
    if not name or "@" in name or "/" in name:
        raise ValueError(f"bundle: {name!r} is not a bundle name; give the name alone (e.g. 'grainflow-demo'): "
                         f"its production and canary aliases answer as `split` weighs them")
    return name


class ServeConfig(BaseModel):
    """See the module docstring."""

    model_config = ConfigDict(extra="forbid")

    bundle: str = "grainflow-demo"
    tracking_uri: Optional[str] = None
    cache_dir: Optional[str] = None
    split: dict[str, float] = Field(default_factory=lambda: {"production": 1.0})
    alias_ttl_s: float = Field(10.0, ge=0)
    generation: int = 0
    ensemble: dict[str, Any] = Field(default_factory=dict)
    tile_size: Optional[int] = Field(None, ge=16)
    chunk: int = Field(512, ge=16)
    halo: int = Field(32, ge=0)
    target_pixel_size_nm: Optional[float] = Field(None, gt=0)
    max_body_bytes: int = Field(64 * 2**20, ge=1024)
    max_pixels: int = Field(4096 * 4096, ge=1)
    keys_file: Optional[str] = None
    audit_log: Optional[str] = None
    rate_per_minute: float = Field(600.0, gt=0)
    deployments: dict[str, DeploymentSettings] = Field(default_factory=dict)

    @field_validator("bundle")
    @classmethod
    def _check_bundle(cls, v: str) -> str:
        return check_bundle_name(v)

    @field_validator("split")
    @classmethod
    def _check_split(cls, v: dict[str, float]) -> dict[str, float]:
        if "production" not in v:
            raise ValueError(f"split: needs a 'production' weight (0 is allowed: production answers when no other arm "
                             f"can), got {', '.join(map(repr, v)) or 'no aliases'}")
        if not all(math.isfinite(w) and w >= 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError(f"split: weights must be finite, >= 0 and add up to more than 0, got {v}")
        return v

    @field_validator("deployments")
    @classmethod
    def _check_deployments(cls, v: dict[str, DeploymentSettings]) -> dict[str, DeploymentSettings]:
        unknown = sorted(set(v) - set(DEPLOYMENTS))
        if unknown:
            raise ValueError(f"deployments: unknown {unknown}; valid: {', '.join(DEPLOYMENTS)}")
        return v

    @field_validator("ensemble")
    @classmethod
    def _check_ensemble(cls, v: dict[str, Any]) -> dict[str, Any]:
        from engine.pipeline.ensemble_config import EnsembleConfig

        EnsembleConfig(**v)  # raises on unknown or bad fields
        return v

    def settings(self, name: str) -> DeploymentSettings:
        return self.deployments.get(name, DeploymentSettings())

    def resource_demand(self) -> tuple[float, float]:
        """(CPUs, GPUs) the deployments ask for at their starting replica counts (fixed
        num_replicas, or autoscaling's initial_replicas / min_replicas, Serve's default 1)."""
        cpus = gpus = 0.0
        for name in DEPLOYMENTS:
            s = self.settings(name)
            auto = s.autoscaling or {}
            n = s.num_replicas if not s.autoscaling else int(auto.get("initial_replicas") or
                                                              auto.get("min_replicas", 1) or 0)
            cpus, gpus = cpus + n * s.num_cpus, gpus + n * s.num_gpus
        return cpus, gpus

    def ensemble_config(self):
        from engine.pipeline.ensemble_config import EnsembleConfig

        return EnsembleConfig(**self.ensemble)

    def registry(self):
        from engine.registry import ModelRegistry

        return ModelRegistry(tracking_uri=self.tracking_uri) if self.tracking_uri else ModelRegistry()

    def user_config(self) -> dict[str, Any]:
        """What replicas get through `reconfigure`: the parts that may change live."""
        return self.model_dump(include=set(LIVE_FIELDS))

    def with_live_settings(self, user_config: Any) -> ServeConfig:
        """This config with a deployment's `user_config` (the live settings: `LIVE_FIELDS`)
        put over it, checked by the validators a config meets at startup. A user_config
        reaches the replicas unchecked (`serve deploy` of a hand-edited file), so a
        replica takes it only through here; `GrainflowError` naming every field at fault
        (a split without production, a weight that is no number, a field that is not a
        live setting) when it is wrong."""
        from pydantic import ValidationError

        from engine.errors import GrainflowError

        if not isinstance(user_config, dict):
            raise GrainflowError(f"user_config: expected a mapping of {', '.join(LIVE_FIELDS)}, got "
                                 f"{type(user_config).__name__}")
        not_live = sorted(str(k) for k in set(user_config) - set(LIVE_FIELDS))
        if not_live:
            # a replica would ignore them: refused, so that an edit that cannot take effect says so
            raise GrainflowError(f"user_config: {', '.join(not_live)}: not live settings (only "
                                 f"{', '.join(LIVE_FIELDS)} are); set other fields in the application's args")
        try:
            return type(self).model_validate({**self.model_dump(), **user_config})
        except ValidationError as exc:
            fields = "; ".join(_error_text(e) for e in exc.errors())
            raise GrainflowError(f"user_config: {fields}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServeConfig:
        """A ServeConfig YAML, or a Serve config file (as cluster/serve.yaml): the
        application running `engine.serving.app:app_builder`, its `args` and its first
        deployment's `user_config`. Errors (GrainflowError) name the file and the field."""
        from pydantic import ValidationError

        from engine.errors import GrainflowError
        from engine.serving.app import IMPORT_PATH

        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise GrainflowError(f"{p}: cannot read the serve config ({type(exc).__name__}: {exc})") from None
        if not isinstance(data, dict):
            raise GrainflowError(f"{p}: expected a mapping of ServeConfig fields, got {type(data).__name__}")
        if "applications" in data:  # a Serve config file
            apps = [a for a in data["applications"] or [] if a.get("import_path") == IMPORT_PATH]
            if not apps:
                raise GrainflowError(f"{p}: no application with import_path {IMPORT_PATH}")
            live = next((d.get("user_config") for d in apps[0].get("deployments") or [] if d.get("user_config")), {})
            data = {**(apps[0].get("args") or {}), **(live or {})}
        try:
            return cls(**data)
        except ValidationError as exc:
            fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
            raise GrainflowError(f"{p}: {fields}") from None


def _error_text(error: dict[str, Any]) -> str:
    """One pydantic error as 'field: what is wrong' (a validator's own message, which
    names its field, without pydantic's 'Value error, ' in front)."""
    where = ".".join(map(str, error["loc"])) or "config"
    if error.get("type") == "value_error" and "error" in error.get("ctx", {}):
        message = str(error["ctx"]["error"])
        return message if message.startswith(f"{where}:") else f"{where}: {message}"
    return f"{where}: {error['msg']} (got {error.get('input')!r})"
