"""Fixtures for model tests: offline Ultralytics, and one tiny input per family."""

from __future__ import annotations

import os

import pytest
import torch

from engine.runtime import configure_offline


@pytest.fixture(scope="session", autouse=True)
def offline(tmp_path_factory):
    """No hub access; Ultralytics keeps its settings file out of the user's home."""
    configure_offline()
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics")))


def smoke_loss(model, family: str, size: int = 64) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A scalar that depends on every trainable parameter, and the outputs it came from.

    Inputs are tiny (B = 2, `size` px) except for SAM, whose encoder input side is fixed.
    SAM's prompt encoder has parts for points, boxes and masks; one pass with points and
    boxes and one with boxes and mask inputs (multimask) reach all of them.
    """
    g = torch.Generator().manual_seed(0)
    if family == "detector":
        out = model(torch.rand(2, 1, size, size, generator=g))
        outs = [out["boxes"], out["scores"]]
    elif family in ("classifier", "fusion"):  # two pixel sizes, for a model that reads them
        views = [torch.rand(2, 1, size, size, generator=g) for _ in range(1 if family == "classifier" else 2)]
        outs = list(model(*views, pixel_size_nm=torch.tensor([2.0, 500.0])).values())
    elif family == "segmenter":
        s = model.img_size
        boxes = [torch.tensor([[0.0, 0.0, s - 1.0, s - 1.0], [8.0, 16.0, 40.0, 30.0]]), torch.tensor([[4.0, 4.0, s / 2, s / 2]])]
        boxes = boxes[: 2 if s <= 256 else 1]  # one 1024 px image is plenty for Meta's sizes
        images = torch.rand(len(boxes), 1, s, s, generator=g)
        points = [
            (torch.tensor([[[10.0, 10.0], [20.0, 5.0], [0.0, 0.0]]]).expand(len(b), -1, -1), torch.tensor([[1, 0, -1]]).expand(len(b), -1))
            for b in boxes
        ]
        low = model.sam.prompt_encoder.mask_input_size
        masks = [torch.rand(len(b), 1, *low, generator=g) for b in boxes]
        first = model(images, boxes, points=points)
        second = model(images, boxes, mask_inputs=masks, multimask_output=True)
        outs = [t for o in first + second for t in (o.low_res_logits, o.iou)]
    else:
        raise AssertionError(family)
    return sum(o.float().mean() for o in outs), outs
