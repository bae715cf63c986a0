"""How a grainflow model version is laid out on MLflow's entities.

One version is one MLflow run plus one registered model version:

- the run's artifacts under `files/` are the registered files, byte for byte;
- run params record what identifies the version: `grainflow.family`, the canonical JSON of
  the config (`grainflow.config`), the sha256 of each file (`sha256.<file>`), and the
  config flattened to `config.<dotted.key>` so MLflow's UI can show and search it;
- run metrics are the metrics given at registration;
- the registered model version's source is `runs:/<run_id>/files`.

Why params: MLflow refuses to change a logged param (a second value for a key is an error),
while tags can be overwritten by anyone with write access. The digests that `fetch`
verifies against therefore live where the API cannot quietly rewrite them. Tags only hold
what is meant to change: the alias history and user tags (see `aliases.py`).
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from collections.abc import Mapping
from typing import Any

from engine.registry.errors import RegistryError

ARTIFACT_DIR = "files"
RESERVED_PREFIX = "grainflow."
PARAM_FAMILY = "grainflow.family"
PARAM_CONFIG = "grainflow.config"
PARAM_SHA256 = "sha256."
PARAM_CONFIG_FLAT = "config."
TAG_FAMILY = "grainflow.family"  # version tag too, so the UI can filter by family
TAG_KIND = "grainflow.kind"  # registered-model tag: KIND_MODEL or KIND_BUNDLE
KIND_MODEL = "model"
KIND_BUNDLE = "bundle"
BUNDLE_FAMILY = "bundle"

# MLflow's limits (mlflow.utils.validation); checked here so nothing is silently truncated.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
_MLFLOW_KEY = re.compile(r"[/\w.\- :]+")
# Artifact file names and bundle roles: one path component, safe as a param key suffix.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def check_file_name(name: str, what: str = "artifact file name") -> str:
    """`name` if it is one safe path component (no '/', no '..'), else RegistryError."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or ".." in name:
        raise RegistryError(
            f"bad {what} {name!r}: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, no '..', at most 200 characters)"
        )
    return name


def canonical_config(config: Mapping[str, Any], *, model: str) -> str:
    """The config as compact, key-sorted JSON; a value JSON cannot hold raises RegistryError."""
    if not isinstance(config, Mapping):
        raise RegistryError(f"register {model!r}: config must be a mapping, got {type(config).__name__}")
    try:
        text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"register {model!r}: config is not plain JSON data ({exc})") from None
    if len(text) > MAX_PARAM_VALUE:
        raise RegistryError(
            f"register {model!r}: config is {len(text)} characters as JSON, over MLflow's "
            f"{MAX_PARAM_VALUE}-character param limit; register the full config as an artifact "
            "file and keep only its key settings in `config`"
        )
    return text


def flatten_config(config: Mapping[str, Any], *, model: str) -> dict[str, str]:
    """`{"a": {"b": 1}}` -> `{"config.a.b": "1"}`; lists and scalars become JSON text."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}", sub)
            return
        key = PARAM_CONFIG_FLAT + prefix[1:]
        check_key(key, what="config key", model=model)
        if key in flat:
            raise RegistryError(f"register {model!r}: config key {key!r} occurs twice once flattened")
        flat[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)

    for key, value in config.items():
        walk(f".{key}", value)
    return flat


def check_key(key: str, *, what: str, model: str) -> str:
    """A key MLflow accepts for a param, metric or tag, else RegistryError naming it."""
    # MLflow also refuses keys that a path normalisation would change ('a/../b', 'a//b').
    if (not isinstance(key, str) or not _MLFLOW_KEY.fullmatch(key) or len(key) > MAX_KEY
            or posixpath.normpath(key) != key or key.startswith(("/", ".."))):
        raise RegistryError(
            f"register {model!r}: bad {what} {key!r}: MLflow keys use letters, digits, "
            f"'_', '-', '.', ' ', ':' and '/' (no empty, '.' or '..' path parts), "
            f"at most {MAX_KEY} characters"
        )
    return key


def check_metrics(metrics: Mapping[str, float], *, model: str) -> dict[str, float]:
    """Metrics as floats; a non-number or non-finite value raises RegistryError."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        check_key(key, what="metric name", model=model)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RegistryError(f"register {model!r}: metric {key!r} is not a number: {value!r}") from None
        if not math.isfinite(number):
            raise RegistryError(f"register {model!r}: metric {key!r} is not finite: {value!r}")
        out[key] = number
    return out


def check_user_tags(tags: Mapping[str, str], *, model: str) -> dict[str, str]:
    """User tags as strings; the `grainflow.` prefix is the registry's own."""
    out: dict[str, str] = {}
    for key, value in tags.items():
        check_key(key, what="tag", model=model)
        if key.startswith(RESERVED_PREFIX):
            raise RegistryError(f"register {model!r}: tag {key!r} uses the reserved prefix {RESERVED_PREFIX!r}")
        out[key] = str(value)
    return out


def digests_from_params(params: Mapping[str, str]) -> dict[str, str]:
    """The `sha256.<file>` params as {file: digest}."""
    return {k[len(PARAM_SHA256):]: v for k, v in params.items() if k.startswith(PARAM_SHA256)}
