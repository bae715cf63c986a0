"""Weights named by a local path or an s3:// URI, as a local file and the sha256 to check.

torch and safetensors read local files, and every worker of a fine-tune needs the file
(Meta's SAM ViT-B is 375 MB, ViT-H 2.5 GB). A file in a bucket is copied once per machine
into the user's cache, under a folder named by its digest: an object replaced later is
never mistaken for the copy. The processes of one machine take turns (a lock per file),
so the workers that start together on a fresh node download it once, and a later run
finds the copy: by the digest it is given, else by the object's ETag (a replaced object
has another). Loaders check the digest again on the read they parse
(engine.models.checkpoint.open_checked).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

from engine.models.checkpoint import check_hex, parse_sidecar, read_sidecar, sha256_file, sha256_of
from engine.models.errors import CheckpointError, ChecksumMismatchError

CACHE_SUBDIR = "weights"
# A partial copy older than this was left by a process that died mid-download.
STALE_PARTIAL_S = 24 * 3600


def default_cache_dir() -> Path:
    """`<user cache dir>/weights`, beside the registry's fetched versions."""
    import platformdirs

    from engine.registry.backend import APP_NAME

    return Path(platformdirs.user_cache_dir(APP_NAME)) / CACHE_SUBDIR


def weights_file(uri: str | os.PathLike, expected_sha256: str | None = None, *,
                 cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(local path, sha256) of the weights at `uri` (a local path, file:// or s3:// URI).

    The digest is `expected_sha256`, else the `<file>.sha256` beside the file (in the
    bucket for s3://), else the file's own. A local file is used where it lies; an s3://
    object is copied to `<cache_dir>/<sha256>/<name>` unless a copy is there already, and
    a copy whose bytes differ from the expected digest is refused (ChecksumMismatchError)
    and not kept. A missing file is a CheckpointError naming it; a memory:// URI too (other
    processes, the training workers, cannot read it).
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
        return path, expected_sha256 or read_sidecar(path) or sha256_file(path)
    if location.scheme != "s3":
        raise CheckpointError(f"{location.uri}: weights must be a local path or an s3:// URI that every "
                              f"worker can read, not {location.scheme}://")

    fs = location.filesystem()
    try:  # not fs.isfile: it reads every error (credentials, endpoint) as "no file"
        info = fs.info(location.path)
    except FileNotFoundError:
        raise CheckpointError(f"{location.uri}: no such file") from None
    if info.get("type") != "file":
        raise CheckpointError(f"{location.uri}: not a file")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    version = hashlib.sha256(f"{location.uri}\0{info.get('ETag', '')}".encode()).hexdigest()
    recorded = expected_sha256 or _remote_sidecar(fs, location)
    known = recorded or _indexed(cache, version)
    from engine.stores.locks import FileLock

    with FileLock(str(cache / ".locks" / f"{known or version}.lock")):
        if known is not None and (cache / known / location.name).is_file():
            return cache / known / location.name, known
        digest = _download(fs, location, cache, recorded)
    if info.get("ETag"):
        _index(cache, version, digest)
    return cache / digest / location.name, digest


def _download(fs, location, cache: Path, expected: str | None) -> str:
    """Copy the object to `cache/<its sha256>/<name>` (through a partial file, moved into
    place only once its digest is known and, when given, matches); returns the digest."""
    partial = cache / ".partial"
    partial.mkdir(parents=True, exist_ok=True)
    for old in partial.iterdir():
        if time.time() - old.stat().st_mtime > STALE_PARTIAL_S:
            old.unlink(missing_ok=True)
    fd, part = tempfile.mkstemp(dir=partial)
    try:
        with os.fdopen(fd, "wb") as out, fs.open(location.path, "rb") as src:
            while block := src.read(8 << 20):
                out.write(block)
        with open(part, "rb") as f:
            actual = sha256_of(f)
        if expected is not None and actual != expected:
            raise ChecksumMismatchError(location.uri, expected, actual)
        (cache / actual).mkdir(exist_ok=True)
        os.replace(part, cache / actual / location.name)
    finally:
        Path(part).unlink(missing_ok=True)
    return actual


def _remote_sidecar(fs, location) -> str | None:
    try:
        text = fs.cat_file(f"{location.path}.sha256")
    except FileNotFoundError:
        return None
    return parse_sidecar(text.decode(errors="replace"), f"{location.uri}.sha256")


def _indexed(cache: Path, version: str) -> str | None:
    """The digest of an object version (URI and ETag) copied before, if any."""
    entry = cache / ".index" / version
    try:
        return parse_sidecar(entry.read_text(), str(entry))
    except (FileNotFoundError, CheckpointError):  # none, or not ours: copy again
        return None


def _index(cache: Path, version: str, digest: str) -> None:
    entry = cache / ".index" / version
    entry.parent.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=entry.parent)
    with os.fdopen(fd, "w") as f:
        f.write(digest)
    os.replace(tmp, entry)
