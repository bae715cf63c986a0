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

from engine.errors import GrainflowError

SAMPLERS = ("ddim", "dpm")
MASK_THRESHOLD = 0.0  # the mask channel lives in [-1, 1]; above 0 is defect


class NonFiniteSampleError(GrainflowError):
    """The sampler's output holds NaN or inf: a pixel cast to an integer would be 0 and
    the mask empty, so nothing of it may be written."""


def max_steps(method: str, num_train_timesteps: int) -> int:
    """The most steps `method` takes on a schedule of `num_train_timesteps`: one per
    distinct timestep. DDIM: all of them. DPM-Solver++ spaces steps + 1 points over the
    timesteps and drops the last, so at num_train_timesteps steps two round to one
    timestep (and its update divides by zero)."""
    return num_train_timesteps - 1 if method == "dpm" else num_train_timesteps


def check_steps(method: str, steps: int, num_train_timesteps: int) -> None:
    """ValueError unless 1 <= steps <= max_steps: DDIM refuses more, and DPM-Solver++
    repeats timesteps and returns NaN samples."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    top = max_steps(method, num_train_timesteps)
    if steps > top:
        raise ValueError(f"steps must be at most {top} for the {method} sampler on the model's {num_train_timesteps} "
                         f"training timesteps (one step per distinct timestep), got {steps}")


def make_sampler(model, method: str = "ddim", steps: int = 25):
    """A diffusers scheduler for `model`'s training schedule, set to `steps` steps
    (1 to max_steps; check_steps).

    method: "ddim" (DDIMScheduler, eta 0) or "dpm" (DPMSolverMultistepScheduler, dpmsolver++).
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; valid samplers: {', '.join(SAMPLERS)}")
    check_steps(method, steps, model.num_train_timesteps)
    common = dict(num_train_timesteps=model.num_train_timesteps, beta_schedule=model.beta_schedule)
    if method == "ddim":
        scheduler = DDIMScheduler(**common, clip_sample=True)
    else:
        scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++")
    scheduler.set_timesteps(steps)
    if len(torch.unique(scheduler.timesteps)) != len(scheduler.timesteps):  # max_steps no longer holds
        raise ValueError(f"the {method} sampler repeats timesteps at {steps} steps; ask for fewer")
    return scheduler


@torch.no_grad()
def sample_patches(model, conditions: Sequence[int], seeds: Sequence[int], *, steps: int = 25,
                   method: str = "ddim", device: str | torch.device | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Generate one (image, mask) patch per (condition index, seed) pair, as one batch.

    conditions: B condition indices (DefectDiffusion.condition_index); seeds: B ints.
    Returns (images B x S x S float32 in [0, 1], masks B x S x S bool: the mask channel
    above MASK_THRESHOLD). NonFiniteSampleError when any sample holds NaN or inf.
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
    x = x.float().cpu()
    bad = (~torch.isfinite(x)).flatten(1).any(dim=1)
    if bad.any():  # clamp keeps NaN, and NaN cast to an integer pixel is 0: a blank sample
        raise NonFiniteSampleError(
            f"the {method} sampler produced NaN or inf in {int(bad.sum())} of {len(x)} samples "
            f"(conditions {[int(c) for c, b in zip(conditions, bad) if b]}, {steps} steps); nothing of them is written")
    x = x.clamp(-1.0, 1.0)
    images = ((x[:, 0] + 1.0) / 2.0).numpy().astype(np.float32)
    masks = (x[:, 1] > MASK_THRESHOLD).numpy()
    return images, masks
