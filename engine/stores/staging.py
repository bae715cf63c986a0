"""Hidden siblings of an image folder, and removing the ones a dead writer left behind.

`ImageWriter` writes a new image to `.<name>.partial-<owner>` and, replacing an image,
moves the old one to `.<name>.replaced-<owner>` until the new one is described (by the
catalog, for an ingest; engine.stores.writer). `<owner>` is `<hex>@<host>`: a random
token and the machine that made the folder. A process killed before it could tidy up
(SIGKILL, OOM killer, power loss) leaves them behind; `remove_stale_siblings` removes
them, or puts a set-aside image back.

Liveness is a lock, not a process id. The writer takes a flock on `<sibling>.lock`
(engine.stores.locks) before it creates the folder and drops it only once the folder
is gone: moved into place, or deleted. The kernel drops a dead process's flocks, so a
sibling whose lock can be taken has no live writer. A process id could not tell: in
two containers sharing a volume and host name but not a PID namespace, the other's
writer is not visible (its pid may even be running here, as another process), and a
grainflow restarted as PID 1 after a kill finds its old pid 1 "running" (itself).

What is done with a sibling whose lock is free:

- a partial image is deleted;
- a replaced image whose root `zarr.json` is gone is deleted: a writer deletes that
  file first, once the new image is described, so this one's deletion had begun;
- a replaced image with no image at its name (the writer died between the two renames
  of its swap) is put back;
- a replaced image with an image at its name is kept, and named in a warning: its
  writer died after the swap but before the new image was described, so the catalog
  row may still describe this one. An ingest upserts right after a swap, so this takes
  a kill within that moment (or a catalog that could not be written).

Other siblings are never removed on a guess:

- made on another machine (host): kept and named in a warning, since flock need not
  reach across machines sharing a file system;
- named by an older grainflow, whose writers held no such lock (`<hex>` alone, or
  `<hex>-<pid>@<host>`): kept and named in a warning, since whether their writer
  still runs cannot be known (a pid cannot tell, as above).

Lock files (engine.stores.locks) a killed process left are removed once no one holds them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import uuid

from engine.stores.locks import LOCK_SUFFIX, FileLock, Lock, NoLock, lock_for
from engine.stores.uri import StoreLocation

PARTIAL = "partial"
REPLACED = "replaced"
ROOT_METADATA = "zarr.json"

# This grainflow's names, whose writer holds `<name>.lock` while the folder exists.
_LOCKED = re.compile(r"\.(?P<target>.+)\.(?P<kind>partial|replaced)-[0-9a-f]+@(?P<host>[A-Za-z0-9._-]+)")
# Older names, whose writers held no lock: with the writer's pid, or nothing about it.
_OLDER = re.compile(r"\.(?P<target>.+)\.(?P<kind>partial|replaced)-[0-9a-f]+(?:-[0-9]+@.+)?")

logger = logging.getLogger(__name__)


def sibling_name(target_name: str, kind: str) -> str:
    """A new hidden folder name beside `target_name` for this process: `kind` is PARTIAL or REPLACED."""
    return f".{target_name}.{kind}-{uuid.uuid4().hex[:12]}@{_host()}"


def sibling_lock(sibling: StoreLocation) -> Lock:
    """The lock a sibling's writer holds while the folder exists: a flock on
    `<sibling>.lock` beside it on local disk, a lock that guards nothing elsewhere."""
    if sibling.scheme != "file":
        return NoLock()
    return FileLock(sibling.path + LOCK_SUFFIX)


class Sibling:
    """A hidden folder beside the image `target` that this process writes, holding the
    lock that tells `remove_stale_siblings` its writer is alive.

    The lock is taken here, before the folder exists, so a clean-up never finds the
    folder unlocked while its writer lives. Call `release` once the folder has been
    moved into place, `remove` to delete it.
    """

    def __init__(self, target: StoreLocation, kind: str):
        self.location = target.parent().join(sibling_name(target.name, kind))
        self._lock = sibling_lock(self.location)
        self._lock.acquire()

    def release(self) -> None:
        """Drop the lock: the folder is no longer at this name."""
        self._lock.release()

    def remove(self) -> None:
        """Delete the folder, its root metadata first (see the module doc), then drop the lock."""
        try:
            fs = self.location.filesystem()
            root = self.location.join(ROOT_METADATA)
            if fs.exists(root.path):
                fs.rm_file(root.path)
            if fs.exists(self.location.path):
                fs.rm(self.location.path, recursive=True)
        finally:
            self._lock.release()


def remove_stale_siblings(folder: StoreLocation) -> list[str]:
    """Remove what dead writers left in `folder` (an archive's `images/`, local disk
    only; elsewhere nothing is done); return the paths removed or put back.

    The module doc says which siblings count as a dead writer's, and what is done with
    each; the ones kept because that cannot be known here are named in a warning.
    """
    if folder.scheme != "file" or not os.path.isdir(folder.path):
        return []
    tidied: list[str] = []
    unknown: list[str] = []
    unconfirmed: list[str] = []
    for entry in os.scandir(folder.path):
        if entry.name.startswith(".") and entry.name.endswith(LOCK_SUFFIX) and entry.is_file(follow_symlinks=False):
            lock = FileLock(entry.path)
            if lock.acquire(blocking=False):  # held means a live writer: left alone
                lock.release()
            continue
        if not entry.is_dir(follow_symlinks=False):
            continue
        locked, older = _LOCKED.fullmatch(entry.name), _OLDER.fullmatch(entry.name)
        if locked is not None and locked["host"] == _host():
            lock = sibling_lock(folder.join(entry.name))
            if not lock.acquire(blocking=False):  # its writer is alive
                continue
            try:
                if os.path.isdir(entry.path):  # else its writer moved it into place or deleted it meanwhile
                    _tidy(entry.path, folder.join(locked["target"]), locked["kind"], tidied, unconfirmed)
            finally:
                lock.release()
        elif locked is not None or older is not None:
            unknown.append(entry.path)
    if unknown:
        logger.warning("%s: kept %s, left by a writer on another machine or an older grainflow; delete them "
                       "once no ingest or synth writes to this archive", folder, ", ".join(sorted(unknown)))
    if unconfirmed:
        logger.warning("%s: kept %s: each is the image that was at its name until a writer replaced it and was "
                       "killed before the new image was catalogued. Ingest that image's file again (its catalog "
                       "row then describes the new image) and delete the kept folder, or move the kept folder back "
                       "to the image's name to keep the old image", folder, ", ".join(sorted(unconfirmed)))
    return tidied


def _tidy(path: str, target: StoreLocation, kind: str, tidied: list[str], unconfirmed: list[str]) -> None:
    """Remove or put back the dead writer's sibling at `path` of image `target`, or keep it."""
    if kind == REPLACED and os.path.isfile(os.path.join(path, ROOT_METADATA)):
        if os.path.lexists(target.path):
            unconfirmed.append(path)
            return
        put_back = _put_back(path, target)
        if put_back:
            tidied.append(path)
        elif put_back is False:
            unconfirmed.append(path)
        return  # None: an ingest is writing an image there: look again next time
    shutil.rmtree(path)
    tidied.append(path)


def _put_back(aside: str, target: StoreLocation) -> bool | None:
    """Rename the replaced image at `aside` back to `target`: True when done, False when
    an image arrived there meanwhile, None when an ingest holds `target`'s lock."""
    lock = lock_for(target)
    if not lock.acquire(blocking=False):
        return None
    try:
        os.rename(aside, target.path)
        return True
    except OSError:
        return False
    finally:
        lock.release()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
