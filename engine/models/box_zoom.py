"""Prompt-centred crops: SAM looks at each box through a window a few times its size.

SAM draws a mask by upscaling its image-embedding grid (16-px cells at its input
size), so an object smaller than a cell cannot be traced: at 256 px, a 13-px pore on a
256-px tile covers less than one cell and a from-scratch SAM paints a blob four times
its size. Micrograph defects span orders of magnitude in size, so instead of the whole
tile, each box gets a square window of `context` times its longer side (at least
`min_side` tile pixels), resampled to the encoder's input: every object then spans
several cells whatever its size. The encoder runs once per box instead of once per tile.
With `max_aspect` > 1 an elongated box gets an oblong window (stretched to the square
input), so a thin crack along it is wider in the encoder's pixels.

Coordinates are continuous tile pixels (the tile spans [0, W] x [0, H], pixel (i, j)
centred at (j + 0.5, i + 0.5)); a window may reach past the tile, where it reads zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch
from torch.nn import functional as F
from torchvision.ops import roi_align


@dataclass(frozen=True)
class BoxZoom:
    """Windows around box prompts, centred on them.

    context: window side / box side (> 1: the decoder sees the boundary and some
    background). min_side: smallest window side, tile pixels (a 2-px box still gets a
    window with texture around it). max_aspect: 1 gives square windows of `context`
    times the box's longer side; above 1 each side is `context` times the box's own
    side, but at least the longer side / max_aspect, so an elongated box (a crack, a
    scratch) gets an elongated window, stretched to the square input: its thin defect
    then spans more embedding cells across than in a square window.
    """

    context: float = 2.0
    min_side: float = 16.0
    max_aspect: float = 1.0

    def __post_init__(self):
        if not self.context >= 1.0:
            raise ValueError(f"box zoom context must be >= 1 (window side / box side), got {self.context}")
        if not self.min_side > 0:
            raise ValueError(f"box zoom min_side must be > 0 tile pixels, got {self.min_side}")
        if not self.max_aspect >= 1.0:
            raise ValueError(f"box zoom max_aspect must be >= 1 (longer / shorter window side), got {self.max_aspect}")

    def windows(self, boxes: torch.Tensor) -> torch.Tensor:
        """N x 4 xyxy boxes (float32, tile px) -> N x 4 xyxy windows centred on them."""
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        sides = (boxes[:, 2:] - boxes[:, :2]).mul(self.context)  # N x (w, h)
        longer = sides.amax(dim=1, keepdim=True)
        sides = torch.maximum(sides, longer / self.max_aspect).clamp(min=self.min_side)
        half = sides / 2
        return torch.cat([centre - half, centre + half], dim=1)


def crop(images: torch.Tensor, image_index: torch.Tensor, windows: torch.Tensor, size: int) -> torch.Tensor:
    """Resample windows of images to size x size (bilinear; averaged when shrinking).

    images: B x C x H x W float; image_index: N int64, the image of each window;
    windows: N x 4 xyxy tile px. Returns N x C x size x size, zeros past the image.
    """
    rois = torch.cat([image_index[:, None].to(windows), windows], dim=1)
    return roi_align(images, rois, output_size=size, sampling_ratio=-1, aligned=True)


def to_window(xy: torch.Tensor, windows: torch.Tensor, size: int) -> torch.Tensor:
    """Points in tile px -> the same points in pixels of each window's size x size crop.

    xy: N x ... x 2k float, x/y pairs in the last dim (boxes N x 4, point prompts
    N x P x 2); windows: N x 4 xyxy tile px, row k for xy[k]. Returns xy's shape.
    """
    n = xy.shape[0]
    pairs = xy.reshape(n, -1, 2)
    scale = (size / (windows[:, 2:] - windows[:, :2]))[:, None, :]  # x and y apart: windows may be oblong
    return ((pairs - windows[:, None, :2]) * scale).reshape(xy.shape)


def paste(logits: torch.Tensor, windows: torch.Tensor, tile: tuple[int, int], fill: float) -> torch.Tensor:
    """Place each window's mask logits back on the tile.

    logits: N x h x w float (any resolution; they cover their window exactly); windows:
    N x 4 xyxy tile px; tile: (H, W). Returns N x H x W, `fill` outside each window.
    """
    n = logits.shape[0]
    h, w = tile
    out = logits.new_full((n, h, w), fill)
    for k in range(n):
        x0, y0, x1, y1 = (float(v) for v in windows[k])
        c0, r0 = max(0, math.floor(x0)), max(0, math.floor(y0))
        c1, r1 = min(w, math.ceil(x1)), min(h, math.ceil(y1))
        if c1 <= c0 or r1 <= r0:
            continue
        # Normalised positions of the covered pixels' centres in the window (align_corners=False).
        u = (torch.arange(c0, c1, device=logits.device, dtype=logits.dtype) + 0.5 - x0) / (x1 - x0) * 2 - 1
        v = (torch.arange(r0, r1, device=logits.device, dtype=logits.dtype) + 0.5 - y0) / (y1 - y0) * 2 - 1
        grid = torch.stack(torch.meshgrid(u, v, indexing="xy"), dim=-1)[None]  # 1 x rows x cols x 2
        out[k, r0:r1, c0:c1] = F.grid_sample(logits[k][None, None], grid, mode="bilinear",
                                             padding_mode="border", align_corners=False)[0, 0]
    return out

