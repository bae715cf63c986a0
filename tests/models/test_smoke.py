"""Every registered config builds, trains a step and round-trips through a checkpoint.

Registry-driven (timm's tests/test_models.py): adding a YAML config adds its tests.
Configs marked `large` (Meta's SAM: a fixed 1024 px encoder input) are `slow`.
"""

from __future__ import annotations

import psutil
import pytest
import torch

import engine.models as M

from .conftest import smoke_loss


def family_loss(model, family: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """smoke_loss, plus the diffusion family: its forward takes noisy (image, mask)
    patches, timesteps and condition indices rather than tiles."""
    if family != "diffusion":
        return smoke_loss(model, family)
    g = torch.Generator().manual_seed(0)
    s = model.sample_size
    noisy = torch.randn(2, model.channels, s, s, generator=g)
    t = torch.tensor([0, model.num_train_timesteps - 1])
    cond = torch.tensor([0, model.num_conditions - 1])
    out = model(noisy, t, cond)
    assert out.shape == noisy.shape
    return out.float().pow(2).mean(), [out]


def _params():
    for qualified in M.list_models():
        family, name = qualified.split("/")
        marks = [pytest.mark.slow] if M.get_config(family, name).large else []
        yield pytest.param((family, name), id=qualified, marks=marks)


@pytest.fixture(scope="module", params=list(_params()))
def built(request):
    """(family, name, model): each config built once for all tests of this module."""
    family, name = request.param
    torch.manual_seed(0)
    return family, name, M.create_model(family, name)


# Peak host memory (GiB) of a CPU forward/backward where it is large: Meta's SAM runs
# global attention over 64 x 64 tokens (measured: vit_b 17 GiB; l, h scaled by size).
SMOKE_MEMORY_GIB = {"segmenter/sam_vit_b": 18, "segmenter/sam_vit_l": 36, "segmenter/sam_vit_h": 56}


class TestEveryConfig:
    def test_forward_backward(self, built):
        family, name, model = built
        need = SMOKE_MEMORY_GIB.get(f"{family}/{name}", 0)
        if need and psutil.virtual_memory().available < need * 2**30:
            pytest.skip(f"forward/backward of {family}/{name} on CPU needs about {need} GiB free memory")
        model.train()
        model.zero_grad(set_to_none=True)
        loss, outs = family_loss(model, family)
        for out in outs:
            assert torch.isfinite(out).all(), f"{family}/{name}: non-finite output"
        loss.backward()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert trainable
        missing = [n for n, p in trainable if p.grad is None]
        assert not missing, f"{family}/{name}: no gradient for {missing[:10]}"
        bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
        assert not bad, f"{family}/{name}: non-finite gradient for {bad[:10]}"

    def test_checkpoint_round_trip(self, built, tmp_path):
        family, name, model = built
        path = tmp_path / f"{name}.safetensors"
        digest = M.save_checkpoint(model, path)
        assert digest == M.sha256_file(path)
        loaded = M.load_model(path, expected_sha256=digest)
        assert type(loaded) is type(model)
        assert loaded.config == model.config
        want, got = model.state_dict(), loaded.state_dict()
        assert want.keys() == got.keys()
        for key in want:
            assert want[key].dtype == got[key].dtype, key
            assert torch.equal(want[key], got[key]), f"{family}/{name}: {key} differs after round trip"
