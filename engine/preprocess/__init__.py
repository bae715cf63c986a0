"""Per-modality preprocessing and resampling to a pixel size.

- `fit.fit_preprocessing(image, modality)`: per-image `PreprocessParams` from a coarse level;
- `apply.apply(params, tile, origin, scale)`: a tile's raw pixels -> float32 [0, 1];
- `resample`: tiles resampled onto a global output grid at a target pixel size.
"""

from engine.preprocess.apply import apply
from engine.preprocess.fit import coarse_level, fit_preprocessing
from engine.preprocess.params import Background, PreprocessParams, method_for

__all__ = ["Background", "PreprocessParams", "apply", "coarse_level", "fit_preprocessing", "method_for"]
