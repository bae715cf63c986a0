"""The HTML quality report of one reprocessing run.

    path = write_report("s3://lab/runs/r1")          # -> "s3://lab/runs/r1/report.html"
    run_summary("s3://lab/runs/r1")                  # per-material DataFrame

Sections: the run (archive, outputs, models and versions, date, tiles, run time,
throughput), per material, per image, defect sizes, density maps, example overlays and,
when tiles failed, the errors table. Memory stays bounded whatever the archive's size:
the small tables are read whole, per-image tables one image at a time, and pixels only
for a few overlays at a coarse pyramid level (`engine.reports.overlay`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np
import pandas as pd

from engine.data.ledger import put_file
from engine.errors import GrainflowError
from engine.reports import figures, html
from engine.reports.density import image_tile_counts
from engine.reports.overlay import read_overlay
from engine.reports.pixels import image_resampling, is_upsampled, pixel_text
from engine.reports.run import Run, load_run
from engine.reports.sizes import BINS_PER_DECADE, EXACT_MAX, size_distributions
from engine.reports.tables import class_names, error_table, image_table, material_summary, run_header
from engine.stores.uri import StoreLocation, resolve

REPORT_FILE = "report.html"
MAX_DENSITY_MAPS = 12
MAX_OVERLAYS = 4
MAX_ERROR_ROWS = 500
MAX_IMAGE_ROWS = 10_000


def write_report(run_uri: str | StoreLocation, *, archive: str | StoreLocation | None = None,
                 out: str | StoreLocation | None = None) -> str:
    """Write the report of the run at `run_uri`; returns where it went (a URI or path).

    archive: where the run's archive lies now (default: the one the job recorded).
    out: the HTML file to write (default ``<run>/report.html``); any store URI.
    Raises `engine.reports.run.NotARunError` when `run_uri` holds no finished run.
    """
    run = load_run(run_uri, archive=archive)
    target = resolve(out) if out is not None else run.out.join(REPORT_FILE)
    put_file(target, render_report(run).encode("utf-8"))
    return target.uri


def run_summary(run: str | StoreLocation | Run, *, archive: str | StoreLocation | None = None) -> pd.DataFrame:
    """The report's per-material summary as a DataFrame (`tables.material_summary`)."""
    return material_summary(run if isinstance(run, Run) else load_run(run, archive=archive))


def render_report(run: Run) -> str:
    """The report of a loaded run as one self-contained HTML page."""
    classes = class_names(run)
    sections = [_header(run), _materials(run), _images(run), _sizes(run, classes), _density(run),
                _overlays(run, classes)]
    n_tiles = int(run.summary["tiles_error"].sum())
    n_images = int((run.summary["tiles_planned"] == 0).sum())  # images that could not be planned
    if n_tiles or n_images:
        sections.append(_errors(error_table(run, limit=MAX_ERROR_ROWS), n_tiles, n_images))
    subtitle = f"run {run.out.uri}" + (f", archive {run.archive.uri}" if run.archive is not None else "")
    return html.page("grainflow reprocessing report", subtitle, sections)


# ---------------------------------------------------------------------------- sections


