"""channels_last for the convolutional families (engine.models.layout): the same answers
as the layout the model was built in, and the same checkpoint file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.models import create_model, save_checkpoint
from engine.models.layout import prefer_channels_last


def _inputs(family: str):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 96, 96, generator=g)
    return (x, torch.rand(2, 1, 96, 96, generator=g)) if family == "fusion" else (x,)


def _outputs(model, family, args):
    with torch.inference_mode():
        if family == "detector":
            dets = model.predict(args[0][:, 0].numpy(), conf=0.0, max_det=5)
            return {"scores": torch.as_tensor(np.concatenate([d.scores for d in dets]))}
        return {k: v for k, v in model(*args).items() if torch.is_tensor(v)}


@pytest.mark.parametrize("family, name", [("detector", "yolov8n_tiny"), ("classifier", "resnet10t"),
                                          ("fusion", "fusion_tiny")])
def test_channels_last_answers_and_saves_as_built(family, name, tmp_path):
    torch.manual_seed(0)
    model = create_model(family, name).eval()
    args = _inputs(family)
    before = _outputs(model, family, args)
    plain_sha = save_checkpoint(model, tmp_path / "nchw.safetensors")
    assert prefer_channels_last(model, family) is model
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    after = _outputs(model, family, args)
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-4, atol=1e-5, msg=k)
    assert save_checkpoint(model, tmp_path / "nhwc.safetensors") == plain_sha  # the file does not know the layout
