"""Figures people look at instead of reading numbers."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.infra.storage import atomic_path  # noqa: E402


def save_figure(fig, path: str | Path) -> None:
    """Write a figure as PNG, atomically, and free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def save_grid(images: torch.Tensor, path: str | Path, rows: int, title: str | None = None) -> None:
    """Square-ish grid of [-1, 1] single-channel or RGB images, written atomically as PNG."""
    images = images[: rows * rows].clamp(-1, 1)
    n, channels, h, w = images.shape
    cols = rows
    rows = (n + cols - 1) // cols
    canvas = torch.full((channels, rows * (h + 1) + 1, cols * (w + 1) + 1), -1.0)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = images[i]
    fig, ax = plt.subplots(figsize=(cols * 0.45 + 0.2, rows * 0.45 + (0.5 if title else 0.2)), dpi=100)
    if channels == 1:
        ax.imshow(canvas[0].numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    else:
        ax.imshow(((canvas.permute(1, 2, 0) + 1) / 2).numpy(), interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout(pad=0.1)
    save_figure(fig, path)


def plot_channel_ranges(stats: dict, layers: tuple[str, str], step: int, path: str | Path) -> None:
    """Per-input-channel [min, max] bars of two layers at one step, side by side: the outlier-heavy
    input PTS is for next to an ordinary one ("dissecting outliers")."""
    fig, axes = plt.subplots(1, len(layers), figsize=(6 * len(layers), 3.6), dpi=100)
    for ax, layer in zip(axes, layers):
        lo, hi = stats[layer]["min"][step], stats[layer]["max"][step]
        channels = range(len(lo))
        ax.bar(channels, hi - lo, bottom=lo, width=1.0, color="tab:blue", linewidth=0)
        ax.axhline(0, color="black", linewidth=0.5)
        ratio = stats[layer]["outlier_ratio"][step]
        ax.set_title(f"{layer}\nstep {step}, outlier ratio {ratio:.1f}", fontsize=9)
        ax.set_xlabel("input channel")
        ax.set_xlim(-0.5, len(lo) - 0.5)
    axes[0].set_ylabel("activation range [min, max]")
    fig.tight_layout()
    save_figure(fig, path)


def plot_outlier_heatmap(stats: dict, path: str | Path) -> None:
    """Layers x steps heat map of the outlier ratio (max / median channel range), log colour scale."""
    from matplotlib.colors import LogNorm

    layers = list(stats)
    ratios = np.stack([stats[layer]["outlier_ratio"] for layer in layers])
    steps = ratios.shape[1]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * steps + 4.5), 0.16 * len(layers) + 1.4), dpi=100)
    image = ax.imshow(
        ratios,
        aspect="auto",
        cmap="magma",
        norm=LogNorm(vmin=1.0, vmax=max(float(ratios.max()), 1.01)),
        interpolation="nearest",
    )
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xticks(range(steps), [str(s) for s in range(steps)], fontsize=7)
    ax.set_xlabel("sampling step index (0 = noisiest)")
    fig.colorbar(image, ax=ax, label="outlier ratio (max / median channel range)")
    ax.set_title("Inter-channel outliers of layer inputs", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
