"""The embedded data set: scikit-learn's handwritten digits, shipped inside the package (no download)."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F


def load_digits_images(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as float images in [-1, 1], shape (N, 1, S, S), and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.tensor(digits.target, dtype=torch.long)


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] single-channel images -> uint8 (N, 3, H, W), the input format torch-fidelity expects."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1).contiguous() if pixels.shape[1] == 1 else pixels


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to one pixel; a cheap augmentation for a 1797-image data set."""
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    size = images.shape[-1]
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    rows = (offsets[:, 0, None] + torch.arange(size)).view(-1, 1, size, 1).expand(-1, 1, size, size + 2 * max_shift)
    shifted = padded.gather(2, rows)
    cols = (offsets[:, 1, None] + torch.arange(size)).view(-1, 1, 1, size).expand(-1, 1, size, size)
    return shifted.gather(3, cols)
