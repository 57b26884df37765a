"""Batched sampling with a (possibly quantized) UNet, switching activation parameters per step, and the
samples store (one array per seed). Under torchrun each rank makes the samples of its chunks."""

from __future__ import annotations

from pathlib import Path

import torch
import zarr
from tqdm import tqdm

from pipeline.accel import autocast, to_device
from pipeline.diffusion import ddim_sample, sample_noise
from pipeline.distributed import SINGLE, World, my_batches, plan_batches, shared_store
from pipeline.io import open_store
from pipeline.quant.model import set_step


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


def write_samples(
    path: Path, unet, scheduler, seeds: list[int], num_samples: int, batch_size: int, eta: float, device, attrs: dict,
    desc: str, world: World = SINGLE, precision: str = "none",
) -> None:  # fmt: skip
    """Sample ``num_samples`` images per seed into a sealed Zarr store, one array per seed
    (``seed-<seed>``), written atomically. Arrays are chunked by ``batch_size`` images, the unit of
    work of a rank; with several ranks every rank makes this call (see :func:`generate`)."""
    cfg = unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    with shared_store(path, world) as tmp:
        if world.main:
            root = zarr.open_group(str(tmp), mode="w")
            for seed in seeds:
                root.create_array(f"seed-{seed}", shape=(num_samples, *shape), chunks=(min(batch_size, num_samples), *shape), dtype="float32")
            root.attrs.update({**attrs, "seeds": list(seeds)})
        world.barrier()
        root = zarr.open_group(str(tmp), mode="r+")
        for seed in seeds:
            generate(unet, scheduler, root[f"seed-{seed}"], batch_size, eta, seed, device, f"{desc} seed {seed}", world, precision)


def read_samples(path: Path, count: int | None = None) -> tuple[dict[int, torch.Tensor], dict]:
    """The samples of each seed (the first ``count`` of them, or all) and the store's attributes,
    checked against its manifest."""
    root = open_store(path, "samples store")
    return {seed: torch.from_numpy(root[f"seed-{seed}"][:count]) for seed in root.attrs["seeds"]}, dict(root.attrs)
