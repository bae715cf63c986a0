"""API keys: stored hashed, each mapped to a tenant and scopes.

A key the client sends looks like ``gf_<key id>_<secret>`` (the secret is 32 random
bytes, url-safe base64). The keys file (JSON, created 0600 by `add_key` /
``grainflow serve keys add``) holds, per key id, never the secret itself:

    {"keys": [{"id": "k3f9a1c2", "tenant": "lab-a", "scopes": ["analyze"],
               "salt": "<hex>", "sha256": "<hex of sha256(salt + secret)>",
               "rate_per_minute": 120, "created": "2026-11-02T10:00:00+00:00"}]}

A salted sha256 is enough here: the secrets are random and 256 bits long, so there is
nothing to brute-force (a slow hash such as scrypt protects low-entropy passwords and
would add tens of milliseconds to every request). Comparison is constant-time.
Scopes: "analyze" (POST /v1/analyze, GET /v1/models) and "admin" (the /v1/admin routes).

A running server follows the file: `KeyStore.verify` looks at the file's inode, size and
mtime at most once a second (`check_every_s`) and reads it again when they changed, so
a key added, or revoked (`revoke_key`, ``grainflow serve keys revoke``, or its entry
deleted by hand), takes effect within a second, without a restart. A file that cannot
be read as a keys file (an edit half saved) keeps the keys read last, and is tried
again at the next check; a file that is gone refuses every key.

`add_key` and `revoke_key` read, change and replace the file while holding an exclusive
flock on `.<keys file name>.lock` beside it (`keys_file_lock`), so two admins, or a
provisioning script adding keys in parallel, take turns: no key printed as created goes
missing, and a revoked key is never written back by an add that read the file before
the revoke. A script that edits the file itself should hold the same lock. The keys
file is local (flock is not reliable over NFS).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from engine.errors import GrainflowError
from engine.stores.locks import LOCK_SUFFIX, FileLock

SCOPES = ("analyze", "admin")
_log = logging.getLogger(__name__)
PREFIX = "gf_"


@dataclass(frozen=True)
class Principal:
    """Who a verified key belongs to."""

    key_id: str
    tenant: str
    scopes: frozenset[str]
    rate_per_minute: float | None = None


@dataclass(frozen=True)
class _Entry:
    principal: Principal
    salt: bytes
    digest: bytes


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def split_key(key: str) -> tuple[str, str] | None:
    """("key id", "secret") of a well-formed key, else None."""
    if not key.startswith(PREFIX):
        return None
    body = key[len(PREFIX):]
    key_id, sep, secret = body.partition("_")
    if not sep or not key_id or not secret or not key_id.isalnum():
        return None
    return key_id, secret


class KeyStore:
    """The keys of a keys file, looked up by id and checked against their hash; the
    file is read again when it changes (module doc)."""

    def __init__(self, entries: dict[str, _Entry], path: Path | None = None, *, check_every_s: float = 1.0,
                 signature: tuple[int, ...] | None = None):
        self._entries = entries
        self._path = path
        self._check_every_s = float(check_every_s)
        self._signature = signature
        self._checked_at = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | os.PathLike | None, *, check_every_s: float = 1.0) -> KeyStore:
        """Read a keys file (module doc); None gives a store that refuses every key.
        check_every_s: how often, at most, `verify` looks whether the file changed (s)."""
        if path is None:
            return cls({})
        p = Path(path)
        signature = _signature(p)
        return cls(_read(p), p, check_every_s=check_every_s, signature=signature)

    def verify(self, key: str | None) -> Principal | None:
        """The key's principal, or None when the key is missing, malformed, unknown or wrong."""
        self._follow_file()
        parts = split_key(key or "")
        if parts is None:
            return None
        entry = self._entries.get(parts[0])
        if entry is None:
            return None
        return entry.principal if hmac.compare_digest(_digest(entry.salt, parts[1]), entry.digest) else None

    def _follow_file(self) -> None:
        """Read the file again if it changed since it was read (one stat a second at most)."""
        if self._path is None or time.monotonic() - self._checked_at < self._check_every_s:
            return
        with self._lock:
            if time.monotonic() - self._checked_at < self._check_every_s:
                return  # another thread checked meanwhile
            self._checked_at = time.monotonic()
            signature = _signature(self._path)
            if signature == self._signature:
                return
            if signature is None:  # removed: no file, no keys (fail closed)
                self._entries, self._signature = {}, None
                return
            try:
                entries = _read(self._path)
            except GrainflowError as exc:  # keep the keys read last; tried again at the next check
                _log.warning("keys file not reloaded, the keys read last stay in force: %s", exc)
                return
            self._entries, self._signature = entries, signature

    def __len__(self) -> int:
        self._follow_file()
        return len(self._entries)


