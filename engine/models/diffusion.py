"""Conditional diffusion model of defect patches: image and defect mask generated together.

A diffusers `UNet2DModel` with two channels (channel 0: the micrograph patch, channel 1:
the defect's binary mask, both scaled to [-1, 1]) denoises both at once, so every sample
it generates comes with its label. It is conditioned on (defect class, material,
modality) through one class embedding whose index combines the three
(`condition_index`): the embedding table has len(classes) x len(materials) x
len(modalities) rows, which for 5 x 12 x 3 = 180 rows is small and lets every
combination learn its own look. Only the combinations the training crops show are
learnt; the config records their keys (`trained_conditions`) and synthesis asks for
those only (engine.synth.diffusion.conditions).

Training follows DDPM (epsilon prediction, `DDPMScheduler` with the config's
`num_train_timesteps` and `beta_schedule`); sampling uses DDIM or DPM-Solver++
(engine.synth.diffusion.sampler). Nothing is fetched: the UNet is built from the config.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

DEFAULT_MODALITIES = ("SEM", "TEM", "optical")
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000


class DefectDiffusion(nn.Module):
    """UNet2DModel over (image, mask) patches with a combined condition embedding.

    sample_size: patch side in pixels; defect_classes / materials / modalities: the
    conditioning vocabularies, in index order (recorded in the config, so a checkpoint
    keeps its order); num_train_timesteps, beta_schedule: the DDPM noise schedule it is
    trained under. What training records of its crops (engine.training.tasks
    DiffusionTask.config_overrides; all empty or None in a model never trained):
    pixel_size_nm: {key: nm}, the median pixel size of the training crops at the
    pyramid level each was read at (large defects are read at coarse levels), per
    condition key with `<material>.<modality>` and `<modality>` fallbacks
    (engine.synth.diffusion.calibration), which generated samples are written with;
    models trained before it was recorded per condition hold modality keys only.
    intensity_range: {key: [p1, p99]} of the training crops as fractions of their
    dtype's full scale, keyed alike, the grey levels generated samples are written with
    (engine.synth.diffusion.intensity; empty in models trained before it was recorded).
    trained_conditions: sorted keys (`pore.ferritic_steel.SEM`) of the conditions the
    training crops teach; None in models saved before it was recorded.
    """

    channels = 2  # image, mask

    def __init__(self, unet: nn.Module, *, sample_size: int, defect_classes: Sequence[str], materials: Sequence[str],
                 modalities: Sequence[str], num_train_timesteps: int, beta_schedule: str,
                 pixel_size_nm: dict[str, float] | None = None,
                 intensity_range: dict[str, list[float]] | None = None,
                 trained_conditions: Sequence[str] | None = None):
        super().__init__()
        self.unet = unet
        self.sample_size = int(sample_size)
        self.defect_classes = tuple(defect_classes)
        self.materials = tuple(materials)
        self.modalities = tuple(modalities)
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_schedule = str(beta_schedule)
        self.pixel_size_nm = dict(pixel_size_nm or {})
        self.intensity_range = {k: [float(a), float(b)] for k, (a, b) in (intensity_range or {}).items()}
        self.trained_conditions = None if trained_conditions is None else tuple(sorted(trained_conditions))

    @property
    def num_conditions(self) -> int:
        return len(self.defect_classes) * len(self.materials) * len(self.modalities)

    def condition_index(self, defect_class: int | torch.Tensor, material: int | torch.Tensor,
                        modality: int | torch.Tensor) -> int | torch.Tensor:
        """Row of the class embedding for (class, material, modality) indices (ints or
        int64 tensors of one shape): class-major, then material, then modality."""
        return (defect_class * len(self.materials) + material) * len(self.modalities) + modality

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """sample: B x 2 x S x S float32 noisy (image, mask) in about [-1, 1]; timesteps: B
        int64 in [0, num_train_timesteps); condition: B int64 from `condition_index`.

        Returns B x 2 x S x S float32: the predicted noise (epsilon).
        """
        return self.unet(sample, timesteps, class_labels=condition).sample

    def noise_scheduler(self):
        """The DDPM schedule the model is trained under (diffusers DDPMScheduler)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule)


def build_unet_diffusion(
    sample_size: int,
    block_out_channels: list[int],
    layers_per_block: int,
    attention: list[bool],
    defect_classes: list[str],
    materials: list[str],
    modalities: list[str] | None = None,
    norm_num_groups: int = 8,
    attention_head_dim: int = 8,
    num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS,
    beta_schedule: str = "squaredcos_cap_v2",
    pixel_size_nm: dict[str, float] | None = None,
    intensity_range: dict[str, list[float]] | None = None,
    trained_conditions: list[str] | None = None,
) -> DefectDiffusion:
    """A DefectDiffusion from plain arguments (random init; nothing downloaded).

    block_out_channels: channels per resolution level (each level halves the side, so
    sample_size must be divisible by 2 ** (levels - 1)); attention: per level, whether
    its blocks carry self-attention (AttnDown/AttnUp blocks; costly on CPU at high
    resolution); norm_num_groups must divide every channel count.
    """
    from diffusers import UNet2DModel

    modalities = list(modalities or DEFAULT_MODALITIES)
    levels = len(block_out_channels)
    if len(attention) != levels:
        raise ValueError(f"attention has {len(attention)} entries for {levels} levels of block_out_channels")
    if sample_size % 2 ** (levels - 1):
        raise ValueError(f"sample_size {sample_size} is not divisible by 2**{levels - 1} ({levels} levels)")
    if trained_conditions is not None:  # a key outside the vocabulary names no embedding row
        known = {f"{c}.{m}.{d}" for c in defect_classes for m in materials for d in modalities}
        unknown = sorted(set(trained_conditions) - known)
        if unknown:
            raise ValueError(f"trained_conditions {unknown} are not class.material.modality keys of the vocabulary")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    unet = UNet2DModel(
        sample_size=sample_size, in_channels=DefectDiffusion.channels, out_channels=DefectDiffusion.channels,
        down_block_types=down, up_block_types=up, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, norm_num_groups=norm_num_groups, attention_head_dim=attention_head_dim,
        num_class_embeds=len(defect_classes) * len(materials) * len(modalities),
    )
    return DefectDiffusion(unet, sample_size=sample_size, defect_classes=defect_classes, materials=materials,
                           modalities=modalities, num_train_timesteps=num_train_timesteps,
                           beta_schedule=beta_schedule, pixel_size_nm=pixel_size_nm,
                           intensity_range=intensity_range, trained_conditions=trained_conditions)


def diffusion_loss(model: nn.Module, clean: torch.Tensor, condition: torch.Tensor, *,
                   generator: torch.Generator | None = None, scheduler: Any = None) -> torch.Tensor:
    """The DDPM training loss: mean squared error between the noise added at a random
    timestep and the model's prediction of it.

    clean: B x 2 x S x S float32 in [-1, 1]; condition: B int64. `model` may be DDP-wrapped.
    Noise and timesteps are drawn on the CPU from `generator` (None: torch's global RNG),
    so a seed gives the same draws on any device, then moved to clean's device.
    """
    bare = getattr(model, "module", model)
    scheduler = scheduler or bare.noise_scheduler()
    b = clean.shape[0]
    noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype).to(clean.device)
    t = torch.randint(0, bare.num_train_timesteps, (b,), generator=generator).to(clean.device)
    noisy = scheduler.add_noise(clean, noise, t)
    return torch.nn.functional.mse_loss(model(noisy, t, condition), noise)


BUILDERS = {"unet": build_unet_diffusion}
