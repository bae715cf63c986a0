"""Multi-scale feature-fusion model: one region seen at two pyramid levels.

Defects span orders of magnitude in size (sub-micron pores to cracks across a whole
field of view), so the model sees each region twice:

- detail: a T x T tile at pyramid level k (pixel size p), rows [y, y + T), cols
  [x, x + T) in level-k pixels;
- context: a Tc x Tc tile at level k + d (pixel size p * 2**d; d = context_level_offset,
  2 by default since levels halve the resolution), centred on the same point. It spans
  Tc * 2**d level-k pixels a side: with Tc = T and d = 2 that is 4x the detail tile's
  side (16x its area); Tc = T / 2 gives 2x the side (4x the area). In the context
  tile, the detail tile is the centred square of side T / 2**d pixels (T/4 for d = 2).
  `context_origin` gives the context tile's position; tiles reaching past the image
  edge are padded by the reader.

One timm backbone (features_only, in_chans=1, weights shared by both views: the same
physics at two pixel sizes) feeds one BiFPN-style neck with learned, normalised fusion
weights (EfficientDet's "fast normalised fusion"). At every neck level, the part of the
context map under the detail tile is resampled (roi_align) onto the detail map and the
two are fused with learned weights, so detail features know what surrounds them.

Heads: material and quality grade from pooled detail and context features; defect
segmentation as per-pixel logits (background + defect classes) at detail resolution.
With `pixel_size_input` the pooled features are modulated by the detail tile's pixel
size first (`engine.models.pixel_size.PixelSizeFiLM`), as the classifier's can be.
"""

from __future__ import annotations

from typing import Sequence

import timm
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import roi_align

from engine.models.errors import check_timm_arch
from engine.models.pixel_size import PixelSizeFiLM


def context_origin(y: int, x: int, detail_size: int, context_size: int, offset: int = 2) -> tuple[int, int]:
    """Top-left (row, col) in level k + offset pixels of the context tile for a detail
    tile whose top-left is (y, x) in level-k pixels and side `detail_size`.

    Level j + 1 pixel i covers level-j pixels [2i, 2i + 2) (engine.stores.pyramid), so
    continuous coordinates scale by exactly 2**offset. Raises ValueError when the
    context tile would not start on a whole pixel (choose y, x multiples of 2**offset
    and even sizes with detail_size a multiple of 2**(offset + 1)).
    """
    scale = 2**offset
    cy2 = 2 * y + detail_size  # twice the detail centre, in level-k pixels: stays integral
    cx2 = 2 * x + detail_size
    ny, nx = cy2 - scale * context_size, cx2 - scale * context_size  # 2 * scale * origin
    if ny % (2 * scale) or nx % (2 * scale):
        raise ValueError(
            f"context tile for detail ({y}, {x}) size {detail_size} at offset {offset} with side "
            f"{context_size} does not start on a whole pixel"
        )
    return ny // (2 * scale), nx // (2 * scale)


