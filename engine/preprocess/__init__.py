"""Per-modality preprocessing and resampling to a pixel size.

- `fit.fit_preprocessing(image, modality)`: per-image `PreprocessParams` from a strided
  sample of level 0 (`sample.scan_level`, chunk by chunk);
- `normalise.apply(params, tile, origin, scale)`: a tile's raw pixels -> float32 [0, 1];
- `batch.preprocess_batch(batch, params)`: the same for a batch of datasource rows;
- `resample`: tiles resampled onto a global output grid at a target pixel size.

Names are imported on first use, so a Ray read task that only resamples does not pay
for importing the fitting code (scipy).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "apply": "engine.preprocess.normalise",
    "fit_preprocessing": "engine.preprocess.fit",
    "Background": "engine.preprocess.params",
    "PreprocessParams": "engine.preprocess.params",
    "method_for": "engine.preprocess.params",
    "preprocess_batch": "engine.preprocess.batch",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine.preprocess' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
