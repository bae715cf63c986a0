"""Image classifier: a timm ResNet with heads for material type and quality grade."""

from __future__ import annotations

from typing import Sequence

import timm
import torch
from torch import nn

from engine.models.errors import check_timm_arch


class Classifier(nn.Module):
    """A timm backbone (1 input channel, random init) shared by two linear heads.

    One backbone for both tasks: material and grade are read from the same texture
    (grain size, phases, porosity), and sharing halves the cost per tile.

    pixel_size_input: the pooled features are modulated by the tile's pixel size (FiLM:
    features * (1 + gamma) + beta, gamma and beta from log10 of the size). A tile does
    not show the scale it was taken at, and the same texture means different materials
    at different scales (pearlite's lamellae at one magnification, alpha-beta laths at
    another); the modulation starts as the identity (its last layer is zero).
    """

    def __init__(self, backbone: nn.Module, materials: Sequence[str], grades: Sequence[str], drop_rate: float = 0.0,
                 pixel_size_input: bool = False):
        super().__init__()
        self.backbone = backbone
        self.materials = tuple(materials)
        self.grades = tuple(grades)
        width = backbone.num_features
        self.dropout = nn.Dropout(drop_rate)
        self.heads = nn.ModuleDict({
            "material": nn.Linear(width, len(self.materials)),
            "grade": nn.Linear(width, len(self.grades)),
        })
        self.pixel_size_input = bool(pixel_size_input)
        self.scale = None
        if self.pixel_size_input:
            self.scale = nn.Sequential(nn.Linear(1, 64), nn.SiLU(), nn.Linear(64, 2 * width))
            nn.init.zeros_(self.scale[-1].weight)
            nn.init.zeros_(self.scale[-1].bias)

    def forward(self, x: torch.Tensor, pixel_size_nm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x: B x 1 x H x W float32, intensities in [0, 1] (any H, W >= 32);
        pixel_size_nm: B float32, each tile's pixel size in nm (needed by a model built
        with pixel_size_input, ignored by others).

        Returns {"material": B x len(materials) logits, "grade": B x len(grades) logits}.
        """
        features = self.backbone(x)
        if self.scale is not None:
            if pixel_size_nm is None:
                raise ValueError("this classifier reads each tile's pixel size: pass pixel_size_nm (B, nm)")
            # log10 of 0.01-1500 nm is -2 to 3.2: centred on 10 nm and brought to about [-1, 1]
            scale = (torch.log10(pixel_size_nm.to(features).reshape(-1, 1)) - 1.0) / 2.0
            gamma, beta = self.scale(scale).chunk(2, dim=1)
            features = features * (1 + gamma) + beta
        features = self.dropout(features)
        return {name: head(features) for name, head in self.heads.items()}


def build_timm_classifier(arch: str, materials: list[str], grades: list[str], drop_rate: float = 0.0,
                          pixel_size_input: bool = False) -> Classifier:
    """timm `arch` (e.g. "resnet18", "resnet10t") with in_chans=1 and pooled features;
    pixel_size_input: the features see each tile's pixel size (see `Classifier`).

    pretrained=False always: weights come from our own training or a checkpoint file.
    """
    check_timm_arch(arch)
    backbone = timm.create_model(arch, pretrained=False, in_chans=1, num_classes=0)
    return Classifier(backbone, materials, grades, drop_rate, pixel_size_input)


BUILDERS = {"timm": build_timm_classifier}
