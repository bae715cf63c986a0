"""Locks that let several processes write one archive on local disk at the same time.

Two things are guarded (see `engine.stores.catalog` and `engine.stores.ingest.pipeline`):

- the catalog's read-modify-write: an upsert waits for another process's, so neither
  loses the other's rows;
- an image id that an ingest is writing: held from the moment the id is picked until
  the image folder is in place, so two ingests never pick the same new id.

They are `fcntl.flock` locks on a hidden `.<name>.lock` file beside what they guard. The
kernel drops a flock when its process dies, however it dies, so a killed writer never
leaves a lock held; the file itself is deleted on release. flock is per open file, so
two threads of one process exclude each other too. Local disk only (flock is not
reliable over NFS); on S3 and memory:// `lock_for` gives a lock that guards nothing.
"""

from __future__ import annotations

import fcntl
import os

from engine.stores.uri import StoreLocation

LOCK_SUFFIX = ".lock"


class FileLock:
    """An exclusive flock on the file at `path` (created if missing, deleted on release)."""

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None

    def acquire(self, *, blocking: bool = True) -> bool:
        """Take the lock, waiting for its holder when `blocking`; False if not taken."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            # The holder we waited for deleted the file as it released it: a lock on that
            # deleted file excludes nobody, so lock the file now at `path` instead.
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                now = None
            held = os.fstat(fd)
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                self._fd = fd
                return True
            os.close(fd)

    def release(self) -> None:
        """Delete the lock file and drop the lock; releasing an unheld lock does nothing."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still held, so no one locks the file being deleted
        except FileNotFoundError:  # deleted by hand: nothing left to tidy
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class NoLock:
    """What `lock_for` gives where there are no locks (S3, memory://): always taken."""

    def acquire(self, *, blocking: bool = True) -> bool:
        return True

    def release(self) -> None:
        pass

    def __enter__(self) -> NoLock:
        return self

    def __exit__(self, *exc) -> None:
        pass


Lock = FileLock | NoLock


def lock_for(location: StoreLocation) -> Lock:
    """The lock guarding `location` (a catalog file, an image folder): a flock on
    `.<name>.lock` beside it on local disk, a lock that guards nothing elsewhere."""
    if location.scheme != "file":
        return NoLock()
    return FileLock(os.path.join(os.path.dirname(location.path), f".{location.name}{LOCK_SUFFIX}"))
