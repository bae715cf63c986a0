"""One scene at several pixel shapes, for the tests that non-square pixels are trained and
evaluated on square ones: a 600 nm disc (one `pore` instance) on a gentle ramp, written
once at (10, 5) nm (y, x) pixels, as a fast-scan SEM records them, and once at (5, 5) nm;
on request at other sizes, and as a foreign OME-Zarr whose pyramid does not halve
(`write_foreign_image`).
"""

from __future__ import annotations

import numpy as np

from engine.stores.catalog import CatalogRow, image_uri, write_catalog, write_table
from engine.stores.uri import StoreLocation, resolve

FIELD_NM = 1280.0  # both images show 1280 x 1280 nm
DISC = (640.0, 640.0, 300.0)  # centre y, x and radius, nm
IMAGES = {"fast-scan": (10.0, 5.0), "square": (5.0, 5.0)}  # (y, x) nm per pixel
CHUNK = 64
DISC_VALUE = 40000  # the disc's uint16 value; the ramp stays below 20000
FOREIGN_FACTOR = 3  # a foreign image's level 1 is this many times coarser than its level 0


def scene(pixel_size_yx: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) uint16 pixels and uint32 instance labels of the disc, sampled at the pixel
    centres of a FIELD_NM square at `pixel_size_yx` nm."""
    py, px = pixel_size_yx
    y = (np.arange(round(FIELD_NM / py)) + 0.5)[:, None] * py
    x = (np.arange(round(FIELD_NM / px)) + 0.5)[None, :] * px
    cy, cx, r = DISC
    disc = (y - cy) ** 2 + (x - cx) ** 2 <= r**2
    pixels = np.where(disc, float(DISC_VALUE), 4000.0 + 4 * x + 2 * y)
    return pixels.astype(np.uint16), disc.astype(np.uint32)


def write_foreign_image(location: StoreLocation, pixel_size_yx: tuple[float, float]) -> None:
    """The scene at `pixel_size_yx` nm as an OME-Zarr v0.5 image another tool could have
    written (zarr directly, not engine.stores.writer; no labels): two levels, level 1
    FOREIGN_FACTOR times coarser on both axes, each level the scene sampled at its own
    pixel centres, which its NGFF scale and translation place (valid NGFF: nothing says a
    pyramid halves)."""
    import zarr

    f = FOREIGN_FACTOR
    py, px = pixel_size_yx
    datasets = [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [py, px]}]},
        # level-1 pixel i covers level-0 pixels [f * i, f * i + f): its centre lies (f - 1) / 2 of them on
        {"path": "1", "coordinateTransformations": [
            {"type": "scale", "scale": [py * f, px * f]},
            {"type": "translation", "translation": [py * (f - 1) / 2, px * (f - 1) / 2]}]},
    ]
    axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in ("y", "x")]
    group = zarr.open_group(location.zarr_store(read_only=False), mode="w", zarr_format=3, attributes={
        "ome": {"version": "0.5", "multiscales": [{"name": location.name, "axes": axes, "datasets": datasets}]}})
    for k, size in enumerate([(py, px), (py * f, px * f)]):
        pixels, _ = scene(size)
        group.create_array(str(k), shape=pixels.shape, dtype=pixels.dtype, chunks=(CHUNK, CHUNK),
                           dimension_names=["y", "x"])[...] = pixels


def write_scene_archive(path, images: dict[str, tuple[float, float]] = IMAGES,
                        foreign: dict[str, tuple[float, float]] | None = None) -> StoreLocation:
    """An archive of the scene at each of `images`' (y, x) nm pixel sizes, written by
    engine.stores.writer with their `defects` labels, and at each of `foreign`'s as a
    foreign OME-Zarr (`write_foreign_image`); with catalog and ground truth."""
    from engine.stores.image import open_image
    from engine.stores.writer import write_image
    from engine.synth.truth import TRUTH_FILE, TruthRow, truth_table

    location = resolve(str(path))
    rows, truth = [], []
    for image_id, size in {**images, **(foreign or {})}.items():
        pixels, labels = scene(size)
        uri = image_uri(location, image_id)
        if image_id in images:
            write_image(uri, pixels, pixel_size=size, chunk=CHUNK, labels={"defects": labels},
                        attributes={"modality": "SEM"}, name=image_id)
        else:
            write_foreign_image(uri, size)
        ys, xs = np.nonzero(labels)
        truth.append(TruthRow.of(image_id, 1, "pore", (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1),
                                 int(labels.sum()), size[1]))
        rows.append(CatalogRow(image_id=image_id, uri=f"images/{image_id}.ome.zarr", modality="SEM",
                               pixel_size_y=size[0], pixel_size_x=size[1], unit="nanometer",
                               height=pixels.shape[0], width=pixels.shape[1], dtype="uint16",
                               levels=len(open_image(uri).levels), chunk=CHUNK, checksum="",
                               material="ferritic_steel", quality_grade="A"))
    write_catalog(location, rows)
    write_table(location.join(TRUTH_FILE), truth_table(truth))
    return location


def extent(mask: np.ndarray) -> tuple[int, int]:
    """(rows, columns) a non-empty mask spans."""
    ys, xs = np.nonzero(mask)
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
