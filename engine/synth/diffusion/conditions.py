"""What a synthesis request asks for: (defect class, material, modality) triples, checked
against the vocabulary of the model that is to generate them and against the conditions
it was trained on.

The embedding has a row for every combination of the vocabulary (5 x 12 x 3 = 180), but
training only teaches the rows of the combinations its crops show; an untaught row
generates noise that looks like nothing. Training records the keys of the taught ones
(`trained_conditions` in the model's config, engine.synth.diffusion.calibration), and a
request is checked against them (`expand_conditions`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, TypeVar

from engine.errors import UnknownNameError

T = TypeVar("T")


class ConditioningError(UnknownNameError):
    """A requested defect class, material or modality the model was not trained on; the
    message lists the valid ones."""


class UntrainedConditionsWarning(UserWarning):
    """A model saved before training recorded its conditions: nothing tells which of
    its conditions it has learnt, so a request is checked against its vocabulary only."""


@dataclass(frozen=True, order=True)
class Condition:
    """One conditioning triple, by name."""

    defect_class: str
    material: str
    modality: str

    def key(self) -> str:
        """A filesystem- and id-safe spelling: `pore.ferritic_steel.SEM`."""
        return f"{self.defect_class}.{self.material}.{self.modality}"

    def lookup_keys(self) -> tuple[str, str, str]:
        """The keys of per-condition records (grey levels, pixel sizes), most specific
        first: the condition's key, `<material>.<modality>`, `<modality>`."""
        return self.key(), f"{self.material}.{self.modality}", self.modality


def lookup(table: Mapping[str, T] | None, condition: Condition) -> T | None:
    """The value of `table` at the first of `condition.lookup_keys()` it holds; None
    when it holds none (or there is no table)."""
    for key in condition.lookup_keys():
        if table and key in table:
            return table[key]
    return None


@dataclass(frozen=True)
class Vocabulary:
    """The names a model is conditioned on, in its embedding order, and the keys of the
    conditions it was trained on (None: not recorded, a model saved before they were)."""

    defect_classes: tuple[str, ...]
    materials: tuple[str, ...]
    modalities: tuple[str, ...]
    trained: frozenset[str] | None = None

    @classmethod
    def of(cls, model_or_args) -> Vocabulary:
        """From a DefectDiffusion or the `args` of its ModelConfig."""
        if isinstance(model_or_args, dict):
            get = model_or_args.get
        else:
            def get(k):
                return getattr(model_or_args, k, None)
        trained = get("trained_conditions")
        return cls(tuple(get("defect_classes")), tuple(get("materials")), tuple(get("modalities")),
                   None if trained is None else frozenset(trained))

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
                      modalities: Iterable[str] | None = None) -> tuple[list[Condition], list[Condition]]:
    """(conditions to generate, untrained conditions left out), both sorted.

    The request is every (class, material, modality) combination of the names asked for
    (None or empty: all the model knows). Unknown names raise ConditioningError listing
    the valid ones. Where the vocabulary records its trained conditions, combinations
    training never saw are left out (the second list); a name asked for that keeps no
    trained combination, or a request that keeps none, raises ConditioningError listing
    the trained conditions. Unrecorded (None): every combination is kept.
    """
    classes = _check("defect class", "defect classes", list(defect_classes or []), vocabulary.defect_classes)
    mats = _check("material", "materials", list(materials or []), vocabulary.materials)
    mods = _check("modality", "modalities", list(modalities or []), vocabulary.modalities)
    asked = sorted(Condition(*t) for t in itertools.product(classes, mats, mods))
    if vocabulary.trained is None:
        return asked, []
    kept = [c for c in asked if c.key() in vocabulary.trained]
    named = [("defect class", "defect_class", defect_classes), ("material", "material", materials),
             ("modality", "modality", modalities)]
    untrained = [f"{kind} {v!r}" for kind, attr, values in named for v in dict.fromkeys(values or [])
                 if not any(getattr(c, attr) == v for c in kept)]
    if untrained or not kept:
        which = f"none with {', '.join(untrained)}" if untrained else "none"
        raise ConditioningError(
            f"untrained conditioning: of the {len(asked)} (class, material, modality) combination(s) asked for, "
            f"{which} was in the model's training crops; it was trained on these conditions "
            f"(class.material.modality): {', '.join(sorted(vocabulary.trained)) or 'none'}")
    return kept, [c for c in asked if c.key() not in vocabulary.trained]
