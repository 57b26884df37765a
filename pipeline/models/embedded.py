"""The embedded default: a tiny diffusers UNet and a digit classifier, both trained here."""

from __future__ import annotations

import copy
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from tqdm import tqdm


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_unet(image_size: int, block_out_channels, layers_per_block: int, norm_num_groups: int) -> UNet2DModel:
    """ResNet blocks (1x1-conv shortcuts where channels change, and in every decoder block, which sees
    ``concat(h, skip)``), one attention level, down and up blocks."""
    levels = len(block_out_channels)
    attn_level = min(1, levels - 1)
    down = tuple("AttnDownBlock2D" if i == attn_level else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if i == levels - 1 - attn_level else "UpBlock2D" for i in range(levels))
    return UNet2DModel(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=norm_num_groups,
        attention_head_dim=block_out_channels[attn_level],
    )


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
        x0 = _random_shift(images[idx], generator)
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


def _random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to one pixel; a cheap augmentation for a 1797-image data set."""
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    size = images.shape[-1]
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    rows = (offsets[:, 0, None] + torch.arange(size)).view(-1, 1, size, 1).expand(-1, 1, size, size + 2 * max_shift)
    shifted = padded.gather(2, rows)
    cols = (offsets[:, 1, None] + torch.arange(size)).view(-1, 1, 1, size).expand(-1, 1, size, size)
    return shifted.gather(3, cols)


class DigitClassifier(nn.Module):
    """Small CNN; its penultimate activations are the feature space of FID (digit-classifier features)."""

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, self.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, 10)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(images)
        return features, self.head(features)


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int, lr: float, generator: torch.Generator
) -> tuple[DigitClassifier, float]:
    """Train on a fixed 80 % split; return the model and its accuracy on the held-out 20 %."""
    order = torch.randperm(len(images), generator=generator)
    n_train = int(0.8 * len(images))
    train_idx, test_idx = order[:n_train], order[n_train:]
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(steps), desc="train classifier", mininterval=2):
        idx = train_idx[torch.randint(0, n_train, (batch_size,), generator=generator)]
        x = _random_shift(images[idx], generator)
        loss = F.cross_entropy(model(x)[1], labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test_idx])[1].argmax(1) == labels[test_idx]).float().mean().item()
    return model, accuracy
