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

    `family` is None for a version grainflow did not register (one added through MLflow
    itself on a shared server): listed by `ModelRegistry.versions`, with empty config,
    metrics and sha256, but refused by `get`, `fetch` and `promote` (its files cannot be
    verified). `run_id` is None when such a version names no run.
    """

    name: str
    version: int
    family: str | None
    config: dict[str, Any]
    metrics: dict[str, float]
    sha256: dict[str, str]
    run_id: str | None
    source: str
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """The fixed ref of this version, `name/version`."""
        return f"{self.name}/{self.version}"

    @property
    def registered_by_grainflow(self) -> bool:
        """False for a version added outside grainflow (its files cannot be verified)."""
        return self.family is not None

    @property
    def files(self) -> tuple[str, ...]:
        """Artifact file names, sorted."""
        return tuple(sorted(self.sha256))


def not_by_grainflow_error(ref: str, run_id: str | None) -> RegistryError:
    """The refusal of a version grainflow did not register, where its files would be used."""
    where = f"its run {run_id} has no family or sha256 record" if run_id else "it names no run"
    return RegistryError(
        f"{ref}: model version was not registered by grainflow ({where}), so its files cannot be "
        "verified; register the files with grainflow (ModelRegistry.register) to use them"
    )


def from_mlflow(mv: Any, run: Any, *, aliases: dict[str, int], ref: str, strict: bool = True) -> ModelVersion:
    """Build from an MLflow ModelVersion entity, its run (None if it has none) and the
    model's alias -> version map.

    The aliases come from the registered model because MLflow's version search leaves a
    version's own `aliases` empty. `ref` names the version in errors. A version grainflow
    did not register raises RegistryError, or with `strict=False` comes back with
    `family=None` and nothing recorded (for listings).
    """
    params = run.data.params if run is not None else {}
    digests = schema.digests_from_params(params)
    version_aliases = tuple(sorted(a for a, v in aliases.items() if int(v) == int(mv.version)))
    user_tags = {k: v for k, v in (mv.tags or {}).items() if not k.startswith(schema.RESERVED_PREFIX)}
    if schema.PARAM_FAMILY not in params or not digests:
        if strict:
            raise not_by_grainflow_error(ref, mv.run_id)
        return ModelVersion(name=mv.name, version=int(mv.version), family=None, config={}, metrics={},
                            sha256={}, run_id=mv.run_id or None, source=mv.source, aliases=version_aliases,
                            tags=user_tags)
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
        aliases=version_aliases,
        tags=user_tags,
    )
