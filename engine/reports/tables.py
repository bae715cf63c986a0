"""The report's numbers as DataFrames: run header, per material, per image, errors.

Every function takes a loaded `engine.reports.run.Run`. Per-image output tables are
read one image at a time with `engine.data.sinks.read_output`. Defect sizes are in
`engine.reports.sizes`, per-tile counts for the density maps in `engine.reports.density`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from engine.data.sinks import ERRORS, read_output
from engine.reports.pixels import header_text
from engine.reports.run import Run


def run_header(run: Run) -> dict[str, Any]:
    """The run's headline numbers.

    Tile counts, seconds and tiles/s are the manifest's `JobResult` as written.
    target_pixel_size_nm: the number the job recorded (at native pixels, only the
    archive's finest level-0 size); model_pixel_size: what the models saw, as text
    (`engine.reports.pixels.header_text`). megapixels_per_s: level-0 megapixels of the
    archive covered per second of the tile stage, i.e. tiles/s times the mean level-0
    megapixels of a done tile's core (from the summary's core areas and the catalog's
    pixel sizes); None without a catalog or tiles.
    """
    r = run.result
    return {
        "archive": run.archive.uri if run.archive is not None else str(run.settings.get("archive", "")),
        "out": run.out.uri, "bundle": run.bundle, "model_versions": run.model_versions(),
        "finished_at": run.finished_at, "images": int(r.get("images", len(run.summary))),
        "images_failed": int(r.get("images_failed", 0)),
        "objects": int(r.get("objects", int(run.summary["n_defects"].sum()))),
        "tiles_total": int(r["tiles_total"]), "tiles_done": int(r["tiles_done"]),
        "tiles_skipped": int(r["tiles_skipped"]), "errors": int(r["errors"]),
        "seconds": float(r["seconds"]), "tiles_per_s": float(r["tiles_per_s"]),
        "megapixels_per_s": _megapixels_per_s(run), "stage_seconds": dict(r.get("stage_seconds", {})),
        "target_pixel_size_nm": r.get("target_pixel_size_nm", run.settings.get("target_pixel_size_nm")),
        "model_pixel_size": header_text(run),
    }


def _megapixels_per_s(run: Run) -> float | None:
    from engine.stores.ngff import to_nanometres

    if run.catalog is None or not len(run.summary):
        return None
    cat = run.catalog.set_index("image_id")
    s = run.summary[run.summary["image_id"].isin(cat.index)]
    if not len(s) or s["tiles_done"].sum() == 0:
        return None
    nm2 = [to_nanometres(float(cat.at[i, "pixel_size_y"]), str(cat.at[i, "unit"]))
           * to_nanometres(float(cat.at[i, "pixel_size_x"]), str(cat.at[i, "unit"])) for i in s["image_id"]]
    level0_px = np.nansum(s["core_area_mm2"].to_numpy(np.float64) * 1e12 / np.asarray(nm2))
    return float(run.result["tiles_per_s"]) * level0_px / float(s["tiles_done"].sum()) / 1e6


def image_table(run: Run) -> pd.DataFrame:
    """One row per image of the run: the summary joined with the catalog's ground truth.

    Columns: image_id, modality, level (the pyramid level the job read), pixel_size_nm
    (the x size of the pixels the models saw, nm; level and pixel size are empty for an
    image the job could not plan), material (predicted), material_prob, grade, grade_prob,
    catalog_material, catalog_grade (None without a catalog or a value there),
    tiles_planned, tiles_done, tiles_error, tiles_halo_reduced (done without part of their
    halo, beside a bad chunk; 0 for runs that predate the column), n_defects,
    defect_density_per_mm2 (per mm² of done tile cores), core_area_mm2, and one column
    per defect class (count).
    """
    s = run.summary
    if "tiles_halo_reduced" not in s.columns:
        s = s.assign(tiles_halo_reduced=0)
    out = s[["image_id", "modality", "level", "pixel_size_nm", "material", "material_prob", "grade", "grade_prob",
             "tiles_planned", "tiles_done", "tiles_error", "tiles_halo_reduced", "n_defects",
             "defect_density_per_mm2", "core_area_mm2"]].copy()
    out["level"] = out["level"].astype(pd.Int64Dtype())  # "1", not "1.0", beside an unplanned image's gap
    if run.catalog is not None:
        truth = run.catalog.set_index("image_id")[["material", "quality_grade"]]
        out["catalog_material"] = out["image_id"].map(truth["material"])
        out["catalog_grade"] = out["image_id"].map(truth["quality_grade"])
    else:
        out["catalog_material"] = None
        out["catalog_grade"] = None
    counts = pd.DataFrame([_counts(text) for text in s["defect_counts"]], index=s.index).fillna(0).astype(int)
    return pd.concat([out, counts], axis=1)


def _counts(text) -> dict[str, int]:
    try:
        return {str(k): int(v) for k, v in json.loads(text).items()}
    except (TypeError, ValueError):
        return {}


def class_names(run: Run) -> list[str]:
    """Defect classes in the detector's order, so each keeps its colour from run to run.

    The order is the one the run recorded in its class label images (the
    ``<labels>_classes`` image's ``image-label.properties``, label value i + 1 = class i
    of the detector), read from the first image that has one; classes of the summary's
    defect_counts not found there follow by name. A run without label images (or whose
    label images cannot be read) has no recorded order: its classes are by name (the
    summary's defect_counts keys, which the job writes sorted).
    """
    names: list[str] = [] if run.summary.empty else _recorded_classes(run)
    counted: set[str] = set()
    for text in run.summary["defect_counts"]:
        counted.update(_counts(text))
    return names + sorted(counted - set(names))


def _recorded_classes(run: Run) -> list[str]:
    """The detector's classes from the first class label image of the run; [] if none."""
    from engine.errors import GrainflowError

    for image_id, uri in zip(run.summary["image_id"], run.summary["labels_uri"]):
        if not uri:
            continue
        try:
            labels = run.labels_location(image_id)
            if labels is None:
                continue
            meta_loc = labels.parent().join(f"{labels.name}_classes", "zarr.json")  # zarr v3 group metadata
            meta = json.loads(meta_loc.filesystem().cat_file(meta_loc.path))
            props = meta["attributes"]["ome"]["image-label"]["properties"]
            pairs = sorted((int(p["label-value"]), str(p["class"])) for p in props)
        except (GrainflowError, OSError, ValueError, KeyError, TypeError):
            return []  # the report still has the summary's classes; one try is enough
        return [name for _, name in pairs]
    return []


def material_summary(run: Run) -> pd.DataFrame:
    """Per predicted material: images, grade distribution, defects per class, density.

    Index: material (predicted; "(none)" where a run had no classifier or no done
    tile). Columns: images; ``grade <G>`` images per predicted grade; ``<class>``
    stitched defects per class; defects (all classes); area_mm2 (done tile cores);
    mean_density_per_mm2 (mean over the material's images of each image's defects per
    mm², images without a done tile left out); catalog_agrees (images whose catalog
    material is the predicted one; NaN when the catalog has no materials).
    """
    images = image_table(run)
    images["material"] = images["material"].replace("", "(none)").fillna("(none)")
    grades = sorted(g for g in images["grade"].dropna().unique() if g)
    classes = class_names(run)
    rows = []
    for material, group in images.groupby("material", sort=True):
        row: dict[str, Any] = {"material": material, "images": len(group)}
        for g in grades:
            row[f"grade {g}"] = int((group["grade"] == g).sum())
        for c in classes:
            row[c] = int(group[c].sum()) if c in group else 0
        row["defects"] = int(group["n_defects"].sum())
        row["area_mm2"] = float(group["core_area_mm2"].sum())
        density = group["defect_density_per_mm2"].to_numpy(np.float64)
        row["mean_density_per_mm2"] = float(np.nanmean(density)) if np.isfinite(density).any() else math.nan
        known = group["catalog_material"].notna()
        row["catalog_agrees"] = int((group.loc[known, "catalog_material"] == material).sum()) if known.any() \
            else math.nan
        rows.append(row)
    columns = ["material", "images", *[f"grade {g}" for g in grades], *classes, "defects", "area_mm2",
               "mean_density_per_mm2", "catalog_agrees"]
    return pd.DataFrame(rows, columns=columns).set_index("material")


_NULLABLE_INTS = {pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype()}


def error_table(run: Run, *, limit: int | None = None) -> pd.DataFrame:
    """Failed tiles: image_id, level, y, x (the tile's key), exception, message, chunk_keys;
    an image the job could not plan has one row with level, y and x empty.

    Read image by image (those whose summary row counts errors), stopping once `limit`
    rows are in: a run where everything failed does not load millions of rows for a
    table that shows the first few hundred. The summary's ``tiles_error`` has the total.
    """
    columns = ["image_id", "level", "y", "x", "exception", "message", "chunk_keys"]
    parts, n = [], 0
    failed = (run.summary["tiles_error"] > 0) | (run.summary["tiles_planned"] == 0)  # a tile, or the whole image
    for image_id in run.summary.loc[failed, "image_id"]:
        # nullable integers: an unplanned image's row has no level, y, x
        part = read_output(run.out, ERRORS, image_id=image_id).to_pandas(types_mapper=_NULLABLE_INTS.get)
        parts.append(part.sort_values(["level", "y", "x"]))
        n += len(part)
        if limit is not None and n >= limit:
            break
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    df = pd.concat(parts, ignore_index=True)[columns]
    return df if limit is None else df.iloc[:limit]


__all__ = ["class_names", "error_table", "image_table", "material_summary", "run_header"]
