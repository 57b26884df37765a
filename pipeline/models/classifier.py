"""The digit classifier whose penultimate features FID uses on the embedded default, trained here."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.models.digits import random_shift


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
        x = random_shift(images[idx], generator)
        loss = F.cross_entropy(model(x)[1], labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test_idx])[1].argmax(1) == labels[test_idx]).float().mean().item()
    return model, accuracy
