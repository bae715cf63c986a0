"""Features that know the scale they were seen at: FiLM by the tile's pixel size.

A tile does not show the scale it was taken at, and the same texture means different
materials at different scales (pearlite's lamellae at one magnification, alpha-beta laths
at another). A model's pooled features are modulated by log10 of the pixel size:
features * (1 + gamma) + beta (FiLM, Perez et al. 2018), gamma and beta from a small MLP.
"""

from __future__ import annotations

import torch
from torch import nn


class PixelSizeFiLM(nn.Sequential):
    """log10(pixel size) -> (gamma, beta) for `width` features; starts as the identity
    (its last layer is zero), so adding it changes nothing until training moves it.

    A Sequential, so that its parameters keep the names the classifier's checkpoints were
    saved with before it was its own module (scale.0.*, scale.2.*).
    """

    def __init__(self, width: int, hidden: int = 64):
        super().__init__(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, 2 * width))
        nn.init.zeros_(self[-1].weight)
        nn.init.zeros_(self[-1].bias)

    def forward(self, features: torch.Tensor, pixel_size_nm: torch.Tensor | None) -> torch.Tensor:
        """features: B x width float; pixel_size_nm: B float32, each tile's pixel size in
        nm (ValueError when missing). Returns B x width."""
        if pixel_size_nm is None:
            raise ValueError("this model reads each tile's pixel size: pass pixel_size_nm (B, nm)")
        # log10 of 0.01-1500 nm is -2 to 3.2: centred on 10 nm and brought to about [-1, 1]
        scale = (torch.log10(pixel_size_nm.to(features).reshape(-1, 1)) - 1.0) / 2.0
        gamma, beta = super().forward(scale).chunk(2, dim=1)
        return features * (1 + gamma) + beta