def _signature(path: Path) -> tuple[int, ...] | None:
    """What changes when the keys file is replaced or edited: device, inode, size, mtime
    and ctime (ns); None when there is no file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _read(p: Path) -> dict[str, _Entry]:
    """The entries of the keys file `p`, by key id; GrainflowError naming the file if it
    is missing or not a keys file."""
    try:
        data = json.loads(p.read_text())
        entries = {}
        for k in data["keys"]:
            scopes = frozenset(k["scopes"])
            bad = sorted(scopes - set(SCOPES))
            if bad:
                raise ValueError(f"key {k['id']}: unknown scopes {bad}; valid: {', '.join(SCOPES)}")
            rate = k.get("rate_per_minute")
            if not _valid_rate(rate):
                raise ValueError(f"key {k['id']}: rate_per_minute {rate} must be positive")
            entries[k["id"]] = _Entry(Principal(k["id"], k["tenant"], scopes, k.get("rate_per_minute")),
                                      bytes.fromhex(k["salt"]), bytes.fromhex(k["sha256"]))
    except FileNotFoundError:
        raise GrainflowError(f"{p}: keys file not found; create one with `grainflow serve keys add`") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise GrainflowError(f"{p}: not a grainflow keys file ({type(exc).__name__}: {exc})") from None
    return entries


def _valid_rate(rate) -> bool:
    """A key's own rate: None (the server's default) or a positive finite number per minute."""
    return rate is None or (math.isfinite(float(rate)) and float(rate) > 0)


def add_key(path: str | os.PathLike, tenant: str, scopes: list[str] | tuple[str, ...] = ("analyze",), *,
            rate_per_minute: float | None = None) -> tuple[str, str]:
    """Create a key for `tenant` in the keys file at `path` (created 0600 if absent).

    Returns (key id, the full key): the key is shown this once and stored only hashed.
    """
    bad = sorted(set(scopes) - set(SCOPES))
    if bad or not scopes:
        raise GrainflowError(f"scopes {list(scopes)}: each must be one of {', '.join(SCOPES)}")
    if not tenant:
        raise GrainflowError("tenant: must not be empty")
    if not _valid_rate(rate_per_minute):
        raise GrainflowError(f"rate_per_minute: {rate_per_minute} must be a positive number of requests "
                             f"(leave it out for the server's default)")
    p = Path(path)
    with keys_file_lock(p):  # read to replace: another add or revoke waits (module doc)
        data = json.loads(p.read_text()) if p.exists() else {"keys": []}
        key_id = "k" + secrets.token_hex(4)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        entry = {"id": key_id, "tenant": tenant, "scopes": sorted(set(scopes)), "salt": salt.hex(),
                 "sha256": _digest(salt, secret).hex(), "created": datetime.now(timezone.utc).isoformat()}
        if rate_per_minute is not None:
            entry["rate_per_minute"] = float(rate_per_minute)
        data["keys"].append(entry)
        _write(p, data)
    return key_id, f"{PREFIX}{key_id}_{secret}"


def list_keys(path: str | os.PathLike) -> list[Principal]:
    """Whom the keys of the keys file at `path` belong to (ids, tenants, scopes, rates;
    never a secret: the file holds none), by key id."""
    return [e.principal for _, e in sorted(_read(Path(path)).items())]


def revoke_key(path: str | os.PathLike, key_id: str) -> Principal:
    """Remove key `key_id` (or the key a full `gf_<id>_<secret>` names) from the keys file
    at `path`; returns whom it belonged to. A running server refuses it within a second
    (module doc)."""
    p = Path(path)
    parts = split_key(key_id)
    if parts is not None:  # the whole key pasted: its id is its second part
        key_id = parts[0]
    with keys_file_lock(p):  # read to replace: another add or revoke waits (module doc)
        entries = _read(p)  # a file that is not a keys file is left as it is
        if key_id not in entries:
            raise GrainflowError(f"{p}: no key {key_id!r}; its keys: {', '.join(sorted(entries)) or 'none'}")
        data = json.loads(p.read_text())
        data["keys"] = [k for k in data["keys"] if k["id"] != key_id]
        _write(p, data)
    return entries[key_id].principal


def keys_file_lock(path: str | os.PathLike) -> FileLock:
    """The lock `add_key` and `revoke_key` hold while they read, change and replace the
    keys file at `path`: an exclusive flock on `.<name>.lock` in the same folder."""
    p = Path(path).absolute()  # FileLock creates the lock's folder, which a bare name lacks
    return FileLock(str(p.with_name(f".{p.name}{LOCK_SUFFIX}")))


def _write(p: Path, data: dict) -> None:
    """Write the keys file whole (0600), replacing it at once: a server reading it
    meanwhile sees the old file or the new, never half of one. Called with
    `keys_file_lock` held; the temp file still gets a name of its own (mkstemp, 0600
    from the start), so a writer that ignores the lock cannot rename this one's away."""
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())  # the data on disk before the name points at it
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(p.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename into `folder` durable: a key printed as created survives a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
