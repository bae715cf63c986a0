"""How each ensemble member's input is made from a tile's raw pixels.

A member must see its input on the intensity scale it was trained on, so the scale is
chosen per member (`InputMode`), not once for the ensemble:

- ``"raw"``: the stored values, scaled by the dtype's maximum (uint16 v -> v / 65535;
  float tiles are taken as [0, 1]). What `engine.training.detector` trains YOLO on
  (`engine.training.detector.pixels.to_uint8`) and what `Detector.predict` expects.
- ``"tile"``: a robust stretch of the tile itself, percentiles 1 -> 0 and 99 -> 1,
  clipped (`engine.data.training_samples.normalise_tile`, the very function
  `engine.training.train` feeds the classifier, SAM and fusion models with).
- ``"image"``: the image's own `engine.preprocess` parameters (fitted once per image,
  so every tile of an image is treated alike; `engine.preprocess.apply`). An image with
  no parameters falls back to the ``"tile"`` stretch.

`DEFAULT_INPUTS` follows how engine.training trains each family by default ("tile";
`train(..., inputs="image")` trains on the image's parameters instead and tags the
version). A bundle names its members' modes (registry tags ``input.<role>``, see
`engine.pipeline.bundle`; `member_inputs` reads them from the members' tags).
"""

from __future__ import annotations

from typing import Callable, Literal, Mapping

import numpy as np

InputMode = Literal["raw", "tile", "image"]
INPUT_MODES: tuple[str, ...] = ("raw", "tile", "image")
DEFAULT_INPUTS: dict[str, str] = {"detector": "raw", "segmenter": "tile", "classifier": "tile", "fusion": "tile"}
# A registered model version's tag: the input mode it was trained with (engine.training
# records it; `engine.pipeline.bundle.member_inputs` reads it for a bundle's modes).
TRAINED_INPUT_TAG = "input"

ParamsLookup = Callable[[str], object | None]


def check_inputs(inputs: Mapping[str, str] | None) -> dict[str, str]:
    """DEFAULT_INPUTS updated with `inputs`; an unknown role or mode raises ValueError."""
    out = dict(DEFAULT_INPUTS)
    for role, mode in (inputs or {}).items():
        if role not in DEFAULT_INPUTS:
            raise ValueError(f"inputs: unknown member role {role!r}; valid roles: {', '.join(DEFAULT_INPUTS)}")
        if mode not in INPUT_MODES:
            raise ValueError(f"inputs[{role!r}]: unknown input mode {mode!r}; valid modes: {', '.join(INPUT_MODES)}")
        out[role] = mode
    return out


def params_lookup(params) -> ParamsLookup:
    """A function image_id -> PreprocessParams or None, from a mapping, a function or None."""
    if params is None:
        return lambda image_id: None
    if isinstance(params, Mapping):
        return params.get
    if callable(params):
        return params
    raise TypeError(f"params: expected a mapping image_id -> PreprocessParams, a function or None, "
                    f"got {type(params).__name__}")


def raw_scale(tile: np.ndarray) -> np.ndarray:
    """(H, W) raw pixels -> float32 [0, 1] by the dtype's maximum (floats, and signed
    integers' negative values, clipped: as the detector's training pixels are,
    `engine.training.detector.pixels.to_uint8`)."""
    a = np.asarray(tile)
    if a.dtype.kind == "u":
        return (a.astype(np.float32) / np.float32(np.iinfo(a.dtype).max)).astype(np.float32)
    if a.dtype.kind == "i":
        return np.clip(a.astype(np.float32) / np.float32(np.iinfo(a.dtype).max), 0.0, 1.0)
    if a.dtype.kind == "f":
        return np.clip(np.nan_to_num(a.astype(np.float32), nan=0.0), 0.0, 1.0)
    raise TypeError(f"tile: expected integer or float pixels, got dtype {a.dtype}")


def tile_stretch(region: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Percentile stretch 1 -> 0, 99 -> 1 of `region` by `reference` (default itself)."""
    from engine.data.training_samples import normalise_tile

    return normalise_tile(region, reference=reference)


def normalise(tile: np.ndarray, mode: str, *, params=None, origin=(0.0, 0.0), scale=(1.0, 1.0)) -> np.ndarray:
    """A whole (H, W) tile -> float32 [0, 1] (H, W) in `mode` (module doc).

    params: the image's PreprocessParams (mode "image"; None falls back to "tile");
    origin, scale: the tile's placement in level 0 (datasource columns), which the
    optical illumination field needs.
    """
    if mode == "raw":
        return raw_scale(tile)
    if mode == "tile" or (mode == "image" and params is None):
        return tile_stretch(tile)
    if mode == "image":
        from engine.preprocess import apply

        return apply(params, tile, tuple(origin), tuple(scale))
    raise ValueError(f"unknown input mode {mode!r}; valid modes: {', '.join(INPUT_MODES)}")
