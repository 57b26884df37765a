"""Figures people look at instead of reading numbers."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402


def save_grid(images: torch.Tensor, path: str | Path, rows: int, title: str | None = None) -> None:
    """Square-ish grid of [-1, 1] single-channel images, written atomically as PNG."""
    images = images[: rows * rows].clamp(-1, 1)
    n, _, h, w = images.shape
    cols = rows
    rows = (n + cols - 1) // cols
    canvas = torch.full((rows * (h + 1) + 1, cols * (w + 1) + 1), -1.0)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = images[i, 0]
    fig, ax = plt.subplots(figsize=(cols * 0.45 + 0.2, rows * 0.45 + (0.5 if title else 0.2)), dpi=100)
    ax.imshow(canvas.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout(pad=0.1)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
