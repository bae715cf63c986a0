"""A SQLite registry copied or moved to another folder.

A SQLite registry keeps its artifacts beside its database (`<folder>/mlflow.db`,
`<folder>/artifacts`), but MLflow records their absolute location in the database: in the
experiment (where new runs' files go) and in every run. A registry folder copied or moved
elsewhere still names the old folder, so the copy would read the original's files, write
new versions into it (recreating it if it was deleted), or fail to find files once it is
gone, with an error naming neither.

ModelRegistry calls `check_artifact_home` before it reads or writes artifacts: such a copy
is refused with a RegistryError naming both folders and the fix, `repoint_artifacts`,
which rewrites the recorded locations to the folder beside the database. MLflow has no API
to change a recorded location; resolving paths against the database behind MLflow's back
instead would leave MLflow's own UI and clients pointing at the old folder.
"""

from __future__ import annotations

from pathlib import Path

from engine.registry import backend
from engine.registry.errors import RegistryError


def check_artifact_home(tracking_uri: str, recorded_location: str | None) -> None:
    """Refuse a SQLite registry whose recorded artifact folder is not the one beside its
    database: the registry folder was copied or moved (module doc).

    `recorded_location` is the artifact location the registry's experiment was created
    with. Only a local one of the default form (`<folder>/artifacts`) is compared: one
    chosen elsewhere on purpose (a bucket, another disk's folder) is left alone. Raises
    RegistryError naming both folders and how to adopt the registry where it now lies.
    """
    expected = backend.default_artifact_location(tracking_uri)
    if expected is None or recorded_location is None or recorded_location.rstrip("/") == expected:
        return
    recorded = _local_path(recorded_location)
    if recorded is None or recorded.name != backend.ARTIFACT_DIR_NAME:
        return
    db = backend.sqlite_path(tracking_uri).expanduser().resolve()
    home = db.parent / backend.ARTIFACT_DIR_NAME
    raise RegistryError(
        f"registry {db}: moved or copied from {recorded.parent}? Its database records its artifacts in "
        f"{recorded}, but a registry's artifacts live beside its database, in {home}; refusing to read "
        "or write the old folder. Open the registry where it was made, or adopt it here (with the old "
        f"folder's files in {home}): python -c \"from engine.registry.relocation import repoint_artifacts; "
        f"repoint_artifacts('{db}')\""
    )


def repoint_artifacts(db_path: str | Path) -> list[str]:
    """Adopt a copied or moved SQLite registry where it now lies: its records of artifact
    locations under an old `<folder>/artifacts` (experiments and their runs, the training
    metrics' too) are rewritten to the `artifacts` folder beside `db_path`. Returns the
    old locations rewritten (none: already at home). The files themselves are not moved.
    """
    import sqlite3
    from contextlib import closing

    db = Path(db_path).expanduser().resolve()
    if not db.is_file():
        raise RegistryError(f"no registry database at {db}")
    new = backend.default_artifact_location(backend.sqlite_uri(db))
    with closing(sqlite3.connect(db)) as conn, conn:  # closed, and committed as one transaction
        old_homes = {loc.rstrip("/") for (loc,) in conn.execute("SELECT artifact_location FROM experiments")
                     if loc and _local_path(loc) is not None and _local_path(loc).name == backend.ARTIFACT_DIR_NAME}
        old_homes.discard(new)
        for old in old_homes:
            conn.execute("UPDATE experiments SET artifact_location = ? WHERE rtrim(artifact_location, '/') = ?",
                         (new, old))
            conn.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                         "WHERE substr(artifact_uri, 1, ?) = ?", (new, len(old) + 1, len(old) + 1, old + "/"))
    return sorted(old_homes)


def _local_path(location: str) -> Path | None:
    """The local folder a `file://` URI (or a bare absolute path) names, else None."""
    from urllib.parse import unquote, urlsplit

    if location.startswith("file://"):
        return Path(unquote(urlsplit(location).path))
    if location.startswith("/"):
        return Path(location)
    return None
