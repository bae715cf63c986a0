"""Hidden siblings of an image folder, and removing the ones a dead writer left behind.

`ImageWriter` writes a new image to `.<name>.partial-<owner>` and, replacing an image,
moves the old one to `.<name>.replaced-<owner>` until the catalog describes the new one
(engine.stores.writer). `<owner>` is `<hex>-<pid>@<host>`: which process on which
machine made the folder. A process killed before it could tidy up (SIGKILL, OOM killer,
power loss) leaves them behind; `remove_stale_siblings` removes them.

The rule: a sibling is stale when it was made on this host and its pid is not running.
Siblings from another host (a file system shared between machines) or from an older
grainflow (no pid in the name) are kept and named in a warning, since whether their
writer still runs cannot be known here. A pid reused by a new process keeps a leftover
until that process ends: the check errs towards keeping. Lock files (engine.stores.locks)
a killed process left are removed once no one holds them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import uuid

from engine.stores.locks import LOCK_SUFFIX, FileLock, lock_for
from engine.stores.uri import StoreLocation

PARTIAL = "partial"
REPLACED = "replaced"

_SIBLING = re.compile(r"\.(?P<target>.+)\.(?P<kind>partial|replaced)-[0-9a-f]+(?:-(?P<pid>[0-9]+)@(?P<host>.+))?")

logger = logging.getLogger(__name__)


def sibling_name(target_name: str, kind: str) -> str:
    """A new hidden folder name beside `target_name` for this process: `kind` is PARTIAL or REPLACED."""
    return f".{target_name}.{kind}-{uuid.uuid4().hex[:12]}-{os.getpid()}@{_host()}"


def remove_stale_siblings(folder: StoreLocation) -> list[str]:
    """Remove what dead writers left in `folder` (an archive's `images/`, local disk
    only; elsewhere nothing is done); return the paths removed or put back.

    A partial image is deleted. A replaced image is deleted too, unless no image is at
    its name (the writer died between the two renames of its swap): then it is put back.
    """
    if folder.scheme != "file" or not os.path.isdir(folder.path):
        return []
    tidied, unknown = [], []
    for entry in os.scandir(folder.path):
        if entry.name.startswith(".") and entry.name.endswith(LOCK_SUFFIX):
            lock = FileLock(entry.path)
            if lock.acquire(blocking=False):  # held means a live writer: left alone
                lock.release()
            continue
        match = _SIBLING.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        if match["pid"] is None or match["host"] != _host():
            unknown.append(entry.path)
            continue
        if _running(int(match["pid"])):
            continue
        target = folder.join(match["target"])
        if match["kind"] == REPLACED and not os.path.lexists(target.path):
            put_back = _put_back(entry.path, target)
            if put_back is None:  # an ingest is writing an image there: look again next time
                continue
            if put_back:
                tidied.append(entry.path)
                continue
        shutil.rmtree(entry.path)
        tidied.append(entry.path)
    if unknown:
        logger.warning("%s: kept %s, left by a writer on another machine or an older grainflow; delete them "
                       "once no ingest or synth writes to this archive", folder, ", ".join(sorted(unknown)))
    return tidied


def _put_back(aside: str, target: StoreLocation) -> bool | None:
    """Rename the replaced image at `aside` back to `target`: True when done, False when
    an image arrived there meanwhile, None when an ingest holds `target`'s lock."""
    lock = lock_for(target)
    if not lock.acquire(blocking=False):
        return None
    try:
        os.rename(aside, target.path)
        return True
    except OSError:  # an image arrived there meanwhile: the old one is obsolete
        return False
    finally:
        lock.release()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
