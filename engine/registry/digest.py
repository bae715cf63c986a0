"""sha256 of artifact files, read in blocks so a multi-GB checkpoint never sits in memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20  # 1 MiB


def sha256_file(path: Path) -> str:
    """Lower-case hex sha256 of the file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()
