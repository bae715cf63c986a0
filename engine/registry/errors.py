"""Errors raised by the model registry.

Each message names the ref (`name@alias`, `name/version`) or the file at fault, so a user
reading a batch job's errors table knows which model to look at.
"""

from __future__ import annotations

from engine.errors import GrainflowError


class RegistryError(GrainflowError):
    """A malformed ref, an unknown model/alias/version, or a registration that cannot be made."""


class ArtifactIntegrityError(RegistryError):
    """A fetched artifact whose sha256 differs from the digest recorded at registration.

    `file` is the artifact's name in the version, `expected` the recorded digest and
    `actual` the digest of the bytes that were downloaded (None when the file is missing).
    """

    def __init__(self, message: str, *, ref: str, file: str, expected: str, actual: str | None):
        super().__init__(message)
        self.ref = ref
        self.file = file
        self.expected = expected
        self.actual = actual