def _header(run: Run) -> str:
    h = run_header(run)
    stages = ", ".join(f"{k} {html.plain_number(float(v), 3)} s"
                       for k, v in sorted(h["stage_seconds"].items(), key=lambda kv: kv[0]))
    items = [("archive", h["archive"]), ("outputs", h["out"]), ("models (bundle)", h["bundle"])]
    versions = {k: v for k, v in h["model_versions"].items() if k != "bundle"}
    items += [(f"model: {role}", version) for role, version in versions.items()]
    images = h["images"] if not h["images_failed"] else \
        f"{h['images']} ({h['images_failed']} more could not be planned or prepared)"
    items += [
        ("finished", h["finished_at"]), ("images", images), ("defects (stitched objects)", h["objects"]),
        ("tiles planned", h["tiles_total"]), ("tiles done", h["tiles_done"]),
        ("tiles skipped", h["tiles_skipped"]), ("tile errors", h["errors"]),
        ("run time (h:mm:ss)", html.duration(h["seconds"])), ("throughput (tiles/s)", h["tiles_per_s"]),
        ("throughput (level-0 megapixels/s)", h["megapixels_per_s"]),
        ("model pixel size (nm)", h["model_pixel_size"]), ("stages", stages or None),
    ]
    parts = [html.definitions(items, dl_id="run-header"), html.note(
        "tiles done: finished by this run; skipped: finished by an earlier run over the same --out (the ledger); "
        "throughput counts this run's tiles per second of its tile stage; megapixels/s is that rate times the "
        "mean level-0 area of a tile core.")]
    if not versions:
        parts.append(html.note(f"member versions are not recorded by this run; the bundle is {run.bundle}",
                               warn=True))
    if run.archive_note:
        parts.append(html.note(run.archive_note, warn=True))
    if h["errors"] or not run.summary["complete"].all():
        incomplete = int((~run.summary["complete"]).sum())
        reduced = int(run.summary["tiles_halo_reduced"].fillna(0).sum()) if "tiles_halo_reduced" in run.summary else 0
        what = [f"{int(run.summary['tiles_error'].sum())} tile(s) failed (see Errors)"]
        if reduced:  # done, but their detections lack a side's context: a rerun redoes them
            what.append(f"{reduced} tile(s) beside them ran without part of their halo")
        if h["images_failed"]:
            what.append(f"{h['images_failed']} image(s) could not be planned or prepared")
        parts.append(html.note(f"{incomplete} image(s) are incomplete: {', '.join(what)}; rerun the job with the "
                               f"same --out to retry them.", warn=True))
    return html.section("run", "Run", parts)


def _materials(run: Run) -> str:
    df = material_summary(run)
    parts = [html.table(df, table_id="material-summary"), html.note(
        "material and grade are the classifier's, averaged over each image's tiles; defects are stitched objects; "
        "mean density is the mean over the material's images of defects per mm² of done tile cores; "
        "catalog_agrees counts images whose catalog material is the predicted one.")]
    return html.section("materials", "Summary per material", parts)


