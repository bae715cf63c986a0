"""The model registry: one YAML config per model, one builder table per family.

A config lives at `engine/models/configs/<family>/<name>.yaml`::

    description: YOLOv8 nano, 1-channel tiles, the five defect classes
    input_size: 640          # tile side in pixels the model is meant to see
    tiny: false              # small enough for CPU tests and demos
    large: false             # too slow to build/run on a CPU for routine tests
    builder: yolo            # key of the family module's BUILDERS table
    args: {arch: yolov8, scale: n}

Builders are looked up in a fixed table, never by turning a string into code. Family
modules are imported only when a model of that family is created, so `import
engine.models` does not import Ultralytics (which configures things at import time).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from engine.models import labels
from engine.models.errors import ModelConfigError, UnknownModelError

FAMILIES: dict[str, str] = {
    "detector": "engine.models.detector",
    "segmenter": "engine.models.segmenter",
    "classifier": "engine.models.classifier",
    "fusion": "engine.models.fusion",
    "diffusion": "engine.models.diffusion",
}

# Label sets a builder may take; filled in at creation when not given, and recorded in
# the config, so a checkpoint keeps the class order it was trained with.
_LABEL_ARGS = {
    "materials": labels.material_names,
    "grades": lambda: labels.GRADES,
    "defect_classes": labels.defect_class_names,
}


@dataclass(frozen=True)
class ModelConfig:
    """A registered model: which builder makes it and with what arguments."""

    family: str
    name: str
    builder: str
    args: dict[str, Any] = field(default_factory=dict)
    input_size: int = 256
    description: str = ""
    tiny: bool = False
    large: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family, "name": self.name, "builder": self.builder,
            "args": dict(self.args), "input_size": self.input_size,
            "description": self.description, "tiny": self.tiny, "large": self.large,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ModelConfigError(f"model config has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise UnknownModelError(f"unknown model family {family!r}; valid families: {', '.join(FAMILIES)}")


@lru_cache(maxsize=None)
def _configs(family: str) -> dict[str, ModelConfig]:
    folder = resources.files("engine.models") / "configs" / family
    out = {}
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yaml"):
            continue
        name = entry.name[: -len(".yaml")]
        raw = yaml.safe_load(entry.read_text())
        if not isinstance(raw, dict) or "builder" not in raw:
            raise ModelConfigError(f"{family}/{entry.name}: a model config must be a mapping with a 'builder' key")
        out[name] = ModelConfig.from_dict({"family": family, "name": name, **raw})
    return out


def list_models(family: str | None = None, *, tiny: bool | None = None) -> list[str]:
    """Registered names: `name` within a family, or `family/name` across all of them.

    tiny=True keeps only the CPU-sized configs (tests, demos); tiny=False the others.
    """
    families = [family] if family is not None else list(FAMILIES)
    out = []
    for fam in families:
        _check_family(fam)
        for name, cfg in _configs(fam).items():
            if tiny is None or cfg.tiny == tiny:
                out.append(name if family is not None else f"{fam}/{name}")
    return out


def get_config(family: str, name: str) -> ModelConfig:
    """The registered config, or an error listing the family's valid names."""
    _check_family(family)
    configs = _configs(family)
    if name not in configs:
        raise UnknownModelError(
            f"unknown {family} model {name!r}; valid {family} models: {', '.join(configs)}"
        )
    return configs[name]


def _builder(config: ModelConfig):
    module = importlib.import_module(FAMILIES[config.family])
    table = module.BUILDERS
    if config.builder not in table:
        raise ModelConfigError(
            f"{config.family}/{config.name}: unknown builder {config.builder!r}; "
            f"valid {config.family} builders: {', '.join(table)}"
        )
    return table[config.builder]


def build(config: ModelConfig):
    """Build the model a config describes (random init; no weights are fetched).

    The returned module carries `.config`: this config with label sets resolved, which
    is what a checkpoint records and what rebuilds the same architecture later.
    """
    _check_family(config.family)
    fn = _builder(config)
    signature = inspect.signature(fn)
    args = dict(config.args)
    for key, default in _LABEL_ARGS.items():
        if key in signature.parameters and args.get(key) is None:
            args[key] = list(default())
    try:
        signature.bind(**args)
    except TypeError as exc:
        raise ModelConfigError(
            f"{config.family}/{config.name}: arguments {sorted(args)} do not fit builder "
            f"{config.builder!r} ({exc}); it takes: {', '.join(signature.parameters)}"
        ) from None
    model = fn(**args)
    model.config = replace(config, args=args)
    return model


def create_model(family: str, name: str, **overrides):
    """Build the registered model `family/name`; `overrides` replace its builder args."""
    config = get_config(family, name)
    if overrides:
        config = replace(config, args={**config.args, **overrides})
    return build(config)
