"""Loading the FP model and DDIM sampling with per-sample reproducible noise."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from pipeline.models.denoiser import as_denoiser
from pipeline.models.embedded import build_unet
from pipeline.models.local import diffusers_class, find_layout, load_scheduler, load_unet, unet_skeleton_from

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    from pipeline.config import ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub


def save_fp_model(unet: UNet2DModel, scheduler: DDPMScheduler, folder: Path) -> None:
    unet.save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")


def unet_skeleton(model: "ModelConfig") -> torch.nn.Module:
    """The UNet that ``model`` describes, without weights (meta device): its layer names and shapes."""
    if model.source == "local":
        return unet_skeleton_from(model.path)
    with torch.device("meta"):
        return build_unet(model.image_size, model.block_out_channels, model.layers_per_block, model.norm_num_groups)


def load_fp_model(folder: str | Path) -> tuple[torch.nn.Module, DDIMScheduler]:
    """The UNet (UNet2DModel or UNet2DConditionModel) and training scheduler of a model folder."""
    layout = find_layout(folder)
    return load_unet(layout), load_scheduler(layout)


def ddim_scheduler(train_scheduler: DDPMScheduler, steps: int) -> DDIMScheduler:
    scheduler = diffusers_class("DDIMScheduler").from_config(train_scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def sample_noise(seed: int, indices: torch.Tensor, steps: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Initial latent and the per-step DDIM noises of each sample, from a generator seeded by the
    sample's own index: a sample is the same whatever batch or rank produces it.

    Returns (B, steps + 1, *shape)."""
    noises = []
    for index in indices.tolist():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        noises.append(torch.randn((steps + 1, *shape), generator=generator))
    return torch.stack(noises)


@torch.no_grad()
def ddim_sample(
    model: torch.nn.Module,
    scheduler: DDIMScheduler,
    noise: torch.Tensor,
    eta: float,
    before_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    cond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Run DDIM from ``noise[:, 0]``; ``before_step(s, t, x_t)`` sees every model input (s = 0 is the
    noisiest step), which is where calibration records and per-step quantizer switches hook in.
    ``model`` is a :class:`~pipeline.models.denoiser.Denoiser` (or a bare unconditional UNet); ``cond``
    holds the samples' condition keys, guided with ``guidance_scale`` (classifier-free guidance)."""
    denoiser = as_denoiser(model)
    x = noise[:, 0]
    on_device = scheduler.timesteps.to(x.device)  # one copy up front, not a host-to-device copy per step
    for s, t in enumerate(scheduler.timesteps):
        if before_step is not None:
            before_step(s, t, x)
        eps = denoiser.guided(
            x, on_device[s], cond, guidance_scale
        ).float()  # float32 under autocast too: the update stays exact
        variance_noise = noise[:, s + 1] if eta > 0 else None
        x = scheduler.step(eps, t, x, eta=eta, variance_noise=variance_noise).prev_sample
    return x
