"""The engine's own configuration file.

grainflow reads `$GRAINFLOW_CONFIG` or, failing that, `~/.config/grainflow/config.toml`.
The default file is optional; every value has a default or falls back to the standard
environment (for S3: AWS_* variables and ~/.aws/config, read by botocore itself). A file
that $GRAINFLOW_CONFIG names must exist. Example::

    [s3]
    endpoint_url = "http://127.0.0.1:9000"
    region = "us-east-1"
    profile = "lab"
    anon = false

Tables and keys grainflow does not know, and values of the wrong TOML type, are refused
(ConfigError naming the file and the valid choices): a typo such as `endpoint =` would
otherwise be dropped and S3 reached with botocore's defaults instead.

Configuration is read when an entrypoint asks for it, never at import time.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from engine.errors import GrainflowError

# [s3] key -> (TOML type it must have, its name in messages)
S3_KEYS: dict[str, tuple[type, str]] = {
    "endpoint_url": (str, "string"),
    "region": (str, "string"),
    "profile": (str, "string"),
    "anon": (bool, "boolean (true or false, no quotes)"),
}
TABLES = ("s3",)


class ConfigError(GrainflowError):
    """An engine config file that is missing where named, or holds what grainflow does not read."""


def config_path() -> Path:
    """Where the engine config is read from (the default file need not exist)."""
    explicit = os.environ.get("GRAINFLOW_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    return _default_path()


def load_config() -> dict[str, Any]:
    """The parsed config file, or {} when the default one does not exist.

    ConfigError when $GRAINFLOW_CONFIG names no file, the file is not valid TOML, or it
    has a table other than those in TABLES.
    """
    path = config_path()
    if not path.is_file():
        if os.environ.get("GRAINFLOW_CONFIG"):
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigError(f"$GRAINFLOW_CONFIG names {path}, which {what}; point it at the engine config "
                              f"file (TOML), or unset it to use {_default_path()} where that exists")
        return {}
    try:
        with path.open("rb") as f:
            config = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(config) - set(TABLES))
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(map(repr, unknown))}; grainflow reads "
                          f"{', '.join(f'[{t}]' for t in TABLES)}")
    return config


def s3_storage_options() -> dict[str, Any]:
    """s3fs keyword arguments from the `[s3]` table of the engine config.

    Only keys that are set are returned, so botocore's own chain (environment, AWS config
    files, instance roles) fills in the rest. ConfigError for a key not in S3_KEYS or a
    value of another TOML type.
    """
    section = load_config().get("s3", {})
    _check_s3_section(section)
    options: dict[str, Any] = {}
    client_kwargs: dict[str, Any] = {}
    if "endpoint_url" in section:
        options["endpoint_url"] = section["endpoint_url"]
    if "region" in section:
        client_kwargs["region_name"] = section["region"]
    if "profile" in section:
        options["profile"] = section["profile"]
    if "anon" in section:
        options["anon"] = section["anon"]
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options


def _check_s3_section(section: Any) -> None:
    path = config_path()
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: s3 must be a table ([s3] with keys {', '.join(S3_KEYS)}), not {section!r}")
    unknown = sorted(set(section) - set(S3_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown [s3] key(s) {', '.join(map(repr, unknown))}; valid keys: "
                          f"{', '.join(S3_KEYS)}")
    for key, value in section.items():
        kind, kind_name = S3_KEYS[key]
        # bool is an int subclass, and a quoted "false" is a non-empty (truthy) string:
        # only the exact TOML type is taken
        if type(value) is not kind:
            raise ConfigError(f"{path}: [s3] {key} must be a TOML {kind_name}, not {value!r}")


def _default_path() -> Path:
    """The config file read when $GRAINFLOW_CONFIG is unset (optional)."""
    base = Path(os.environ.get("XDG_CONFIG_HOME", "~/.config")).expanduser()
    return base / "grainflow" / "config.toml"
