"""Pixel readers for one stored array: tensorstore where it can, zarr-python elsewhere.

tensorstore (Google's C++ array store) fetches and decodes chunks on its own thread
pool outside the GIL and overlaps many region reads; on this project's benchmark
(benchmarks/stores.py) it reads tiles about 1.5-2x faster than zarr-python. It serves
local files and S3 whose endpoint, region and credentials come from the standard places.
zarr-python serves everything else (memory://, S3 with an AWS profile or explicit keys)
and is the reference both are tested against (tests/stores/test_store_contract.py).
"""

from __future__ import annotations

import functools
import os
from typing import Protocol, Sequence

import numpy as np
import zarr

from engine.stores.uri import StoreLocation

Region = tuple[int, int, int, int]  # y0, y1, x0, x1 in pixels of the level


class ArrayReader(Protocol):
    def read_regions(self, regions: Sequence[Region]) -> list[np.ndarray]:
        """(y, x) arrays of the stored dtype, one per region; leading singleton axes dropped."""


class ZarrReader:
    def __init__(self, array: zarr.Array):
        self.array = array
        self._lead = (0,) * (array.ndim - 2)

    def read_regions(self, regions: Sequence[Region]) -> list[np.ndarray]:
        return [np.asarray(self.array[self._lead + (slice(y0, y1), slice(x0, x1))]) for y0, y1, x0, x1 in regions]


class TensorstoreReader:
    def __init__(self, store):
        self.store = store
        self._lead = (0,) * (store.rank - 2)

    def read_regions(self, regions: Sequence[Region]) -> list[np.ndarray]:
        # Issue every read before waiting on any: tensorstore overlaps their I/O and decoding.
        futures = [self.store[self._lead + (slice(y0, y1), slice(x0, x1))].read() for y0, y1, x0, x1 in regions]
        arrays, first_error = [], None
        for future in futures:
            # Where one region fails (a corrupt chunk), the others are still waited for
            # (defensive: the caller moves on with no read of its own still running).
            try:
                arrays.append(np.asarray(future.result()))
            except Exception as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return arrays


def open_reader(location: StoreLocation, array: zarr.Array, array_path: str) -> ArrayReader:
    """The fastest reader that serves `array` (stored at `location`/`array_path`)."""
    kvstore = _tensorstore_kvstore(location, array_path)
    if kvstore is None:
        return ZarrReader(array)
    try:
        import tensorstore as ts
    except ImportError:
        return ZarrReader(array)
    driver = "zarr3" if array.metadata.zarr_format == 3 else "zarr"
    store = ts.open({"driver": driver, "kvstore": kvstore}, read=True, context=_context()).result()
    return TensorstoreReader(store)


@functools.cache
def _context():
    """The process's one tensorstore Context: one limit on the decoding threads of every
    store it opens (not one per image, each allowing every core), and no chunk cache.
    (Credentials are not shared through it: each S3 store names its own inline, below.)"""
    import tensorstore as ts

    return ts.Context({
        "data_copy_concurrency": {"limit": os.cpu_count() or 1},
        # Tiles are read once per job; a chunk cache would only hold memory.
        "cache_pool": {"total_bytes_limit": 0},
    })


def _tensorstore_kvstore(location: StoreLocation, array_path: str) -> dict | None:
    if location.scheme == "file":
        return {"driver": "file", "path": f"{location.path}/{array_path}/"}
    if location.scheme != "s3":
        return None
    options = dict(location.storage_options)
    client = options.pop("client_kwargs", {})
    endpoint = options.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = client.pop("region_name", None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if options or client or not os.environ.get("AWS_ACCESS_KEY_ID"):
        # Profiles, anonymous access and explicit keys go through s3fs/botocore, which
        # implement the whole AWS credential chain.
        return None
    bucket, _, key = location.path.partition("/")
    # An inline resource: made at each open from the environment of that moment, never
    # taken from the shared context (engine.stores.pixels._context).
    kvstore: dict = {"driver": "s3", "bucket": bucket, "path": f"{key}/{array_path}/".lstrip("/"),
                     "aws_credentials": {"type": "environment"}}
    if endpoint:
        kvstore["endpoint"] = endpoint
    if region:
        kvstore["aws_region"] = region
    return kvstore
