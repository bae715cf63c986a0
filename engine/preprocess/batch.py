"""Preprocessing a batch of datasource rows (`engine.data.tile_read` columns).

Free of Ray: a map_batches UDF or the online endpoint calls it with a numpy batch.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from engine.preprocess.normalise import apply
from engine.preprocess.params import PreprocessParams


def preprocess_batch(batch: Mapping[str, np.ndarray],
                     params: Mapping[str, PreprocessParams] | Callable[[str], PreprocessParams]) -> dict:
    """The batch with each `tile` mapped to float32 [0, 1] by its image's parameters.

    batch: columns image_id, tile, origin, scale, error (others pass through). Tiles
    may come as one (B, H, W) array or as B arrays of their own shapes (edge tiles);
    error rows keep their empty tile. params: image id -> `PreprocessParams` (a mapping,
    or a function that fits or loads them on first use).
    """
    lookup = params.__getitem__ if isinstance(params, Mapping) else params
    errors = batch.get("error")
    out = []
    for i, tile in enumerate(batch["tile"]):
        if (errors is not None and errors[i] is not None) or np.size(tile) == 0:
            out.append(np.zeros((0, 0), np.float32))
            continue
        out.append(apply(lookup(str(batch["image_id"][i])), tile, batch["origin"][i], batch["scale"][i]))
    result = dict(batch)
    shapes = {t.shape for t in out}
    if len(shapes) == 1:
        result["tile"] = np.stack(out) if out else np.zeros((0, 0, 0), np.float32)
    else:
        result["tile"] = np.empty(len(out), dtype=object)
        result["tile"][:] = out
    return result
