"""Where pixels and tables live: URIs, OME-Zarr images, the archive catalog, ingest."""
