"""Image classifier: a timm ResNet with heads for material type and quality grade."""

from __future__ import annotations

from typing import Sequence

import timm
import torch
from torch import nn

from engine.models.errors import check_timm_arch
from engine.models.pixel_size import PixelSizeFiLM


class Classifier(nn.Module):
    """A timm backbone (1 input channel, random init) shared by two linear heads.

    One backbone for both tasks: material and grade are read from the same texture
    (grain size, phases, porosity), and sharing halves the cost per tile.

    pixel_size_input: the pooled features are modulated by the tile's pixel size
    (`engine.models.pixel_size.PixelSizeFiLM`, starting as the identity).
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
        self.scale = PixelSizeFiLM(width) if self.pixel_size_input else None

    def forward(self, x: torch.Tensor, pixel_size_nm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x: B x 1 x H x W float32, intensities in [0, 1] (any H, W >= 32);
        pixel_size_nm: B float32, each tile's pixel size in nm (needed by a model built
        with pixel_size_input, ignored by others).

        Returns {"material": B x len(materials) logits, "grade": B x len(grades) logits}.
        """
        features = self.backbone(x)
        if self.scale is not None:
            features = self.scale(features, pixel_size_nm)
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
