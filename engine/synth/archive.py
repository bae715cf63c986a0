"""A procedural archive: images, catalog and ground truth under one store location.

Layout (see `engine.stores.catalog`)::

    <archive>/catalog.parquet
    <archive>/images/<image_id>.ome.zarr      pixels + labels/defects
    <archive>/ground_truth.parquet            one row per defect instance
"""

from __future__ import annotations

from typing import Callable, Iterable

import pandas as pd

from engine.stores.catalog import (
    IMAGES_DIR, CatalogRow, image_uri, read_catalog, relative_image_path, write_catalog, write_table,
)
from engine.stores.staging import remove_stale_siblings
from engine.stores.uri import StoreLocation, resolve
from engine.synth.image import write_image
from engine.synth.plan import ImagePlan, plan_archive
from engine.synth.truth import TRUTH_FILE, truth_table


def generate_archive(out: str | StoreLocation, *, n_images: int, seed: int, size: int | tuple[int, int] = 512,
                     chunk: int = 512, materials: Iterable[str] | None = None,
                     modalities: Iterable[str] | None = None,
                     progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Write `n_images` synthetic micrographs with ground truth to `out`; return the catalog.

    `size` is the level-0 shape (an int for square images); `chunk` the Zarr chunk edge.
    `progress(k)` is called as chunks finish, k being how many just finished (use
    `plan_archive(...)` and `total_chunks` for the total). The same arguments give the
    same bytes. Images already at `out` with the same ids are replaced; the catalog and
    ground truth are replaced.
    """
    plans = plan_archive(n_images=n_images, seed=seed, size=size, chunk=chunk, materials=materials,
                         modalities=modalities)
    return write_archive(out, plans, progress=progress)


def write_archive(out: str | StoreLocation, plans: Iterable[ImagePlan],
                  progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Write already planned images (see `plan_archive`) as an archive; return the catalog."""
    archive = resolve(out)
    remove_stale_siblings(archive.join(IMAGES_DIR))  # what a killed run into this folder left
    rows, truth = [], []
    for plan in plans:
        info, objects = write_image(plan, image_uri(archive, plan.image_id), progress)
        truth.extend(objects)
        rows.append(CatalogRow(
            image_id=plan.image_id, uri=relative_image_path(plan.image_id), modality=plan.modality,
            pixel_size_y=info.pixel_size[0], pixel_size_x=info.pixel_size[1], unit=info.unit,
            height=info.shape[0], width=info.shape[1], dtype=info.dtype, levels=info.levels, chunk=info.chunk,
            checksum=info.checksum, material=plan.material, quality_grade=plan.quality_grade,
            instrument=plan.instrument, source="engine.synth", seed=plan.seed,
        ))
    write_table(archive.join(TRUTH_FILE), truth_table(truth))
    write_catalog(archive, rows)
    return read_catalog(archive)
