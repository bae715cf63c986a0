"""The engine's own configuration file.

grainflow reads `$GRAINFLOW_CONFIG` or, failing that, `~/.config/grainflow/config.toml`.
It is optional; every value has a default or falls back to the standard environment
(for S3: AWS_* variables and ~/.aws/config, read by botocore itself). Example::

    [s3]
    endpoint_url = "http://127.0.0.1:9000"
    region = "us-east-1"
    profile = "lab"

Configuration is read when an entrypoint asks for it, never at import time.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from engine.errors import GrainflowError


def config_path() -> Path:
    """Where the engine config is read from (the file need not exist)."""
    explicit = os.environ.get("GRAINFLOW_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME", "~/.config")).expanduser()
    return base / "grainflow" / "config.toml"


def load_config() -> dict[str, Any]:
    """The parsed config file, or {} when there is none."""
    path = config_path()
    if not path.is_file():
        return {}
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise GrainflowError(f"{path}: not valid TOML: {exc}") from None


def s3_storage_options() -> dict[str, Any]:
    """s3fs keyword arguments from the `[s3]` table of the engine config.

    Only keys that are set are returned, so botocore's own chain (environment, AWS config
    files, instance roles) fills in the rest.
    """
    section = load_config().get("s3", {})
    options: dict[str, Any] = {}
    client_kwargs: dict[str, Any] = {}
    if "endpoint_url" in section:
        options["endpoint_url"] = section["endpoint_url"]
    if "region" in section:
        client_kwargs["region_name"] = section["region"]
    if "profile" in section:
        options["profile"] = section["profile"]
    if "anon" in section:
        options["anon"] = bool(section["anon"])
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options
