"""Defect segmenter: segment-anything (SAM) prompted with detector boxes.

Meta's vit_b / vit_l / vit_h are built by segment_anything's own registry with
checkpoint=None (its loader unpickles fully) and their weights are then read with
`engine.models.checkpoint.load_state_dict` (torch.load(weights_only=True)). A small
config built from the same modeling classes trains from scratch on a CPU.

Single-channel micrographs are replicated to three channels, scaled to [0, 255] and
normalised with the model's pixel mean/std: Meta's encoder was trained on RGB photos,
and a grey photo is exactly (v, v, v), so this is the input it knows for grey images.
The small model shares that path so that one preprocessing serves every SAM here.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn
from torch.nn import functional as F

from engine.models.tiles import model_device, tiles_to_tensor

# Meta's ImageNet statistics in [0, 255]; the small model keeps them (see module doc).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Segmentation(NamedTuple):
    """Masks for the boxes of one tile, in box order.

    masks: N x H x W bool, H x W the tile's shape; iou: N float32, the model's own
    estimate of each mask's IoU with the true object (a quality score, not a measurement).
    """

    masks: np.ndarray
    iou: np.ndarray


class SamOutput(NamedTuple):
    """Differentiable output for one image: low_res_logits N x M x S/4 x S/4 (S = the
    encoder's img_size; M = 1, or 3 with multimask_output) and iou N x M."""

    low_res_logits: torch.Tensor
    iou: torch.Tensor


class Segmenter(nn.Module):
    """A SAM model with batched box prompts over tiles and over the boxes of each tile."""

    def __init__(self, sam: Sam):
        super().__init__()
        self.sam = sam
        self.img_size = int(sam.image_encoder.img_size)
        self.resize = ResizeLongestSide(self.img_size)

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """Size (h, w) of a tile after its longest side is resized to img_size."""
        return ResizeLongestSide.get_preprocess_shape(h, w, self.img_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """B x 1 x H x W float32 in [0, 1] -> B x 3 x S x S normalised encoder input.

        Longest side resized to S = img_size (bilinear, antialiased), grey replicated to
        RGB at [0, 255], normalised by pixel mean/std, zero-padded bottom/right to S x S.
        """
        # Not ResizeLongestSide.apply_image_torch: it reads the size from dims 0 and 1
        # (batch and channel) of a B x C x H x W tensor. Same interpolation otherwise.
        size = self.input_size(*images.shape[-2:])
        x = images if tuple(images.shape[-2:]) == size else F.interpolate(
            images, size, mode="bilinear", align_corners=False, antialias=True
        )
        return self.sam.preprocess(x.expand(-1, 3, -1, -1) * 255.0)

    def forward(
        self,
        images: torch.Tensor,
        boxes: Sequence[torch.Tensor],
        *,
        points: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
        mask_inputs: Sequence[torch.Tensor] | None = None,
        multimask_output: bool = False,
    ) -> list[SamOutput]:
        """Differentiable SAM pass (for training); the encoder runs once per batch.

        images: B x 1 x H x W float32 in [0, 1]. boxes[b]: N_b x 4 float32, xyxy in pixels
        of image b. points[b] (optional): (N_b x P x 2 xy pixels, N_b x P labels: 1
        foreground, 0 background, -1 padding). mask_inputs[b] (optional): N_b x 1 x S/4 x
        S/4 logits from an earlier pass. Returns one SamOutput per image.
        """
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images: expected B x 1 x H x W, got shape {tuple(images.shape)}")
        if len(boxes) != images.shape[0]:
            raise ValueError(f"boxes: expected one N x 4 tensor per image ({images.shape[0]}), got {len(boxes)}")
        h, w = images.shape[-2:]
        embeddings = self.sam.image_encoder(self.preprocess(images))
        dense_pe = self.sam.prompt_encoder.get_dense_pe()
        out = []
        for b, embedding in enumerate(embeddings):
            if boxes[b].shape[0] == 0:  # the decoder cannot reshape an empty prompt batch
                m = 3 if multimask_output else 1
                low = self.sam.prompt_encoder.mask_input_size
                out.append(SamOutput(embedding.new_zeros((0, m, *low)), embedding.new_zeros((0, m))))
                continue
            box = self.resize.apply_boxes_torch(boxes[b].to(embedding), (h, w))
            pts = None
            if points is not None:
                coords, labels = points[b]
                pts = (self.resize.apply_coords_torch(coords.to(embedding).contiguous(), (h, w)), labels.to(embedding.device))
            sparse, dense = self.sam.prompt_encoder(
                points=pts, boxes=box, masks=None if mask_inputs is None else mask_inputs[b]
            )
            logits, iou = self.sam.mask_decoder(
                image_embeddings=embedding.unsqueeze(0),
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            out.append(SamOutput(logits, iou))
        return out

    @torch.inference_mode()
    def segment(self, images, boxes: Sequence[np.ndarray]) -> list[Segmentation]:
        """One mask per box, for a batch of tiles.

        images: B x H x W, float32 in [0, 1] or uint8/uint16 (scaled by the dtype's max).
        boxes: B arrays of N_b x 4, xyxy in pixels of their tile (N_b may be 0).
        Returns one Segmentation per tile: N_b x H x W bool masks and N_b float32 scores.
        """
        device = model_device(self)
        x = tiles_to_tensor(images, device=device, name="images")
        if len(boxes) != x.shape[0]:
            raise ValueError(f"boxes: expected one N x 4 array per image ({x.shape[0]}), got {len(boxes)}")
        h, w = x.shape[-2:]
        prompts = []
        for b, box in enumerate(boxes):
            box = torch.as_tensor(np.asarray(box, dtype=np.float32), device=device)
            if box.ndim != 2 or box.shape[-1] != 4:
                raise ValueError(f"boxes[{b}]: expected N x 4 xyxy, got shape {tuple(box.shape)}")
            prompts.append(box)
        was_training = self.training
        self.eval()
        try:
            outputs = self.forward(x, prompts)
        finally:
            self.train(was_training)
        size = self.input_size(h, w)
        result = []
        for out in outputs:
            if out.low_res_logits.shape[0] == 0:
                result.append(Segmentation(np.zeros((0, h, w), bool), np.zeros((0,), np.float32)))
                continue
            logits = self.sam.postprocess_masks(out.low_res_logits, size, (h, w))[:, 0]
            masks = (logits > self.sam.mask_threshold).cpu().numpy()
            result.append(Segmentation(masks, out.iou[:, 0].float().cpu().numpy()))
        return result


def build_sam_meta(variant: str) -> Segmenter:
    """Meta's architecture `variant` ("vit_b" | "vit_l" | "vit_h"), 1024 px, random init.

    Load Meta's released weights with `load_sam_weights` (or `create_segmenter(name,
    checkpoint=...)`).
    """
    if variant not in ("vit_b", "vit_l", "vit_h"):
        raise ValueError(f"unknown SAM variant {variant!r}; valid: vit_b, vit_l, vit_h")
    return Segmenter(sam_model_registry[variant](checkpoint=None))


def build_sam_small(
    img_size: int = 256,
    patch_size: int = 16,
    embed_dim: int = 96,
    depth: int = 2,
    num_heads: int = 3,
    window_size: int = 8,
    global_attn_indexes: Sequence[int] = (1,),
    prompt_dim: int = 64,
    decoder_mlp_dim: int = 256,
    decoder_heads: int = 4,
) -> Segmenter:
    """A narrow, shallow SAM from segment_anything's modeling classes (trains on CPU).

    Same design as Meta's (windowed ViT with relative positions and a few global blocks,
    two-way transformer decoder), scaled down: embeddings grid img_size / patch_size,
    prompt/decoder width prompt_dim (divisible by 8 for the upscaling path).
    """
    grid = img_size // patch_size
    encoder = ImageEncoderViT(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=4.0, out_chans=prompt_dim, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
        window_size=window_size, global_attn_indexes=tuple(global_attn_indexes),
    )
    prompt = PromptEncoder(
        embed_dim=prompt_dim, image_embedding_size=(grid, grid),
        input_image_size=(img_size, img_size), mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=decoder_mlp_dim, num_heads=decoder_heads),
        transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=prompt_dim,
    )
    return Segmenter(Sam(encoder, prompt, decoder, pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD)))


BUILDERS = {"sam_meta": build_sam_meta, "sam_small": build_sam_small}


def load_sam_weights(model: Segmenter, path: str | Path, *, expected_sha256: str | None = None) -> Segmenter:
    """Load a SAM state dict into `model`: Meta's .pth (keys of `Sam`, read weights-only)
    or a safetensors file with the same keys, or our own save (keys prefixed "sam.")."""
    from engine.models.checkpoint import load_into, load_state_dict

    state = load_state_dict(path, expected_sha256=expected_sha256)
    prefixed = all(k.startswith("sam.") for k in state)
    load_into(model if prefixed else model.sam, state, source=path)
    return model
