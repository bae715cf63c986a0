"""Tiny synthetic run folders for the report tests: the files a finished reprocessing job
leaves (`engine.data.sinks`: job.json, summary.parquet, tiles/ and objects/ per image),
written directly, with no Ray, models or pixels.

Each image is a grid of square tiles whose cores tile it; a tile's own detection count
(`n_defects` of the tiles table, what a tile saw before stitching) counts every object
whose box overlaps the tile's core plus halo, as the job's tiles do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine.data.sinks import OBJECT_SCHEMA, SUMMARY_FILE, TILE_SCHEMA, partition, summary_table

RESULT = {"tiles_total": 0, "tiles_done": 0, "tiles_skipped": 0, "errors": 0, "seconds": 12.5, "tiles_per_s": 2.0,
          "images": 0, "images_failed": 0, "objects": 0, "stage_seconds": {"tiles": 10.0}, "bundle": "b/1"}


@dataclass(frozen=True)
class Obj:
    """One stitched object: class name, box (x0, y0, x1, y1) and centroid in level-0 px,
    equivalent diameter in nm (NaN: not measured)."""

    class_name: str
    box: tuple[float, float, float, float]
    diameter_nm: float = 100.0
    centroid: tuple[float, float] | None = None  # (y, x); default: the box centre


@dataclass(frozen=True)
class Img:
    """One image: its objects, a rows x cols grid of `tile` px tiles, failed (row, col)s."""

    objects: list[Obj] = field(default_factory=list)
    grid: tuple[int, int] = (2, 2)
    tile: int = 128
    failed: tuple[tuple[int, int], ...] = ()
    material: str = "steel"
    level: int = 0  # the pyramid level the job read
    pixel_nm: float | None = None  # the pixel size the models saw; default: the run's pixel_nm
    level_nm: tuple[float, float] | None = None  # (y, x) of the level read, as the job records it; None: not recorded


def write_run(out: Path, images: dict[str, Img], *, classes=("pore", "crack"), pixel_nm: float = 100.0,
              halo: int = 16, result: dict | None = None, settings: dict | None = None) -> Path:
    """Write a finished run of `images` to `out` (no archive: settings.archive is empty,
    unless `settings`, merged into the manifest's, names one)."""
    out.mkdir(parents=True, exist_ok=True)
    rows, totals = [], {"tiles_total": 0, "tiles_done": 0, "errors": 0, "objects": 0}
    for image_id, img in images.items():
        model_nm = img.pixel_nm if img.pixel_nm is not None else pixel_nm
        area_mm2 = lambda px: px * (model_nm * 1e-6) ** 2  # noqa: E731  (px² -> mm²)
        tiles = []
        for r in range(img.grid[0]):
            for c in range(img.grid[1]):
                y, x, t = r * img.tile, c * img.tile, img.tile
                done = (r, c) not in img.failed
                seen = sum(1 for o in img.objects if o.box[0] < x + t + halo and o.box[2] > x - halo
                           and o.box[1] < y + t + halo and o.box[3] > y - halo) if done else 0
                a = area_mm2(t * t)
                tiles.append({"level": 0, "y": y, "x": x, "status": "done" if done else "error",
                              "core_x0": float(x) if done else None, "core_y0": float(y) if done else None,
                              "core_x1": float(x + t) if done else None, "core_y1": float(y + t) if done else None,
                              "n_defects": seen, "core_area_mm2": a if done else None,
                              "defect_density_per_mm2": seen / a if done else None, "material": img.material,
                              "grade": "A", "material_probs": [], "grade_probs": [],
                              "error": None if done else "CorruptChunkError"})
        _write(out / "tiles" / partition(image_id) / "part-0.parquet", pa.Table.from_pylist(tiles, schema=TILE_SCHEMA))
        objs = []
        for k, o in enumerate(img.objects):
            cy, cx = o.centroid or ((o.box[1] + o.box[3]) / 2, (o.box[0] + o.box[2]) / 2)
            objs.append({"object_id": k, "class": list(classes).index(o.class_name), "class_name": o.class_name,
                         "score": 0.9, "x0": o.box[0], "y0": o.box[1], "x1": o.box[2], "y1": o.box[3], "parts": 1,
                         "label_ids": [], "equivalent_diameter_nm": o.diameter_nm, "centroid_y": cy,
                         "centroid_x": cx})
        _write(out / "objects" / partition(image_id) / "part-0.parquet",
               pa.Table.from_pylist(objs, schema=OBJECT_SCHEMA))
        n_done = sum(t["status"] == "done" for t in tiles)
        core = area_mm2(img.tile * img.tile) * n_done
        counts = {name: sum(o.class_name == name for o in img.objects) for name in classes}
        level_nm = img.level_nm or (None, None)
        rows.append({"image_id": image_id, "modality": "sem", "level": img.level, "pixel_size_nm": model_nm,
                     "level_pixel_size_y_nm": level_nm[0], "level_pixel_size_x_nm": level_nm[1],
                     "tiles_planned": len(tiles), "tiles_done": n_done, "tiles_error": len(tiles) - n_done,
                     "complete": n_done == len(tiles), "core_area_mm2": core, "material": img.material,
                     "material_prob": 0.9, "grade": "A", "grade_prob": 0.8, "material_probs": [], "grade_probs": [],
                     "n_detections": sum(t["n_defects"] for t in tiles), "n_defects": len(img.objects),
                     "defect_density_per_mm2": len(img.objects) / core if core else math.nan,
                     "defect_counts": json.dumps(counts, sort_keys=True), "model_versions": "{}", "labels_uri": ""})
        totals["tiles_total"] += len(tiles)
        totals["tiles_done"] += n_done
        totals["errors"] += len(tiles) - n_done
        totals["objects"] += len(img.objects)
    _write(out / SUMMARY_FILE, summary_table(rows))
    job = {"settings": {"archive": "", "bundle": "b/1", **(settings or {})},
           "result": {**RESULT, **totals, "images": len(images), **(result or {})}}
    (out / "job.json").write_text(json.dumps(job))
    return out


def _write(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
