"""Model refs: the strings that name a registered model version.

    name            the version the `production` alias points at
    name@alias      the version an alias points at (`production`, `canary`, ...)
    name/version    one fixed version (a positive integer)

Names are restricted to `[A-Za-z0-9][A-Za-z0-9._-]*` so a ref is never ambiguous (MLflow
itself allows `@` and spaces in names, which would make `a@b` unparseable).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.registry.errors import RegistryError

DEFAULT_ALIAS = "production"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
# MLflow reserves `latest` and `v<digits>` (they would shadow its own version aliases).
_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,99}")
_RESERVED_ALIAS = re.compile(r"latest|[vV]\d+", re.IGNORECASE)
_REF_FORMS = "expected 'name', 'name@alias' or 'name/version'"


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A parsed ref: exactly one of `version` and `alias` is set."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return f"{self.name}/{self.version}" if self.version is not None else f"{self.name}@{self.alias}"


def check_name(name: str) -> str:
    """`name` if it is a valid registered model name, else RegistryError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RegistryError(
            f"bad model name {name!r}: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 200 characters)"
        )
    return name


def check_alias(alias: str) -> str:
    """`alias` if it is a valid alias, else RegistryError."""
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias):
        raise RegistryError(
            f"bad alias {alias!r}: use letters, digits, '_' and '-', starting with a letter"
        )
    if _RESERVED_ALIAS.fullmatch(alias):
        raise RegistryError(f"bad alias {alias!r}: 'latest' and 'v<number>' are reserved by MLflow")
    return alias


def parse_ref(ref: str) -> ModelRef:
    """Parse `name`, `name@alias` or `name/version`; anything else raises RegistryError."""
    if not isinstance(ref, str):
        raise RegistryError(f"bad model ref {ref!r}: not a string; {_REF_FORMS}")
    if "@" in ref and "/" in ref:
        raise RegistryError(f"bad model ref {ref!r}: give an alias or a version, not both; {_REF_FORMS}")
    if "@" in ref:
        name, _, alias = ref.partition("@")
        if not alias:
            raise RegistryError(f"bad model ref {ref!r}: empty alias after '@'; {_REF_FORMS}")
        if "@" in alias:
            raise RegistryError(f"bad model ref {ref!r}: more than one '@'; {_REF_FORMS}")
        return ModelRef(_ref_name(name, ref), alias=_ref_part(check_alias, alias, ref))
    if "/" in ref:
        name, _, version = ref.partition("/")
        name = _ref_name(name, ref)
        # isdecimal, not int(): int() accepts ' 3', '+3' and '3_0'.
        if not (version.isascii() and version.isdecimal()) or int(version) < 1:
            raise RegistryError(
                f"bad model ref {ref!r}: version {version!r} is not a positive integer; {_REF_FORMS}"
            )
        return ModelRef(name, version=int(version))
    return ModelRef(_ref_name(ref, ref), alias=DEFAULT_ALIAS)


def _ref_name(name: str, ref: str) -> str:
    if not name:
        raise RegistryError(f"bad model ref {ref!r}: empty model name; {_REF_FORMS}")
    return _ref_part(check_name, name, ref)


def _ref_part(check, value: str, ref: str) -> str:
    try:
        return check(value)
    except RegistryError as exc:
        raise RegistryError(f"bad model ref {ref!r}: {exc}") from None
