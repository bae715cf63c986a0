"""Memory layout of the convolutional families: channels_last (NHWC).

    model = prefer_channels_last(model, "classifier")   # in place; returns the model

oneDNN (CPU) and cuDNN run convolutions faster on NHWC weights; the detector, classifier
and fusion models are convolutional (the segmenter is a ViT; the diffusion UNet gained
2-8% on one thread with outputs 2e-6 apart, and is left as built). Measured on one CPU
thread (benchmarks/RESULTS.md, "Convolutions in channels_last"): inference resnet10t
-27%, fusion_tiny -21%, YOLO -5%; a training step resnet10t -23%, fusion_tiny -13%.
Outputs agree with NCHW to ~1e-8, not bit for bit.
Inputs need no conversion: with one channel, NCHW and NHWC are the same memory. Saved
checkpoints are unchanged (engine.models.checkpoint writes contiguous tensors).
"""

from __future__ import annotations

import torch

CONV_FAMILIES = frozenset({"detector", "classifier", "fusion"})


def prefer_channels_last(model: torch.nn.Module, family: str) -> torch.nn.Module:
    """`model` (of `family`) in channels_last if its family is convolutional (in place)."""
    if family in CONV_FAMILIES:
        model.to(memory_format=torch.channels_last)
    return model
