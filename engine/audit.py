"""The append-only audit log: one JSON line per request or job decision, refused ones included.

    log = AuditLog.default()
    log.append({"kind": "http", "tenant": "lab-a", "key_id": "k1", "route": "/v1/analyze",
                "status": 200, "models": {...}, "image_sha256": "..."})

Each entry gets ``time`` (UTC, ISO 8601 with microseconds) and ``pid``. The file is opened
with O_APPEND and every entry is one ``os.write`` of one line, so writers in several
processes (Serve replicas, job drivers) interleave whole lines and never rewrite what is
there. Entries carry identifiers and digests, never pixels: bytes and arrays are refused.

Where it lives: ``$GRAINFLOW_AUDIT_LOG``, else ``audit.jsonl`` in the user data dir.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

from engine.errors import GrainflowError

ENV_VAR = "GRAINFLOW_AUDIT_LOG"


def default_audit_path() -> Path:
    """``$GRAINFLOW_AUDIT_LOG`` or ``<user data dir>/audit.jsonl``."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("grainflow")) / "audit.jsonl"


class AuditLog:
    """Append-only JSON-lines log at ``path`` (created 0600 with its folder if absent).

    fsync: sync each entry to disk before returning (durable across a power cut, about a
    millisecond per entry on local disks); off by default for request paths.
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = False):
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd: int | None = None

    @classmethod
    def default(cls, **kwargs: Any) -> "AuditLog":
        return cls(default_audit_path(), **kwargs)

    def append(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Write one entry; returns it as written (with ``time`` and ``pid``)."""
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="microseconds"), "pid": os.getpid()}
        record.update(entry)
        _refuse_payloads(record)
        line = (json.dumps(record, sort_keys=True, default=str, separators=(",", ":")) + "\n").encode()
        with self._lock:
            fd = self._open()
            os.write(fd, line)
            if self.fsync:
                os.fsync(fd)
        return record

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __getstate__(self) -> dict[str, Any]:
        # A log handed to a Ray actor or task reopens the file there.
        return {"path": self.path, "fsync": self.fsync}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], fsync=state["fsync"])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def read_audit(path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Every entry of the log at ``path`` (default: the default log), oldest first."""
    return list(iter_audit(path))


def iter_audit(path: str | os.PathLike | None = None) -> Iterator[dict[str, Any]]:
    p = Path(path) if path is not None else default_audit_path()
    if not p.exists():
        return
    with p.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise GrainflowError(f"{p}:{number}: not a JSON audit entry: {exc}") from None


def _refuse_payloads(value: Any, where: str = "entry") -> None:
    if isinstance(value, (bytes, bytearray, memoryview)) or hasattr(value, "__array_interface__"):
        raise GrainflowError(f"audit {where}: {type(value).__name__} values are not logged (digests only, never pixels)")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _refuse_payloads(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _refuse_payloads(v, f"{where}[{i}]")
