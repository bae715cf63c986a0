"""Batches of micrograph tiles as model input tensors."""

from __future__ import annotations

import numpy as np
import torch


def tiles_to_tensor(tiles, *, device: torch.device | str = "cpu", name: str = "tiles") -> torch.Tensor:
    """B x H x W tiles (numpy or torch) -> B x 1 x H x W float32 in [0, 1] on `device`.

    Integer tiles are scaled by their dtype's maximum (uint8 / 255, uint16 / 65535), the
    full range of the detector that wrote them; float tiles are taken as already in
    [0, 1] (what engine.preprocess delivers) and are not rescaled, so intensities keep
    their meaning between tiles of one image. A single H x W tile is refused rather than
    guessed at: the batch axis is the caller's to state.
    """
    if isinstance(tiles, torch.Tensor):
        t = tiles
    else:
        arr = np.asarray(tiles)
        if arr.dtype.kind not in "uif":
            raise TypeError(f"{name}: expected an integer or float array, got dtype {arr.dtype}")
        if arr.dtype.kind in "ui":
            arr = arr.astype(np.float32) / np.float32(np.iinfo(arr.dtype).max)
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if t.ndim != 3:
        raise ValueError(f"{name}: expected B x H x W, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float() / float(torch.iinfo(t.dtype).max)
    return t.to(device=device, dtype=torch.float32).unsqueeze(1)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters are (CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
