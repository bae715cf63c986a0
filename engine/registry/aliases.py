"""Alias history, so that `rollback` knows where an alias pointed before.

MLflow keeps only an alias's current version. grainflow records, per alias, the versions it
was moved to (oldest first) in a registered-model tag `grainflow.alias_history.<alias>`
holding a JSON list of ints, e.g. `[1, 2, 4]`. A tag on the registered model (not on the
versions) keeps one alias's whole history in one place, readable with the model in one call.

The read-modify-write of that tag is not atomic: two processes moving the same alias at
the same instant can lose one history entry (never the alias itself, which MLflow sets).
Promotions are human- or pipeline-paced, so this is accepted rather than adding a lock
service.
"""

from __future__ import annotations

import json

from engine.registry.schema import RESERVED_PREFIX

TAG_PREFIX = RESERVED_PREFIX + "alias_history."
MAX_ENTRIES = 200  # plenty of rollbacks; keeps the tag far below MLflow's 100 000 chars


def tag_key(alias: str) -> str:
    return TAG_PREFIX + alias


def decode(value: str | None) -> list[int]:
    """The history stored in a tag value; a missing or unreadable tag is an empty history."""
    if not value:
        return []
    try:
        items = json.loads(value)
    except json.JSONDecodeError:
        return []
    if not isinstance(items, list):
        return []
    return [int(v) for v in items if isinstance(v, int) and not isinstance(v, bool)]


def encode(history: list[int]) -> str:
    return json.dumps(history[-MAX_ENTRIES:], separators=(",", ":"))


def pushed(history: list[int], version: int) -> list[int]:
    """History after moving the alias to `version` (moving it to where it is changes nothing)."""
    if history and history[-1] == version:
        return list(history)
    return [*history, version]


def moved(history: list[int], current: int | None, version: int) -> list[int]:
    """History after moving the alias from `current` (None if unset) to `version`.

    `current` is pushed first in case the alias was moved outside grainflow, so that the
    version being replaced is always there to roll back to.
    """
    if current is not None:
        history = pushed(history, current)
    return pushed(history, version)


def popped(history: list[int], current: int) -> list[int]:
    """History with the current version taken off the top: its new top is the rollback target.

    If the alias was moved outside grainflow (the top is not `current`), `current` is
    treated as the latest move, so rollback still goes to the version before it.
    """
    history = pushed(history, current)
    return history[:-1]
