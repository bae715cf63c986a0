"""The ensemble bundle: one registered artifact naming the exact versions of its members.

The bundle's single file, `bundle.json`, holds::

    {"format": "grainflow.bundle/1",
     "members": {"detector": {"name": "yolo-defects", "version": 3,
                              "family": "detector", "sha256": {"best.pt": "9f2c..."}}, ...}}

Members are fixed versions, never aliases: aliases given at registration are resolved
then, so promoting a member later does not change a bundle that already exists (serving
moves to new members by registering and promoting a new bundle version). Each member's
digests are copied in as well, so a bundle also pins the bytes of its members.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.registry.errors import RegistryError

FORMAT = "grainflow.bundle/1"
FILE_NAME = "bundle.json"


@dataclass(frozen=True, slots=True)
class Member:
    """One member as the bundle records it."""

    name: str
    version: int
    family: str
    sha256: dict[str, str]

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"


def encode(members: dict[str, Member]) -> str:
    doc = {
        "format": FORMAT,
        "members": {
            role: {"name": m.name, "version": m.version, "family": m.family, "sha256": m.sha256}
            for role, m in sorted(members.items())
        },
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def decode(text: str, *, ref: str) -> dict[str, Member]:
    """Members of a bundle file; anything but the format above raises RegistryError."""
    try:
        doc = json.loads(text)
        if doc.get("format") != FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
        members = {
            role: Member(str(m["name"]), int(m["version"]), str(m["family"]), dict(m["sha256"]))
            for role, m in doc["members"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RegistryError(f"{ref}: {FILE_NAME} is not a grainflow bundle ({exc})") from None
    return members


def as_config(members: dict[str, Member]) -> dict[str, Any]:
    """The bundle's config param: role -> fixed ref, readable in MLflow's UI."""
    return {"members": {role: m.ref for role, m in sorted(members.items())}}
