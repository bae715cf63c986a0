"""Defect segmenter: segment-anything (SAM) prompted with detector boxes.

Meta's vit_b / vit_l / vit_h are built by segment_anything's own registry with
checkpoint=None (its loader unpickles fully) and their weights are then read with
`engine.models.checkpoint.load_state_dict` (torch.load(weights_only=True)). A small
config built from the same modeling classes trains from scratch on a CPU; it looks at
each box through a window around it (`engine.models.box_zoom`), because at its 256-px
input most defects are smaller than one cell of the embedding grid.

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

from engine.models import box_zoom
from engine.models.box_zoom import BoxZoom
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
    """Differentiable output for the N boxes of one image.

    low_res_logits: N x M x S/4 x S/4 float32 (S = the encoder's img_size; M = 1, or 3
    with multimask_output); iou: N x M. With box zoom, windows: N x 4 xyxy tile px, and
    mask k covers window k (see `engine.models.box_zoom`); without, windows is None and
    the masks cover the resized, padded tile.
    """

    low_res_logits: torch.Tensor
    iou: torch.Tensor
    windows: torch.Tensor | None = None


class Segmenter(nn.Module):
    """A SAM model with batched box prompts over tiles and over the boxes of each tile.

    zoom: None (the encoder sees each tile once, resized to img_size) or a BoxZoom (it
    sees a window around each box: for objects smaller than the embedding grid's cells).
    """

    ZOOM_CHUNK = 64  # windows per encoder pass with box zoom

    def __init__(self, sam: Sam, zoom: BoxZoom | None = None):
        super().__init__()
        self.sam = sam
        self.zoom = zoom
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
        """Differentiable SAM pass (for training).

        images: B x 1 x H x W float32 in [0, 1]. boxes[b]: N_b x 4 float32, xyxy in pixels
        of image b. points[b] (optional): (N_b x P x 2 xy pixels, N_b x P labels: 1
        foreground, 0 background, -1 padding). mask_inputs[b] (optional): N_b x 1 x S/4 x
        S/4 logits from an earlier pass. Returns one SamOutput per image. The encoder runs
        once per batch: on the B tiles, or with box zoom on the windows of all boxes.
        """
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images: expected B x 1 x H x W, got shape {tuple(images.shape)}")
        if len(boxes) != images.shape[0]:
            raise ValueError(f"boxes: expected one N x 4 tensor per image ({images.shape[0]}), got {len(boxes)}")
        points = points if points is not None else [None] * len(boxes)
        mask_inputs = mask_inputs if mask_inputs is not None else [None] * len(boxes)
        if self.zoom is not None:
            return self._forward_zoomed(images, boxes, points, mask_inputs, multimask_output)
        h, w = images.shape[-2:]
        embeddings = self.sam.image_encoder(self.preprocess(images))
        dense_pe = self.sam.prompt_encoder.get_dense_pe()
        out = []
        for b, embedding in enumerate(embeddings):
            if boxes[b].shape[0] == 0:  # the decoder cannot reshape an empty prompt batch
                out.append(self._no_masks(embedding, multimask_output))
                continue
            box = self.resize.apply_boxes_torch(boxes[b].to(embedding), (h, w))
            pts = None
            if points[b] is not None:
                coords, labels = points[b]
                pts = (self.resize.apply_coords_torch(coords.to(embedding).contiguous(), (h, w)), labels.to(embedding.device))
            out.append(SamOutput(*self._decode(embedding, dense_pe, box, pts, mask_inputs[b], multimask_output)))
        return out

    def _forward_zoomed(self, images, boxes, points, mask_inputs, multimask_output) -> list[SamOutput]:
        counts = [int(b.shape[0]) for b in boxes]
        if sum(counts) == 0:
            return [self._no_masks(images, multimask_output) for _ in boxes]
        all_boxes = torch.cat([b.to(images) for b in boxes])
        image_index = torch.repeat_interleave(torch.arange(len(boxes), device=images.device),
                                              torch.tensor(counts, device=images.device))
        windows = self.zoom.windows(all_boxes)
        crops = box_zoom.crop(images, image_index, windows, self.img_size)
        # In chunks: a batch of tiles may hold thousands of boxes, and the encoder's
        # activations grow with the number of windows.
        embeddings = torch.cat([self.sam.image_encoder(self.preprocess(c)) for c in crops.split(self.ZOOM_CHUNK)])
        crop_boxes = box_zoom.to_window(all_boxes, windows, self.img_size)
        dense_pe = self.sam.prompt_encoder.get_dense_pe()  # the same grid for every window
        out, start = [], 0
        for b, n in enumerate(counts):
            if n == 0:
                out.append(self._no_masks(images, multimask_output))
                continue
            logits, iou = [], []
            for i in range(n):  # box i of image b, window k of the batch
                k = start + i
                pts = None
                if points[b] is not None:
                    coords, labels = points[b]
                    pts = (box_zoom.to_window(coords[i : i + 1].to(images), windows[k : k + 1], self.img_size),
                           labels[i : i + 1].to(images.device))
                mask_in = None if mask_inputs[b] is None else mask_inputs[b][i : i + 1]
                # One crop, one prompt: the decoder repeats its image embedding per prompt.
                lo, q = self._decode(embeddings[k], dense_pe, crop_boxes[k : k + 1], pts, mask_in, multimask_output)
                logits.append(lo)
                iou.append(q)
            out.append(SamOutput(torch.cat(logits), torch.cat(iou), windows[start : start + n]))
            start += n
        return out

    def _decode(self, embedding, dense_pe, box, pts, mask_in, multimask_output) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits N x M x S/4 x S/4 and IoU estimates N x M for N prompts on one
        C x h x w image embedding (dense_pe: the prompt encoder's 1 x C x h x w positional
        grid); box, pts in pixels of the S x S encoder input."""
        sparse, dense = self.sam.prompt_encoder(points=pts, boxes=box, masks=mask_in)
        return self.sam.mask_decoder(
            image_embeddings=embedding.unsqueeze(0),
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def _no_masks(self, like: torch.Tensor, multimask_output: bool) -> SamOutput:
        m = 3 if multimask_output else 1
        low = self.sam.prompt_encoder.mask_input_size
        windows = like.new_zeros((0, 4)) if self.zoom is not None else None
        return SamOutput(like.new_zeros((0, m, *low)), like.new_zeros((0, m)), windows)

    def tile_logits(self, out: SamOutput, tile: tuple[int, int]) -> torch.Tensor:
        """The first mask of each box as N x H x W logits over its tile (H, W)."""
        if out.windows is None:
            return self.sam.postprocess_masks(out.low_res_logits, self.input_size(*tile), tile)[:, 0]
        return box_zoom.paste(out.low_res_logits[:, 0], out.windows, tile, fill=-1e4)

    def loss_frame(self, out: SamOutput, masks: torch.Tensor, tile: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets, N x h x w each, in the frame a loss compares them in.

        masks: N x H x W float32 in {0, 1}, each box's object on its tile (H, W). Without
        zoom the frame is the tile; with zoom, each box's S x S window (the object then
        fills a fair share of the pixels the loss averages over).
        """
        if out.windows is None:
            return self.tile_logits(out, tile), masks
        s = self.img_size
        logits = F.interpolate(out.low_res_logits[:, :1], (s, s), mode="bilinear", align_corners=False)[:, 0]
        index = torch.arange(masks.shape[0], device=masks.device)
        targets = (box_zoom.crop(masks[:, None], index, out.windows, s)[:, 0] > 0.5).to(logits.dtype)
        return logits, targets

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
        result = []
        for out in outputs:
            if out.low_res_logits.shape[0] == 0:
                result.append(Segmentation(np.zeros((0, h, w), bool), np.zeros((0,), np.float32)))
                continue
            masks = (self.tile_logits(out, (h, w)) > self.sam.mask_threshold).cpu().numpy()
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
    zoom_context: float | None = None,
    zoom_min_side: float = 16.0,
    zoom_max_aspect: float = 1.0,
) -> Segmenter:
    """A narrow, shallow SAM from segment_anything's modeling classes (trains on CPU).

    Same design as Meta's (windowed ViT with relative positions and a few global blocks,
    two-way transformer decoder), scaled down: embeddings grid img_size / patch_size,
    prompt/decoder width prompt_dim (divisible by 8 for the upscaling path).
    zoom_context: None, or the encoder sees a window of zoom_context times each box,
    at least zoom_min_side tile pixels, square (zoom_max_aspect 1) or oblong up to
    zoom_max_aspect (`engine.models.box_zoom`).
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
    zoom = None if zoom_context is None else BoxZoom(zoom_context, zoom_min_side, zoom_max_aspect)
    return Segmenter(Sam(encoder, prompt, decoder, pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD)), zoom)


