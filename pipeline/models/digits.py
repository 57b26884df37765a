"""The embedded data set: scikit-learn's handwritten digits, shipped inside the package (no download)."""

from __future__ import annotations

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
