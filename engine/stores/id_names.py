"""How an image id names files in a run's outputs.

Its own module, free of the catalog's pandas and pyarrow: the sinks and the reprocess
entrypoint's pre-Ray check name files by it without loading either.
"""

from __future__ import annotations

import urllib.parse


def id_file_stem(image_id: str) -> str:
    """`image_id` as it names files in a run's outputs: percent-encoded (each byte of
    UTF-8 outside [A-Za-z0-9_.~-] as %XX), so any id names one file and never a path.
    The tables' partitions (``image_id=<stem>``, `engine.data.sinks.partition`), the
    preprocessing parameters (``<stem>.json``) and the label images (``<stem>.ome.zarr``)
    are all named by it."""
    return urllib.parse.quote(str(image_id), safe="")


__all__ = ["id_file_stem"]