BUILDERS = {"sam_meta": build_sam_meta, "sam_small": build_sam_small}


def load_sam_weights(model: Segmenter, path: str | Path, *, expected_sha256: str | None = None) -> Segmenter:
    """Load a SAM state dict into `model`: Meta's .pth (keys of `Sam`, read weights-only)
    or a safetensors file with the same keys, or our own save (keys prefixed "sam.").

    Our own save records its config: settings without weights (the box zoom) must match
    `model`'s, or the weights would run another inference than they were trained for
    (CheckpointError naming them; `engine.models.load_model` rebuilds from the file's own)."""
    import json

    from engine.models.checkpoint import FORMAT, load_checked, load_into
    from engine.models.errors import CheckpointError

    state, meta = load_checked(path, expected_sha256=expected_sha256)
    if meta.get("format") == FORMAT and "config" in meta and getattr(model, "config", None) is not None:
        recorded = json.loads(meta["config"]).get("args", {})
        current = json.loads(json.dumps(model.config.to_dict())).get("args", {})  # tuples as the file's lists
        differ = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
        if differ:
            raise CheckpointError(
                f"{path}: saved with other settings than this {model.config.name} ("
                + ", ".join(f"{k}: file {recorded.get(k)!r}, here {current.get(k)!r}" for k in differ)
                + "); load it with engine.models.load_model, which builds the model the file records")
    prefixed = all(k.startswith("sam.") for k in state)
    load_into(model if prefixed else model.sam, state, source=path)
    return model
