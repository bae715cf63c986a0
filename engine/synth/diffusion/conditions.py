"""What a synthesis request asks for: (defect class, material, modality) triples, checked
against the vocabulary of the model that is to generate them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Sequence

from engine.errors import UnknownNameError


class ConditioningError(UnknownNameError):
    """A requested defect class, material or modality the model was not trained on; the
    message lists the valid ones."""


@dataclass(frozen=True, order=True)
class Condition:
    """One conditioning triple, by name."""

    defect_class: str
    material: str
    modality: str

    def key(self) -> str:
        """A filesystem- and id-safe spelling: `pore.ferritic_steel.SEM`."""
        return f"{self.defect_class}.{self.material}.{self.modality}"


@dataclass(frozen=True)
class Vocabulary:
    """The names a model is conditioned on, in its embedding order."""

    defect_classes: tuple[str, ...]
    materials: tuple[str, ...]
    modalities: tuple[str, ...]

    @classmethod
    def of(cls, model_or_args) -> Vocabulary:
        """From a DefectDiffusion or the `args` of its ModelConfig."""
        get = (lambda k: model_or_args[k]) if isinstance(model_or_args, dict) else (lambda k: getattr(model_or_args, k))
        return cls(tuple(get("defect_classes")), tuple(get("materials")), tuple(get("modalities")))

    def index(self, c: Condition) -> int:
        """Row of the model's condition embedding (DefectDiffusion.condition_index)."""
        k, m, d = self.defect_classes.index(c.defect_class), self.materials.index(c.material), self.modalities.index(c.modality)
        return (k * len(self.materials) + m) * len(self.modalities) + d


def _check(kind: str, plural: str, asked: Sequence[str] | None, valid: tuple[str, ...]) -> tuple[str, ...]:
    if not asked:
        return valid
    unknown = [a for a in asked if a not in valid]
    if unknown:
        raise ConditioningError(
            f"unknown {kind} {', '.join(repr(u) for u in unknown)}; the model knows these {plural}: {', '.join(valid)}")
    return tuple(dict.fromkeys(asked))


def expand_conditions(vocabulary: Vocabulary, *, defect_classes: Iterable[str] | None = None,
                      materials: Iterable[str] | None = None,
                      modalities: Iterable[str] | None = None) -> list[Condition]:
    """Every (class, material, modality) combination of the names asked for (None or
    empty: all the model knows), sorted. Unknown names raise ConditioningError listing
    the valid ones, before anything else happens."""
    classes = _check("defect class", "defect classes", list(defect_classes or []), vocabulary.defect_classes)
    mats = _check("material", "materials", list(materials or []), vocabulary.materials)
    mods = _check("modality", "modalities", list(modalities or []), vocabulary.modalities)
    return sorted(Condition(*t) for t in itertools.product(classes, mats, mods))
