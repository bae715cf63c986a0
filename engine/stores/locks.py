"""Locks that let several processes write one archive on local disk at the same time.

What is guarded (see `engine.stores.catalog`, `engine.stores.staging` and
`engine.stores.ingest.pipeline`):

- the catalog's read-modify-write: an upsert waits for another process's, so neither
  loses the other's rows;
- an image id that an ingest is writing: held from the moment the id is picked until
  the image folder is in place, so two ingests never pick the same new id;
- a source file that an ingest is converting (`lock_for_source`): held from the start
  of the file until its catalog rows are written, so two ingests of one file take turns
  and the second replaces the first's image rather than adding another;
- a hidden folder a writer is filling or has set aside (engine.stores.staging): held
  while the folder exists, so a clean-up can tell a live writer's from a dead one's.

They are `fcntl.flock` locks on hidden `*.lock` files beside what they guard. The
kernel drops a flock when its process dies, however it dies, and whatever PID namespace
it runs in, so a killed writer never leaves a lock held; the file itself is deleted on
release (and when a held lock is garbage collected). flock is per open file, so two
threads of one process exclude each other too. Local disk only (flock is not reliable
over NFS); on S3 and memory:// these functions give a lock that guards nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import weakref

from engine.stores.uri import StoreLocation

LOCK_SUFFIX = ".lock"


class FileLock:
    """An exclusive flock on the file at `path` (created if missing, deleted on release).

    A held lock whose object is garbage collected is released then, as an unclosed file
    is closed: it could no longer be released by hand.
    """

    def __init__(self, path: str):
        self.path = path
        self._held: weakref.finalize | None = None

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
                self._held = weakref.finalize(self, _unlock, self.path, fd)
                return True
            os.close(fd)

    def release(self) -> None:
        """Delete the lock file and drop the lock; releasing an unheld lock does nothing."""
        if self._held is not None:
            self._held()  # runs `_unlock` once; a second call does nothing
            self._held = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _unlock(path: str, fd: int) -> None:
    try:
        os.unlink(path)  # while still held, so no one locks the file being deleted
    except FileNotFoundError:  # deleted by hand: nothing left to tidy
        pass
    os.close(fd)


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


def lock_for_source(images: StoreLocation, source: str) -> Lock:
    """The lock an ingest holds on the file `source` (its resolved full path) while it
    converts it into the archive whose image folder is `images`: a flock on
    `.source-<sha256 of the path>.lock` there, a lock that guards nothing elsewhere.

    The path is hashed because it may be longer than a file name may be, and hold
    characters (`/`) a file name may not.
    """
    if images.scheme != "file":
        return NoLock()
    digest = hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return FileLock(os.path.join(images.path, f".source-{digest}{LOCK_SUFFIX}"))
