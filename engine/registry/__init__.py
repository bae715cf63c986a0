"""Versioned model artifacts on MLflow's model registry: aliases, rollback, bundles.

Importing this package does not import MLflow; the first `ModelRegistry()` does.
"""

from engine.registry.backend import default_tracking_uri
from engine.registry.errors import ArtifactIntegrityError, RegistryError
from engine.registry.refs import DEFAULT_ALIAS, ModelRef, parse_ref
from engine.registry.registry import ModelRegistry
from engine.registry.version import ModelVersion

__all__ = [
    "DEFAULT_ALIAS",
    "ArtifactIntegrityError",
    "ModelRef",
    "ModelRegistry",
    "ModelVersion",
    "RegistryError",
    "default_tracking_uri",
    "parse_ref",
]
