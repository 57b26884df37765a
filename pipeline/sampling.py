"""Batched sampling with a (possibly quantized) model, switching activation parameters per step, and the
samples store (one array per seed)."""

from __future__ import annotations

from pathlib import Path

import torch
import zarr
from tqdm import tqdm

from pipeline.conditioning import as_denoiser
from pipeline.diffusion import ddim_sample, sample_noise
from pipeline.io import atomic_store, open_store
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


def write_samples(path: Path, runs: dict[int, torch.Tensor], attrs: dict) -> None:
    """One array per seed (``seed-<seed>``) in a sealed Zarr store, written atomically."""
    with atomic_store(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        for seed, images in runs.items():
            root.create_array(f"seed-{seed}", data=images.numpy(), chunks=(min(256, len(images)), *images.shape[1:]))
        root.attrs.update({**attrs, "seeds": list(runs)})


def read_samples(path: Path) -> tuple[dict[int, torch.Tensor], dict]:
    """The samples of each seed and the store's attributes, checked against its manifest."""
    root = open_store(path, "samples store")
    return {seed: torch.from_numpy(root[f"seed-{seed}"][:]) for seed in root.attrs["seeds"]}, dict(root.attrs)
