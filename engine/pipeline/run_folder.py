"""A run's output folder (`--out`): which folders hold a run, and removing one run's outputs.

`<out>/job.json` (MANIFEST) records a run's settings and each image's pixel checksum
(engine.pipeline.job); beside it the run writes the tables, ledger, summary,
preprocessing parameters and, with ``--labels out``, label images (`engine.data.sinks`
has the layout). A folder that holds any of those names but no run's manifest is
someone else's: a run is refused there rather than writing into it, and a rerun with
``resume=False`` removes only what a run wrote (`clear_run`), never a user's own files
beside the outputs. Local disk and object stores alike (fsspec).
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from engine.data.ledger import LEDGER_DIR
from engine.data.sinks import DETECTIONS, ERRORS, LABELS_DIR, OBJECTS, SUMMARY_FILE, TILES
from engine.errors import GrainflowError
from engine.stores.id_names import id_file_stem
from engine.stores.uri import StoreLocation

MANIFEST = "job.json"
PREPROCESS_DIR = "preprocess"
# What a run writes directly under `out`. A folder holding any of these but no run's
# manifest is not a run's: it is refused, not written.
_TABLES = (DETECTIONS, ERRORS, OBJECTS, TILES)
_OUTPUT_NAMES = (MANIFEST, SUMMARY_FILE, LEDGER_DIR, *_TABLES, PREPROCESS_DIR, LABELS_DIR)
_LEFTOVER = re.compile(r"\.\d+\.tmp$")  # what `put_file` leaves of a local write killed midway


def read_manifest(out: StoreLocation) -> dict[str, Any] | None:
    """The manifest (``job.json``) of the run whose outputs `out` holds; None when it
    holds none: no job.json, or one that is not a run's (not JSON, no ``settings``)."""
    loc = out.join(MANIFEST)
    fs = loc.filesystem()
    if not fs.exists(loc.path):
        return None
    try:
        manifest = json.loads(fs.cat_file(loc.path))
    except (ValueError, IsADirectoryError, FileNotFoundError):  # not JSON text; a folder of that name
        return None
    if (not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict)
            or not isinstance(manifest.get("checksums", {}), dict)):
        return None
    return manifest


def earlier_run(out: StoreLocation) -> dict[str, Any] | None:
    """The manifest of the run whose outputs `out` holds (`read_manifest`), None for a
    folder that holds nothing a run writes; someone else's folder is refused
    (`refuse_foreign`)."""
    earlier = read_manifest(out)
    if earlier is None:
        refuse_foreign(out)
    return earlier


def refuse_foreign(out: StoreLocation) -> None:
    """Raise GrainflowError when `out`, which holds no run's manifest, holds any name a
    run writes there (`_OUTPUT_NAMES`): those are someone else's files, which a run would
    write into and a rerun with resume=False would delete."""
    fs = out.filesystem()
    found = [name for name in _OUTPUT_NAMES if fs.exists(out.join(name).path)]
    if found:
        shown = ", ".join(name if "." in name else f"{name}/" for name in found)
        raise GrainflowError(f"--out {out} holds files that are not a grainflow run's outputs ({shown}; no "
                             f"{MANIFEST} of a run): a run would write into them and --no-resume would delete "
                             f"them; give an empty or new folder")


def clear_run(out: StoreLocation, manifest: Mapping[str, Any]) -> None:
    """Remove from `out` what the runs recorded by `manifest` (``job.json``) wrote there,
    and nothing else: a user's notes or own label files beside the outputs stay.

    Removed: the tables' image partitions (``image_id=...``), the ledger's batch files,
    the summary, the preprocessing parameters of the images the manifest names, and in
    ``labels/`` the label images of those images and any other a run marked as its own
    (an image that left the archive before a resumed run, which the manifest then no
    longer names); with what local writes killed midway left of them. The manifest
    stays: the caller replaces it, so an interrupted clear leaves a folder still marked
    as a run's, which the next run clears again."""
    fs = out.filesystem()
    quoted = [id_file_stem(image_id) for image_id in manifest.get("checksums", {})]
    params, label_images = {f"{q}.json" for q in quoted}, {f"{q}.ome.zarr" for q in quoted}
    doomed = [path for path, name in _entries(fs, out)
              if name != MANIFEST and _LEFTOVER.sub("", name) in (SUMMARY_FILE, MANIFEST)]
    for table in _TABLES:
        doomed += [path for path, name in _entries(fs, out.join(table)) if name.startswith("image_id=")]
    # Every .parquet there is a batch to `Ledger.files`: one left behind would skip tiles.
    doomed += [path for path, name in _entries(fs, out.join(LEDGER_DIR))
               if _LEFTOVER.sub("", name).endswith(".parquet")]
    doomed += [path for path, name in _entries(fs, out.join(PREPROCESS_DIR))
               if _LEFTOVER.sub("", name) in params]
    doomed += [path for path, name in _entries(fs, out.join(LABELS_DIR))
               if name in label_images or _is_label_root(fs, path, name)]
    for path in doomed:
        fs.rm(path, recursive=True)
    if out.scheme == "file":  # folders left empty (an object store has none)
        for name in (*_TABLES, LEDGER_DIR, PREPROCESS_DIR, LABELS_DIR):
            path = out.join(name).path
            if fs.isdir(path) and not fs.ls(path):
                fs.rmdir(path)


def _entries(fs, folder: StoreLocation) -> list[tuple[str, str]]:
    """(path, name) of each thing directly in `folder`; [] when it is no folder."""
    fs.invalidate_cache(folder.path)  # Ray workers wrote there, not this (cached) filesystem object
    if not fs.isdir(folder.path):
        return []
    own = folder.path.rstrip("/")
    paths = [p.rstrip("/") for p in fs.ls(folder.path, detail=False)]
    return [(p, p.rsplit("/", 1)[-1]) for p in paths if p != own]  # an object store may list the folder itself


def _is_label_root(fs, path: str, name: str) -> bool:
    """Whether the folder `path`, named `name`, in ``<out>/labels/`` is a label image group
    a run created: `engine.data.sinks.create_label_arrays` marks it with its image's id,
    which names the folder."""
    try:
        attributes = json.loads(fs.cat_file(f"{path}/zarr.json")).get("attributes")
    except (OSError, ValueError, AttributeError):  # no zarr.json, not JSON, not an object: not one
        return False
    mark = attributes.get("grainflow") if isinstance(attributes, dict) else None
    return (isinstance(mark, dict) and "source_image" in mark and "image_id" in mark
            and name == f"{id_file_stem(mark['image_id'])}.ome.zarr")


__all__ = ["MANIFEST", "PREPROCESS_DIR", "clear_run", "earlier_run", "read_manifest", "refuse_foreign"]
