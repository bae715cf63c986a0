"""Ingest: instrument files (TIFF, Gatan DM3/DM4, Velox/NCEM EMD) to OME-Zarr images and catalog rows.

    from engine.stores.ingest import ingest_files, read_instrument_file

    rows = ingest_files(["a.tif", "b.dm4"], "s3://lab/archive", material="ferritic steel")
    image = read_instrument_file("a.tif")      # pixels, pixel_size (y, x), unit, modality, ...
    np.asarray(image.pixels)                   # a large TIFF plane comes as a BandedPlane, read in bands

Readers are chosen by file extension from one registry (`supported_extensions()`); the
rules for pixel sizes, modality, ids and failures are in `pipeline`'s docstring.
"""

from engine.stores.ingest.bands import BandedPlane
from engine.stores.ingest.base import InstrumentImage, register_reader, supported_extensions
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
    "register_reader",
    "sanitise_id",
    "supported_extensions",
]
