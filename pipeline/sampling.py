"""Batched sampling with a (possibly quantized) model, switching activation parameters per step."""

from __future__ import annotations

import torch
from tqdm import tqdm

from pipeline.conditioning import as_denoiser
from pipeline.diffusion import ddim_sample, sample_noise
from pipeline.quant.model import set_step


def generate(model, scheduler, num_samples: int, batch_size: int, eta: float, seed: int, device, desc: str,
             guidance_scale: float = 1.0) -> torch.Tensor:  # fmt: skip
    """``num_samples`` images (latents for a latent model); sample i depends only on (seed, i), not on
    the batch it lands in: its noise and its condition (class or prompt) come from its index."""
    denoiser = as_denoiser(model)
    shape = denoiser.sample_shape
    steps = len(scheduler.timesteps)
    out = []
    for start in tqdm(range(0, num_samples, batch_size), desc=desc):
        indices = torch.arange(start, min(start + batch_size, num_samples))
        noise = sample_noise(seed, indices, steps, shape).to(device)
        cond = denoiser.condition_keys(indices)
        cond = None if cond is None else cond.to(device)
        switch_step = lambda s, t, x: set_step(denoiser, s)  # noqa: E731  (per-step activation parameters)
        out.append(ddim_sample(denoiser, scheduler, noise, eta, switch_step, cond, guidance_scale).cpu())
    return torch.cat(out)
