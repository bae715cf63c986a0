"""Store locations: one parsed, normalised URI and the filesystem that serves it.

Accepted forms:

- a local path (``/data/a.ome.zarr``, ``runs/x``) or ``file:///data/a.ome.zarr``
- ``s3://bucket/prefix`` through s3fs; endpoint, region and credentials come from the
  explicit storage options, then the engine config (`engine.config`), then botocore's
  standard chain (AWS_* environment, ~/.aws files)
- ``memory://name`` for tests and scratch work (one process only)

A `StoreLocation` is a small frozen value: it pickles to Ray workers, and each process
builds its own filesystem from it.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import fsspec

from engine.config import s3_storage_options
from engine.errors import InvalidURIError

SCHEMES = ("file", "s3", "memory")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")


@dataclass(frozen=True)
class StoreLocation:
    """A normalised store URI.

    `path` is what the filesystem wants: an absolute local path, ``bucket/key`` for S3,
    ``/name`` for memory. `storage_options` are extra fsspec arguments (S3 only).
    """

    scheme: str
    path: str
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def uri(self) -> str:
        if self.scheme == "file":
            return self.path
        return f"{self.scheme}://{self.path.lstrip('/')}"

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def join(self, *parts: str) -> StoreLocation:
        """A location below this one; a part that climbs out (``..``) is refused."""
        path = self.path
        for part in parts:
            path = posixpath.join(path, part)
        child = StoreLocation(self.scheme, _normalise_path(self.scheme, path), self.storage_options)
        child.require_within(self)
        return child

    def parent(self) -> StoreLocation:
        return StoreLocation(self.scheme, posixpath.dirname(self.path.rstrip("/")), self.storage_options)

    def is_within(self, root: StoreLocation) -> bool:
        if self.scheme != root.scheme:
            return False
        base = root.path.rstrip("/")
        return self.path == base or self.path.startswith(base + "/")

    def require_within(self, root: StoreLocation) -> None:
        """Raise InvalidURIError unless this location lies inside `root`."""
        if not self.is_within(root):
            raise InvalidURIError(f"{self.uri}: outside the allowed root {root.uri}")

    def real(self) -> StoreLocation:
        """This location with the symbolic links on its path followed (local disk; other
        stores have no links: the location itself). `is_within` compares path text, so a
        link below a root passes it wherever it leads: compare real locations."""
        if self.scheme != "file":
            return self
        return StoreLocation("file", os.path.realpath(self.path), self.storage_options)

    def filesystem(self) -> fsspec.AbstractFileSystem:
        """A synchronous fsspec filesystem for this location (cached by fsspec)."""
        if self.scheme == "file":
            return fsspec.filesystem("file")
        if self.scheme == "memory":
            return fsspec.filesystem("memory")
        return fsspec.filesystem("s3", **self.storage_options)

    def zarr_store(self, *, read_only: bool):
        """A zarr v3 store rooted at this location."""
        from zarr.storage import FsspecStore, LocalStore

        if self.scheme == "file":
            return LocalStore(self.path, read_only=read_only)
        if self.scheme == "memory":
            return FsspecStore.from_url(self.uri, read_only=read_only)
        import s3fs

        fs = s3fs.S3FileSystem(asynchronous=True, **self.storage_options)
        return FsspecStore(fs, path=self.path, read_only=read_only)

    def exists(self) -> bool:
        return self.filesystem().exists(self.path)


def resolve(
    uri: str | os.PathLike | StoreLocation,
    *,
    root: str | StoreLocation | None = None,
    storage_options: dict[str, Any] | None = None,
) -> StoreLocation:
    """Parse `uri` into a StoreLocation.

    With `root`, the location must lie inside it, else InvalidURIError: this is how a
    tenant or a job is kept to the prefixes it was granted.
    """
    if isinstance(uri, StoreLocation):
        location = uri
    else:
        location = _parse(os.fspath(uri), storage_options)
    if root is not None:
        location.require_within(resolve(root, storage_options=storage_options))
    return location


def _parse(uri: str, storage_options: dict[str, Any] | None) -> StoreLocation:
    if not uri or not uri.strip():
        raise InvalidURIError("empty URI: give a local path, file://, s3:// or memory:// URI")
    match = _SCHEME_RE.match(uri)
    if match is None:
        if ":" in uri.split("/", 1)[0] and not os.path.exists(uri):
            raise InvalidURIError(f"{uri!r}: not a URI grainflow understands (use {', '.join(s + '://' for s in SCHEMES)} or a local path)")
        return StoreLocation("file", _normalise_path("file", os.path.abspath(os.path.expanduser(uri))))
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme not in SCHEMES:
        raise InvalidURIError(f"{uri!r}: unknown scheme {scheme!r}; grainflow reads {', '.join(s + '://' for s in SCHEMES)} and local paths")
    if scheme == "file":
        if not rest.startswith("/"):
            raise InvalidURIError(f"{uri!r}: a file:// URI needs an absolute path (file:///data/x)")
        return StoreLocation("file", _normalise_path("file", rest))
    if scheme == "memory":
        return StoreLocation("memory", _normalise_path("memory", "/" + rest.lstrip("/")))
    bucket = rest.split("/", 1)[0]
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise InvalidURIError(f"{uri!r}: {bucket!r} is not a valid S3 bucket name")
    options = {**s3_storage_options(), **(storage_options or {})}
    return StoreLocation("s3", _normalise_path("s3", rest), options)


def _normalise_path(scheme: str, path: str) -> str:
    """Collapse `.` and `..`; a path whose `..` climbs above its top is refused."""
    absolute = path.startswith("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts or (scheme == "s3" and len(parts) == 1):
                raise InvalidURIError(f"{path!r}: '..' climbs above the top of the {scheme} store")
            parts.pop()
            continue
        parts.append(part)
    joined = "/".join(parts)
    return "/" + joined if absolute or scheme in ("file", "memory") else joined


# How far below an image's folder `escaping_link` looks when a job or a report checks an
# image: the folder, its levels and labels/ group, their arrays and label images, and
# those label images' levels, which a job writes into. Chunk files lie deeper; listing
# them all would cost more than planning.
IMAGE_LINK_DEPTH = 3


def escaping_link(location: StoreLocation, root: StoreLocation, *, depth: int = 0) -> tuple[str, str] | None:
    """The first symbolic link that leads outside `root`, as (the link's path, or
    `location`'s when a folder above it is the link; the real path it leads to), looked
    for at `location` itself and among the entries of its folders down to `depth`
    levels below it (0: `location` alone); None when there is none, or the store has no
    links (not local disk).

    `root`'s own links are followed first, so an archive that is itself a link is fine,
    and so is a link that stays inside it. A folder reached through a link inside `root`
    is searched where it really lies. Entries deeper than `depth` are not looked at:
    listing every chunk file of an image would cost more than planning it.
    """
    if location.scheme != "file" or root.scheme != "file":
        return None
    boundary = root.real()
    real = location.real()
    if not real.is_within(boundary):
        return location.path, real.path
    folders = [real.path]
    for _ in range(depth):
        below = []
        for folder in folders:
            try:
                entries = list(os.scandir(folder))
            except OSError:  # not a folder, gone, unreadable: whoever opens it says why
                continue
            for entry in entries:
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if not StoreLocation("file", target).is_within(boundary):
                        return entry.path, target
                    below.append(target)
                elif entry.is_dir(follow_symlinks=False):
                    below.append(entry.path)
        folders = below
    return None


def durable(uri: str | StoreLocation, what: str) -> StoreLocation:
    """`uri` resolved for a command's data, which must outlive the command and reach
    Ray's worker processes: memory:// (one process's memory) is refused, naming `what`."""
    location = resolve(uri)
    if location.scheme == "memory":
        raise InvalidURIError(f"{what} {location.uri}: memory:// lives in one process's memory and is gone when the "
                              f"command ends; give a local path, file:// or s3:// URI")
    return location
