"""Ingest: instrument files (TIFF, Gatan DM3/DM4, Velox/NCEM EMD) and existing OME-Zarr
images (NGFF v0.4, v0.5) to the archive's own OME-Zarr images and catalog rows.

    from engine.stores.ingest import ingest_files, read_instrument_file

    rows = ingest_files(["a.tif", "b.dm4", "c.ome.zarr"], "s3://lab/archive", material="ferritic steel")
    image = read_instrument_file("a.tif")      # pixels, pixel_size (y, x), unit, modality, ...
    np.asarray(image.pixels)                   # a large TIFF plane or an OME-Zarr image comes as a
                                               # BandedPlane, read in bands

Readers are chosen from one registry: files by extension (`supported_extensions()`),
folders by the tests folder formats register (OME-Zarr: `ome_zarr`); the rules for pixel
sizes, modality, ids and failures are in `pipeline`'s docstring.
"""

from engine.stores.ingest.bands import BandedPlane
from engine.stores.ingest.base import (
    InstrumentImage,
    register_folder_reader,
    register_reader,
    supported_extensions,
)
from engine.stores.ingest.pipeline import (
    IngestBatchError,
    IngestFailure,
    ingest_files,
    read_instrument_file,
    read_instrument_images,
    sanitise_id,
)

__all__ = [
    "BandedPlane",
    "IngestBatchError",
    "IngestFailure",
    "InstrumentImage",
    "ingest_files",
    "read_instrument_file",
    "read_instrument_images",
    "register_folder_reader",
    "register_reader",
    "sanitise_id",
    "supported_extensions",
]
