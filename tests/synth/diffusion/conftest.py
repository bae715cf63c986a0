"""A tiny diffusion checkpoint, trained a few steps here (no Ray), for the synthesis tests."""

from __future__ import annotations

import pytest
import torch

from engine.models import create_diffusion, save_checkpoint
from engine.models.diffusion import diffusion_loss


# Grey levels as training records them (engine.synth.diffusion.intensity): one condition
# of its own, one (material, modality), and per modality.
INTENSITY = {"crack.ferritic_steel.SEM": [0.30, 0.50], "ferritic_steel.SEM": [0.25, 0.55], "SEM": [0.2, 0.6],
             "TEM": [0.1, 0.7], "optical": [0.1, 0.9]}
# Pixel sizes keyed alike (engine.synth.diffusion.calibration): the crack crops were read
# four times coarser than the modality's typical crop (large defects, coarse levels).
PIXEL_SIZE_NM = {"crack.ferritic_steel.SEM": 10.0, "SEM": 2.5, "TEM": 0.1, "optical": 250.0}
# What training saw: the job tests' request, and a pore in SEM only.
TRAINED = [f"{c}.ferritic_steel.{m}" for c in ("crack", "void") for m in ("SEM", "optical")] + [
    "pore.ferritic_steel.SEM"]


def train_tiny(steps: int = 3, seed: int = 0):
    """ddpm_tiny after `steps` AdamW steps on random (image, mask) patches."""
    torch.manual_seed(seed)
    model = create_diffusion("ddpm_tiny", pixel_size_nm=PIXEL_SIZE_NM, intensity_range=INTENSITY,
                             trained_conditions=TRAINED)
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
