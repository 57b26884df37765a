"""Training the embedded default on scikit-learn's digits (DDPM, epsilon prediction, EMA weights)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.models.digits import load_digits_images, random_shift, seed_everything
from pipeline.models.embedded import build_unet
from pipeline.models.local import diffusers_class

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DModel

    from pipeline.config import ModelConfig


def train_embedded(model: ModelConfig, seed: int) -> tuple[UNet2DModel, DDPMScheduler, list[float]]:
    """The embedded default trained as ``model`` says; returns (EMA UNet, DDPM scheduler, loss curve)."""
    generator = seed_everything(seed)
    images, _ = load_digits_images(model.image_size)
    unet = build_unet(model.image_size, model.block_out_channels, model.layers_per_block, model.norm_num_groups)
    scheduler = diffusers_class("DDPMScheduler")(num_train_timesteps=model.num_train_timesteps, beta_schedule="linear")
    ema, losses = train_unet(
        unet, scheduler, images, model.train_steps, model.batch_size, model.lr, model.ema_decay, generator
    )
    return ema, scheduler, losses


def train_unet(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    ema_decay: float,
    generator: torch.Generator,
) -> tuple[UNet2DModel, list[float]]:
    """DDPM epsilon-prediction training; returns the EMA copy of the weights and the loss curve."""
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    alphas_cumprod = scheduler.alphas_cumprod
    losses = []
    unet.train()
    for _ in (bar := tqdm(range(steps), desc="train unet", mininterval=2)):
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        x0 = random_shift(images[idx], generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - ema_decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
    return ema.eval(), losses
