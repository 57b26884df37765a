"""Batched sampling with a (possibly quantized) model, switching activation parameters per step, and the
samples store (one array per seed). Under torchrun each rank makes the samples of its chunks."""

from __future__ import annotations

from pathlib import Path

import torch
import zarr
from tqdm import tqdm

from pipeline.infra.device import autocast, host, to_device
from pipeline.infra.distributed import SINGLE, World, my_batches, plan_batches, shared_store
from pipeline.infra.storage import create_array, open_store
from pipeline.models.denoiser import as_denoiser
from pipeline.models.diffusion import ddim_sample, sample_noise
from pipeline.quant.model import set_step


def sample_batch(
    model,
    scheduler,
    indices: torch.Tensor,
    eta: float,
    seed: int,
    device,
    guidance_scale: float = 1.0,
    precision: str = "none",
) -> torch.Tensor:
    """The samples (latents for a latent model) with these indices; sample i depends only on (seed, i),
    not on the batch or rank that makes it: its noise and its condition (class or prompt) come from
    its index. ``precision`` is the ``autocast`` param (none | bf16 | fp16)."""
    denoiser = as_denoiser(model)
    noise = to_device(sample_noise(seed, indices, len(scheduler.timesteps), denoiser.sample_shape), device)
    cond = denoiser.condition_keys(indices)
    cond = None if cond is None else to_device(cond, device)
    with autocast(device, precision):
        return ddim_sample(
            denoiser, scheduler, noise, eta, lambda s, t, x: set_step(denoiser, s), cond, guidance_scale
        ).float()


def generate(
    model,
    scheduler,
    num_samples: int,
    batch_size: int,
    eta: float,
    seed: int,
    device,
    desc: str,
    guidance_scale: float = 1.0,
    precision: str = "none",
) -> torch.Tensor:
    """``num_samples`` samples in memory (see :func:`sample_batch`)."""
    batches = [torch.arange(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]
    return torch.cat(
        [
            host(sample_batch(model, scheduler, b, eta, seed, device, guidance_scale, precision))
            for b in tqdm(batches, desc=desc)
        ]
    )


def fill_samples(
    model,
    scheduler,
    out: zarr.Array,
    batch_size: int,
    eta: float,
    seed: int,
    device,
    desc: str,
    world: World = SINGLE,
    precision: str = "none",
    guidance_scale: float = 1.0,
    decode=None,
) -> None:
    """Fill ``out`` (num_samples, C, H, W) with images, decoded to pixels by ``decode`` for a latent
    model. Each rank makes the batches of its chunks of ``out``."""
    batches = my_batches(plan_batches(out.shape[0], batch_size, out.chunks[0]), world)
    for start, stop in tqdm(batches, desc=desc, disable=not world.main):
        images = sample_batch(model, scheduler, torch.arange(start, stop), eta, seed, device, guidance_scale, precision)
        out[start:stop] = host(images if decode is None else decode(images)).numpy()


def write_samples(
    path: Path,
    model,
    scheduler,
    seeds: list[int],
    num_samples: int,
    batch_size: int,
    eta: float,
    device,
    attrs: dict,
    desc: str,
    world: World = SINGLE,
    precision: str = "none",
    guidance_scale: float = 1.0,
    decode=None,
) -> None:
    """Sample ``num_samples`` images per seed into a sealed Zarr store, one array per seed
    (``seed-<seed>``), written atomically. Arrays are chunked by ``batch_size`` images, the unit of
    work of a rank; with several ranks every rank makes this call (see :func:`fill_samples`)."""
    latent_shape = as_denoiser(model).sample_shape
    shape = latent_shape if decode is None else tuple(decode(torch.zeros(1, *latent_shape)).shape[1:])
    with shared_store(path, world) as tmp:
        if world.main:
            root = zarr.open_group(str(tmp), mode="w")
            for seed in seeds:
                create_array(
                    root,
                    f"seed-{seed}",
                    shape=(num_samples, *shape),
                    chunks=(min(batch_size, num_samples), *shape),
                    dtype="float32",
                )
            root.attrs.update({**attrs, "sample_seeds": list(seeds)})
        world.barrier()
        root = zarr.open_group(str(tmp), mode="r+")
        for seed in seeds:
            fill_samples(
                model,
                scheduler,
                root[f"seed-{seed}"],
                batch_size,
                eta,
                seed,
                device,
                f"{desc} seed {seed}",
                world,
                precision,
                guidance_scale,
                decode,
            )


def read_samples(path: Path, count: int | None = None) -> tuple[dict[int, torch.Tensor], dict]:
    """The samples of each seed (the first ``count`` of them, or all) and the store's attributes,
    checked against its manifest."""
    root = open_store(path, "samples store")
    return {seed: torch.from_numpy(root[f"seed-{seed}"][:count]) for seed in root.attrs["sample_seeds"]}, dict(
        root.attrs
    )
