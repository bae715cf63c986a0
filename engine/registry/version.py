"""ModelVersion: what the registry knows about one registered version."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from engine.registry import schema
from engine.registry.errors import RegistryError


@dataclass(frozen=True)
class ModelVersion:
    """One registered version, read back from MLflow.

    `sha256` maps each artifact file name to the lower-case hex digest recorded at
    registration; `fetch` checks downloaded bytes against it. `source` is MLflow's URI of
    the version's files (`runs:/<run_id>/files`). `aliases` are the aliases that pointed at
    this version when it was read. The dict fields are not to be mutated (frozen dataclasses
    cannot freeze a dict; a copy is made per read).
    """

    name: str
    version: int
    family: str
    config: dict[str, Any]
    metrics: dict[str, float]
    sha256: dict[str, str]
    run_id: str
    source: str
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """The fixed ref of this version, `name/version`."""
        return f"{self.name}/{self.version}"

    @property
    def files(self) -> tuple[str, ...]:
        """Artifact file names, sorted."""
        return tuple(sorted(self.sha256))


def from_mlflow(mv: Any, run: Any, *, aliases: dict[str, int], ref: str) -> ModelVersion:
    """Build from an MLflow ModelVersion entity, its run and the model's alias -> version map.

    The aliases come from the registered model because MLflow's version search leaves a
    version's own `aliases` empty. `ref` names the version in errors.
    """
    params = run.data.params
    digests = schema.digests_from_params(params)
    if schema.PARAM_FAMILY not in params or not digests:
        raise RegistryError(
            f"{ref}: model version was not registered by grainflow (its run {mv.run_id} has no "
            "family or sha256 record), so its files cannot be verified"
        )
    try:
        config = json.loads(params.get(schema.PARAM_CONFIG, "{}"))
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{ref}: recorded config is not valid JSON ({exc})") from None
    return ModelVersion(
        name=mv.name,
        version=int(mv.version),
        family=params[schema.PARAM_FAMILY],
        config=config,
        metrics=dict(run.data.metrics),
        sha256=digests,
        run_id=mv.run_id,
        source=mv.source,
        aliases=tuple(sorted(a for a, v in aliases.items() if int(v) == int(mv.version))),
        tags={k: v for k, v in (mv.tags or {}).items() if not k.startswith(schema.RESERVED_PREFIX)},
    )
