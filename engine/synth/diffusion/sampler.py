"""Sampling (image, mask) patches from a trained DefectDiffusion, deterministic per seed.

Every sample starts from its own noise, drawn from a `torch.Generator` seeded with that
sample's seed, and the samplers used are deterministic (DDIM with eta = 0, DPM-Solver++
multistep), so a seed and a condition fix the sample whatever else is generated. The
batch a sample is computed in is kept fixed by the job's plan as well: float sums in a
batched convolution may differ in the last bit between batch sizes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

SAMPLERS = ("ddim", "dpm")
MASK_THRESHOLD = 0.0  # the mask channel lives in [-1, 1]; above 0 is defect


def make_sampler(model, method: str = "ddim", steps: int = 25):
    """A diffusers scheduler for `model`'s training schedule, set to `steps` steps.

    method: "ddim" (DDIMScheduler, eta 0) or "dpm" (DPMSolverMultistepScheduler, dpmsolver++).
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; valid samplers: {', '.join(SAMPLERS)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    common = dict(num_train_timesteps=model.num_train_timesteps, beta_schedule=model.beta_schedule)
    if method == "ddim":
        scheduler = DDIMScheduler(**common, clip_sample=True)
    else:
        scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++")
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def sample_patches(model, conditions: Sequence[int], seeds: Sequence[int], *, steps: int = 25,
                   method: str = "ddim", device: str | torch.device | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Generate one (image, mask) patch per (condition index, seed) pair, as one batch.

    conditions: B condition indices (DefectDiffusion.condition_index); seeds: B ints.
    Returns (images B x S x S float32 in [0, 1], masks B x S x S bool: the mask channel
    above MASK_THRESHOLD).
    """
    if len(conditions) != len(seeds):
        raise ValueError(f"{len(conditions)} conditions for {len(seeds)} seeds")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    s, c = model.sample_size, model.channels
    noise = [torch.randn((c, s, s), generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    x = torch.stack(noise).to(device)
    cond = torch.as_tensor(list(conditions), dtype=torch.int64, device=device)
    scheduler = make_sampler(model, method, steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        eps = model(inp, t.expand(len(x)).to(device), cond)
        x = scheduler.step(eps, t, x).prev_sample
    x = x.float().cpu().clamp(-1.0, 1.0)
    images = ((x[:, 0] + 1.0) / 2.0).numpy().astype(np.float32)
    masks = (x[:, 1] > MASK_THRESHOLD).numpy()
    return images, masks
