"""Loading the FP model and DDIM sampling with per-sample reproducible noise."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from pipeline.models import build_unet

if TYPE_CHECKING:
    from pipeline.config import ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but no CUDA device is available")
    return torch.device(name)


def save_fp_model(unet: UNet2DModel, scheduler: DDPMScheduler, folder: Path) -> None:
    unet.save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")


def unet_config(folder: str | Path) -> dict:
    """The UNet config of a diffusers model folder, after checking the folder has a UNet with weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder")
    config = folder / "unet" / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"{folder} has no unet/config.json: not a diffusers model folder with a UNet")
    if not any((folder / "unet").glob("*.safetensors")):
        raise FileNotFoundError(f"{folder}/unet has no .safetensors weights")
    return json.loads(config.read_text())


def unet_skeleton(model: "ModelConfig") -> torch.nn.Module:
    """The UNet that ``model`` describes, without weights (meta device): its layer names and shapes."""
    with torch.device("meta"):
        if model.source == "embedded":
            return build_unet(model.image_size, model.block_out_channels, model.layers_per_block, model.norm_num_groups)
        config = unet_config(model.path)
        classes = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
        name = config.get("_class_name")
        if name not in classes:
            raise ValueError(f"{model.path}/unet/config.json is a {name}; supported: {', '.join(classes)}")
        return classes[name].from_config(config)


def load_fp_model(folder: str | Path) -> tuple[UNet2DModel, DDPMScheduler]:
    folder = Path(folder)
    unet_config(folder)
    unet = UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False).eval().requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    return unet, scheduler


def ddim_scheduler(train_scheduler: DDPMScheduler, steps: int) -> DDIMScheduler:
    scheduler = DDIMScheduler.from_config(train_scheduler.config)
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
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    noise: torch.Tensor,
    eta: float,
    before_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run DDIM from ``noise[:, 0]``; ``before_step(s, t, x_t)`` sees every model input (s = 0 is the
    noisiest step), which is where calibration records and per-step quantizer switches hook in."""
    x = noise[:, 0]
    on_device = scheduler.timesteps.to(x.device)  # one copy up front, not a host-to-device copy per step
    for s, t in enumerate(scheduler.timesteps):
        if before_step is not None:
            before_step(s, t, x)
        eps = unet(x, on_device[s]).sample.float()  # float32 under autocast too: the update stays exact
        variance_noise = noise[:, s + 1] if eta > 0 else None
        x = scheduler.step(eps, t, x, eta=eta, variance_noise=variance_noise).prev_sample
    return x
