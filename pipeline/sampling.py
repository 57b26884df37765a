"""Batched sampling with a (possibly quantized) UNet, switching activation parameters per step."""

from __future__ import annotations

import torch
from tqdm import tqdm

from pipeline.diffusion import ddim_sample, sample_noise
from pipeline.quant.model import set_step


def generate(unet, scheduler, num_samples: int, batch_size: int, eta: float, seed: int, device, desc: str) -> torch.Tensor:
    """``num_samples`` images; sample i depends only on (seed, i), not on the batch it lands in."""
    cfg = unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    steps = len(scheduler.timesteps)
    out = []
    for start in tqdm(range(0, num_samples, batch_size), desc=desc):
        indices = torch.arange(start, min(start + batch_size, num_samples))
        noise = sample_noise(seed, indices, steps, shape).to(device)
        out.append(ddim_sample(unet, scheduler, noise, eta, lambda s, t, x: set_step(unet, s)).cpu())
    return torch.cat(out)
