"""A finished reprocessing run as the report sees it: manifest, summary, catalog.

A run is the output folder (any store URI) of `engine.pipeline.job.reprocess`; what it
holds is described in `engine.data.sinks`. `load_run` reads only the small files (the
manifest ``job.json``, ``summary.parquet`` and the archive's catalog); per-image tables
and pixels are read later, one image at a time, by the report's sections.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from functools import cached_property
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from engine.data.sinks import SUMMARY_FILE
from engine.errors import GrainflowError, MetadataError
from engine.pipeline.run_folder import MANIFEST  # light: no torch, no Ray
from engine.stores.catalog import CATALOG_FILE
from engine.stores.uri import IMAGE_LINK_DEPTH, StoreLocation, escaping_link, resolve

logger = logging.getLogger(__name__)

# The `JobResult` numbers the report's header shows; a manifest without them was not
# written by a finished job (or was edited), and says so instead of a KeyError.
RESULT_NUMBERS = ("tiles_total", "tiles_done", "tiles_skipped", "errors", "seconds", "tiles_per_s")
# The summary columns (`engine.data.sinks.SUMMARY_COLUMNS`) the report reads; the others
# (model_versions, ...) are optional.
SUMMARY_NEEDED = ("image_id", "modality", "level", "pixel_size_nm", "tiles_planned", "tiles_done", "tiles_error",
                  "complete", "core_area_mm2", "material", "material_prob", "grade", "grade_prob", "n_defects",
                  "defect_density_per_mm2", "defect_counts", "labels_uri")


class NotARunError(GrainflowError):
    """A URI that does not hold a finished reprocessing run."""


class MalformedRunError(NotARunError, MetadataError):
    """A run whose manifest or summary is there but cannot be used; the message names the file."""


@dataclass(frozen=True)
class Run:
    """What a finished run left, plus the archive it read.

    out: the run's output location. settings, result: ``job.json``'s two parts (the
    job's settings; `JobResult.to_dict()`). summary: ``summary.parquet``, one row per
    image (`engine.data.sinks.SUMMARY_COLUMNS`), sorted by image id. archive: the
    archive's location (`--archive`, else the one the job recorded). catalog: its
    catalog (`engine.stores.catalog`), or None when it cannot be read, with the reason
    in `archive_note`. finished_at: the job's ``result.finished_at`` when it records
    one, else when the manifest was last written (UTC), if the store says.
    """

    out: StoreLocation
    settings: dict[str, Any]
    result: dict[str, Any]
    summary: pd.DataFrame
    archive: StoreLocation | None
    catalog: pd.DataFrame | None
    archive_note: str = ""
    finished_at: datetime | None = None

    @property
    def bundle(self) -> str:
        return str(self.settings.get("bundle") or self.result.get("bundle") or "")

    def model_versions(self) -> dict[str, str]:
        """Role -> registered version of each ensemble member (plus "bundle").

        From the manifest when the job records them (``settings.model_versions``), else
        from the summary rows (each image's tiles record the versions that ran them);
        {} when neither has them.
        """
        recorded = self.settings.get("model_versions") or self.result.get("model_versions")
        if isinstance(recorded, dict) and recorded:
            return {str(k): str(v) for k, v in sorted(recorded.items())}
        merged: dict[str, str] = {}
        for text in self.summary.get("model_versions", pd.Series(dtype=object)).dropna().unique():
            try:
                versions = json.loads(text)
            except (TypeError, ValueError):
                continue
            for role, version in versions.items():
                seen = merged.get(role)
                merged[role] = str(version) if seen in (None, str(version)) else f"{seen}, {version}"
        return dict(sorted(merged.items()))

    @cached_property
    def _image_uris(self) -> dict[str, str]:
        # Built once: looking an image up must not scan the catalog (a report asks for
        # many images of an archive of tens of thousands).
        if self.catalog is None:
            return {}
        return dict(zip(self.catalog["image_id"].astype(str), self.catalog["uri"].astype(str)))

    def image_location(self, image_id: str) -> StoreLocation | None:
        """Where an image of the archive lies (None without a catalog row).

        Also None, with a warning naming the image, for a row whose image lies outside
        the archive: a uri that climbs out of it, or a symbolic link that leads out
        (the job's rule, `engine.data.datasource.ZarrTileDatasource`): a report reads
        no pixels but the archive's."""
        if self.archive is None:
            return None
        uri = self._image_uris.get(str(image_id))
        if uri is None:
            return None
        try:
            location = self.archive.join(uri)
        except GrainflowError as exc:  # '..' out of the archive
            logger.warning("image %r: not read: %s", image_id, exc)
            return None
        escape = escaping_link(location, self.archive, depth=IMAGE_LINK_DEPTH)
        if escape is not None:
            logger.warning("image %r: not read: %s is a symbolic link to %s, outside the archive %s", image_id,
                           *escape, self.archive.uri)
            return None
        return location

    def labels_location(self, image_id: str) -> StoreLocation | None:
        """The image's predicted label image (the summary's ``labels_uri``); None if none.

        The job records absolute URIs. One under the job's own --out (``labels="out"``,
        or an archive it could not write: ``<out>/labels/<id>.ome.zarr``) is taken under
        the run's folder as it is now, so a run moved, renamed, copied to S3 or
        downloaded keeps its outlines; one beside the image moves with the archive when
        `--archive` names another copy of it."""
        rows = self.summary.loc[self.summary["image_id"] == image_id, "labels_uri"]
        uri = str(rows.iloc[0]) if len(rows) else ""
        if not uri:
            return None
        labels = resolve(uri)
        for recorded, now in ((self.result.get("out"), self.out), (self.settings.get("archive"), self.archive)):
            if not recorded or now is None:
                continue
            recorded_loc = resolve(recorded)
            if labels.is_within(recorded_loc):
                if (recorded_loc.scheme, recorded_loc.path) == (now.scheme, now.path):
                    return labels
                return now.join(_relative(labels, recorded_loc))
        return labels


def _relative(location: StoreLocation, root: StoreLocation) -> str:
    """`location`'s path below `root` (`location.is_within(root)`), "" for root itself."""
    return location.path[len(root.path.rstrip("/")):].lstrip("/")


def load_run(run_uri: str | StoreLocation, *, archive: str | StoreLocation | None = None) -> Run:
    """Read a finished run's manifest and summary and its archive's catalog.

    archive: the archive to read images and the catalog from (default: the one the job
    recorded). Raises NotARunError naming `run_uri` when it holds no finished run (an
    archive, an empty folder, a job still running or interrupted), MalformedRunError
    naming the file when its manifest or summary cannot be used, and
    GrainflowError naming `archive` when an archive given here cannot be read (the
    recorded one may be gone: the report then goes on without it).
    """
    out = resolve(run_uri)
    manifest_loc = out.join(MANIFEST)
    fs = out.filesystem()
    if not fs.exists(out.path):
        raise NotARunError(f"{out.uri}: no such run (nothing is stored there)")
    if not fs.exists(manifest_loc.path):
        if fs.exists(out.join(CATALOG_FILE).path):
            raise NotARunError(f"{out.uri}: not a grainflow run: this is an archive (it has {CATALOG_FILE}); pass "
                               f"the job's --out (the folder its outputs went to), and this folder as --archive "
                               f"if it moved")
        raise NotARunError(f"{out.uri}: not a grainflow run (no {MANIFEST}; a run is the --out of "
                           f"`python -m jobs.reprocess`)")
    try:
        manifest = json.loads(fs.cat_file(manifest_loc.path))
    except ValueError as exc:
        raise MalformedRunError(f"{manifest_loc.uri}: not readable JSON ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
        raise MalformedRunError(f"{manifest_loc.uri}: not a grainflow job manifest (no 'settings')")
    if manifest.get("result") is None:
        # A job writes its manifest's result last: without one the job is either still
        # running (a second job on the same --out would race it) or was interrupted.
        raise NotARunError(f"{out.uri}: the run has not finished ({MANIFEST} has no result). If its job is still "
                           f"running, wait for it to finish; if it was interrupted, rerun it with the same --out "
                           f"to finish it")
    _check_result(manifest["result"], manifest_loc)
    summary = _read_summary(out.join(SUMMARY_FILE), fs)

    settings = manifest["settings"]
    catalog, note, where = None, "", None
    if archive is not None:
        where = resolve(archive)
        catalog = _read_catalog(where)  # asked for by name: its faults are the user's to fix
    elif settings.get("archive"):
        where = resolve(settings["archive"])
        try:
            catalog = _read_catalog(where)
        except (GrainflowError, OSError) as exc:
            note = f"the archive {where.uri} cannot be read ({exc}); pass --archive where it lies now"
    finished = _timestamp(manifest["result"].get("finished_at")) or _modified(fs, manifest_loc.path)
    return Run(out=out, settings=settings, result=manifest["result"], summary=summary, archive=where,
               catalog=catalog, archive_note=note, finished_at=finished)


def _check_result(result: Any, manifest_loc: StoreLocation) -> None:
    """Raise MalformedRunError naming the manifest unless its result has the numbers
    the report shows (`RESULT_NUMBERS`, each a finite number)."""
    if not isinstance(result, dict):
        raise MalformedRunError(f"{manifest_loc.uri}: 'result' is {type(result).__name__}, not an object")
    missing = [k for k in RESULT_NUMBERS if k not in result]
    if missing:
        raise MalformedRunError(f"{manifest_loc.uri}: the job's result lacks {', '.join(missing)} (not written by a "
                                f"finished grainflow job, or edited since)")
    bad = [f"{k}={result[k]!r}" for k in RESULT_NUMBERS
           if isinstance(result[k], bool) or not isinstance(result[k], (int, float)) or not math.isfinite(result[k])]
    if bad:
        raise MalformedRunError(f"{manifest_loc.uri}: the job's result has values that are not numbers: "
                                f"{', '.join(bad)}")


def _read_summary(summary_loc: StoreLocation, fs) -> pd.DataFrame:
    """summary.parquet sorted by image id; MalformedRunError naming it when it is missing,
    not Parquet, or lacks a column the report reads (`SUMMARY_NEEDED`)."""
    import pyarrow as pa

    if not fs.exists(summary_loc.path):
        raise MalformedRunError(f"{summary_loc.uri}: missing (the job's manifest says it finished; its outputs are "
                                f"incomplete)")
    try:
        with fs.open(summary_loc.path, "rb") as f:
            table = pq.read_table(f)
    except (pa.ArrowException, OSError) as exc:
        raise MalformedRunError(f"{summary_loc.uri}: not a readable Parquet table ({type(exc).__name__}: {exc})") \
            from None
    missing = [c for c in SUMMARY_NEEDED if c not in table.column_names]
    if missing:
        raise MalformedRunError(f"{summary_loc.uri}: not a grainflow run summary (no column(s) {', '.join(missing)})")
    return table.to_pandas().sort_values("image_id").reset_index(drop=True)


def _read_catalog(archive: StoreLocation) -> pd.DataFrame:
    from engine.stores.catalog import read_catalog

    return read_catalog(archive)


def _timestamp(value) -> datetime | None:
    """An ISO 8601 time the job recorded (``result.finished_at``), as UTC; None if absent."""
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def _modified(fs, path: str) -> datetime | None:
    """A file's last modification (UTC) from the store's own listing, if it gives one."""
    try:
        info = fs.info(path)
    except OSError:
        return None
    value = info.get("LastModified", info.get("mtime"))
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return datetime.fromtimestamp(value, timezone.utc)
    return None


__all__ = ["MalformedRunError", "NotARunError", "Run", "load_run"]
