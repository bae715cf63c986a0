"""Weights named by a local path or an s3:// URI, as a local file and the sha256 to check.

torch and safetensors read local files, and every worker of a fine-tune needs the file
(Meta's SAM ViT-B is 375 MB, ViT-H 2.5 GB). A file in a bucket is copied once per machine
into the user's cache, under a folder named by its digest: an object replaced later is
never mistaken for the copy, and the next run on that machine reads the copy. Loaders
check the digest again on the read they parse (engine.models.checkpoint.open_checked).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from engine.models.checkpoint import check_hex, read_sidecar, sha256_file, sha256_of
from engine.models.errors import CheckpointError, ChecksumMismatchError

CACHE_SUBDIR = "weights"


def default_cache_dir() -> Path:
    """`<user cache dir>/weights`, beside the registry's fetched versions."""
    import platformdirs

    from engine.registry.backend import APP_NAME

    return Path(platformdirs.user_cache_dir(APP_NAME)) / CACHE_SUBDIR


def weights_file(uri: str | os.PathLike, expected_sha256: str | None = None, *,
                 cache_dir: str | os.PathLike | None = None, recorded_only: bool = False) -> tuple[Path, str]:
    """(local path, sha256) of the weights at `uri` (a local path, file:// or s3:// URI).

    The digest is `expected_sha256`, else the `<file>.sha256` beside the file (in the
    bucket for s3://), else the file's own. A local file is used where it lies; an s3://
    object is copied to `<cache_dir>/<sha256>/<name>` unless a copy is there already, and
    a copy whose bytes differ from the expected digest is refused (ChecksumMismatchError)
    and not kept. A missing file is a CheckpointError naming it. recorded_only: the file's
    own digest is not enough (a format whose loader must only see files a trusted record
    names): without `expected_sha256` or a sidecar it is a CheckpointError.
    """
    from engine.stores.uri import resolve

    location = resolve(uri)
    if expected_sha256 is not None:
        check_hex(Path(location.name), expected_sha256)
        expected_sha256 = expected_sha256.lower()
    if location.scheme == "file":
        path = Path(location.path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        digest = expected_sha256 or read_sidecar(path)
        if digest is None and recorded_only:
            raise _unrecorded(path)
        return path, digest or sha256_file(path)

    fs = location.filesystem()
    if not fs.isfile(location.path):
        raise CheckpointError(f"{location.uri}: no such file")
    digest = expected_sha256 or _remote_sidecar(fs, location)
    if digest is None and recorded_only:
        raise _unrecorded(location.uri)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if digest is not None and (cache / digest / location.name).is_file():
        return cache / digest / location.name, digest
    cache.mkdir(parents=True, exist_ok=True)
    fd, part = tempfile.mkstemp(dir=cache, prefix=".part-")  # one per process: copies never mix
    try:
        with os.fdopen(fd, "wb") as out, fs.open(location.path, "rb") as src:
            while block := src.read(8 << 20):
                out.write(block)
        with open(part, "rb") as f:
            actual = sha256_of(f)
        if digest is not None and actual != digest:
            raise ChecksumMismatchError(location.uri, digest, actual)
        target = cache / actual / location.name
        target.parent.mkdir(exist_ok=True)
        os.replace(part, target)  # atomic: another process placing the same bytes is harmless
    finally:
        Path(part).unlink(missing_ok=True)
    return target, actual


def _unrecorded(where) -> CheckpointError:
    return CheckpointError(f"{where}: this format is read only with a sha256 from a record you trust: give it "
                           f"(init_sha256 / --init-sha256), or put it in {Path(str(where)).name}.sha256 beside the file")


def _remote_sidecar(fs, location) -> str | None:
    side = f"{location.path}.sha256"
    if not fs.isfile(side):
        return None
    text = fs.cat_file(side).decode(errors="replace").split()
    if not text or not re.fullmatch(r"[0-9a-fA-F]{64}", text[0]):
        raise CheckpointError(f"{location.uri}.sha256: not a sha256 record (expected 64 hex digits)")
    return text[0].lower()