def _images(run: Run) -> str:
    df = image_table(run).set_index("image_id")
    resampled = image_resampling(run)
    df.insert(df.columns.get_loc("pixel_size_nm") + 1, "resampled", resampled.reindex(df.index).fillna(""))
    parts = [html.table(df, table_id="image-summary", limit=MAX_IMAGE_ROWS), html.note(
        "level: the pyramid level the job read; pixel_size_nm: the pixel size the models saw (nm); resampled: how "
        "the level's pixels were resampled to it (empty: read as stored).")]
    upsampled = [i for i, text in resampled.items() if is_upsampled(text)]
    if upsampled:
        parts.append(html.note(
            f"{len(upsampled)} image(s) were upsampled: the models saw pixels finer than the archive stores, detail "
            f"made up by interpolation, which models may read as texture or defects; check their results: "
            f"{', '.join(upsampled[:20])}{' ...' if len(upsampled) > 20 else ''}", warn=True))
    if run.catalog is not None:
        missing = sorted(set(run.catalog["image_id"]) - set(run.summary["image_id"]))
        if missing:
            parts.append(html.note(f"{len(missing)} catalog image(s) are not in this run: "
                                   f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}", warn=True))
    return html.section("images", "Images", parts)


def _sizes(run: Run, classes: list[str]) -> str:
    sizes = size_distributions(run, classes)
    unmeasured = sizes.missing()
    missing = [html.note(f"{name}: {n} of {total} defects have no measured size and are not shown", warn=True)
               for name, (n, total) in unmeasured.items()]
    if not sizes.measured:
        what = "no measured defects in this run" if not missing else "no defect of this run has a measured size"
        return html.section("sizes", "Defect sizes", [html.note(what), *missing])
    stats = sizes.statistics()
    unit, factor = figures.length_unit(np.array([sizes.median_nm()]))
    shown = stats.copy()
    for col in ("p10_nm", "median_nm", "p90_nm", "mean_nm"):
        shown[col] = shown[col] * factor
    shown.columns = ["count", "no size"] + [f"{c[:-3]} ({unit})" for c in stats.columns[2:]]
    shown.index.name = "class"
    return html.section("sizes", "Defect sizes", [
        html.table(shown, table_id="size-statistics"),
        html.note(f"count: defects with a measured size; no size: defects without one (no mask was measured), "
                  f"left out of the statistics and histograms. Percentiles are exact for a class of up to "
                  f"{EXACT_MAX} measured defects; beyond, they are read from {BINS_PER_DECADE} log-spaced bins per "
                  f"decade (within one bin, {100 * (10 ** (1 / BINS_PER_DECADE) - 1):.1f} %). The mean is exact."),
        html.image(figures.size_histograms(sizes, classes), "equivalent diameter histograms per defect class",
                   f"Equivalent diameter (diameter of the circle of the defect's mask area) of every stitched "
                   f"defect with a measured size, per class, in {unit}."
                   + "".join(f" {name}: {n} of {total} defects have no measured size and are not shown."
                             for name, (n, total) in unmeasured.items())),
    ])


def _density(run: Run) -> str:
    s = run.summary.sort_values(["defect_density_per_mm2", "image_id"], ascending=[False, True],
                                na_position="last")
    ids = list(s["image_id"][:MAX_DENSITY_MAPS])
    if not ids:
        return html.section("density", "Density maps", [html.note("no images in this run")])
    with ThreadPoolExecutor(max_workers=8) as pool:
        counts = dict(zip(ids, pool.map(lambda i: image_tile_counts(run, i), ids)))
    counts = {i: c for i, c in counts.items() if len(c.tiles)}
    if not counts:
        return html.section("density", "Density maps", [html.note("no tiles recorded in this run")])
    extents, pixels = _extents(run, list(counts))
    shown = f"the {len(counts)} densest of {len(run.summary)} images" if len(run.summary) > len(counts) \
        else f"all {len(counts)} images"
    moved = {i: c.moved for i, c in counts.items() if c.moved}
    unplaced = {i: c.unplaced for i, c in counts.items() if c.unplaced}
    caption = (f"Stitched defects (the objects the tables count) per mm² of each tile's core, laid out by tile "
               f"position: each defect is counted once, in the tile whose core holds its centroid, so a map's "
               f"total (in its title) is the image's defect count in the tables; {shown}; failed tiles are grey "
               f"and crossed out.")
    if moved:
        caption += (" Defects whose centroid lies in a failed tile are counted in the nearest done tile: "
                    + ", ".join(f"{i}: {n}" for i, n in moved.items()) + ".")
    if unplaced:
        caption += (" Defects without a position (not on the map): "
                    + ", ".join(f"{i}: {n}" for i, n in unplaced.items()) + ".")
    return html.section("density", "Density maps", [html.image(
        figures.density_maps({i: c.tiles for i, c in counts.items()}, extents, pixels),
        "per-tile defect density maps", caption)])


def _extents(run: Run, ids: list[str]):
    from engine.stores.ngff import to_nanometres

    extents, pixels = {}, {}
    cat = run.catalog.set_index("image_id") if run.catalog is not None else None
    for i in ids:
        if cat is None or i not in cat.index:
            extents[i] = pixels[i] = None
            continue
        row = cat.loc[i]
        py = to_nanometres(float(row["pixel_size_y"]), str(row["unit"])) / 1000
        px = to_nanometres(float(row["pixel_size_x"]), str(row["unit"])) / 1000
        pixels[i] = (py, px)
        extents[i] = (int(row["height"]) * py, int(row["width"]) * px)
    return extents, pixels


def _overlays(run: Run, classes: list[str]) -> str:
    if run.catalog is None:
        return html.section("overlays", "Example overlays", [html.note(
            "no overlays: the archive is not readable" + (f" ({run.archive_note})" if run.archive_note else ""),
            warn=True)])
    s = run.summary.sort_values(["n_defects", "image_id"], ascending=[False, True])
    # each image's location looked up once: it checks the image's folder for links out of the archive
    located = ((i, run.image_location(i)) for i in s["image_id"])
    shown = list(islice(((i, loc) for i, loc in located if loc is not None), MAX_OVERLAYS))
    figs = []
    notes = []
    for image_id, location in shown:
        try:
            ov = read_overlay(run.out, image_id, location, run.labels_location(image_id))
        except (GrainflowError, OSError) as exc:  # one unreadable image does not cost the whole report
            notes.append(html.note(f"{image_id}: no overlay ({type(exc).__name__}: {exc})", warn=True))
            continue
        caption = (f"{image_id}: level {ov.level} (pixels of {pixel_text(*ov.pixel_size_nm)}), "
                   f"{len(ov.boxes)} defect boxes"
                   + (f"; outlines from {ov.labels_uri}" if ov.outlines is not None else "")
                   + (f"; {ov.note}" if ov.note else ""))
        figs.append(html.image(figures.overlay_figure(ov, classes), f"overlay of {image_id}", caption))
    if not figs:
        return html.section("overlays", "Example overlays",
                            notes or [html.note("no images of this run are in the catalog")])
    return html.section("overlays", "Example overlays", [
        html.note(f"The {len(figs)} images with the most defects, at a coarse pyramid level: stitched boxes "
                  f"coloured by class, predicted label outlines in cyan, pixels without data (NaN or inf) in "
                  f"magenta; the scale bar's length is from the level's pixel size."),
        f'<div class="overlays">{"".join(figs)}</div>', *notes])


def _errors(errors: pd.DataFrame, tiles: int, images: int) -> str:
    def where(level, y, x) -> str:
        return "whole image" if pd.isna(level) else f"{level}, {y}, {x}"

    df = pd.DataFrame({
        "image": errors["image_id"],
        "tile (level, y, x)": [where(lv, y, x) for lv, y, x in zip(errors["level"], errors["y"], errors["x"])],
        "exception": errors["exception"], "message": errors["message"],
        "chunks": [", ".join(k) if k is not None else "" for k in errors["chunk_keys"]],
    })
    parts = [html.table(df, index=False, table_id="errors-table")]
    if tiles + images > len(df):
        parts.append(html.note(f"the first {len(df)} of {tiles + images} errors; read them all with "
                               f"engine.data.sinks.read_output(out, 'errors')"))
    parts.append(html.note("tiles that failed, and images that could not be planned or prepared (\"whole image\"); they are "
                           "not in the ledger, so a rerun with the same --out tries them again."))
    counts = [f"{tiles} tiles"] + ([f"{images} images"] if images else [])
    return html.section("errors", f"Errors ({', '.join(counts)})", parts)


def overlay_png(run: str | StoreLocation | Run, image_id: str | None = None, *,
                archive: str | StoreLocation | None = None) -> bytes:
    """One example overlay as PNG bytes (for a notebook: ``IPython.display.Image(...)``):
    `image_id`'s, or that of the image with the most defects."""
    run = run if isinstance(run, Run) else load_run(run, archive=archive)
    if image_id is None:
        image_id = run.summary.sort_values(["n_defects", "image_id"], ascending=[False, True])["image_id"].iloc[0]
    loc = run.image_location(image_id)
    if loc is None:
        raise GrainflowError(f"{run.out.uri}: image {image_id!r} is not in the archive's catalog "
                             f"({run.archive_note or (run.archive.uri if run.archive else 'no archive')})")
    overlay = read_overlay(run.out, image_id, loc, run.labels_location(image_id))
    return figures.overlay_figure(overlay, class_names(run))


__all__ = ["REPORT_FILE", "overlay_png", "render_report", "run_summary", "write_report"]
