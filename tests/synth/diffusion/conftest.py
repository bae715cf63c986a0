"""A tiny diffusion checkpoint, trained a few steps here (no Ray), for the synthesis tests."""

from __future__ import annotations

import pytest
import torch

from engine.models import create_diffusion, save_checkpoint
from engine.models.diffusion import diffusion_loss


def train_tiny(steps: int = 3, seed: int = 0):
    """ddpm_tiny after `steps` AdamW steps on random (image, mask) patches."""
    torch.manual_seed(seed)
    model = create_diffusion("ddpm_tiny", pixel_size_nm={"SEM": 2.5, "TEM": 0.1, "optical": 250.0})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        clean = torch.rand(4, 2, 32, 32, generator=g) * 2 - 1
        cond = torch.randint(0, model.num_conditions, (4,), generator=g)
        loss = diffusion_loss(model, clean, cond, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def diffusion_checkpoint(tmp_path_factory):
    """(path, sha256) of a tiny trained diffusion model saved as safetensors."""
    path = tmp_path_factory.mktemp("diffusion") / "ddpm_tiny.safetensors"
    digest = save_checkpoint(train_tiny(), path)
    return path, digest
