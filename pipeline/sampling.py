"""Batched sampling with a (possibly quantized) UNet, switching activation parameters per step."""

from __future__ import annotations

from pathlib import Path

import torch
import zarr
from tqdm import tqdm

from pipeline.accel import autocast, to_device
from pipeline.diffusion import ddim_sample, sample_noise
from pipeline.distributed import SINGLE, World, my_batches, plan_batches
from pipeline.quant.model import set_step


def image_shape(unet) -> tuple[int, int, int]:
    cfg = unet.config
    return (cfg.in_channels, cfg.sample_size, cfg.sample_size)


def create_sample_arrays(path: str | Path, names: list[str], num_samples: int, shape: tuple[int, ...], chunk: int, attrs: dict, world: World = SINGLE) -> zarr.Group:
    """Rank 0 creates one float32 array of ``num_samples`` images per name, in chunks of ``chunk``
    images (the unit a rank fills, see :func:`generate`); every rank gets the group to write into."""
    if world.main:
        root = zarr.open_group(str(path), mode="w")
        for name in names:
            root.create_array(name, shape=(num_samples, *shape), chunks=(min(chunk, num_samples), *shape), dtype="float32")
        root.attrs.update(attrs)
    world.barrier()
    return zarr.open_group(str(path), mode="r+")


def generate(unet, scheduler, out: zarr.Array, batch_size: int, eta: float, seed: int, device, desc: str, world: World = SINGLE, precision: str = "none") -> None:
    """Fill ``out`` (num_samples, C, H, W) with images; sample i depends only on (seed, i), not on the
    batch or rank that makes it. Each rank makes the batches of its chunks of ``out``.
    ``precision`` is the ``autocast`` param (none | bf16 | fp16)."""
    steps = len(scheduler.timesteps)
    batches = my_batches(plan_batches(out.shape[0], batch_size, out.chunks[0]), world)
    for start, stop in tqdm(batches, desc=desc, disable=not world.main):
        noise = to_device(sample_noise(seed, torch.arange(start, stop), steps, tuple(out.shape[1:])), device)
        with autocast(device, precision):
            images = ddim_sample(unet, scheduler, noise, eta, lambda s, t, x: set_step(unet, s))
        out[start:stop] = images.float().cpu().numpy()