def conv_bn_act(c_in: int, c_out: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample a feature map to `size`: max-pool down (keeps small strong responses,
    e.g. a pore), nearest up (as EfficientDet's BiFPN)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_max_pool2d(x, size)
    return F.interpolate(x, size=size, mode="nearest")


class WeightedFusion(nn.Module):
    """sum_i w_i x_i / (eps + sum_i w_i) with learned w_i = relu(raw_i) >= 0.

    EfficientDet's fast normalised fusion: inputs at different scales contribute
    unequally, and the weights learn how much, without a softmax's cost.
    """

    def __init__(self, n: int, eps: float = 1e-4):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        w = F.relu(self.weight)
        w = w / (w.sum() + self.eps)
        return sum(wi * xi for wi, xi in zip(w, xs))


class BiFPNLayer(nn.Module):
    """One top-down then bottom-up pass over L maps of equal width, finest first."""

    def __init__(self, levels: int, channels: int):
        super().__init__()
        self.td_fuse = nn.ModuleList(WeightedFusion(2) for _ in range(levels - 1))
        self.td_conv = nn.ModuleList(conv_bn_act(channels, channels) for _ in range(levels - 1))
        # Middle levels also take their top-down output (three inputs); ends take two.
        self.bu_fuse = nn.ModuleList(WeightedFusion(3 if i < levels - 1 else 2) for i in range(1, levels))
        self.bu_conv = nn.ModuleList(conv_bn_act(channels, channels) for _ in range(1, levels))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        n = len(feats)
        td = list(feats)
        for i in range(n - 2, -1, -1):
            td[i] = self.td_conv[i](self.td_fuse[i]([feats[i], resize_to(td[i + 1], feats[i].shape[-2:])]))
        out = [td[0]]
        for i in range(1, n):
            inputs = [feats[i], resize_to(out[-1], feats[i].shape[-2:])]
            if i < n - 1:
                inputs.insert(1, td[i])
            out.append(self.bu_conv[i - 1](self.bu_fuse[i - 1](inputs)))
        return out


class BiFPN(nn.Module):
    """1x1 lateral projections to `channels`, then `repeats` BiFPN layers."""

    def __init__(self, in_channels: Sequence[int], channels: int, repeats: int):
        super().__init__()
        self.lateral = nn.ModuleList(conv_bn_act(c, channels, 1) for c in in_channels)
        self.layers = nn.ModuleList(BiFPNLayer(len(in_channels), channels) for _ in range(repeats))

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = [lat(f) for lat, f in zip(self.lateral, feats)]
        for layer in self.layers:
            x = layer(x)
        return x


class FusionModel(nn.Module):
    """Detail + context views -> material, grade and defect segmentation (module doc)."""

    def __init__(
        self,
        backbone: nn.Module,
        channels: int,
        repeats: int,
        materials: Sequence[str],
        grades: Sequence[str],
        defect_classes: Sequence[str],
        context_level_offset: int = 2,
        pixel_size_input: bool = False,
    ):
        super().__init__()
        self.materials, self.grades = tuple(materials), tuple(grades)
        self.segment_classes = ("background", *defect_classes)
        self.context_level_offset = context_level_offset
        self.backbone = backbone
        in_channels = backbone.feature_info.channels()
        levels = len(in_channels)
        self.neck = BiFPN(in_channels, channels, repeats)
        self.cross_fuse = nn.ModuleList(WeightedFusion(2) for _ in range(levels))
        self.cross_conv = nn.ModuleList(conv_bn_act(channels, channels) for _ in range(levels))
        self.seg_head = nn.Sequential(conv_bn_act(channels, channels), nn.Conv2d(channels, len(self.segment_classes), 1))
        self.heads = nn.ModuleDict({
            "material": nn.Linear(2 * channels, len(self.materials)),
            "grade": nn.Linear(2 * channels, len(self.grades)),
        })
        self.pixel_size_input = bool(pixel_size_input)
        self.scale = PixelSizeFiLM(2 * channels) if self.pixel_size_input else None

    def footprint(self, detail_hw: Sequence[int], context_hw: Sequence[int]) -> tuple[float, float, float, float]:
        """The detail tile in context-tile pixels: (x0, y0, x1, y1), continuous coords."""
        scale = 2**self.context_level_offset
        (hd, wd), (hc, wc) = detail_hw, context_hw
        fh, fw = hd / scale, wd / scale
        if fh > hc or fw > wc:
            raise ValueError(
                f"context: a {hc} x {wc} tile at level offset {self.context_level_offset} does not "
                f"cover the {hd} x {wd} detail tile (needs at least {fh:g} x {fw:g})"
            )
        y0, x0 = (hc - fh) / 2, (wc - fw) / 2
        return x0, y0, x0 + fw, y0 + fh

    def forward(self, detail: torch.Tensor, context: torch.Tensor,
                pixel_size_nm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """detail: B x 1 x T x T, context: B x 1 x Tc x Tc, float32 intensities in [0, 1],
        geometry as in the module doc (non-square tiles work the same way per axis);
        pixel_size_nm: B float32, the detail tiles' pixel sizes in nm (needed by a model
        built with pixel_size_input, ignored by others).

        Returns {"material": B x 12 logits, "grade": B x 4 logits, "segmentation":
        B x (1 + defect classes) x T x T per-pixel logits at detail resolution, class 0
        background}.
        """
        if detail.ndim != 4 or context.ndim != 4 or detail.shape[0] != context.shape[0]:
            raise ValueError(
                f"detail and context: expected B x 1 x H x W each with one batch size, "
                f"got {tuple(detail.shape)} and {tuple(context.shape)}"
            )
        x0, y0, x1, y1 = self.footprint(detail.shape[-2:], context.shape[-2:])
        d_feats = self.neck(self.backbone(detail))
        c_feats = self.neck(self.backbone(context))
        b = detail.shape[0]
        index = torch.arange(b, dtype=detail.dtype, device=detail.device)[:, None]
        fused = []
        for i, (d, c) in enumerate(zip(d_feats, c_feats)):
            sy, sx = c.shape[-2] / context.shape[-2], c.shape[-1] / context.shape[-1]
            box = torch.tensor([x0 * sx, y0 * sy, x1 * sx, y1 * sy], dtype=d.dtype, device=d.device)
            rois = torch.cat([index, box.expand(b, 4)], dim=1)
            under = roi_align(c, rois, output_size=tuple(d.shape[-2:]), spatial_scale=1.0, sampling_ratio=2, aligned=True)
            fused.append(self.cross_conv[i](self.cross_fuse[i]([d, under])))
        seg = F.interpolate(self.seg_head(fused[0]), size=detail.shape[-2:], mode="bilinear", align_corners=False)
        pooled = torch.cat([
            torch.stack([f.mean(dim=(2, 3)) for f in fused]).mean(0),
            torch.stack([f.mean(dim=(2, 3)) for f in c_feats]).mean(0),
        ], dim=1)
        if self.scale is not None:
            pooled = self.scale(pooled, pixel_size_nm)
        out = {name: head(pooled) for name, head in self.heads.items()}
        out["segmentation"] = seg
        return out


def build_fusion(
    arch: str,
    materials: list[str],
    grades: list[str],
    defect_classes: list[str],
    channels: int = 64,
    repeats: int = 2,
    out_indices: Sequence[int] = (1, 2, 3, 4),
    context_level_offset: int = 2,
    pixel_size_input: bool = False,
) -> FusionModel:
    """timm `arch` (features_only, in_chans=1, pretrained=False) at strides 4..32 by
    default (out_indices into its feature levels), a `repeats`-layer BiFPN of width
    `channels`, and the three heads; pixel_size_input: see `FusionModel`."""
    check_timm_arch(arch)
    backbone = timm.create_model(arch, pretrained=False, features_only=True, in_chans=1, out_indices=tuple(out_indices))
    return FusionModel(backbone, channels, repeats, materials, grades, defect_classes, context_level_offset,
                       pixel_size_input)


BUILDERS = {"fusion": build_fusion}
